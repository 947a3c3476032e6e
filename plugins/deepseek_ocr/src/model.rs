//! The DeepSeek-OCR architecture under the real checkpoint's parameter names,
//! following the original remote code (`deepencoder.py`: SAM ViT-B, the CLIP-L
//! part, the linear projector; `modeling_deepseekocr.py`: how image features
//! are laid out and merged; `modeling_deepseekv2.py`: the MoE language model,
//! whose attention with `use_mla: false` is transformers' `LlamaAttention`).
//!
//! Unlike the original, which runs the whole image path under `no_grad`, the
//! vision side builds an autograd graph whenever vision trains, so modes
//! `vision` and `both` really fine-tune SAM and CLIP; when it is frozen it
//! runs without one. The projector (with `image_newline` and
//! `view_seperator`) always trains.

use crate::config::{ClipConfig, DeepseekOcrConfig, SamConfig, TextConfig};
use tch::{Kind, Tensor};
use vlmhost_plugin_api::builder::{key_rule, role_rule, ConvParams, LayerNormParams, RmsNormParams, SpecPath};
use vlmhost_plugin_api::ops::{self, activation};
use vlmhost_plugin_api::{BatchInputs, Host, LinearId, ModelSpec, ParamId, ParamKind, PluginError, Role, SpecBuilder};

type R<T = Tensor> = Result<T, PluginError>;

struct SamBlock {
    norm1: LayerNormParams,
    qkv: LinearId,
    proj: LinearId,
    rel_pos_h: ParamId,
    rel_pos_w: ParamId,
    norm2: LayerNormParams,
    lin1: LinearId,
    lin2: LinearId,
    /// Window size, 0 for global attention.
    window: i64,
}

struct Sam {
    patch_embed: ConvParams,
    pos_embed: ParamId,
    blocks: Vec<SamBlock>,
    neck: [ConvParams; 2],
    neck_norm: [LayerNormParams; 2],
    net_2: ConvParams,
    net_3: ConvParams,
}

struct ClipLayer {
    ln1: LayerNormParams,
    qkv: LinearId,
    out: LinearId,
    ln2: LayerNormParams,
    fc1: LinearId,
    fc2: LinearId,
}

struct Clip {
    class_embedding: ParamId,
    position_embedding: ParamId,
    pre_layrnorm: LayerNormParams,
    layers: Vec<ClipLayer>,
}

/// A SwiGLU MLP (`down(act(gate(x)) * up(x))`).
pub struct Mlp {
    pub gate: LinearId,
    pub up: LinearId,
    pub down: LinearId,
}

/// The MoE block of one decoder layer.
pub struct Moe {
    /// The router, `[n_routed_experts, hidden]`: a bare parameter, never a LoRA target.
    pub gate: ParamId,
    pub experts: Vec<Mlp>,
    pub shared: Option<Mlp>,
}

enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

struct Layer {
    q: LinearId,
    k: LinearId,
    v: LinearId,
    o: LinearId,
    input_norm: RmsNormParams,
    post_norm: RmsNormParams,
    ffn: Ffn,
}

/// The model: the spec and typed handles into it.
pub struct DeepseekOcr {
    pub config: DeepseekOcrConfig,
    pub spec: ModelSpec,
    /// The id of `<image>` in the text.
    pub image_token_id: i64,
    sam: Sam,
    clip: Clip,
    projector: LinearId,
    image_newline: ParamId,
    view_seperator: ParamId,
    embed_tokens: ParamId,
    layers: Vec<Layer>,
    norm: RmsNormParams,
    lm_head: LinearId,
}

fn declare_sam(p: &SpecPath, c: &SamConfig) -> Sam {
    let w = c.width;
    let hd = w / c.heads;
    let patch_embed = (p / "patch_embed" / "proj").conv(&[w, 3, c.patch_size, c.patch_size], true, "Conv2d");
    let pos_embed = p.param("pos_embed", &[1, c.grid, c.grid, w], ParamKind::Embedding);
    let blocks = (0..c.layers)
        .map(|i| {
            let b = p / "blocks" / i;
            let a = &b / "attn";
            let window = if c.global_attn_indexes.contains(&i) { 0 } else { c.window_size };
            let size = if window == 0 { c.grid } else { window };
            SamBlock {
                norm1: (&b / "norm1").layer_norm(w, true, c.eps),
                qkv: (&a / "qkv").linear(w, 3 * w, true),
                proj: (&a / "proj").linear(w, w, true),
                rel_pos_h: a.param("rel_pos_h", &[2 * size - 1, hd], ParamKind::Embedding),
                rel_pos_w: a.param("rel_pos_w", &[2 * size - 1, hd], ParamKind::Embedding),
                norm2: (&b / "norm2").layer_norm(w, true, c.eps),
                lin1: (&b / "mlp" / "lin1").linear(w, c.mlp_dim, true),
                lin2: (&b / "mlp" / "lin2").linear(c.mlp_dim, w, true),
                window,
            }
        })
        .collect();
    let n = c.neck_channels;
    let neck = p / "neck";
    let neck0 = (&neck / 0).conv(&[n, w, 1, 1], false, "Conv2d");
    let norm0 = (&neck / 1).layer_norm(n, true, c.eps);
    let neck2 = (&neck / 2).conv(&[n, n, 3, 3], false, "Conv2d");
    let norm1 = (&neck / 3).layer_norm(n, true, c.eps);
    let [d2, d3] = c.downsample_channels;
    Sam {
        patch_embed,
        pos_embed,
        blocks,
        neck: [neck0, neck2],
        neck_norm: [norm0, norm1],
        net_2: (p / "net_2").conv(&[d2, n, 3, 3], false, "Conv2d"),
        net_3: (p / "net_3").conv(&[d3, d2, 3, 3], false, "Conv2d"),
    }
}

fn declare_clip(p: &SpecPath, c: &ClipConfig) -> Clip {
    let w = c.width;
    let emb = p / "embeddings";
    let class_embedding = emb.param("class_embedding", &[w], ParamKind::Embedding);
    // In the checkpoint, never used: CLIP's patch tokens are SAM's features.
    (&emb / "patch_embedding").conv(&[w, 3, c.patch_size, c.patch_size], false, "Conv2d (unused by the model)");
    let position_embedding = (&emb / "position_embedding").embedding(c.grid * c.grid + 1, w);
    let layers = (0..c.layers)
        .map(|i| {
            let l = p / "transformer" / "layers" / i;
            ClipLayer {
                ln1: (&l / "layer_norm1").layer_norm(w, true, c.eps),
                qkv: (&l / "self_attn" / "qkv_proj").linear(w, 3 * w, true),
                out: (&l / "self_attn" / "out_proj").linear(w, w, true),
                ln2: (&l / "layer_norm2").layer_norm(w, true, c.eps),
                fc1: (&l / "mlp" / "fc1").linear(w, c.mlp_dim, true),
                fc2: (&l / "mlp" / "fc2").linear(c.mlp_dim, w, true),
            }
        })
        .collect();
    let pre_layrnorm = (p / "pre_layrnorm").layer_norm(w, true, c.eps);
    Clip { class_embedding, position_embedding, pre_layrnorm, layers }
}

fn declare_mlp(p: &SpecPath, hidden: i64, inner: i64) -> Mlp {
    Mlp {
        gate: (p / "gate_proj").linear(hidden, inner, false),
        up: (p / "up_proj").linear(hidden, inner, false),
        down: (p / "down_proj").linear(inner, hidden, false),
    }
}

fn declare_layer(p: &SpecPath, t: &TextConfig, i: i64) -> Layer {
    let (d, hd) = (t.hidden_size, t.head_dim());
    let a = p / "self_attn";
    let mlp = p / "mlp";
    let ffn = if t.is_moe_layer(i) {
        let n = t.n_routed_experts.unwrap_or(0);
        Ffn::Moe(Moe {
            gate: (&mlp / "gate").param("weight", &[n, d], ParamKind::Weight),
            experts: (0..n).map(|e| declare_mlp(&(&mlp / "experts" / e), d, t.moe_intermediate_size)).collect(),
            shared: t
                .n_shared_experts
                .filter(|&s| s > 0)
                .map(|s| declare_mlp(&(&mlp / "shared_experts"), d, t.moe_intermediate_size * s)),
        })
    } else {
        Ffn::Dense(declare_mlp(&mlp, d, t.intermediate_size))
    };
    Layer {
        q: (&a / "q_proj").linear(d, t.num_attention_heads * hd, t.attention_bias),
        k: (&a / "k_proj").linear(d, t.kv_heads() * hd, t.attention_bias),
        v: (&a / "v_proj").linear(d, t.kv_heads() * hd, t.attention_bias),
        o: (&a / "o_proj").linear(t.num_attention_heads * hd, d, t.attention_bias),
        input_norm: (p / "input_layernorm").rms_norm(d, t.rms_norm_eps),
        post_norm: (p / "post_attention_layernorm").rms_norm(d, t.rms_norm_eps),
        ffn,
    }
}

impl DeepseekOcr {
    pub fn new(config: DeepseekOcrConfig, image_token_id: i64) -> DeepseekOcr {
        let b = SpecBuilder::new();
        let m = b.root() / "model";
        let t = &config.text;
        let d = t.hidden_size;
        let sam = declare_sam(&(&m / "sam_model"), &config.sam);
        let clip = declare_clip(&(&m / "vision_model"), &config.clip);
        let projector = (&m / "projector" / "layers").linear(config.projector_input, d, true);
        let image_newline = m.param("image_newline", &[d], ParamKind::Embedding);
        let view_seperator = m.param("view_seperator", &[d], ParamKind::Embedding);
        let embed_tokens = (&m / "embed_tokens").embedding(t.vocab_size, d);
        let layers = (0..t.num_hidden_layers).map(|i| declare_layer(&(&m / "layers" / i), t, i)).collect();
        let norm = (&m / "norm").rms_norm(d, t.rms_norm_eps);
        let lm_head = if t.tie_word_embeddings {
            (b.root() / "lm_head").linear_tied(d, t.vocab_size, "model.embed_tokens.weight")
        } else {
            (b.root() / "lm_head").linear(d, t.vocab_size, false)
        };
        let spec = b.build(
            "deepseek_ocr",
            vec![
                role_rule(
                    Role::Vision,
                    &["model.sam_model.**", "model.vision_model.**"],
                    &[],
                    "model.vision_model.transformer.layers.*",
                ),
                role_rule(Role::Projector, &["model.projector.**", "model.image_newline", "model.view_seperator"], &[], ""),
                role_rule(
                    Role::Llm,
                    &["model.embed_tokens.**", "model.layers.**", "model.norm.**", "lm_head.**"],
                    &[],
                    "model.layers.*",
                ),
            ],
            // The checkpoint's names are this plugin's names; the remote code
            // names them the same in memory (what PEFT saves under).
            vec![],
            vec!["model.vision_model.embeddings.position_ids".into()],
            true,
        );
        let mut spec = spec;
        // The remote code names parameters as the checkpoint does (what PEFT saves under).
        spec.transformers_names = vec![key_rule("model.", "model."), key_rule("lm_head.", "lm_head.")].into();
        DeepseekOcr {
            config,
            spec,
            image_token_id,
            sam,
            clip,
            projector,
            image_newline,
            view_seperator,
            embed_tokens,
            layers,
            norm,
            lm_head,
        }
    }

    // ---------------------------------------------------------------- SAM

    /// SAM ViT-B with neck and the two stride-2 convolutions:
    /// `[n, 3, S, S]` -> `[n, net_3 channels, S/64, S/64]`.
    pub fn sam(&self, host: Host<'_, '_>, pixels: &Tensor) -> R {
        let s = &self.sam;
        let x = self.sam_neck(host, pixels)?;
        let x = conv2d(host, &s.net_2, &x, 2, 1)?;
        conv2d(host, &s.net_3, &x, 2, 1)
    }

    /// SAM ViT-B up to its neck: `[n, 3, S, S]` -> `[n, neck channels, S/16, S/16]`.
    pub fn sam_neck(&self, host: Host<'_, '_>, pixels: &Tensor) -> R {
        let s = &self.sam;
        let c = &self.config.sam;
        let x = conv2d(host, &s.patch_embed, pixels, c.patch_size, 0)?.f_permute([0, 2, 3, 1])?;
        let grid = x.size()[1];
        let pos = host.param(s.pos_embed)?;
        let pos = if pos.size()[1] != grid {
            let p = pos.f_permute([0, 3, 1, 2])?.f_to_kind(Kind::Float)?;
            let p = p.f_internal_upsample_bicubic2d_aa([grid, grid], false, None, None)?;
            p.f_to_kind(pos.kind())?.f_permute([0, 2, 3, 1])?
        } else {
            pos
        };
        let mut x = x.f_add(&pos)?;
        for blk in &s.blocks {
            let shortcut = x.shallow_clone();
            let y = ops::layer_norm(host, &blk.norm1, &x)?;
            let y = if blk.window > 0 {
                let (h, w) = (y.size()[1], y.size()[2]);
                let (windows, padded) = window_partition(&y, blk.window)?;
                let out = self.sam_attention(host, blk, &windows)?;
                window_unpartition(&out, blk.window, padded, (h, w))?
            } else {
                self.sam_attention(host, blk, &y)?
            };
            x = shortcut.f_add(&y)?;
            let y = ops::layer_norm(host, &blk.norm2, &x)?;
            let y = host.linear(blk.lin2, &host.linear(blk.lin1, &y)?.f_gelu("none")?)?;
            x = x.f_add(&y)?;
        }
        let mut x = x.f_permute([0, 3, 1, 2])?;
        for (conv, norm) in s.neck.iter().zip(&s.neck_norm) {
            let k = conv_kernel(host, conv)?.size()[2];
            x = conv2d(host, conv, &x, 1, k / 2)?;
            x = layer_norm_2d(host, norm, &x)?;
        }
        Ok(x)
    }

    /// Attention with decomposed relative positions over `[n, h, w, C]`.
    fn sam_attention(&self, host: Host<'_, '_>, blk: &SamBlock, x: &Tensor) -> R {
        let size = x.size();
        let (b, h, w, c) = (size[0], size[1], size[2], size[3]);
        let heads = self.config.sam.heads;
        let hd = c / heads;
        let qkv = host
            .linear(blk.qkv, x)?
            .f_reshape([b, h * w, 3, heads, hd])?
            .f_permute([2, 0, 3, 1, 4])?
            .f_reshape([3, b * heads, h * w, hd])?;
        let (q, k, v) = (qkv.f_get(0)?, qkv.f_get(1)?, qkv.f_get(2)?);
        let rh = rel_pos(h, h, &host.param(blk.rel_pos_h)?)?;
        let rw = rel_pos(w, w, &host.param(blk.rel_pos_w)?)?;
        let rq = q.f_reshape([b * heads, h, w, hd])?;
        let rel_h = Tensor::f_einsum("bhwc,hkc->bhwk", &[&rq, &rh], None::<i64>)?;
        let rel_w = Tensor::f_einsum("bhwc,wkc->bhwk", &[&rq, &rw], None::<i64>)?;
        let bias = rel_h
            .f_unsqueeze(-1)?
            .f_add(&rel_w.f_unsqueeze(-2)?)?
            .f_reshape([b, heads, h * w, h * w])?;
        let view = |t: &Tensor| t.f_view([b, heads, h * w, hd]);
        let out = ops::attention(&view(&q)?, &view(&k)?, &view(&v)?, Some(&bias), false, (hd as f64).powf(-0.5))?;
        let out = out.f_view([b, heads, h, w, hd])?.f_permute([0, 2, 3, 1, 4])?.f_reshape([b, h, w, c])?;
        host.linear(blk.proj, &out)
    }

    // ---------------------------------------------------------------- CLIP

    /// The CLIP-L part on SAM's features `[n, W, g, g]`: `[n, 1 + g*g, W]`.
    pub fn clip(&self, host: Host<'_, '_>, sam_features: &Tensor) -> R {
        let c = &self.clip;
        let cfg = &self.config.clip;
        let patches = sam_features.f_flatten(2, 3)?.f_transpose(1, 2)?;
        let (n, tokens, width) = (patches.size()[0], patches.size()[1], patches.size()[2]);
        let class = host.param(c.class_embedding)?.f_expand([n, 1, width], false)?;
        let x = Tensor::f_cat(&[&class, &patches], 1)?;
        let table = host.param(c.position_embedding)?;
        let src = cfg.grid;
        let tgt = (tokens as f64).sqrt() as i64;
        let pos = if src != tgt {
            let cls = table.f_narrow(0, 0, 1)?;
            let grid = table
                .f_narrow(0, 1, src * src)?
                .f_view([1, src, src, width])?
                .f_permute([0, 3, 1, 2])?
                .f_to_kind(Kind::Float)?
                .f_internal_upsample_bicubic2d_aa([tgt, tgt], false, None, None)?
                .f_to_kind(table.kind())?
                .f_permute([0, 2, 3, 1])?
                .f_reshape([tgt * tgt, width])?;
            Tensor::f_cat(&[&cls, &grid], 0)?
        } else {
            table
        };
        let x = ops::layer_norm(host, &c.pre_layrnorm, &x.f_add(&pos.f_unsqueeze(0)?)?)?;
        self.clip_layers(host, x)
    }

    /// CLIP's transformer layers on `[n, tokens, W]` (fused `qkv_proj`, quick_gelu, no final norm).
    pub fn clip_layers(&self, host: Host<'_, '_>, mut x: Tensor) -> R {
        let size = x.size();
        let (n, l, width) = (size[0], size[1], size[2]);
        let heads = self.config.clip.heads;
        let hd = width / heads;
        for layer in &self.clip.layers {
            let y = ops::layer_norm(host, &layer.ln1, &x)?;
            let qkv = host.linear(layer.qkv, &y)?.f_view([n, l, 3, heads, hd])?;
            let part = |i: i64| qkv.f_select(2, i)?.f_permute([0, 2, 1, 3]);
            let att = ops::attention(&part(0)?, &part(1)?, &part(2)?, None, false, (hd as f64).powf(-0.5))?;
            let att = att.f_permute([0, 2, 1, 3])?.f_reshape([n, l, width])?;
            let h = x.f_add(&host.linear(layer.out, &att)?)?;
            let y = ops::layer_norm(host, &layer.ln2, &h)?;
            let y = host.linear(layer.fc2, &activation("quick_gelu", &host.linear(layer.fc1, &y)?)?)?;
            x = h.f_add(&y)?;
        }
        Ok(x)
    }

    /// Projected features of views `[n, 3, S, S]`: `[n, (S/64)^2, hidden]`.
    /// SAM and CLIP run without autograd unless vision trains.
    pub fn encode_views(&self, host: Host<'_, '_>, pixels: &Tensor) -> R {
        let run = || -> R {
            let kind = host.param(self.sam.patch_embed.weight)?.kind();
            let sam = self.sam(host, &pixels.f_to_kind(kind)?)?;
            let clip = self.clip(host, &sam)?;
            let tokens = clip.size()[1] - 1;
            let clip = clip.f_narrow(1, 1, tokens)?;
            Ok(Tensor::f_cat(&[&clip, &sam.f_flatten(2, 3)?.f_permute([0, 2, 1])?], -1)?)
        };
        let features = if host.role_trains(Role::Vision) { run()? } else { tch::no_grad(run)? };
        host.linear(self.projector, &features)
    }

    /// The image-token embeddings of a batch, in text order: per image, the
    /// tiles' map (one `image_newline` per row), the global view's map (one
    /// `image_newline` per row), then `view_seperator`.
    pub fn image_embeddings(&self, host: Host<'_, '_>, batch: &BatchInputs) -> R<Option<Tensor>> {
        let Some(global) = batch.get("images_ori").filter(|t| t.size()[0] > 0) else {
            return Ok(None);
        };
        let n_images = global.size()[0];
        let grids = Vec::<i64>::try_from(batch.tensor("images_spatial_crop")?.f_reshape([-1])?)?;
        if grids.len() as i64 != 2 * n_images {
            return Err(PluginError::invalid("batch", format!("images_spatial_crop has {} entries for {n_images} images", grids.len() / 2)));
        }
        let global = self.encode_views(host, global)?;
        let local = match batch.get("images_crop").filter(|t| t.size()[0] > 0) {
            Some(tiles) => Some(self.encode_views(host, tiles)?),
            None => None,
        };
        let newline = host.param(self.image_newline)?;
        let sep = host.param(self.view_seperator)?;
        let d = newline.size()[0];
        let with_newlines = |map: &Tensor| -> R {
            let rows = map.size()[0];
            let col = newline.f_view([1, 1, d])?.f_expand([rows, 1, d], false)?.f_to_kind(map.kind())?;
            Ok(Tensor::f_cat(&[map, &col], 1)?.f_reshape([-1, d])?)
        };
        let side = |tokens: i64| (tokens as f64).sqrt().round() as i64;
        let mut parts = Vec::new();
        let mut tile = 0;
        for i in 0..n_images {
            let (wc, hc) = (grids[2 * i as usize], grids[2 * i as usize + 1]);
            if wc > 1 || hc > 1 {
                let local = local.as_ref().ok_or_else(|| {
                    PluginError::invalid("batch", format!("image {i} is tiled {wc}x{hc} but the batch has no images_crop"))
                })?;
                let n = wc * hc;
                if tile + n > local.size()[0] {
                    return Err(PluginError::invalid("batch", "images_spatial_crop asks for more tiles than images_crop holds"));
                }
                let s = side(local.size()[1]);
                let map = local
                    .f_narrow(0, tile, n)?
                    .f_view([hc, wc, s, s, d])?
                    .f_permute([0, 2, 1, 3, 4])?
                    .f_reshape([hc * s, wc * s, d])?;
                parts.push(with_newlines(&map)?);
                tile += n;
            }
            let s = side(global.size()[1]);
            parts.push(with_newlines(&global.f_get(i)?.f_view([s, s, d])?)?);
            parts.push(sep.f_view([1, d])?.f_to_kind(global.kind())?);
        }
        if let Some(local) = &local {
            if tile != local.size()[0] {
                return Err(PluginError::invalid("batch", format!("{} tiles in images_crop but images_spatial_crop uses {tile}", local.size()[0])));
            }
        }
        Ok(Some(Tensor::f_cat(&parts, 0)?))
    }

    /// Token embeddings with the image positions filled: `[batch, seq, hidden]`.
    pub fn input_embeddings(&self, host: Host<'_, '_>, batch: &BatchInputs) -> R {
        let ids = &batch.input_ids;
        let embed = host.param(self.embed_tokens)?;
        let x = Tensor::f_embedding(&embed, ids, -1, false, false)?;
        let mask = ids.f_eq(self.image_token_id)?;
        let n_tokens = mask.f_sum(Kind::Int64)?.int64_value(&[]);
        match self.image_embeddings(host, batch)? {
            Some(features) => {
                if features.size()[0] != n_tokens {
                    return Err(PluginError::invalid(
                        "batch",
                        format!("{n_tokens} image tokens in the text but {} image features", features.size()[0]),
                    ));
                }
                Ok(x.f_masked_scatter(&mask.f_unsqueeze(-1)?, &features.f_to_kind(x.kind())?)?)
            }
            None if n_tokens > 0 => Err(PluginError::invalid("batch", format!("{n_tokens} image tokens but no images"))),
            None => Ok(x),
        }
    }

    // ---------------------------------------------------------------- LLM

    fn mlp(&self, host: Host<'_, '_>, m: &Mlp, x: &Tensor) -> R {
        let gate = activation(&self.config.text.hidden_act, &host.linear(m.gate, x)?)?;
        host.linear(m.down, &gate.f_mul(&host.linear(m.up, x)?)?)
    }

    /// The router: expert indices and weights `[tokens, k]` for `x` `[tokens, hidden]`.
    pub fn route(&self, host: Host<'_, '_>, moe: &Moe, x: &Tensor) -> R<(Tensor, Tensor)> {
        let t = &self.config.text;
        let k = t.num_experts_per_tok.unwrap_or(1);
        let w = host.param(moe.gate)?;
        let logits = x.f_to_kind(Kind::Float)?.f_linear(&w.f_to_kind(Kind::Float)?, None::<&Tensor>)?;
        let scores = logits.f_softmax(-1, Kind::Float)?;
        let (weights, idx) = if t.topk_method == "group_limited_greedy" {
            let n = scores.size()[0];
            let groups = t.n_group.unwrap_or(1).max(1);
            let e = scores.size()[1];
            let group_scores = scores.f_view([n, groups, e / groups])?.f_amax([-1i64].as_slice(), false)?;
            let (_, group_idx) = group_scores.f_topk(t.topk_group.unwrap_or(1), -1, true, false)?;
            let group_mask = group_scores.f_zeros_like()?.f_scatter_value(1, &group_idx, 1.0)?;
            let score_mask = group_mask.f_unsqueeze(-1)?.f_expand([n, groups, e / groups], false)?.f_reshape([n, e])?;
            scores.f_mul(&score_mask)?.f_topk(k, -1, true, false)?
        } else {
            scores.f_topk(k, -1, true, false)?
        };
        let weights = if k > 1 && t.norm_topk_prob {
            weights.f_div(&weights.f_sum_dim_intlist(-1, true, Kind::Float)?.f_add_scalar(1e-20)?)?
        } else {
            weights
        };
        Ok((idx, weights.f_mul_scalar(t.routed_scaling_factor)?))
    }

    /// The MoE block on `x` `[batch, seq, hidden]`: tokens grouped by expert
    /// (one sort, one gather), each expert run once on its tokens, results
    /// weighted and summed back with one `index_add`; plus the shared experts.
    pub fn moe(&self, host: Host<'_, '_>, moe: &Moe, x: &Tensor) -> R {
        let shape = x.size();
        let d = shape[2];
        let flat = x.f_reshape([-1, d])?;
        let (idx, weights) = self.route(host, moe, &flat)?;
        let k = idx.size()[1];
        let flat_idx = idx.f_reshape([-1])?;
        let order = flat_idx.f_argsort(0, false)?;
        let token_of = order.f_floor_divide_scalar(k)?;
        let counts = Vec::<i64>::try_from(flat_idx.f_bincount(None::<&Tensor>, moe.experts.len() as i64)?.f_to_device(tch::Device::Cpu)?)?;
        let sorted = flat.f_index_select(0, &token_of)?;
        let mut outs = Vec::new();
        let mut start = 0;
        for (expert, &n) in moe.experts.iter().zip(&counts) {
            if n > 0 {
                outs.push(self.mlp(host, expert, &sorted.f_narrow(0, start, n)?)?);
                start += n;
            }
        }
        let outs = Tensor::f_cat(&outs, 0)?;
        let w = weights.f_reshape([-1])?.f_index_select(0, &order)?.f_unsqueeze(-1)?;
        let routed = flat
            .f_zeros_like()?
            .f_to_kind(Kind::Float)?
            .f_index_add(0, &token_of, &outs.f_to_kind(Kind::Float)?.f_mul(&w)?)?
            .f_to_kind(x.kind())?
            .f_view(shape.as_slice())?;
        match &moe.shared {
            Some(shared) => Ok(routed.f_add(&self.mlp(host, shared, x)?)?),
            None => Ok(routed),
        }
    }

    /// Logits `[batch, seq, vocab]`.
    pub fn forward(&self, host: Host<'_, '_>, batch: &BatchInputs) -> R {
        Ok(self.decode(host, batch, None)?.0)
    }

    /// Incremental decoding: logits of the new tokens and the cache (keys and
    /// values per layer, `[batch, kv_heads, seq, head_dim]`).
    pub fn forward_cached(&self, host: Host<'_, '_>, batch: &BatchInputs, past: &[Tensor]) -> R<(Tensor, Vec<Tensor>)> {
        self.decode(host, batch, Some(past))
    }

    /// The forward pass, with a cache when `past` is given (empty: the first call).
    fn decode(&self, host: Host<'_, '_>, batch: &BatchInputs, past: Option<&[Tensor]>) -> R<(Tensor, Vec<Tensor>)> {
        let t = &self.config.text;
        let past_len = past.and_then(|p| p.first()).map_or(0, |k| k.size()[2]);
        // Images belong to the prompt: later decoding steps carry none.
        let mut x = if past_len > 0 {
            Tensor::f_embedding(&host.param(self.embed_tokens)?, &batch.input_ids, -1, false, false)?
        } else {
            self.input_embeddings(host, batch)?
        };
        let (b, l) = (x.size()[0], x.size()[1]);
        let (heads, kv, hd) = (t.num_attention_heads, t.kv_heads(), t.head_dim());
        let (cos, sin) = ops::rope_cos_sin(past_len + l, hd, t.rope_theta, x.device())?;
        let (cos, sin) = (cos.f_narrow(0, past_len, l)?, sin.f_narrow(0, past_len, l)?);
        let mask = match past {
            Some(_) => ops::causal_padding_mask_cached(&batch.attention_mask, l)?,
            None => ops::causal_padding_mask(&batch.attention_mask)?,
        };
        let mut cache = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let residual = x.shallow_clone();
            let y = ops::rms_norm(host, &layer.input_norm, &x)?;
            let q = host.linear(layer.q, &y)?.f_view([b, l, heads, hd])?.f_transpose(1, 2)?;
            let k = host.linear(layer.k, &y)?.f_view([b, l, kv, hd])?.f_transpose(1, 2)?;
            let v = host.linear(layer.v, &y)?.f_view([b, l, kv, hd])?.f_transpose(1, 2)?;
            let q = ops::apply_rope(&q, &cos, &sin)?;
            let k = ops::apply_rope(&k, &cos, &sin)?;
            let (k, v) = match past {
                Some(p) => {
                    let k = ops::append_cache(p.get(2 * i), &k)?;
                    let v = ops::append_cache(p.get(2 * i + 1), &v)?;
                    cache.extend([k.shallow_clone(), v.shallow_clone()]);
                    (k, v)
                }
                None => (k, v),
            };
            let att = ops::attention(&q, &k, &v, Some(&mask), true, (hd as f64).powf(-0.5))?;
            let att = att.f_transpose(1, 2)?.f_reshape([b, l, heads * hd])?;
            x = residual.f_add(&host.linear(layer.o, &att)?)?;
            let y = ops::rms_norm(host, &layer.post_norm, &x)?;
            let y = match &layer.ffn {
                Ffn::Dense(m) => self.mlp(host, m, &y)?,
                Ffn::Moe(moe) => self.moe(host, moe, &y)?,
            };
            x = x.f_add(&y)?;
        }
        let x = ops::rms_norm(host, &self.norm, &x)?;
        Ok((host.linear(self.lm_head, &x)?, cache))
    }

    /// The MoE block of decoder layer `i`, if it has one.
    pub fn moe_of_layer(&self, i: usize) -> Option<&Moe> {
        match &self.layers.get(i)?.ffn {
            Ffn::Moe(m) => Some(m),
            Ffn::Dense(_) => None,
        }
    }
}

fn conv_kernel(host: Host<'_, '_>, p: &ConvParams) -> R {
    host.param(p.weight)
}

fn conv2d(host: Host<'_, '_>, p: &ConvParams, x: &Tensor, stride: i64, padding: i64) -> R {
    let w = host.param(p.weight)?;
    let b = p.bias.map(|b| host.param(b)).transpose()?;
    Ok(x.f_conv2d(&w, b.as_ref(), [stride, stride], [padding, padding], [1, 1], 1)?)
}

/// SAM's `LayerNorm2d`: normalise over channels of `[n, C, h, w]`.
fn layer_norm_2d(host: Host<'_, '_>, p: &LayerNormParams, x: &Tensor) -> R {
    let w = host.param(p.weight)?.f_view([-1, 1, 1])?;
    let u = x.f_mean_dim(1, true, x.kind())?;
    let centred = x.f_sub(&u)?;
    let s = centred.f_square()?.f_mean_dim(1, true, x.kind())?;
    let y = centred.f_div(&s.f_add_scalar(p.eps)?.f_sqrt()?)?.f_mul(&w)?;
    match p.bias {
        Some(b) => Ok(y.f_add(&host.param(b)?.f_view([-1, 1, 1])?)?),
        None => Ok(y),
    }
}

/// Split `[n, h, w, C]` into `[n * windows, ws, ws, C]`, zero-padding the
/// bottom and right to a multiple of `ws` (the padding is not masked, as in
/// the original). Returns the padded size too.
fn window_partition(x: &Tensor, ws: i64) -> R<(Tensor, (i64, i64))> {
    let size = x.size();
    let (n, h, w, c) = (size[0], size[1], size[2], size[3]);
    let (ph, pw) = ((ws - h % ws) % ws, (ws - w % ws) % ws);
    let x = if ph > 0 || pw > 0 { x.f_constant_pad_nd([0, 0, 0, pw, 0, ph])? } else { x.shallow_clone() };
    let (hp, wp) = (h + ph, w + pw);
    let windows = x
        .f_view([n, hp / ws, ws, wp / ws, ws, c])?
        .f_permute([0, 1, 3, 2, 4, 5])?
        .f_contiguous()?
        .f_view([-1, ws, ws, c])?;
    Ok((windows, (hp, wp)))
}

fn window_unpartition(windows: &Tensor, ws: i64, (hp, wp): (i64, i64), (h, w): (i64, i64)) -> R {
    let n = windows.size()[0] / (hp * wp / ws / ws);
    let x = windows
        .f_view([n, hp / ws, wp / ws, ws, ws, -1])?
        .f_permute([0, 1, 3, 2, 4, 5])?
        .f_contiguous()?
        .f_view([n, hp, wp, -1])?;
    Ok(x.f_narrow(1, 0, h)?.f_narrow(2, 0, w)?)
}

/// Relative position embeddings `[q, k, C]` for query and key lengths, the
/// table resized by linear interpolation when its length does not match.
fn rel_pos(q: i64, k: i64, table: &Tensor) -> R {
    let max_dist = 2 * q.max(k) - 1;
    let table = if table.size()[0] != max_dist {
        let len = table.size()[0];
        table
            .f_to_kind(Kind::Float)?
            .f_reshape([1, len, -1])?
            .f_permute([0, 2, 1])?
            .f_upsample_linear1d([max_dist], false, None)?
            .f_to_kind(table.kind())?
            .f_reshape([-1, max_dist])?
            .f_permute([1, 0])?
    } else {
        table.shallow_clone()
    };
    let (qf, kf) = (q as f64, k as f64);
    let (qs, ks) = ((kf / qf).max(1.0), (qf / kf).max(1.0));
    let idx: Vec<i64> = (0..q)
        .flat_map(|i| (0..k).map(move |j| (i as f64 * qs - j as f64 * ks + (kf - 1.0) * ks) as i64))
        .collect();
    let idx = Tensor::f_from_slice(&idx)?.f_to_device(table.device())?;
    Ok(table.f_index_select(0, &idx)?.f_view([q, k, -1])?)
}
