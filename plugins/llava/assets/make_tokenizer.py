"""Writes byte_tokenizer.json, the tokenizer of `vlmhost init --plugin llava` checkpoints.

A byte-level BPE without merges (every UTF-8 byte one token, so any text is covered) with
LLaVA-1.5's (Llama's) special tokens and its `<s>` post-processor:

    <unk> 0, <s> 1, </s> 2, byte b -> b + 3, <image> 259, <pad> 260,
    <|vlmhost_unused_N|> 261..319 (the vocabulary is 320, a multiple of 64).

Run it with the project's virtualenv (tokenizers 0.23):

    .venv/bin/python plugins/llava/assets/make_tokenizer.py

The output is deterministic; plugins/llava/src/init.rs embeds it with include_str!.
"""

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

VOCAB_SIZE = 320


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
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[byte_char[b]] = b + 3
    vocab["<image>"] = 259
    vocab["<pad>"] = 260
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[f"<|vlmhost_unused_{i}|>"] = i
    assert len(vocab) == VOCAB_SIZE and sorted(vocab.values()) == list(range(VOCAB_SIZE))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ["<unk>", "<s>", "</s>", "<image>", "<pad>"]])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )

    # Any text is covered, one token per byte; the special tokens are single tokens.
    text = "USER: <image><image>\nFree OCR. ASSISTANT: Grüße 42</s>"
    enc = tok.encode(text)
    assert enc.ids[0] == 1 and enc.ids[7:9] == [259, 259] and enc.ids[-1] == 2, enc.ids
    assert tok.decode(enc.ids) == "USER: \nFree OCR. ASSISTANT: Grüße 42", tok.decode(enc.ids)

    out = Path(__file__).with_name("byte_tokenizer.json")
    tok.save(str(out), pretty=True)
    print(f"wrote {out} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
