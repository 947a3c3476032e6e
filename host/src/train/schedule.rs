//! What happens at optimizer step N: the learning rate (warm-up, then cosine,
//! linear or constant) and the data order of each epoch (a permutation drawn
//! from the seed), so a resumed run needs only the step and data position.

use crate::config::Schedule;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Learning rate at optimizer step `step` (0-based) of `total`.
pub fn learning_rate(base: f64, schedule: Schedule, warmup: usize, step: usize, total: usize) -> f64 {
    if warmup > 0 && step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup.min(step)) as f64 / span).min(1.0);
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// The order of epoch `epoch`: a permutation drawn from the seed.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed.wrapping_add(0x9e37_79b9_7f4a_7c15u64.wrapping_mul(epoch as u64 + 1))));
    idx
}

/// How many of `n` samples `train.val_size` holds out: a fraction below 1,
/// or a count.
pub fn val_count(n: usize, val_size: f64) -> usize {
    if val_size <= 0.0 {
        0
    } else if val_size < 1.0 {
        ((n as f64) * val_size).round() as usize
    } else {
        val_size as usize
    }
}

/// The indices of the `k` of `n` samples held out for validation, drawn with the seed.
pub fn held_out(n: usize, k: usize, seed: u64) -> std::collections::HashSet<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_0f5a));
    idx.into_iter().take(k).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        assert_eq!(learning_rate(1.0, Schedule::Cosine, 2, 0, 10), 0.5);
        assert_eq!(learning_rate(1.0, Schedule::Cosine, 2, 1, 10), 1.0);
        assert_eq!(learning_rate(1.0, Schedule::Cosine, 2, 2, 10), 1.0);
        assert!((learning_rate(1.0, Schedule::Cosine, 2, 6, 10) - 0.5).abs() < 1e-12);
        assert!((learning_rate(1.0, Schedule::Linear, 0, 5, 10) - 0.5).abs() < 1e-12);
        assert_eq!(learning_rate(1.0, Schedule::Constant, 0, 9, 10), 1.0);
    }

    #[test]
    fn epoch_orders_are_permutations_and_seeded() {
        let a = epoch_order(10, 1, 0);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..10).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(10, 1, 0));
        assert_ne!(a, epoch_order(10, 1, 1));
    }
}
