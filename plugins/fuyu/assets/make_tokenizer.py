"""Writes tokenizer.json, the tokenizer of `vlmhost init --plugin fuyu` checkpoints.

Built like adept/fuyu-8b's: a Unigram model with byte fallback and the legacy SentencePiece
normalizer (`Prepend("▁")` + `Replace(" ", "▁")`), no pre-tokenizer. Any text is covered:
printable ASCII characters and `▁` are pieces, every other character falls back to its UTF-8
bytes `<0x00>`..`<0xFF>`. As in fuyu-8b, `|SPEAKER|`, `|NEWLINE|`, `<s>` and the byte pieces
are ordinary pieces of score 0 (so `<0x04>` written in text is the one beginning-of-answer
token, and tokenising `|SPEAKER|...|NEWLINE|<s>` gives a leading `▁` piece, which
FuyuProcessor drops), and only `<unk>` and `|ENDOFTEXT|` are added tokens.

    <unk> 0, <s> 1, </s> 2, |ENDOFTEXT| 3, |SPEAKER| 4, |NEWLINE| 5, <0xNN> 6 + NN
    (so <0x04> is 10), ▁ 262, '!'..'~' 263..356, <|vlmhost_unused_N|> 357..383
    (the vocabulary is 384, a multiple of 64).

Run it with the project's virtualenv (tokenizers 0.23):

    .venv/bin/python plugins/fuyu/assets/make_tokenizer.py

The output is deterministic; plugins/fuyu/src/init.rs embeds it with include_str!.
"""

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

VOCAB_SIZE = 384
SPECIAL_PIECES = ["<unk>", "<s>", "</s>", "|ENDOFTEXT|", "|SPEAKER|", "|NEWLINE|"]


def main() -> None:
    pieces = [(p, 0.0) for p in SPECIAL_PIECES] + [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    pieces.append(("▁", -2.0))
    pieces += [(chr(c), -3.0) for c in range(ord("!"), ord("~") + 1)]
    # Unused slots: never produced from text in practice, lowest score.
    pieces += [(f"<|vlmhost_unused_{i}|>", -20.0) for i in range(len(pieces), VOCAB_SIZE)]
    assert len(pieces) == VOCAB_SIZE and len({p for p, _ in pieces}) == VOCAB_SIZE

    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken("<unk>", normalized=False, special=True),
                            AddedToken("|ENDOFTEXT|", normalized=False, special=True)])
    tok.post_processor = processors.TemplateProcessing(
        single="|ENDOFTEXT| $A", pair="|ENDOFTEXT| $A |ENDOFTEXT|:1 $B:1", special_tokens=[("|ENDOFTEXT|", 3)]
    )

    # FuyuProcessor's image part: a leading '▁', then the placeholders, then <s>.
    ids = tok.encode("|SPEAKER||SPEAKER||NEWLINE||SPEAKER||SPEAKER||NEWLINE|<s>", add_special_tokens=False).ids
    assert ids == [262, 4, 4, 5, 4, 4, 5, 1], ids
    ids = tok.encode("Free OCR.<0x04>", add_special_tokens=False).ids
    assert ids[0] == 262 and ids[-1] == 10 and len(ids) == 11, ids
    for text in ["Grüße 42, naïve ~ café!", "x", "a  b"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text, text

    out = Path(__file__).with_name("tokenizer.json")
    tok.save(str(out), pretty=True)
    print(f"wrote {out} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
