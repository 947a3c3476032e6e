//! DeepSeek-OCR through the host (compiled into the host's integration tests
//! by `tests/integration/families/mod.rs`), against the reference fixture
//! computed by the ORIGINAL remote code (`tests/fixtures/deepseek_ocr`, its
//! README says what each tensor is), run as training runs it (plugin library
//! loaded, weights and rules by the host); intermediate tensors through the
//! plugin crate's functions with the host's parameters. Parts are also checked
//! against transformers (`target/fixtures/deepseek_parts`: SAM, CLIP layers,
//! the MoE). The fixture model (`target/fixtures/deepseek_ocr/model`, with a
//! tokenizer) is made by `scripts/fixtures/make_deepseek_ocr_fixture.py`.

use crate::families::prelude::*;
use vlmhost::plugin_api::sample::parse_line;
use vlmhost::plugin_api::{BatchInputs, Host, ModelOptions};
use vlmhost_plugin_deepseek_ocr::{image_options, DeepseekOcrModel};

/// The fixture's sizes: a 256 global view and 128 tiles (Gundam scaled down).
fn processor_options() -> serde_json::Map<String, serde_json::Value> {
    serde_json::json!({"base_size": 256, "image_size": 128, "crop_mode": true}).as_object().unwrap().clone()
}

pub fn family() -> Family {
    Family { processor: processor_options, ..Family::new("deepseek_ocr", "vlmhost_plugin_deepseek_ocr") }
}

checks! { family();
    init_tiny_trains_and_generates,
    checkpoint_save_and_reload_keeps_bytes,
    // The original code's inputs: a global view and local crops (SAM, CLIP and the LLM).
    gradient_checkpointing_keeps_gradients(Checkpointing {
        samples: &[],
        batch: Some(|| batch(Kind::Float)),
        // SAM and CLIP run twice (the global view, the crops). Under bf16 autocast, without
        // checkpointing, both uses of a trainable fp32 tensor share autocast's cached bf16 copy,
        // so their gradients are summed in bf16 before reaching the fp32 master; recomputed
        // segment by segment, each use has its own copy and the sum is taken in fp32. The two
        // differ by bf16 rounding (8 bits: 3.9e-3 relative): measured 2.2e-3. (fp32: equal to the bit.)
        bf16_rtol: 1e-2,
    }),
}

/// The original code's tensors and image.
pub fn reference_dir() -> PathBuf {
    workspace_root().join("tests/fixtures/deepseek_ocr")
}

fn open(mode: Mode, kind: Kind) -> HostModel {
    open_with(mode, kind, &TrainConfig::default())
}

fn open_with(mode: Mode, kind: Kind, cfg: &TrainConfig) -> HostModel {
    let f = family();
    f.open_with(&OpenOptions { kind, ..f.options(mode) }, cfg)
}

/// The plugin crate itself, for its intermediate functions.
fn family_model() -> DeepseekOcrModel {
    let opts = image_options(&ModelOptions(processor_options())).unwrap();
    DeepseekOcrModel::open(&family().fixture().join("model"), &opts).unwrap()
}

fn inputs() -> HashMap<String, Tensor> {
    read_tensors(&reference_dir().join("inputs.safetensors"))
}

fn outputs() -> HashMap<String, Tensor> {
    read_tensors(&reference_dir().join("outputs.safetensors"))
}


/// An activation against the reference (computed by the original code with torch 2.6 on another
/// CPU, or by transformers): rounding only, bounded relative to its scale (common.rs).
fn check(name: &str, got: &Tensor, want: &Tensor) {
    assert_close(&format!("deepseek_ocr {name}"), got, want, RTOL_ACT, ATOL_FLOOR);
}

/// The fixture's forward inputs as a batch (pixel values as the model got them: bf16 -> f32).
fn batch(kind: Kind) -> BatchTensors {
    let i = inputs();
    let ids = i["input_ids"].shallow_clone();
    BatchTensors {
        attention_mask: ids.ones_like(),
        labels: i["labels"].shallow_clone(),
        input_ids: ids,
        tensors: vec![
            ("images_ori".into(), i["images_ori"].to_kind(kind)),
            ("images_crop".into(), i["images_crop"].to_kind(kind)),
            ("images_spatial_crop".into(), i["images_spatial_crop"].shallow_clone()),
        ],
    }
}

fn batch_inputs(b: &BatchTensors) -> BatchInputs {
    BatchInputs {
        input_ids: b.input_ids.shallow_clone(),
        attention_mask: b.attention_mask.shallow_clone(),
        tensors: b.tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(),
    }
}

#[test]
fn prepare_matches_original_code() {
    let m = open(Mode::Llm, Kind::Float);
    let line = r#"{"images": ["image.png"], "messages": [{"role": "user", "content": "<image>\nFree OCR. "}, {"role": "assistant", "content": "HELLO 42"}]}"#;
    let sample = parse_line(line, &reference_dir()).unwrap();
    let p = m.prepare(&serde_json::to_string(&sample).unwrap()).unwrap();
    let i = inputs();
    let ids = |t: &Tensor| Vec::<i64>::try_from(t.reshape([-1])).unwrap();
    assert_eq!(p.input_ids, ids(&i["input_ids"]), "input_ids");
    assert_eq!(p.labels, ids(&i["labels"]), "labels");
    let mask: Vec<bool> = ids(&i["images_seq_mask"]).iter().map(|&v| v != 0).collect();
    assert_eq!(p.image_token_mask, mask, "images_seq_mask");
    let t = |name: &str| &p.tensors.iter().find(|(n, _)| n == name).unwrap().1;
    // Bit for bit: the processor rounds to bfloat16 as the original does.
    assert_eq!(max_abs_diff(t("images_ori"), &i["images_ori"]), 0.0, "images_ori");
    assert_eq!(max_abs_diff(t("images_crop"), &i["images_crop"]), 0.0, "images_crop");
    assert_eq!(ids(t("images_spatial_crop")), ids(&i["images_spatial_crop"]), "images_spatial_crop");
}

#[test]
fn vision_features_match_original_code() {
    let m = open(Mode::Llm, Kind::Float);
    let f = family_model();
    let i = inputs();
    let o = outputs();
    let b = batch(Kind::Float);
    m.with_ops(false, |ops| {
        let host = Host::new(ops);
        for (view, pixels) in [("local", &i["images_crop"]), ("global", &i["images_ori"])] {
            let pixels = pixels.to_kind(Kind::Float);
            let sam = f.model.sam(host, &pixels).unwrap();
            check(&format!("sam_out_{view}"), &sam, &o[&format!("sam_out_{view}")]);
            let clip = f.model.clip(host, &sam).unwrap();
            check(&format!("clip_out_{view}"), &clip, &o[&format!("clip_out_{view}")]);
            let projected = f.model.encode_views(host, &pixels).unwrap();
            check(&format!("projector_out_{view}"), &projected, &o[&format!("projector_out_{view}")]);
        }
        let inputs = batch_inputs(&b);
        let vision = f.model.image_embeddings(host, &inputs).unwrap().unwrap();
        check("projected_vision", &vision, &o["projected_vision"]);
        let embeds = f.model.input_embeddings(host, &inputs).unwrap();
        check("inputs_embeds", &embeds, &o["inputs_embeds"]);
    });
}

#[test]
fn logits_and_loss_match_original_code() {
    let m = open(Mode::Llm, Kind::Float);
    let o = outputs();
    let b = batch(Kind::Float);
    let logits = m.forward(&b, false).unwrap();
    check("logits", &logits, &o["logits"]);
    let (loss, n) = causal_lm_loss(&logits, &b.labels).unwrap();
    assert_eq!(n, 9, "supervised tokens");
    let (got, want) = (loss.double_value(&[]), o["loss"].double_value(&[0]));
    assert_close_f64("deepseek_ocr loss", got, want, RTOL_LOSS, 0.0);
}

/// Load a parts fixture's weights into the fixture model (same sizes).
fn with_part(m: &HostModel, part: &str) -> HashMap<String, Tensor> {
    let path = workspace_root().join("target/fixtures/deepseek_parts").join(format!("{part}.safetensors"));
    assert!(path.is_file(), "{} is missing: run scripts/fixtures.sh", path.display());
    let t = read_tensors(&path);
    let weights: HashMap<String, Tensor> =
        t.iter().filter(|(k, _)| k.starts_with("model.")).map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
    let copied = m.load_tensors(&weights, false).unwrap();
    assert_eq!(copied, weights.len(), "{part}: every weight has a place in the model");
    t
}

#[test]
fn parts_match_transformers() {
    let f = family_model();
    // SAM up to its neck: transformers' SamVisionEncoder.
    let m = open(Mode::Llm, Kind::Float);
    let t = with_part(&m, "sam");
    m.with_ops(false, |ops| check("SAM neck vs transformers", &f.model.sam_neck(Host::new(ops), &t["input"]).unwrap(), &t["output"]));
    // CLIP encoder layers: transformers' CLIPEncoderLayer, q/k/v fused as the checkpoint stores them.
    let t = with_part(&m, "clip");
    m.with_ops(false, |ops| {
        check("CLIP layers vs transformers", &f.model.clip_layers(Host::new(ops), t["input"].shallow_clone()).unwrap(), &t["output"])
    });
    // The MoE block of layer 1: transformers' DeepseekV2Moe.
    let t = with_part(&m, "moe");
    let moe = f.model.moe_of_layer(1).expect("layer 1 is an MoE layer");
    m.with_ops(false, |ops| check("MoE vs transformers", &f.model.moe(Host::new(ops), moe, &t["input"]).unwrap(), &t["output"]));
}

/// Modes `vision` and `both` give SAM, CLIP and the projector real gradients
/// (the original runs them under no_grad): autograd against central finite
/// differences, in float64, on a few parameters of each part.
#[test]
fn vision_gradients_are_real() {
    let mut cfg = TrainConfig::default();
    cfg.roles.vision.strategy = Some(Strategy::Full);
    let m = open_with(Mode::Both, Kind::Double, &cfg);
    let b = batch(Kind::Double);
    let loss_of = |m: &HostModel| causal_lm_loss(&m.forward(&b, false).unwrap(), &b.labels).unwrap().0;
    let names = [
        "model.sam_model.blocks.0.attn.qkv.weight",
        "model.sam_model.pos_embed",
        "model.sam_model.net_3.weight",
        "model.vision_model.transformer.layers.1.mlp.fc1.weight",
        "model.vision_model.embeddings.position_embedding.weight",
        "model.projector.layers.weight",
        "model.image_newline",
    ];
    let index = |name: &str| m.spec().params.iter().position(|p| p.name == name).unwrap_or_else(|| panic!("no {name}"));
    for name in names {
        assert!(m.params()[index(name)].requires_grad(), "{name} trains in mode both");
    }
    let loss = loss_of(&m);
    loss.backward();
    // Steps large enough that the float32 parts inside (RMSNorm and the MoE
    // router compute in float32, as the original does) stay below the
    // difference, small enough not to flip an expert choice: the better of two.
    for name in names {
        let p = &m.params()[index(name)];
        let grad = p.grad();
        assert!(grad.defined(), "{name}: no gradient");
        // The entry with the largest gradient: a finite difference resolves it best.
        let flat_grad = grad.reshape([-1]);
        let at = flat_grad.abs().argmax(0, false).int64_value(&[]);
        let analytic = flat_grad.double_value(&[at]);
        let bump = |delta: f64| {
            tch::no_grad(|| {
                let flat = p.reshape([-1]);
                let v = flat.double_value(&[at]);
                let _ = flat.get(at).fill_(v + delta);
            })
        };
        let central = |eps: f64| {
            bump(eps);
            let up = tch::no_grad(|| loss_of(&m)).double_value(&[]);
            bump(-2.0 * eps);
            let down = tch::no_grad(|| loss_of(&m)).double_value(&[]);
            bump(eps);
            (up - down) / (2.0 * eps)
        };
        let rel = |numeric: f64| (analytic - numeric).abs() / numeric.abs().max(1e-8);
        let numeric = [1e-2, 2e-3].map(central).into_iter().min_by(|a, b| rel(*a).total_cmp(&rel(*b))).unwrap();
        let rel = rel(numeric);
        eprintln!("deepseek_ocr grad {name}[{at}]: autograd {analytic:.6e}, finite difference {numeric:.6e}, rel {rel:.1e}");
        assert!(analytic.abs() > 1e-6, "{name}: gradient is zero");
        assert!(rel < 5e-3, "{name}: autograd {analytic} vs finite difference {numeric}");
    }
}

/// Mode `llm` keeps no autograd graph for the frozen vision side: SAM and CLIP
/// get no gradient and their outputs carry no graph; the projector still trains.
#[test]
fn frozen_vision_builds_no_graph() {
    let m = open(Mode::Llm, Kind::Float);
    let f = family_model();
    let b = batch(Kind::Float);
    assert!(!m.plan().role_trains(Role::Vision, m.spec()));
    m.with_ops(true, |ops| {
        let host = Host::new(ops);
        let pixels = b.tensors[0].1.shallow_clone();
        let projected = f.model.encode_views(host, &pixels).unwrap();
        assert!(projected.requires_grad(), "the projector trains in every mode");
    });
    let loss = causal_lm_loss(&m.forward(&b, true).unwrap(), &b.labels).unwrap().0;
    loss.backward();
    for (i, p) in m.spec().params.iter().enumerate() {
        let vision = p.name.starts_with("model.sam_model.") || p.name.starts_with("model.vision_model.");
        let projector = p.name.starts_with("model.projector.") || p.name == "model.image_newline";
        if vision {
            assert!(!m.params()[i].grad().defined(), "{}: frozen but has a gradient", p.name);
        }
        if projector {
            assert!(m.params()[i].grad().defined(), "{}: trains but has no gradient", p.name);
        }
    }
}

/// LoRA over the MoE: every expert's linear layers (and the shared experts')
/// take adapters in mode llm; the router never does, and stays frozen.
#[test]
fn lora_covers_experts_not_the_router() {
    let m = open(Mode::Llm, Kind::Float);
    let names = m.lora_module_names(Role::Llm);
    for layer in [1, 2] {
        for e in 0..4 {
            for proj in ["gate_proj", "up_proj", "down_proj"] {
                let name = format!("model.layers.{layer}.mlp.experts.{e}.{proj}");
                assert!(names.contains(&name), "{name} has no adapter");
            }
        }
        assert!(names.contains(&format!("model.layers.{layer}.mlp.shared_experts.down_proj")));
        assert!(!names.iter().any(|n| n.ends_with(".mlp.gate")), "the router is never a LoRA target");
        let gate = m.spec().params.iter().position(|p| p.name == format!("model.layers.{layer}.mlp.gate.weight")).unwrap();
        assert!(!m.params()[gate].requires_grad(), "the router is frozen under LoRA");
    }
    // LoRA gradients reach the experts the tokens were routed to.
    let b = batch(Kind::Float);
    let loss = causal_lm_loss(&m.forward(&b, true).unwrap(), &b.labels).unwrap().0;
    loss.backward();
    let with_grad = m
        .trainable_tensors()
        .iter()
        .filter(|(n, t)| n.contains(".mlp.experts.") && t.grad().defined() && t.grad().abs().sum(Kind::Double).double_value(&[]) > 0.0)
        .count();
    assert!(with_grad > 0, "no expert adapter received a gradient");
}
