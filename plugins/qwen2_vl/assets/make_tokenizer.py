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

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

VOCAB_SIZE = 320
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which the ByteLevel pre-tokenizer uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def main() -> None:
    byte_char = bytes_to_unicode()
    vocab = {byte_char[b]: b for b in range(256)}
    for t in SPECIAL:
        vocab[t] = len(vocab)
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[f"<|vlmhost_unused_{i}|>"] = i
    assert len(vocab) == VOCAB_SIZE and sorted(vocab.values()) == list(range(VOCAB_SIZE))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL])
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])

    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Free OCR.<|im_end|>\n"
    enc = tok.encode(text)
    assert enc.ids[:3] == [257, ord("u"), ord("s")] and enc.ids[6:10] == [259, 262, 262, 260], enc.ids
    assert enc.ids[-2:] == [258, ord("\n")], enc.ids
    assert tok.decode(tok.encode("Grüße 42").ids) == "Grüße 42"

    out = Path(__file__).with_name("byte_tokenizer.json")
    tok.save(str(out), pretty=True)
    print(f"wrote {out} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
