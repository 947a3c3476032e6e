"""Writes byte_tokenizer.json, the tokenizer of `vlmhost init --plugin llava` checkpoints.

A byte-level BPE without merges (every UTF-8 byte one token, so any text is covered) with
LLaVA-1.5's (Llama's) special tokens and its `<s>` post-processor:

    <unk> 0, <s> 1, </s> 2, byte b -> b + 3, <image> 259, <pad> 260,
    <|vlmhost_unused_N|> 261..319 (the vocabulary is 320, a multiple of 64).

Run it with the project's virtualenv (tokenizers 0.23):

    .venv/bin/python plugins/llava/assets/make_tokenizer.py

The output is deterministic; plugins/llava/src/init.rs embeds it with include_str!.
"""

import sys
from pathlib import Path

from tokenizers import processors

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "plugin-sdk" / "assets"))
from byte_level import byte_level_bpe, bytes_to_unicode, save  # noqa: E402


def main() -> None:
    byte_char = bytes_to_unicode()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[byte_char[b]] = b + 3
    vocab["<image>"] = 259
    vocab["<pad>"] = 260
    post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    tok = byte_level_bpe(vocab, ["<unk>", "<s>", "</s>", "<image>", "<pad>"], post_processor)

    # Any text is covered, one token per byte; the special tokens are single tokens.
    text = "USER: <image><image>\nFree OCR. ASSISTANT: Grüße 42</s>"
    enc = tok.encode(text)
    assert enc.ids[0] == 1 and enc.ids[7:9] == [259, 259] and enc.ids[-1] == 2, enc.ids
    assert tok.decode(enc.ids) == "USER: \nFree OCR. ASSISTANT: Grüße 42", tok.decode(enc.ids)

    save(tok, __file__)


if __name__ == "__main__":
    main()
