//! `config.json` of a DeepSeek-OCR checkpoint (`model_type: deepseek_vl_v2`).
//!
//! The language model's keys sit at the top level, as the original remote code
//! (`DeepseekOCRConfig`, a `DeepseekV2Config`) reads them; `language_config`
//! repeats them and is the fallback. Defaults are `DeepseekV2Config`'s.
//!
//! The original code hard-codes the vision sizes; the checkpoint's
//! `vision_config.width` records most of them and the rest follow the real
//! model's wiring. Keys vlmhost reads there (all optional; the defaults are
//! the real checkpoint's):
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `vision_config.image_size` | 1024 | SAM's position grid is `image_size / 16` |
//! | `width.sam_vit_b.{width, layers, heads, global_attn_indexes}` | 768, 12, 12, [2,5,8,11] | SAM ViT-B |
//! | `width.sam_vit_b.downsample_channels` | [512, 1024] | outputs of `net_2`, `net_3` |
//! | `width.sam_vit_b.window_size` (vlmhost) | 14 | windowed-attention size |
//! | `width.sam_vit_b.neck_channels` (vlmhost) | `downsample_channels[0] / 2` (256) | SAM neck width |
//! | `width.clip-l-14-224.{width, layers, heads, image_size, patch_size}` | 1024, 24, 16, 224, 14 | CLIP-L; MLP is 4 x width |

use serde_json::Value;
use std::path::Path;
use vlmhost_plugin_api::PluginError;
use vlmhost_plugin_sdk::config_struct;
use vlmhost_plugin_sdk::files::{TextDefaults, TextSizes};

config_struct! {
    /// The DeepSeek-V2 language model.
    #[derive(Debug, Clone)]
    pub struct TextConfig {
        #[serde(flatten, deserialize_with = "TextSizes::deserialize_for::<TextConfig, _>")]
        pub sizes: TextSizes = Self::SIZES,
        pub moe_intermediate_size: i64 = 1407,
        pub num_key_value_heads: Option<i64> = None,
        pub n_shared_experts: Option<i64> = None,
        pub n_routed_experts: Option<i64> = None,
        pub num_experts_per_tok: Option<i64> = None,
        pub routed_scaling_factor: f64 = 1.0,
        pub topk_method: String = "greedy".into(),
        pub n_group: Option<i64> = None,
        pub topk_group: Option<i64> = None,
        pub moe_layer_freq: i64 = 1,
        pub first_k_dense_replace: i64 = 0,
        pub norm_topk_prob: bool = false,
        pub scoring_func: String = "softmax".into(),
        pub hidden_act: String = "silu".into(),
        pub rms_norm_eps: f64 = 1e-6,
        pub rope_theta: f64 = 10000.0,
        pub rope_scaling: Option<Value> = None,
        pub attention_bias: bool = false,
        pub use_mla: bool = true,
        pub tie_word_embeddings: bool = false,
        pub bos_token_id: Option<i64> = None,
        pub eos_token_id: Option<i64> = None,
    }
}

impl TextDefaults for TextConfig {
    /// `DeepseekV2Config`'s vocabulary, widths, depth and heads.
    const SIZES: TextSizes = TextSizes::new(102400, 4096, 11008, 30, 32);
}

impl TextConfig {
    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.sizes.num_attention_heads)
    }
    /// Whether decoder layer `i` has the MoE block (else the dense MLP).
    pub fn is_moe_layer(&self, i: i64) -> bool {
        self.n_routed_experts.is_some() && i >= self.first_k_dense_replace && i % self.moe_layer_freq.max(1) == 0
    }
}

/// SAM ViT-B.
#[derive(Debug, Clone)]
pub struct SamConfig {
    pub width: i64,
    pub layers: i64,
    pub heads: i64,
    pub global_attn_indexes: Vec<i64>,
    pub window_size: i64,
    /// Position grid of the base view (`image_size / patch_size`).
    pub grid: i64,
    pub patch_size: i64,
    pub mlp_dim: i64,
    pub neck_channels: i64,
    pub downsample_channels: [i64; 2],
    pub eps: f64,
}

/// The CLIP-L part.
#[derive(Debug, Clone)]
pub struct ClipConfig {
    pub width: i64,
    pub layers: i64,
    pub heads: i64,
    pub mlp_dim: i64,
    /// Position grid (`image_size / patch_size`).
    pub grid: i64,
    pub patch_size: i64,
    pub eps: f64,
}

/// The whole model.
#[derive(Debug, Clone)]
pub struct DeepseekOcrConfig {
    pub text: TextConfig,
    pub sam: SamConfig,
    pub clip: ClipConfig,
    /// Projector input (CLIP width + SAM `net_3` channels) and output.
    pub projector_input: i64,
}

/// The sizes checked against [`vlmhost_plugin_api::limits`], the key named.
fn sizes(sizes: &[(&str, i64)]) -> Result<(), String> {
    vlmhost_plugin_api::limits::check_sizes(sizes).map_err(|(key, m)| format!("{key}: {m}"))
}

fn int(v: &Value, key: &str, default: i64) -> Result<i64, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x.as_i64().ok_or_else(|| format!("{key} must be an integer, got {x}")),
    }
}

fn int_list(v: &Value, key: &str, default: &[i64]) -> Result<Vec<i64>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default.to_vec()),
        Some(Value::Array(a)) => {
            a.iter().map(|x| x.as_i64().ok_or_else(|| format!("{key} must hold integers, got {x}"))).collect()
        }
        Some(x) => Err(format!("{key} must be a list of integers, got {x}")),
    }
}

impl DeepseekOcrConfig {
    pub fn from_dir(dir: &Path) -> Result<Self, PluginError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| PluginError::Io { path: path.display().to_string().into(), message: e.to_string().into() })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| PluginError::invalid(path.display().to_string(), format!("not JSON: {e}")))?;
        Self::from_value(&v).map_err(|msg| PluginError::invalid(path.display().to_string(), msg))
    }

    pub fn from_value(v: &Value) -> Result<Self, String> {
        let text = text_config(v)?;
        let (sam, clip) = vision_configs(v)?;
        let projector_input = clip.width + sam.downsample_channels[1];
        check_projector(v, projector_input, text.sizes.hidden_size)?;
        Ok(DeepseekOcrConfig { text, sam, clip, projector_input })
    }
}

/// The language model: top-level keys over `language_config`, checked.
fn text_config(v: &Value) -> Result<TextConfig, String> {
    // Top-level LLM keys win; language_config fills the rest.
    let mut merged = v.get("language_config").cloned().unwrap_or(Value::Object(Default::default()));
    if let (Some(m), Some(top)) = (merged.as_object_mut(), v.as_object()) {
        for (k, x) in top {
            if !matches!(k.as_str(), "language_config" | "vision_config" | "projector_config") {
                m.insert(k.clone(), x.clone());
            }
        }
    }
    let text: TextConfig = serde_json::from_value(merged).map_err(|e| format!("language model keys: {e}"))?;
    sizes(&text.sizes.named())?;
    sizes(&[("num_key_value_heads", text.kv_heads()), ("moe_layer_freq", text.moe_layer_freq)])?;
    let (hidden, heads, kv) = (text.sizes.hidden_size, text.sizes.num_attention_heads, text.kv_heads());
    if hidden % heads != 0 || heads % kv != 0 {
        return Err(format!(
            "hidden_size {hidden} must be a multiple of num_attention_heads {heads}, which must be a multiple of num_key_value_heads {kv}"
        ));
    }
    if let Some(experts) = text.n_routed_experts {
        let k = text.num_experts_per_tok.unwrap_or(0);
        if experts <= 0 || k <= 0 || k > experts || text.moe_intermediate_size <= 0 {
            return Err(format!(
                "n_routed_experts {experts}, num_experts_per_tok {k}, moe_intermediate_size {}: need 0 < num_experts_per_tok <= n_routed_experts and a positive moe_intermediate_size",
                text.moe_intermediate_size
            ));
        }
        let groups = text.n_group.unwrap_or(1);
        if text.topk_method == "group_limited_greedy"
            && (groups <= 0 || experts % groups != 0 || text.topk_group.unwrap_or(1) > groups)
        {
            return Err(format!("n_group {groups} must divide n_routed_experts {experts}, with topk_group <= n_group"));
        }
    }
    if text.use_mla {
        return Err("use_mla is true: multi-head latent attention is not supported (DeepSeek-OCR sets use_mla false)".into());
    }
    if text.rope_scaling.as_ref().is_some_and(|r| !r.is_null()) {
        return Err("rope_scaling is set: only plain RoPE is supported (DeepSeek-OCR has rope_scaling null)".into());
    }
    if text.scoring_func != "softmax" {
        return Err(format!("scoring_func {:?}: only \"softmax\" is supported", text.scoring_func));
    }
    if !matches!(text.topk_method.as_str(), "greedy" | "group_limited_greedy") {
        return Err(format!("topk_method {:?}: use \"greedy\" or \"group_limited_greedy\"", text.topk_method));
    }
    if !vlmhost_plugin_api::ops::known_activation(&text.hidden_act) {
        return Err(format!("hidden_act {:?} is not supported", text.hidden_act));
    }
    if text.n_routed_experts.is_some() && text.num_experts_per_tok.is_none() {
        return Err("n_routed_experts is set but num_experts_per_tok is not".into());
    }

    Ok(text)
}

/// SAM and CLIP from `vision_config` (the real checkpoint's sizes by default), checked.
fn vision_configs(v: &Value) -> Result<(SamConfig, ClipConfig), String> {
    let vc = v.get("vision_config").cloned().unwrap_or(Value::Null);
    let width = vc.get("width").cloned().unwrap_or(Value::Null);
    let s = width.get("sam_vit_b").cloned().unwrap_or(Value::Null);
    let c = width.get("clip-l-14-224").cloned().unwrap_or(Value::Null);
    let patch = 16;
    let down = int_list(&s, "downsample_channels", &[512, 1024])?;
    let [d2, d3] = <[i64; 2]>::try_from(down.as_slice())
        .map_err(|_| "vision_config.width.sam_vit_b.downsample_channels must hold two integers".to_string())?;
    let sam_width = int(&s, "width", 768)?;
    let sam = SamConfig {
        width: sam_width,
        layers: int(&s, "layers", 12)?,
        heads: int(&s, "heads", 12)?,
        global_attn_indexes: int_list(&s, "global_attn_indexes", &[2, 5, 8, 11])?,
        window_size: int(&s, "window_size", 14)?,
        grid: int(&vc, "image_size", 1024)? / patch,
        patch_size: patch,
        mlp_dim: sam_width * 4,
        neck_channels: int(&s, "neck_channels", d2 / 2)?,
        downsample_channels: [d2, d3],
        eps: 1e-6,
    };
    let clip_width = int(&c, "width", 1024)?;
    let clip_patch = int(&c, "patch_size", 14)?;
    if clip_patch <= 0 || int(&vc, "image_size", 1024)? < patch {
        return Err("vision_config: clip-l-14-224.patch_size must be positive and image_size at least 16".into());
    }
    let clip = ClipConfig {
        width: clip_width,
        layers: int(&c, "layers", 24)?,
        heads: int(&c, "heads", 16)?,
        mlp_dim: clip_width * 4,
        grid: int(&c, "image_size", 224)? / clip_patch,
        patch_size: clip_patch,
        eps: 1e-5,
    };
    sizes(&[
        ("vision_config.width.sam_vit_b.width", sam.width),
        ("vision_config.width.sam_vit_b.layers", sam.layers),
        ("vision_config.width.sam_vit_b.heads", sam.heads),
        ("vision_config.width.sam_vit_b.window_size", sam.window_size),
        ("vision_config.width.sam_vit_b.neck_channels", sam.neck_channels),
        ("vision_config.width.sam_vit_b.downsample_channels", d2.min(d3)),
        ("vision_config.image_size", sam.grid * patch),
        ("vision_config.width.clip-l-14-224.width", clip.width),
        ("vision_config.width.clip-l-14-224.layers", clip.layers),
        ("vision_config.width.clip-l-14-224.heads", clip.heads),
        ("vision_config.width.clip-l-14-224.image_size", clip.grid * clip_patch),
    ])?;
    if d3 != clip.width {
        return Err(format!(
            "vision_config: SAM's last channels ({d3}) must equal the CLIP width ({}): CLIP takes SAM's features as its patch tokens",
            clip.width
        ));
    }
    if sam.heads <= 0 || sam.width % sam.heads != 0 || clip.heads <= 0 || clip.width % clip.heads != 0 {
        return Err("vision_config: widths must be multiples of the head counts".into());
    }
    Ok((sam, clip))
}

/// `projector_config`, when present, must describe the linear projector the encoder and LLM imply.
fn check_projector(v: &Value, projector_input: i64, hidden_size: i64) -> Result<(), String> {
    if let Some(p) = v.get("projector_config") {
        let kind = p.get("projector_type").and_then(Value::as_str).unwrap_or("linear");
        if kind != "linear" {
            return Err(format!("projector_config.projector_type {kind:?}: DeepSeek-OCR's projector is \"linear\""));
        }
        let input = int(p, "input_dim", projector_input)?;
        let n_embed = int(p, "n_embed", hidden_size)?;
        if input != projector_input || n_embed != hidden_size {
            return Err(format!(
                "projector_config: input_dim {input} -> n_embed {n_embed}, but the encoder gives {projector_input} features and the LLM is {} wide",
                hidden_size
            ));
        }
    }
    Ok(())
}
