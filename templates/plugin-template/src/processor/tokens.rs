//! The byte tokenizer (`assets/byte_tokenizer.json`, which `vlmhost init`
//! writes as the checkpoint's `tokenizer.json`): `<bos>` 0, `<eos>` 1, byte
//! `b` -> `b + 2`, `<image>` 300. A real family reads its `tokenizer.json`
//! with the `tokenizers` crate instead; this one is small enough to write out.

use std::ops::Range;

/// `<bos>`: begins every conversation.
pub const BOS: i64 = 0;
/// `<eos>`: ends every answer; generation stops at it.
pub const EOS: i64 = 1;
/// Byte `b` is token `b + BYTE_OFFSET`.
pub const BYTE_OFFSET: i64 = 2;
/// `<image>`: one image's place in the text, expanded into its image tokens.
pub const IMAGE_TOKEN: i64 = 300;
/// The smallest vocabulary holding every id above.
pub const MIN_VOCAB: i64 = IMAGE_TOKEN + 1;

/// The text of `<bos>` in the tokenizer (its `bos_token`).
pub const BOS_TEXT: &str = "<｜begin▁of▁sentence｜>";
/// The text of `<eos>` in the tokenizer (its `eos_token`).
pub const EOS_TEXT: &str = "<｜end▁of▁sentence｜>";
/// The text of `<image>` in the tokenizer.
pub const IMAGE_TEXT: &str = "<image>";

const SPECIAL: [(&str, i64); 3] = [(BOS_TEXT, BOS), (EOS_TEXT, EOS), (IMAGE_TEXT, IMAGE_TOKEN)];

/// One token of a text: its id and the characters (not bytes) of the text it
/// stands for, as transformers' offsets count them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub id: i64,
    pub chars: Range<usize>,
}

/// `text` as tokens, as the `tokenizers` library encodes it with
/// `byte_tokenizer.json`: the special tokens written in the text are split off
/// first (their ids), every other byte `b` is `b + 2`. The bytes of one
/// character each give a token, all with that character's range.
pub fn encode(text: &str) -> Vec<Token> {
    let mut tokens = Vec::with_capacity(text.len());
    let mut chars = text.char_indices().enumerate().peekable();
    while let Some((c, (at, ch))) = chars.next() {
        if let Some(&(special, id)) = SPECIAL.iter().find(|(s, _)| text[at..].starts_with(s)) {
            let n = special.chars().count();
            tokens.push(Token { id, chars: c..c + n });
            for _ in 1..n {
                chars.next();
            }
            continue;
        }
        let mut buf = [0u8; 4];
        for &b in ch.encode_utf8(&mut buf).as_bytes() {
            tokens.push(Token { id: b as i64 + BYTE_OFFSET, chars: c..c + 1 });
        }
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_tokens_split_off_and_characters_share_offsets() {
        // The same ids and offsets as transformers' PreTrainedTokenizerFast on byte_tokenizer.json.
        let tokens = encode("a<image>é€<｜end▁of▁sentence｜>x");
        let ids: Vec<i64> = tokens.iter().map(|t| t.id).collect();
        assert_eq!(ids, [99, 300, 197, 171, 228, 132, 174, 1, 122]);
        let chars: Vec<Range<usize>> = tokens.into_iter().map(|t| t.chars).collect();
        assert_eq!(chars, [0..1, 1..8, 8..9, 8..9, 9..10, 9..10, 9..10, 10..29, 29..30]);
    }
}
