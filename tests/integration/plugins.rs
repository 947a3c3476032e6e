//! Plugin discovery and loading: `vlmhost plugins`, `vlmhost doctor`, and
//! every kind of bad plugin library a user can end up with.

use crate::common::*;
use std::fs;

const MINIMAL: &str = "vlmhost_test_minimal";

#[test]
fn plugins_lists_the_workspace_plugins() {
    let dir = tempdir();
    let run = vlmhost(&["plugins", "--json"], dir.path(), None);
    assert!(run.success(), "{}", run.all());
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let plugins = v["plugins"].as_array().unwrap();
    let minimal = plugins
        .iter()
        .find(|p| p["plugin"] == "vlmhost-test-minimal")
        .unwrap_or_else(|| panic!("test_minimal not listed\n{}", run.all()));
    assert_eq!(minimal["families"][0]["name"], "test_minimal");
    assert_eq!(minimal["families"][0]["model_types"][0], "test_minimal");
    assert_eq!(minimal["api_version"], vlmhost::plugin_api::API_VERSION);
    assert_eq!(minimal["libtorch_version"], vlmhost::plugin_api::LIBTORCH_VERSION);
    let path = minimal["path"].as_str().unwrap();
    assert_eq!(fs::canonicalize(path).unwrap(), fs::canonicalize(member_plugin(MINIMAL)).unwrap());
    // The folders searched are reported in order.
    let origins: Vec<&str> =
        v["searched"].as_array().unwrap().iter().map(|d| d["origin"].as_str().unwrap()).collect();
    assert_eq!(origins, ["binary_folder", "working_dir_plugins"]);
}

#[test]
fn plugins_table_has_one_row_per_family() {
    let dir = tempdir();
    let run = vlmhost(&["plugins"], dir.path(), None);
    assert!(run.success(), "{}", run.all());
    let mut lines = run.stdout.lines();
    let header = lines.next().unwrap();
    for col in ["FAMILY", "LIBRARY", "PLUGIN-API", "LIBTORCH", "HF MODEL TYPES"] {
        assert!(header.contains(col), "{header}");
    }
    let row = run.stdout.lines().find(|l| l.starts_with("test_minimal ")).expect("a test_minimal row");
    assert!(row.contains(&format!("lib{MINIMAL}.so")), "{row}");
    assert!(row.contains(vlmhost::plugin_api::LIBTORCH_VERSION), "{row}");
}

#[test]
fn plugin_by_family_and_by_path() {
    let dir = tempdir();
    let by_name = vlmhost(&["plugins", "--plugin", "test_minimal", "--json"], dir.path(), None);
    assert!(by_name.success(), "{}", by_name.all());
    let lib = member_plugin(MINIMAL);
    let by_path = vlmhost(&["plugins", "--plugin", lib.to_str().unwrap(), "--json"], dir.path(), None);
    assert!(by_path.success(), "{}", by_path.all());
    let a: serde_json::Value = serde_json::from_str(&by_name.stdout).unwrap();
    let b: serde_json::Value = serde_json::from_str(&by_path.stdout).unwrap();
    assert_eq!(a["plugins"], b["plugins"]);
    assert_eq!(a["plugins"].as_array().unwrap().len(), 1);
}

#[test]
fn plugin_path_var_is_searched_first() {
    let dir = tempdir();
    let extra = dir.path().join("extra");
    fs::create_dir(&extra).unwrap();
    let run = vlmhost(&["plugins", "--json"], dir.path(), Some(&format!("{}:/nonexistent", extra.display())));
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let searched = v["searched"].as_array().unwrap();
    assert_eq!(searched[0]["path"], extra.to_str().unwrap());
    assert_eq!(searched[0]["origin"], "plugin_path_var");
    assert_eq!(searched[1]["path"], "/nonexistent");
    assert_eq!(searched[2]["origin"], "binary_folder");
}

#[test]
fn plugins_in_working_dir_plugins_folder_are_found() {
    let dir = tempdir();
    fs::create_dir(dir.path().join("plugins")).unwrap();
    // A copy under another name serves the same family: found, and a duplicate.
    fs::copy(member_plugin(MINIMAL), dir.path().join("plugins/libcopy.so")).unwrap();
    let run = vlmhost(&["plugins", "--json"], dir.path(), None);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let paths: Vec<&str> =
        v["plugins"].as_array().unwrap().iter().map(|p| p["path"].as_str().unwrap()).collect();
    assert!(paths.iter().any(|p| p.ends_with("plugins/libcopy.so")), "{paths:?}");
    assert_eq!(v["duplicates"]["test_minimal"].as_array().map(Vec::len), Some(2), "{}", run.all());
    let text = vlmhost(&["plugins"], dir.path(), None);
    assert!(text.stderr.contains("family \"test_minimal\" is served by several libraries"), "{}", text.all());
}

#[test]
fn doctor_passes_here() {
    let dir = tempdir();
    let run = vlmhost(&["doctor"], dir.path(), None);
    assert!(run.success(), "{}", run.all());
    assert!(run.stdout.contains("libtorch   2.11.0"), "{}", run.all());
    assert!(run.stdout.contains("threads    "), "{}", run.all());
    assert!(run.stdout.contains("doctor: everything looks fine"), "{}", run.all());
    let json = vlmhost(&["doctor", "--json"], dir.path(), None);
    assert!(json.success(), "{}", json.all());
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert!(v["libtorch"]["threads"].as_i64().unwrap() >= 1);
    // The CUDA backend of this libtorch build is linked for real (the
    // --as-needed pitfall), whether or not a GPU is present.
    let lib_dir = v["libtorch"]["lib_dir"].as_str().expect("libtorch folder found");
    if std::path::Path::new(lib_dir).join("libtorch_cuda.so").exists() {
        assert_eq!(v["cuda"]["backend"], "linked", "{}", json.all());
    }
    let gpus = v["cuda"]["gpus"].as_array().unwrap();
    if gpus.is_empty() {
        assert_eq!(v["cuda"]["available"], false);
        assert!(run.stdout.contains("CUDA       not available"), "{}", run.all());
    } else {
        // On a GPU machine CUDA must really be usable.
        assert_eq!(v["cuda"]["available"], true, "{}", json.all());
        assert!(run.stdout.contains("CUDA       available"), "{}", run.all());
    }
}

#[test]
fn missing_path_is_a_clear_error() {
    let dir = tempdir();
    let run = vlmhost(&["plugins", "--plugin", "/nonexistent/libnothing.so"], dir.path(), None);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("/nonexistent/libnothing.so: no such file"), "{}", run.all());
}

#[test]
fn a_file_that_is_not_a_shared_library() {
    let dir = tempdir();
    let fake = dir.path().join("libfake.so");
    fs::write(&fake, "this is text, not ELF\n").unwrap();
    let run = vlmhost(&["plugins", "--plugin", fake.to_str().unwrap()], dir.path(), None);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("not a loadable shared library"), "{}", run.all());
    assert!(run.stderr.contains("libfake.so"), "{}", run.all());
}

#[test]
fn a_shared_library_that_is_not_a_plugin() {
    let dir = tempdir();
    let lib = workspace_root().join(".libtorch/lib/libc10.so");
    assert!(lib.exists(), "scripts/setup.sh makes .libtorch");
    let run = vlmhost(&["plugins", "--plugin", lib.to_str().unwrap()], dir.path(), None);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("libc10.so: not a vlmhost plugin"), "{}", run.all());
}

#[test]
fn a_plugin_built_against_another_api_major_version() {
    let dir = tempdir();
    let lib = broken_plugin("api_v2_plugin");
    let run = vlmhost(&["plugins", "--plugin", lib.to_str().unwrap()], dir.path(), None);
    assert_eq!(run.code, 1, "{}", run.all());
    let want = format!(
        "built against vlmhost-plugin-api 2.0.0, but this vlmhost speaks {}",
        vlmhost::plugin_api::API_VERSION
    );
    assert!(run.stderr.contains(&want), "{}", run.all());
    assert!(run.stderr.contains("rebuild the plugin"), "{}", run.all());
}

#[test]
fn a_plugin_built_against_another_libtorch() {
    let dir = tempdir();
    let lib = broken_plugin("old_libtorch_plugin");
    let run = vlmhost(&["plugins", "--plugin", lib.to_str().unwrap()], dir.path(), None);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("built against libtorch 1.13.1+cpu"), "{}", run.all());
    assert!(run.stderr.contains("this vlmhost runs libtorch 2.11.0"), "{}", run.all());
}

#[test]
fn a_panicking_plugin_is_an_error_not_an_abort() {
    let dir = tempdir();
    let lib = broken_plugin("panicking_plugin");
    let run = vlmhost(&["plugins", "--plugin", lib.to_str().unwrap()], dir.path(), None);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("the plugin panicked: index out of bounds"), "{}", run.all());
}

#[test]
fn an_unknown_family_lists_families_and_folders() {
    let dir = tempdir();
    let extra = dir.path().join("extra");
    let run = vlmhost(&["plugins", "--plugin", "no_such_family"], dir.path(), Some(extra.to_str().unwrap()));
    assert_eq!(run.code, 1, "{}", run.all());
    let e = &run.stderr;
    assert!(e.contains("no plugin serves the family \"no_such_family\""), "{}", run.all());
    let mut found: Vec<&str> = crate::families::all().iter().map(|f| f.name).chain(["test_minimal"]).collect();
    found.sort();
    assert!(e.contains(&format!("Families found: {}.", found.join(", "))), "{}", run.all());
    assert!(e.contains(&format!("{} [$VLMHOST_PLUGIN_PATH] (does not exist)", extra.display())), "{}", run.all());
    assert!(e.contains(&format!("{} [vlmhost's folder]", profile_dir().display())), "{}", run.all());
    assert!(e.contains("plugins [./plugins]"), "{}", run.all());
}

#[test]
fn two_plugins_claiming_one_family_are_refused() {
    let dir = tempdir();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    fs::create_dir(&a).unwrap();
    fs::create_dir(&b).unwrap();
    fs::copy(member_plugin(MINIMAL), a.join("libone.so")).unwrap();
    fs::copy(member_plugin(MINIMAL), b.join("libtwo.so")).unwrap();
    let path = format!("{}:{}", a.display(), b.display());
    let run = vlmhost(&["plugins", "--plugin", "test_minimal"], dir.path(), Some(&path));
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("the family \"test_minimal\" is served by 3 libraries"), "{}", run.all());
    assert!(run.stderr.contains("a/libone.so"), "{}", run.all());
    assert!(run.stderr.contains("b/libtwo.so"), "{}", run.all());
    assert!(run.stderr.contains(&format!("lib{MINIMAL}.so")), "{}", run.all());
    // doctor calls it broken too.
    let doctor = vlmhost(&["doctor"], dir.path(), Some(&path));
    assert_eq!(doctor.code, 1, "{}", doctor.all());
    assert!(doctor.stdout.contains("served by several libraries"), "{}", doctor.all());
}

#[test]
fn doctor_reports_every_failure_at_once() {
    let dir = tempdir();
    let bad = dir.path().join("bad");
    fs::create_dir(&bad).unwrap();
    for example in ["api_v2_plugin", "old_libtorch_plugin", "panicking_plugin"] {
        fs::copy(broken_plugin(example), bad.join(format!("lib{example}.so"))).unwrap();
    }
    fs::write(bad.join("libtruncated.so"), b"\x7fELF\x02\x01\x01").unwrap();
    let run = vlmhost(&["doctor", "--json"], dir.path(), Some(bad.to_str().unwrap()));
    assert_eq!(run.code, 1, "{}", run.all());
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["ok"], false);
    let issues: Vec<&str> = v["issues"].as_array().unwrap().iter().map(|i| i.as_str().unwrap()).collect();
    assert_eq!(issues.len(), 4, "{issues:#?}");
    for needle in ["libapi_v2_plugin.so", "libold_libtorch_plugin.so", "libpanicking_plugin.so", "libtruncated.so"] {
        assert!(issues.iter().any(|i| i.contains(needle)), "{needle} not reported: {issues:#?}");
    }
    // The good plugin still loads beside them.
    assert!(v["plugins"].as_array().unwrap().iter().any(|p| p["plugin"] == "vlmhost-test-minimal"));
    let text = vlmhost(&["doctor"], dir.path(), Some(bad.to_str().unwrap()));
    assert!(text.stdout.contains("doctor: 4 problem(s):"), "{}", text.all());
}
