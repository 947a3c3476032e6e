//! What every rank must agree on before the first step (the configuration,
//! the data, the trainable tensors, the resume point): each rank publishes
//! its key/value list in the group's store, reads everyone's, and all ranks
//! stop with the same error naming the first key that differs.

use super::group::Group;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;

/// Publish `mine` as rank `group.rank`'s values under `topic` and check that
/// every rank's equal rank 0's.
pub fn check_equal(group: &Group, topic: &str, mine: &BTreeMap<String, String>) -> Result<()> {
    group.set(&format!("agree/{topic}/{}", group.rank), &serde_json::to_vec(mine)?)?;
    let all: Vec<BTreeMap<String, String>> = (0..group.world)
        .map(|r| -> Result<BTreeMap<String, String>> {
            let bytes = group.get(&format!("agree/{topic}/{r}"))?;
            serde_json::from_slice(&bytes).with_context(|| format!("rank {r}'s {topic} in the store is not readable"))
        })
        .collect::<Result<_>>()?;
    if let Some(msg) = first_difference(&all) {
        bail!("rank {} of {}: the ranks disagree on their {topic}: {msg}. Every rank must run the same command on the same files", group.rank, group.world);
    }
    Ok(())
}

/// The first key (in order) whose value on some rank differs from rank 0's.
pub fn first_difference(all: &[BTreeMap<String, String>]) -> Option<String> {
    let reference = all.first()?;
    let keys: std::collections::BTreeSet<&String> = all.iter().flat_map(|m| m.keys()).collect();
    for key in keys {
        let want = reference.get(key);
        for (r, m) in all.iter().enumerate().skip(1) {
            let got = m.get(key);
            if got != want {
                let show = |v: Option<&String>| v.map_or("(not set)".to_owned(), |v| v.clone());
                return Some(format!("{key} is {} on rank 0 but {} on rank {r}", show(want), show(got)));
            }
        }
    }
    None
}

/// `value` (JSON) flattened to dotted keys: `{"a": {"b": 1}}` -> `a.b = 1`.
pub fn flatten(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match value {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                flatten(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, v, out);
            }
        }
        other => {
            out.insert(prefix.to_owned(), other.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_differing_key_is_named() {
        let mut a = BTreeMap::new();
        flatten("config", &serde_json::json!({"train": {"batch_size": 1, "seed": 3}, "optimizer": {"lr": 0.1}}), &mut a);
        let mut b = a.clone();
        assert_eq!(first_difference(&[a.clone(), b.clone()]), None);
        b.insert("config.optimizer.lr".into(), "0.2".into());
        assert_eq!(first_difference(&[a.clone(), b.clone()]).unwrap(), "config.optimizer.lr is 0.1 on rank 0 but 0.2 on rank 1");
        b.remove("config.train.seed");
        let msg = first_difference(&[a, b]).unwrap();
        assert!(msg.starts_with("config.optimizer.lr"), "{msg}");
    }
}
