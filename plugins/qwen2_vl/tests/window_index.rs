//! Qwen2.5-VL's window order equals transformers 5.23 `get_vision_window_index`
//! (`vision_utils.py`) on the cases `scripts/fixtures/make_qwen2_5_vl_fixture.py` writes to
//! `reference/window_index.json`: grids that divide into windows and grids that do not, one and
//! several images, several frames, the fixture's windows and Qwen2.5-VL's own (112 pixels).
//!
//! Fixture folder: `$VLMHOST_QWEN2_5_VL_FIXTURE`, default `target/fixtures/qwen2_5_vl`
//! (made by scripts/fixtures.sh).

use vlmhost_plugin_qwen2_vl::vision25::window_index;

#[test]
fn window_order_and_lengths_equal_transformers() {
    let dir = vlmhost_plugin_sdk::fixture_dir("VLMHOST_QWEN2_5_VL_FIXTURE", "target/fixtures/qwen2_5_vl", "manifest.json", "run scripts/fixtures.sh");
    let cases: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference/window_index.json")).unwrap()).unwrap();
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let int = |k: &str| case[k].as_i64().unwrap();
        let grids: Vec<[i64; 3]> = serde_json::from_value(case["grids"].clone()).unwrap();
        let side = int("window_size") / int("merge") / int("patch_size");
        let ours = window_index(&grids, int("merge"), side);
        let order: Vec<i64> = serde_json::from_value(case["window_index"].clone()).unwrap();
        let cu: Vec<i64> = serde_json::from_value(case["cu_window_seqlens"].clone()).unwrap();
        assert_eq!(ours.order, order, "grids {grids:?}, window {side}");
        let lengths: Vec<i64> = cu.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(ours.windows, lengths, "grids {grids:?}, window {side}");
        eprintln!("grids {grids:?}, windows of {side} merged tokens: {} windows, order and lengths equal", lengths.len());
    }
}
