"""Writes byte_tokenizer.json, the tokenizer of `vlmhost init --plugin qwen2_vl` checkpoints.

A byte-level BPE without merges (every UTF-8 byte one token, so any text is covered) with
Qwen2-VL's special tokens, in Qwen2's order after the bytes:

    byte b -> b, <|endoftext|> 256, <|im_start|> 257, <|im_end|> 258, <|vision_start|> 259,
    <|vision_end|> 260, <|vision_pad|> 261, <|image_pad|> 262, <|video_pad|> 263,
    <|vlmhost_unused_N|> 264..319 (the vocabulary is 320, a multiple of 64).

No BOS is added (Qwen2's post-processor adds nothing). Run it with the project's virtualenv
(tokenizers 0.23):

    .venv/bin/python plugins/qwen2_vl/assets/make_tokenizer.py

The output is deterministic; plugins/qwen2_vl/src/init.rs embeds it with include_str!.
"""

import sys
from pathlib import Path

from tokenizers import processors

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "plugin-sdk" / "assets"))
from byte_level import byte_level_bpe, bytes_to_unicode, save  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def main() -> None:
    byte_char = bytes_to_unicode()
    vocab = {byte_char[b]: b for b in range(256)}
    for t in SPECIAL:
        vocab[t] = len(vocab)
    post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
    tok = byte_level_bpe(vocab, SPECIAL, post_processor)

    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Free OCR.<|im_end|>\n"
    enc = tok.encode(text)
    assert enc.ids[:3] == [257, ord("u"), ord("s")] and enc.ids[6:10] == [259, 262, 262, 260], enc.ids
    assert enc.ids[-2:] == [258, ord("\n")], enc.ids
    assert tok.decode(tok.encode("Grüße 42").ids) == "Grüße 42"

    save(tok, __file__)


if __name__ == "__main__":
    main()
