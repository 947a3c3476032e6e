//! OCR scores of generated answers against their references: character and
//! word error rates (Levenshtein, summed over the corpus as jiwer does) and
//! exact match.

use crate::model::generate::StopReason;
use serde::Serialize;

/// Levenshtein distance between two sequences.
pub fn edit_distance<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let next = (diag + usize::from(x != y)).min(row[j] + 1).min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// OCR scores of one answer against its reference. Both are compared after
/// trimming; CER counts Unicode scalar values, WER whitespace-separated words.
#[derive(Debug, Clone, Serialize)]
pub struct OcrScore {
    pub index: usize,
    pub reference: String,
    pub generated: String,
    pub char_errors: usize,
    pub chars: usize,
    pub word_errors: usize,
    pub words: usize,
    pub exact_match: bool,
    pub new_tokens: usize,
    pub stopped: StopReason,
}

impl OcrScore {
    pub fn new(index: usize, reference: &str, generated: &str, new_tokens: usize, stopped: StopReason) -> Self {
        let (r, g) = (reference.trim(), generated.trim());
        let rc: Vec<char> = r.chars().collect();
        let gc: Vec<char> = g.chars().collect();
        let rw: Vec<&str> = r.split_whitespace().collect();
        let gw: Vec<&str> = g.split_whitespace().collect();
        OcrScore {
            index,
            reference: r.to_owned(),
            generated: g.to_owned(),
            char_errors: edit_distance(&rc, &gc),
            chars: rc.len(),
            word_errors: edit_distance(&rw, &gw),
            words: rw.len(),
            exact_match: r == g,
            new_tokens,
            stopped,
        }
    }
}

/// Corpus-level scores: errors summed over samples, divided by the
/// reference's length summed (as jiwer computes CER and WER).
#[derive(Debug, Clone, Serialize)]
pub struct OcrMetrics {
    pub cer: f64,
    pub wer: f64,
    pub exact_match: f64,
    pub samples: usize,
}

impl OcrMetrics {
    pub fn of(scores: &[OcrScore]) -> OcrMetrics {
        let sum = |f: fn(&OcrScore) -> usize| scores.iter().map(f).sum::<usize>() as f64;
        let ratio = |e: f64, n: f64| if n > 0.0 { e / n } else if e > 0.0 { 1.0 } else { 0.0 };
        OcrMetrics {
            cer: ratio(sum(|s| s.char_errors), sum(|s| s.chars)),
            wer: ratio(sum(|s| s.word_errors), sum(|s| s.words)),
            exact_match: if scores.is_empty() { 0.0 } else { scores.iter().filter(|s| s.exact_match).count() as f64 / scores.len() as f64 },
            samples: scores.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_insertions_deletions_substitutions() {
        let c = |s: &str| s.chars().collect::<Vec<_>>();
        assert_eq!(edit_distance(&c("kitten"), &c("sitting")), 3);
        assert_eq!(edit_distance(&c(""), &c("abc")), 3);
        assert_eq!(edit_distance(&c("abc"), &c("abc")), 0);
        assert_eq!(edit_distance(&["a", "b"], &["b"]), 1);
    }

    #[test]
    fn metrics_are_corpus_level() {
        let a = OcrScore::new(0, "HELLO 42", "HELLO 43", 3, StopReason::Eos);
        let b = OcrScore::new(1, "abc", "abc", 2, StopReason::Eos);
        assert_eq!((a.char_errors, a.chars, a.word_errors, a.words), (1, 8, 1, 2));
        let m = OcrMetrics::of(&[a, b]);
        assert!((m.cer - 1.0 / 11.0).abs() < 1e-12);
        assert!((m.wer - 1.0 / 3.0).abs() < 1e-12);
        assert!((m.exact_match - 0.5).abs() < 1e-12);
    }
}
