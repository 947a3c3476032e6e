//! `vlmhost init`'s refusals for every family: a non-empty folder without
//! `--force`, an unknown preset. (That a tiny checkpoint `inspect` reads,
//! trains and generates is a check of every family's:
//! `families::checks::init_tiny_trains_and_generates`.)

use crate::common::*;
use crate::families;

#[test]
fn init_refuses_a_non_empty_folder_and_an_unknown_preset() {
    let dir = tempdir();
    let cwd = dir.path();
    std::fs::create_dir(cwd.join("taken")).unwrap();
    std::fs::write(cwd.join("taken/notes.txt"), "keep me").unwrap();
    for f in families::all() {
        let (family, plugin) = (f.name, f.plugin());
        let run = vlmhost(&["init", "--plugin", &plugin, "--family", family, "--preset", "tiny", "--output", "taken"], cwd, None);
        assert!(!run.success(), "{family}: init into a non-empty folder succeeded\n{}", run.all());
        assert!(run.stderr.contains("--force"), "{family}: the refusal does not name --force\n{}", run.all());
        assert_eq!(std::fs::read_to_string(cwd.join("taken/notes.txt")).unwrap(), "keep me", "{family}");

        let run = vlmhost(&["init", "--plugin", &plugin, "--family", family, "--preset", "huge", "--output", "new"], cwd, None);
        assert!(!run.success(), "{family}: preset huge was accepted\n{}", run.all());
        for word in ["huge", "tiny", "small"] {
            assert!(run.stderr.contains(word), "{family}: the refusal does not name {word:?}\n{}", run.all());
        }
        assert!(!cwd.join("new").exists(), "{family}: a failed init left {}", cwd.join("new").display());
    }
}
