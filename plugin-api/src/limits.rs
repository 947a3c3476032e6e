//! Sanity limits on the sizes a checkpoint's `config.json` declares, which
//! every family checks before it builds its spec: a size must be positive, a
//! count of layers (a key ending in `layers` or `depth`) at most
//! [`MAX_LAYERS`], any other size at most [`MAX_SIZE`]. The largest published
//! models have about 200 layers and vocabularies of about 256 000 entries; a
//! config far beyond that is a typo or a hostile file, and is refused by key
//! before anything is allocated rather than failing later as shape mismatches
//! or an exhausted machine.

/// The most layers any one stack may declare.
pub const MAX_LAYERS: i64 = 4096;

/// The largest width, vocabulary, head or expert count a config may declare.
pub const MAX_SIZE: i64 = 1 << 24;

/// What is wrong with size `value` of config key `key`, if anything.
pub fn size_problem(key: &str, value: i64) -> Option<String> {
    let layers = key.ends_with("layers") || key.ends_with("depth");
    let max = if layers { MAX_LAYERS } else { MAX_SIZE };
    if value <= 0 {
        Some(format!("must be positive, got {value}"))
    } else if value > max {
        Some(format!("{value} is more than the sanity limit {max}{}", if layers { " layers" } else { "" }))
    } else {
        None
    }
}

/// The first of `sizes` (key, value) out of range, as `(key, message)`.
pub fn check_sizes<'a>(sizes: &[(&'a str, i64)]) -> Result<(), (&'a str, String)> {
    match sizes.iter().find_map(|&(key, n)| size_problem(key, n).map(|m| (key, m))) {
        Some(bad) => Err(bad),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_positive_and_bounded() {
        assert_eq!(check_sizes(&[("hidden_size", 64), ("num_hidden_layers", 2)]), Ok(()));
        let (key, m) = check_sizes(&[("vocab_size", 10), ("hidden_size", -64)]).unwrap_err();
        assert_eq!((key, m.as_str()), ("hidden_size", "must be positive, got -64"));
        let (key, m) = check_sizes(&[("num_hidden_layers", 1_000_000)]).unwrap_err();
        assert_eq!(key, "num_hidden_layers");
        assert!(m.contains("more than the sanity limit 4096 layers"), "{m}");
        assert!(size_problem("vision_config.depth", 5000).is_some());
        assert!(size_problem("vocab_size", 256_000).is_none());
    }
}
