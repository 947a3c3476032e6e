//! Qwen2-VL under the hub checkpoint's names (`visual.*`, `model.*`,
//! `lm_head.*`), following transformers 5.23 `models/qwen2_vl/modeling_qwen2_vl.py`
//! (`Qwen2VLModel.forward`, `get_placeholder_mask`, `compute_3d_position_ids`,
//! `Qwen2VLForConditionalGeneration`): image features from the vision tower
//! and merger replace the `<|image_pad|>` tokens' embeddings in order, the
//! language model runs at M-RoPE positions ([`crate::rope::rope_index`]).
//!
//! Key layouts accepted: the hub's (what `save_pretrained` writes) and
//! transformers 5's in-memory one (`model.visual.*`, `model.language_model.*`,
//! `lm_head.*`, also written by `save_pretrained(save_original_format=False)`).
//! A tied `lm_head` (Qwen2-VL-2B) shares `model.embed_tokens.weight` and has no
//! key in the file.

use crate::config::Qwen2VlConfig;
use crate::rope::{rope_index, Grid};
use crate::text::Text;
use crate::vision::{Vision, VISION_STACK};
use crate::vision25::Vision25;
use vlmhost_plugin_sdk::Architecture;
use tch::{Device, Kind, Tensor};
use vlmhost_plugin_api::builder::role_rule;
use vlmhost_plugin_sdk::keys::KeyRules;
use vlmhost_plugin_api::{BatchInputs, Host, ModelSpec, Role, Segment, SpecBuilder};
use vlmhost_plugin_sdk::decoder::{attention_mask, batch_error as batch_err, image_tokens, merge_image_features, segment_error, LLM_STACK, R};

/// The model: the spec and typed handles into it.
pub struct Qwen2Vl {
    pub config: Qwen2VlConfig,
    pub spec: ModelSpec,
    vision: Tower,
    text: Text,
}

/// The vision tower of either model (the rest is the same).
enum Tower {
    Qwen2Vl(Vision),
    Qwen25Vl(Vision25),
}

impl Tower {
    /// Image features that replace the image tokens, `[tokens, hidden]`; the
    /// encoder runs without autograd when nothing of the vision role trains.
    fn features(&self, host: Host<'_, '_>, pixel_values: &Tensor, grids: &[Grid]) -> R {
        let encode = || self.encode(host, pixel_values, grids);
        let encoded = if host.role_trains(Role::Vision) { encode()? } else { tch::no_grad(encode)? };
        match self {
            Tower::Qwen2Vl(v) => v.merge(host, &encoded),
            Tower::Qwen25Vl(v) => v.merge(host, &encoded),
        }
    }

    fn encode(&self, host: Host<'_, '_>, pixel_values: &Tensor, grids: &[Grid]) -> R {
        match self {
            Tower::Qwen2Vl(v) => v.encode(host, pixel_values, grids),
            Tower::Qwen25Vl(v) => v.encode(host, pixel_values, grids),
        }
    }

    /// Vision block `layer` as `encode` marked it a segment.
    fn run_segment(&self, host: Host<'_, '_>, layer: u32, inputs: &[Tensor]) -> R<Vec<Tensor>> {
        match self {
            Tower::Qwen2Vl(v) => v.run_segment(host, layer, inputs),
            Tower::Qwen25Vl(v) => v.run_segment(host, layer, inputs),
        }
    }
}

/// `[n, 3]` int64 grids as a list (on any device).
fn grids_of(t: Option<&Tensor>) -> R<Vec<Grid>> {
    let Some(t) = t else { return Ok(Vec::new()) };
    let size = t.size();
    if size.len() != 2 || size[1] != 3 {
        return Err(batch_err(format!("image_grid_thw has shape {size:?}, expected [images, 3]")));
    }
    let v = Vec::<i64>::try_from(t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?.f_reshape([-1])?)?;
    Ok(v.chunks(3).map(|c| [c[0], c[1], c[2]]).collect())
}

fn to_vec(t: &Tensor) -> R<Vec<i64>> {
    Ok(Vec::<i64>::try_from(t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?.f_reshape([-1])?)?)
}

impl Qwen2Vl {
    pub fn new(config: Qwen2VlConfig) -> Qwen2Vl {
        let b = SpecBuilder::new();
        let root = b.root();
        let visual = &root / "visual";
        let vision = match &config.window {
            None => Tower::Qwen2Vl(Vision::declare(&visual, &config.vision)),
            Some(window) => Tower::Qwen25Vl(Vision25::declare(&visual, &config.vision, window)),
        };
        let text = Text::declare(&root, &config.text, config.tie_word_embeddings);
        // transformers >= 4.52 in memory (Qwen2VLForConditionalGeneration, what
        // PEFT names) / save_original_format=False, then the hub layout, kept as it is.
        let keys = KeyRules::new()
            .in_memory("model.visual.", "visual.")
            .in_memory("model.language_model.", "model.")
            .also("visual.", "visual.")
            .also("model.", "model.")
            .in_memory("lm_head.", "lm_head.");
        let roles = vec![
            // The merger sits inside visual.*: it is the projector, carved out of the vision role.
            role_rule(Role::Vision, &["visual.**"], &["visual.merger.**"], "visual.blocks.*"),
            role_rule(Role::Projector, &["visual.merger.**"], &[], ""),
            role_rule(Role::Llm, &["model.**", "lm_head.**"], &[], "model.layers.*"),
        ];
        // Non-persistent rotary buffers, should an old save contain them.
        let spec = keys.spec(b, config.variant.family(), roles, &["**.inv_freq"], true);
        Qwen2Vl { config, spec, vision, text }
    }

    /// Image features `[tokens, hidden]` (vision tower + merger), for tests and tools.
    pub fn image_features(&self, host: Host<'_, '_>, pixel_values: &Tensor, grids: &[Grid]) -> R {
        self.vision.features(host, pixel_values, grids)
    }

    /// The vision encoder's output before the merger, `[patches, embed_dim]`.
    pub fn vision_encode(&self, host: Host<'_, '_>, pixel_values: &Tensor, grids: &[Grid]) -> R {
        self.vision.encode(host, pixel_values, grids)
    }

    /// M-RoPE positions `[3, batch, seq]` and rope deltas `[batch]` of a batch
    /// (its input ids, attention mask and `image_grid_thw`).
    pub fn positions(&self, input_ids: &Tensor, attention_mask: &Tensor, grids: &[Grid]) -> R<(Tensor, Vec<i64>)> {
        let (b, l) = (input_ids.size()[0], input_ids.size()[1]);
        let ids = to_vec(input_ids)?;
        let mask = to_vec(attention_mask)?;
        if mask.len() != ids.len() {
            return Err(batch_err(format!("attention_mask has {} values for {} tokens", mask.len(), ids.len())));
        }
        let c = &self.config;
        let (pos, deltas) = rope_index(&ids, Some(&mask), b as usize, c.image_token_id, grids, c.vision.spatial_merge_size)
            .map_err(|e| batch_err(format!("{e} (image_grid_thw {grids:?})")))?;
        Ok((Tensor::f_from_slice(&pos)?.f_view([3, b, l])?.f_to_device(input_ids.device())?, deltas))
    }

    /// Positions of a prompt (the first call) and the next position of each row.
    fn prompt_positions(&self, ids: &Tensor, mask: &Tensor, grids: &[Grid]) -> R<(Tensor, Tensor)> {
        let (pos, deltas) = self.positions(ids, mask, grids)?;
        let real = to_vec(&mask.f_ne(0)?.f_sum_dim_intlist(1, false, Kind::Int64)?)?;
        let next: Vec<i64> = real.iter().zip(&deltas).map(|(n, d)| n + d).collect();
        Ok((pos, Tensor::f_from_slice(&next)?.f_to_device(ids.device())?))
    }

}

/// Positions `[3, batch, new]` of tokens after a cached prefix whose next
/// position per row is `start` `[batch]`, and the next positions after them.
fn continued_positions(start: &Tensor, mask: &Tensor, past_len: i64, new: i64) -> R<(Tensor, Tensor)> {
    let b = mask.size()[0];
    let start = start.f_to_kind(Kind::Int64)?;
    let new_mask = mask.f_narrow(1, past_len, new)?.f_ne(0)?.f_to_kind(Kind::Int64)?;
    // [b, l]: the next position plus the real tokens before this one.
    let pos = start.f_unsqueeze(1)?.f_add(&new_mask.f_cumsum(1, Kind::Int64)?)?.f_sub_scalar(1)?;
    let next = start.f_add(&new_mask.f_sum_dim_intlist(1, false, Kind::Int64)?)?;
    Ok((pos.f_unsqueeze(0)?.f_expand([3, b, new], false)?, next))
}

impl Architecture for Qwen2Vl {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The forward pass: logits, and with `past` (empty on the first call)
    /// the cache: keys and values per layer (`[batch, kv_heads, seq,
    /// head_dim]`), then the next M-RoPE position of each row (`[batch]`
    /// int64). A prompt's images make its positions advance slower than its
    /// tokens; the tokens after it continue from the prompt's largest
    /// position + 1, as transformers' `rope_deltas` do.
    fn decode(&self, host: Host<'_, '_>, batch: &BatchInputs, past: Option<&[Tensor]>) -> R<(Tensor, Vec<Tensor>)> {
        let c = &self.config;
        let ids = &batch.input_ids;
        let (b, l) = (ids.size()[0], ids.size()[1]);
        let layers = self.text.num_layers();
        let past_len = match past {
            None | Some([]) => 0,
            Some(p) if p.len() == 2 * layers + 1 => p[0].size()[2],
            Some(p) => {
                return Err(batch_err(format!(
                    "the cache holds {} tensors; a {} cache holds {} (keys and values of {layers} layers, then positions): \
                     pass back what the previous call returned",
                    p.len(),
                    c.variant.family(),
                    2 * layers + 1
                )))
            }
        };
        let x = self.text.embed(host, ids)?;
        let (image_mask, n_image_tokens) = image_tokens(ids, c.image_token_id)?;
        let grids = grids_of(batch.get("image_grid_thw"))?;
        if past_len > 0 && n_image_tokens > 0 {
            return Err(batch_err("images belong to the prompt: a later decoding step cannot carry image tokens"));
        }
        let x = match batch.get("pixel_values") {
            Some(pv) if pv.size()[0] > 0 && past_len == 0 => {
                let features = self.vision.features(host, pv, &grids)?.f_to_kind(x.kind())?;
                let detail = format!(" ({} images, grids {grids:?})", grids.len());
                merge_image_features(&x, &image_mask, n_image_tokens, &features, &detail)?
            }
            _ if n_image_tokens > 0 => return Err(batch_err(format!("{n_image_tokens} image tokens but no pixel_values"))),
            _ => x,
        };
        let mask = &batch.attention_mask;
        if mask.size() != [b, past_len + l] {
            return Err(batch_err(format!(
                "attention_mask has shape {:?}; expected [{b}, {}] (cached and new tokens)",
                mask.size(),
                past_len + l
            )));
        }
        let (positions, next) = if past_len == 0 {
            let grids = if n_image_tokens > 0 { grids } else { Vec::new() };
            self.prompt_positions(ids, mask, &grids)?
        } else {
            let start = past.and_then(|p| p.last()).expect("checked above");
            continued_positions(start, mask, past_len, l)?
        };
        let attention = attention_mask(mask, past.is_some(), l)?;
        let kv = past.map(|p| if p.is_empty() { p } else { &p[..2 * layers] });
        let (logits, mut cache) = self.text.decode(host, x, &positions, attention.as_ref(), kv, batch.logit_rows())?;
        if past.is_some() {
            cache.push(next);
        }
        Ok((logits, cache))
    }

    fn run_segment(&self, host: Host<'_, '_>, id: Segment, inputs: &[Tensor]) -> R<Vec<Tensor>> {
        match (id.role, id.stack) {
            (Role::Llm, LLM_STACK) => self.text.run_segment(host, id.layer, inputs),
            (Role::Vision, VISION_STACK) => self.vision.run_segment(host, id.layer, inputs),
            _ => Err(segment_error(id, inputs.len())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use vlmhost_plugin_api::model::{map_key, ModuleKind};

    /// Qwen/Qwen2-VL-2B's config.json and model.safetensors.index.json (public copies; same
    /// architecture and names as -Instruct), and every tensor's shape from transformers on the
    /// meta device (tests/real_names.py, checked there against the index's names and size).
    const CONFIG: &str = include_str!("../tests/qwen2-vl-2b.config.json");
    const INDEX: &str = include_str!("../tests/qwen2-vl-2b.index.json");
    const WEIGHTS: &str = include_str!("../tests/qwen2-vl-2b.weights.json");

    #[test]
    fn the_real_checkpoint_names_and_shapes_are_declared_exactly() {
        let m = Qwen2Vl::new(Qwen2VlConfig::from_json(CONFIG).unwrap());
        let ours: BTreeMap<String, Vec<i64>> = m
            .spec
            .params
            .iter()
            .filter(|p| p.tied_to.is_empty())
            .map(|p| (p.name.to_string(), p.shape.to_vec()))
            .collect();
        let weights: serde_json::Value = serde_json::from_str(WEIGHTS).unwrap();
        let theirs: BTreeMap<String, Vec<i64>> =
            serde_json::from_value(weights["weights"].clone()).unwrap();
        assert_eq!(ours.len(), 729);
        assert_eq!(ours, theirs);
        // The index's keys, through the plugin's key rules, are exactly the declared names.
        let index: serde_json::Value = serde_json::from_str(INDEX).unwrap();
        let mut mapped: Vec<String> =
            index["weight_map"].as_object().unwrap().keys().map(|k| map_key(&m.spec.key_rules, k)).collect();
        mapped.sort();
        assert_eq!(mapped, ours.keys().cloned().collect::<Vec<_>>());
        // The tied head has no key: it shares the embeddings.
        let head = m.spec.params.iter().find(|p| p.name == "lm_head.weight").unwrap();
        assert_eq!(head.tied_to, "model.embed_tokens.weight");
        assert_eq!(head.shape.as_slice(), [151936, 1536]);
        // transformers 5 in-memory names map back onto ours.
        for name in ours.keys() {
            let in_memory = map_key(&m.spec.transformers_names, name);
            assert!(in_memory.starts_with("model.visual.") || in_memory.starts_with("model.language_model."), "{in_memory}");
            assert_eq!(&map_key(&m.spec.key_rules, &in_memory), name);
        }
    }

    #[test]
    fn the_patch_embedding_is_a_conv_run_as_linear_and_never_lora() {
        let m = Qwen2Vl::new(Qwen2VlConfig::from_json(CONFIG).unwrap());
        let pe = m.spec.modules.iter().find(|x| x.name == "visual.patch_embed.proj").unwrap();
        assert_eq!(pe.kind, ModuleKind::Conv);
        assert!(!pe.lora);
        assert_eq!(pe.description, "Conv3d run as Linear");
        assert_eq!((pe.in_features, pe.out_features), (1176, 1280));
        assert_eq!(m.spec.params[pe.weight as usize].shape.as_slice(), [1280, 3, 2, 14, 14]);
        let linears = m.spec.modules.iter().filter(|x| x.kind == ModuleKind::Linear && x.lora).count();
        // 32 blocks x 4, merger 2, 28 layers x 7, lm_head.
        assert_eq!(linears, 32 * 4 + 2 + 28 * 7 + 1);
    }

    /// Qwen/Qwen2.5-VL-3B-Instruct's and -7B-Instruct's config.json and every tensor's shape from
    /// transformers on the meta device (tests/real_names_qwen2_5_vl.py).
    const CONFIG_25: [(&str, &str, &str, usize, bool); 2] = [
        ("3b", include_str!("../tests/qwen2.5-vl-3b.config.json"), include_str!("../tests/qwen2.5-vl-3b.weights.json"), 824, true),
        ("7b", include_str!("../tests/qwen2.5-vl-7b.config.json"), include_str!("../tests/qwen2.5-vl-7b.weights.json"), 729, false),
    ];

    #[test]
    fn the_real_qwen2_5_vl_names_and_shapes_are_declared_exactly() {
        for (size, config, weights, count, tied) in CONFIG_25 {
            let m = Qwen2Vl::new(Qwen2VlConfig::from_json(config).unwrap());
            assert_eq!(m.spec.family, "qwen2_5_vl");
            let ours: BTreeMap<String, Vec<i64>> =
                m.spec.params.iter().filter(|p| p.tied_to.is_empty()).map(|p| (p.name.to_string(), p.shape.to_vec())).collect();
            let weights: serde_json::Value = serde_json::from_str(weights).unwrap();
            let theirs: BTreeMap<String, Vec<i64>> = serde_json::from_value(weights["weights"].clone()).unwrap();
            assert_eq!(ours.len(), count, "{size}");
            assert_eq!(ours, theirs, "{size}");
            let head = m.spec.params.iter().find(|p| p.name == "lm_head.weight").unwrap();
            assert_eq!(head.tied_to.is_empty(), !tied, "{size}");
            // Every name maps to transformers 5's in-memory one and back (checkpoints saved either way load).
            for name in ours.keys() {
                let in_memory = map_key(&m.spec.transformers_names, name);
                assert!(in_memory.starts_with("model.visual.") || in_memory.starts_with("model.language_model.") || in_memory == "lm_head.weight", "{in_memory}");
                assert_eq!(&map_key(&m.spec.key_rules, &in_memory), name);
            }
            // The patch embedding: a Conv3d run as Linear, no LoRA; the vision linears: 5 per block.
            let pe = m.spec.modules.iter().find(|x| x.name == "visual.patch_embed.proj").unwrap();
            assert!(pe.kind == ModuleKind::Conv && !pe.lora && (pe.in_features, pe.out_features) == (1176, 1280), "{size}");
            let vision_linears = m.spec.modules.iter().filter(|x| x.kind == ModuleKind::Linear && x.lora && x.name.starts_with("visual.blocks.")).count();
            assert_eq!(vision_linears, 32 * 5, "{size}");
        }
    }
}
