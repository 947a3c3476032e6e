//! The generic freeze and LoRA rules: one set of rules, applied the same way
//! to every family, from what its plugin reports.
//!
//! 1. **Roles.** Every parameter gets exactly one role from the plugin's
//!    [`RoleRule`]s; a parameter with none or several is refused, with the list.
//! 2. **Mode.** The mode says which roles train (the projector always).
//! 3. **Strategy.** A trained role trains `full` or with `lora`; a role the
//!    mode does not train is frozen.
//! 4. **LoRA targets** are looked up only among the role's own linear layers;
//!    `all-linear` (also the default when a LoRA role has no list) leaves out
//!    `lm_head`; convolutions and layers the plugin marks non-LoRA-able are
//!    never targets.
//! 5. **Last k layers**, **`modules_to_save`** and **regex overrides** refine
//!    the result, in that order.
//!
//! **Encoder-free families** (Fuyu: the spec says `has_vision_encoder: false`)
//! have no vision role at all: a plugin that declares one is refused. Their
//! image path is the projector (Fuyu's `vision_embed_tokens`), which trains in
//! every mode like any projector, so mode `projector` trains it alone and mode
//! `llm` trains it with the LLM. Modes `vision` and `both` have nothing to add
//! and are refused with "`<family>` has no vision encoder; its image path is the
//! projector, which trains in every mode", rather than silently meaning `llm`.

use crate::config::{Mode, Strategy, TrainConfig};
use super::patterns::{layer_index, Pattern};
use serde::Serialize;
use std::collections::BTreeMap;
use vlmhost_plugin_api::model::{ModelSpec, ModuleKind, ParamKind, RoleRule};
use vlmhost_plugin_api::Role;

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("the plugin's role report is invalid:{0}")]
    Roles(String),
    #[error("{0}")]
    Config(String),
}

/// The role of every parameter, in spec order.
pub fn assign_roles(spec: &ModelSpec) -> Result<Vec<Role>, RulesError> {
    let compiled: Vec<(Role, Vec<Pattern>, Vec<Pattern>)> = spec
        .roles
        .iter()
        .map(|r: &RoleRule| {
            let comp = |v: &abi_stable::std_types::RVec<abi_stable::std_types::RString>| {
                v.iter().map(|p| Pattern::new(p)).collect::<Result<Vec<_>, _>>()
            };
            Ok((r.role, comp(&r.include)?, comp(&r.exclude)?))
        })
        .collect::<Result<_, String>>()
        .map_err(|e| RulesError::Roles(format!("\n  bad pattern: {e}")))?;
    if !spec.has_vision_encoder && spec.roles.iter().any(|r| r.role == Role::Vision) {
        return Err(RulesError::Roles(
            "\n  the plugin says the model has no vision encoder but declares a vision role".into(),
        ));
    }
    let mut roles = Vec::with_capacity(spec.params.len());
    let (mut none, mut several) = (Vec::new(), Vec::new());
    for p in spec.params.iter() {
        let hits: Vec<Role> = compiled
            .iter()
            .filter(|(_, inc, exc)| {
                inc.iter().any(|i| i.matches(&p.name)) && !exc.iter().any(|e| e.matches(&p.name))
            })
            .map(|(r, _, _)| *r)
            .collect();
        match hits.as_slice() {
            [one] => roles.push(*one),
            [] => none.push(p.name.to_string()),
            many => several.push(format!(
                "{} ({})",
                p.name,
                many.iter().map(|r| r.name()).collect::<Vec<_>>().join(", ")
            )),
        }
    }
    if none.is_empty() && several.is_empty() {
        return Ok(roles);
    }
    let mut msg = String::new();
    if !none.is_empty() {
        msg.push_str(&format!("\n  {} parameter(s) without a role:", none.len()));
        for n in &none {
            msg.push_str(&format!("\n    {n}"));
        }
    }
    if !several.is_empty() {
        msg.push_str(&format!("\n  {} parameter(s) with several roles:", several.len()));
        for n in &several {
            msg.push_str(&format!("\n    {n}"));
        }
    }
    Err(RulesError::Roles(msg))
}

/// How one role ends up training.
#[derive(Debug, Clone, Serialize)]
pub struct RolePlan {
    pub strategy: Strategy,
    pub lr_scale: f64,
}

/// The outcome of the rules: what trains, and how.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub mode: Mode,
    /// Per parameter (spec order): its role.
    pub roles: Vec<Role>,
    /// Per parameter: whether the base weight itself trains (full training,
    /// `modules_to_save`, an override).
    pub trainable: Vec<bool>,
    /// Modules (indices into `spec.modules`) that get a LoRA adapter.
    pub lora_modules: Vec<usize>,
    pub role_plans: BTreeMap<Role, RolePlan>,
    /// Non-fatal remarks (a target entry that matches nothing, ...).
    pub warnings: Vec<String>,
}

impl Plan {
    /// Whether anything of `role` trains (full parameters or adapters).
    pub fn role_trains(&self, role: Role, spec: &ModelSpec) -> bool {
        self.roles.iter().zip(&self.trainable).any(|(r, t)| *r == role && *t)
            || self
                .lora_modules
                .iter()
                .any(|&m| self.roles[spec.modules[m].weight as usize] == role)
    }
}

fn module_of(param_name: &str) -> &str {
    param_name.rsplit_once('.').map_or("", |(m, _)| m)
}

/// Whether a target (module name, segment-wise) selects `module`: the target
/// matches the end of the module's path, or of one of its ancestors' paths
/// (a target naming a container selects the linears inside it).
fn target_selects(target: &Pattern, module: &str) -> bool {
    let mut path = module;
    loop {
        if target.matches_suffix(path) {
            return true;
        }
        match path.rsplit_once('.') {
            Some((parent, _)) => path = parent,
            None => return false,
        }
    }
}

/// Apply the rules in `cfg` with mode `mode` to `spec`.
pub fn plan(spec: &ModelSpec, cfg: &TrainConfig, mode: Mode) -> Result<Plan, RulesError> {
    let roles = assign_roles(spec)?;
    let role_plans = role_plans(spec, cfg, mode)?;
    let in_scope = last_layers_scope(spec, cfg, &roles)?;
    // Full training.
    let mut trainable: Vec<bool> = (0..spec.params.len())
        .map(|i| role_plans[&roles[i]].strategy == Strategy::Full && in_scope[i])
        .collect();
    let mut warnings = Vec::new();
    let mut lora_modules = Vec::new();
    for role in Role::ALL {
        if role_plans[&role].strategy == Strategy::Lora {
            let selected = lora_targets(spec, cfg, role, &roles, &mut warnings)?;
            lora_modules.extend(selected.into_iter().filter(|&m| in_scope[spec.modules[m].weight as usize]));
        }
    }
    apply_modules_to_save(spec, cfg, &mut trainable, &mut lora_modules)?;
    apply_overrides(spec, cfg, &mut trainable, &mut lora_modules)?;
    lora_modules.sort_unstable();
    lora_modules.dedup();
    // A fully trained base weight takes no adapter.
    lora_modules.retain(|&m| !trainable[spec.modules[m].weight as usize]);
    Ok(Plan { mode, roles, trainable, lora_modules, role_plans, warnings })
}

fn config_err(message: String) -> RulesError {
    RulesError::Config(message)
}

/// Each role's strategy in `mode` (frozen where the mode does not train it)
/// and learning-rate scale; a configuration that contradicts the mode is refused.
fn role_plans(spec: &ModelSpec, cfg: &TrainConfig, mode: Mode) -> Result<BTreeMap<Role, RolePlan>, RulesError> {
    if !spec.has_vision_encoder && matches!(mode, Mode::Vision | Mode::Both) {
        return Err(config_err(format!(
            "{} has no vision encoder; its image path is the projector, which trains in every mode \
             (mode {} has nothing more to train: use mode llm, or projector for the projector alone)",
            spec.family,
            mode.name()
        )));
    }
    let mut role_plans = BTreeMap::new();
    for role in Role::ALL {
        let configured = cfg.roles.get(role).strategy;
        if role == Role::Projector && configured == Some(Strategy::Frozen) {
            return Err(config_err("roles.projector.strategy: the projector trains in every mode; use full or lora".into()));
        }
        if mode.trains(role) && configured == Some(Strategy::Frozen) {
            return Err(config_err(format!(
                "roles.{role}.strategy is frozen, but mode {} trains the {role}; \
                 pick a mode that leaves it frozen, or set full or lora",
                mode.name()
            )));
        }
        let strategy = if mode.trains(role) { cfg.roles.strategy(role) } else { Strategy::Frozen };
        role_plans.insert(role, RolePlan { strategy, lr_scale: cfg.roles.get(role).lr_scale });
    }
    Ok(role_plans)
}

/// Last-k-layers: per parameter, whether it may train (false for the layers
/// of a role's stack before its last `train_last_layers`).
fn last_layers_scope(spec: &ModelSpec, cfg: &TrainConfig, roles: &[Role]) -> Result<Vec<bool>, RulesError> {
    let mut in_scope = vec![true; spec.params.len()];
    for role in Role::ALL {
        let Some(k) = cfg.roles.get(role).train_last_layers else { continue };
        let layers = spec.roles.iter().find(|r| r.role == role).map(|r| r.layers.as_str()).unwrap_or("");
        if layers.is_empty() {
            return Err(config_err(format!(
                "roles.{role}.train_last_layers: the {} plugin declares no layer stack for the {role} role",
                spec.family
            )));
        }
        let n = spec.params.iter().filter_map(|p| layer_index(layers, &p.name)).max().map_or(0, |m| m + 1);
        let first = n.saturating_sub(k);
        for (i, p) in spec.params.iter().enumerate() {
            if roles[i] == role {
                in_scope[i] = layer_index(layers, &p.name).is_some_and(|l| l >= first);
            }
        }
    }
    Ok(in_scope)
}

/// The modules of `role` that get an adapter: `lora.{role}_target_modules`
/// looked up among the role's own LoRA-able linears (all of them but the
/// output head for `all-linear` or no list).
fn lora_targets(spec: &ModelSpec, cfg: &TrainConfig, role: Role, roles: &[Role], warnings: &mut Vec<String>) -> Result<Vec<usize>, RulesError> {
    let role_modules: Vec<usize> = (0..spec.modules.len()).filter(|&m| roles[spec.modules[m].weight as usize] == role).collect();
    let linears: Vec<usize> = role_modules
        .iter()
        .copied()
        .filter(|&m| spec.modules[m].kind == ModuleKind::Linear && spec.modules[m].lora)
        .collect();
    let key = format!("lora.{role}_target_modules");
    let all_linear = || -> Vec<usize> {
        linears.iter().copied().filter(|&m| spec.modules[m].name.rsplit('.').next().is_none_or(|s| s != "lm_head")).collect()
    };
    match cfg.lora.targets(role) {
        // No list: every linear layer of the role, as all-linear (the output head is left out).
        None => Ok(all_linear()),
        Some(list) if list.iter().any(|t| t == "all-linear") => {
            if list.len() > 1 {
                return Err(config_err(format!("{key}: \"all-linear\" stands alone in its list")));
            }
            Ok(all_linear())
        }
        Some(list) => listed_targets(spec, role, &key, list, &role_modules, &linears, warnings),
    }
}

/// The linears of `role_modules` that an explicit target list selects; an
/// entry that selects only layers LoRA cannot take, or a list that selects
/// nothing, is refused with the names that would work.
fn listed_targets(
    spec: &ModelSpec,
    role: Role,
    key: &str,
    list: &[String],
    role_modules: &[usize],
    linears: &[usize],
    warnings: &mut Vec<String>,
) -> Result<Vec<usize>, RulesError> {
    let mut chosen = Vec::new();
    for t in list {
        let pat = Pattern::new(t).map_err(|e| config_err(format!("{key}: {e}")))?;
        let hits = role_modules.iter().copied().filter(|&m| target_selects(&pat, &spec.modules[m].name));
        let (hits, not_lora): (Vec<usize>, Vec<usize>) = hits.partition(|m| linears.contains(m));
        if !not_lora.is_empty() {
            let listed: Vec<String> =
                not_lora.iter().map(|&m| format!("{} ({})", spec.modules[m].name, spec.modules[m].description)).collect();
            if hits.is_empty() {
                return Err(config_err(format!(
                    "{key}: {t:?} selects only {}, which cannot take LoRA; target linear layers instead",
                    listed.join(", ")
                )));
            }
            warnings.push(format!("{key}: {t:?} also names {}, which cannot take LoRA: left out", listed.join(", ")));
        }
        if hits.is_empty() {
            warnings.push(format!("{key}: {t:?} matches no linear layer of the {role}"));
        }
        chosen.extend(hits);
    }
    if chosen.is_empty() {
        let mut names: Vec<&str> = linears.iter().map(|&m| spec.modules[m].name.rsplit('.').next().unwrap_or("")).collect();
        names.sort();
        names.dedup();
        return Err(config_err(format!(
            "{key}: none of {list:?} matches a linear layer of the {} {role}; its linear layers are named: {}",
            spec.family,
            if names.is_empty() { "(none)".to_owned() } else { names.join(", ") }
        )));
    }
    chosen.sort_unstable();
    chosen.dedup();
    Ok(chosen)
}

/// `modules_to_save`: fully trained, no adapter.
fn apply_modules_to_save(spec: &ModelSpec, cfg: &TrainConfig, trainable: &mut [bool], lora_modules: &mut Vec<usize>) -> Result<(), RulesError> {
    for t in &cfg.modules_to_save {
        let pat = Pattern::new(t).map_err(|e| config_err(format!("modules_to_save: {e}")))?;
        let mut hit = false;
        for (i, p) in spec.params.iter().enumerate() {
            if target_selects(&pat, module_of(&p.name)) {
                trainable[i] = true;
                hit = true;
            }
        }
        if !hit {
            return Err(config_err(format!("modules_to_save: {t:?} matches no module of {}", spec.family)));
        }
        lora_modules.retain(|&m| !target_selects(&pat, &spec.modules[m].name));
    }
    Ok(())
}

/// Regex overrides, anchored, last word.
fn apply_overrides(spec: &ModelSpec, cfg: &TrainConfig, trainable: &mut [bool], lora_modules: &mut Vec<usize>) -> Result<(), RulesError> {
    for o in &cfg.overrides {
        let re = regex::Regex::new(&format!("^(?:{})$", o.pattern))
            .map_err(|e| config_err(format!("overrides: {:?}: {e}", o.pattern)))?;
        let mut hit = false;
        for (i, p) in spec.params.iter().enumerate() {
            if re.is_match(&p.name) {
                hit = true;
                trainable[i] = o.train;
            }
        }
        if !o.train {
            lora_modules.retain(|&m| !re.is_match(&spec.params[spec.modules[m].weight as usize].name));
        }
        if !hit {
            return Err(config_err(format!(
                "overrides: {:?} matches no parameter of {} (patterns are anchored: add .* where needed)",
                o.pattern, spec.family
            )));
        }
    }
    Ok(())
}

/// Whether weight decay applies to a parameter (not to biases, norms, embeddings).
pub fn decays(kind: ParamKind) -> bool {
    kind == ParamKind::Weight
}

#[cfg(test)]
mod tests {
    use super::*;
    use vlmhost_plugin_api::builder::{role_rule, SpecBuilder};

    /// A Qwen2-VL-shaped toy: the projector inside `visual.*`, a conv patch embedding.
    fn qwen_like() -> ModelSpec {
        let b = SpecBuilder::new();
        let r = b.root();
        (&r / "visual" / "patch_embed" / "proj").conv(&[8, 3, 2, 2, 2], false, "Conv3d");
        for i in 0..3 {
            let blk = &r / "visual" / "blocks" / i;
            (&blk / "attn" / "qkv").linear(8, 24, true);
            (&blk / "attn" / "proj").linear(8, 8, true);
            (&blk / "norm1").layer_norm(8, true, 1e-6);
        }
        (&r / "visual" / "merger" / "mlp" / 0).linear(32, 16, true);
        (&r / "visual" / "merger" / "mlp" / 2).linear(16, 16, true);
        (&r / "model" / "embed_tokens").embedding(10, 16);
        for i in 0..2 {
            let l = &r / "model" / "layers" / i;
            (&l / "self_attn" / "q_proj").linear(16, 16, true);
            (&l / "self_attn" / "q_proj_x").linear(16, 16, true);
            (&l / "mlp" / "down_proj").linear(16, 16, false);
        }
        (&r / "lm_head").linear(16, 10, false);
        b.build(
            "toy",
            vec![
                role_rule(Role::Vision, &["visual.**"], &["visual.merger.**"], "visual.blocks.*"),
                role_rule(Role::Projector, &["visual.merger.**"], &[], ""),
                role_rule(Role::Llm, &["model.**", "lm_head.**"], &[], "model.layers.*"),
            ],
            vec![],
            vec![],
            true,
        )
    }

    fn lora_names(spec: &ModelSpec, plan: &Plan) -> Vec<String> {
        plan.lora_modules.iter().map(|&m| spec.modules[m].name.to_string()).collect()
    }

    #[test]
    fn the_projector_inside_visual_is_carved_out() {
        let spec = qwen_like();
        let roles = assign_roles(&spec).unwrap();
        let merger = spec.params.iter().position(|p| p.name == "visual.merger.mlp.0.weight").unwrap();
        assert_eq!(roles[merger], Role::Projector);
        let blk = spec.params.iter().position(|p| p.name == "visual.blocks.0.attn.qkv.weight").unwrap();
        assert_eq!(roles[blk], Role::Vision);
    }

    #[test]
    fn unassigned_and_doubly_assigned_are_listed() {
        let mut spec = qwen_like();
        spec.roles[1].include = vec!["visual.merger.**".into(), "model.embed_tokens.**".into()].into();
        spec.roles[2].include = vec!["model.**".into()].into();
        let err = assign_roles(&spec).unwrap_err().to_string();
        assert!(err.contains("without a role:\n    lm_head.weight"), "{err}");
        assert!(err.contains("model.embed_tokens.weight (projector, llm)"), "{err}");
    }

    #[test]
    fn mode_llm_trains_projector_full_and_llm_lora() {
        let spec = qwen_like();
        let plan = plan(&spec, &TrainConfig::default(), Mode::Llm).unwrap();
        for (i, p) in spec.params.iter().enumerate() {
            assert_eq!(plan.trainable[i], plan.roles[i] == Role::Projector, "{}", p.name);
        }
        assert_eq!(
            lora_names(&spec, &plan),
            [
                "model.layers.0.self_attn.q_proj",
                "model.layers.0.self_attn.q_proj_x",
                "model.layers.0.mlp.down_proj",
                "model.layers.1.self_attn.q_proj",
                "model.layers.1.self_attn.q_proj_x",
                "model.layers.1.mlp.down_proj",
            ]
        );
    }

    #[test]
    fn targets_are_segment_wise_and_per_role() {
        let spec = qwen_like();
        let mut cfg = TrainConfig::default();
        cfg.lora.llm_target_modules = Some(vec!["q_proj".into()]);
        cfg.lora.vision_target_modules = Some(vec!["proj".into()]);
        let plan = plan(&spec, &cfg, Mode::Both).unwrap();
        let names = lora_names(&spec, &plan);
        assert!(names.contains(&"model.layers.0.self_attn.q_proj".to_owned()));
        assert!(!names.iter().any(|n| n.ends_with("q_proj_x")), "{names:?}");
        // "proj" in the vision role: the attention output projection, never q_proj, never the merger.
        assert!(names.contains(&"visual.blocks.0.attn.proj".to_owned()));
        assert!(!names.iter().any(|n| n.starts_with("visual.merger")));
        assert!(!names.iter().any(|n| n.contains("patch_embed")));
        assert!(plan.warnings.iter().any(|w| w.contains("visual.patch_embed.proj (Conv3d), which cannot take LoRA: left out")));
    }

    #[test]
    fn all_linear_skips_lm_head_and_convs() {
        let spec = qwen_like();
        let mut cfg = TrainConfig::default();
        cfg.lora.llm_target_modules = Some(vec!["all-linear".into()]);
        cfg.lora.vision_target_modules = Some(vec!["all-linear".into()]);
        let plan = plan(&spec, &cfg, Mode::Both).unwrap();
        let names = lora_names(&spec, &plan);
        assert!(!names.contains(&"lm_head".to_owned()));
        assert!(!names.iter().any(|n| n.contains("patch_embed")));
        assert_eq!(names.len(), 6 + 6);
    }

    #[test]
    fn targeting_a_conv_is_explained() {
        let spec = qwen_like();
        let mut cfg = TrainConfig::default();
        cfg.lora.vision_target_modules = Some(vec!["patch_embed".into()]);
        let err = plan(&spec, &cfg, Mode::Vision).unwrap_err().to_string();
        assert!(err.contains("selects only visual.patch_embed.proj (Conv3d), which cannot take LoRA"), "{err}");
    }

    #[test]
    fn a_target_list_matching_nothing_lists_the_role_linears() {
        let spec = qwen_like();
        let mut cfg = TrainConfig::default();
        cfg.lora.llm_target_modules = Some(vec!["qkv_proj".into()]);
        let err = plan(&spec, &cfg, Mode::Llm).unwrap_err().to_string();
        assert!(err.contains("its linear layers are named: down_proj, lm_head, q_proj, q_proj_x"), "{err}");
    }

    #[test]
    fn projector_mode_and_last_k_layers() {
        let spec = qwen_like();
        let p = plan(&spec, &TrainConfig::default(), Mode::Projector).unwrap();
        assert!(p.lora_modules.is_empty());
        assert!(p.trainable.iter().zip(&p.roles).all(|(t, r)| *t == (*r == Role::Projector)));

        let mut cfg = TrainConfig::default();
        cfg.roles.vision.strategy = Some(Strategy::Full);
        cfg.roles.vision.train_last_layers = Some(1);
        let p = plan(&spec, &cfg, Mode::Vision).unwrap();
        for (i, param) in spec.params.iter().enumerate() {
            if p.roles[i] == Role::Vision {
                assert_eq!(p.trainable[i], param.name.starts_with("visual.blocks.2."), "{}", param.name);
            }
        }
    }

    #[test]
    fn modules_to_save_and_overrides() {
        let spec = qwen_like();
        let mut cfg = TrainConfig::default();
        cfg.modules_to_save = vec!["lm_head".into()];
        cfg.overrides = vec![crate::config::Override { pattern: r"visual\.merger\.mlp\.2\..*".into(), train: false }];
        let p = plan(&spec, &cfg, Mode::Llm).unwrap();
        let idx = |n: &str| spec.params.iter().position(|p| p.name == n).unwrap();
        assert!(p.trainable[idx("lm_head.weight")]);
        assert!(!lora_names(&spec, &p).contains(&"lm_head".to_owned()));
        assert!(!p.trainable[idx("visual.merger.mlp.2.weight")]);
        assert!(p.trainable[idx("visual.merger.mlp.0.weight")]);
        cfg.overrides[0].pattern = "merger".into();
        assert!(plan(&spec, &cfg, Mode::Llm).unwrap_err().to_string().contains("anchored"));
    }

    #[test]
    fn encoder_free_families_explain_vision_modes() {
        let mut spec = qwen_like();
        spec.family = "fuyu".into();
        spec.has_vision_encoder = false;
        spec.roles = vec![
            role_rule(Role::Projector, &["visual.**"], &[], ""),
            role_rule(Role::Llm, &["model.**", "lm_head.**"], &[], "model.layers.*"),
        ]
        .into();
        for mode in [Mode::Vision, Mode::Both] {
            let err = plan(&spec, &TrainConfig::default(), mode).unwrap_err().to_string();
            assert!(
                err.starts_with("fuyu has no vision encoder; its image path is the projector, which trains in every mode"),
                "{err}"
            );
        }
        let p = plan(&spec, &TrainConfig::default(), Mode::Llm).unwrap();
        assert!(p.role_trains(Role::Projector, &spec) && p.role_trains(Role::Llm, &spec));
        assert!(!p.roles.contains(&Role::Vision));
        spec.roles = vec![role_rule(Role::Vision, &["visual.**"], &[], "")].into();
        assert!(assign_roles(&spec).unwrap_err().to_string().contains("no vision encoder but declares a vision role"));
    }

    #[test]
    fn frozen_projector_is_refused() {
        let mut cfg = TrainConfig::default();
        cfg.roles.projector.strategy = Some(Strategy::Frozen);
        let err = plan(&qwen_like(), &cfg, Mode::Projector).unwrap_err().to_string();
        assert!(err.contains("the projector trains in every mode"), "{err}");
    }
}
