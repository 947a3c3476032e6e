"""What the byte-level tokenizers of `vlmhost init` checkpoints share, for the scripts that write
them (plugins/llava/assets/make_tokenizer.py, plugins/qwen2_vl/assets/make_tokenizer.py): a
byte-level BPE without merges (every UTF-8 byte one token, so any text is covered), a family's
special tokens, unused tokens up to a vocabulary of 320 (a multiple of 64).

The scripts put plugin-sdk/assets on sys.path to import it.
"""

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

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


def byte_level_bpe(vocab: dict[str, int], special: list[str], post_processor) -> Tokenizer:
    """The tokenizer of `vocab` (the bytes and special tokens), filled with
    `<|vlmhost_unused_N|>` up to VOCAB_SIZE; `special` are added as special tokens."""
    vocab = dict(vocab)
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[f"<|vlmhost_unused_{i}|>"] = i
    assert len(vocab) == VOCAB_SIZE and sorted(vocab.values()) == list(range(VOCAB_SIZE))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    tok.post_processor = post_processor
    return tok


def save(tok: Tokenizer, script: str) -> None:
    """Write `tok` as byte_tokenizer.json next to `script` (pretty, as the plugins embed it)."""
    out = Path(script).with_name("byte_tokenizer.json")
    tok.save(str(out), pretty=True)
    print(f"wrote {out} ({tok.get_vocab_size()} tokens)")
