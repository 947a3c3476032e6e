//! The loss without full logits (issue #18): the host names the positions
//! whose next token is labelled (`logit_rows`), every registered family runs
//! its head there only, and the loss equals the one over the whole logits.

use crate::common::*;
use crate::families::{self, prelude::*};
use vlmhost::model::{causal_lm_loss_sum, labelled_rows};
use vlmhost::plugin_api::LOGIT_ROWS;

#[test]
fn every_family_runs_its_head_on_the_labelled_positions_only() {
    let dir = tempdir();
    let data = synth_ocr(dir.path(), 2);
    for f in families::all() {
        let m = f.open(Mode::Llm, &TrainConfig::default());
        let samples = prepare_file(&m, &data);
        let mut batch = f.collate(&samples, &[0, 1]);
        let (whole, n) = causal_lm_loss_sum(&m.forward(&batch, false).unwrap(), &batch.labels).unwrap();
        let (rows, _) = labelled_rows(&batch.labels).unwrap();
        batch.tensors.push((LOGIT_ROWS.to_owned(), rows));
        let logits = m.forward(&batch, false).unwrap();
        let v = logits.size()[2];
        assert_eq!(logits.size(), [1, n, v], "{}: logits at the labelled positions only", f.name);
        let (at_rows, m_) = causal_lm_loss_sum(&logits, &batch.labels).unwrap();
        assert_eq!(n, m_);
        // The same arithmetic per position; only the head's matrix product has fewer rows
        // (another GEMM blocking may round differently): fp32 rounding of a loss sum.
        let (a, b) = (whole.double_value(&[]), at_rows.double_value(&[]));
        assert!((a - b).abs() <= 1e-6 * a.abs(), "{}: loss {b} at the rows vs {a} over the whole logits", f.name);
        eprintln!("{}: {n} labelled positions of {:?}, loss sum {a:.6} vs {b:.6}", f.name, batch.labels.size());
    }
}
