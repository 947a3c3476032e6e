//! Declaring an architecture under its checkpoint names, by path segments
//! (`root / "vision_tower" / "encoder" / "layers" / i`), as a plugin builds its
//! modules. Produces the [`ModelSpec`] and typed handles the forward pass uses.

use crate::model::{KeyRule, ModelSpec, ModuleKind, ModuleSpec, ParamKind, ParamSpec, Role, RoleRule};
use abi_stable::std_types::{RString, RVec};
use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt::Display;
use std::rc::Rc;

/// Index of a parameter in [`ModelSpec::params`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamId(pub u32);

/// A linear layer run by the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinearId(pub u32);

/// A convolution (its kernel and optional bias), run by the plugin.
#[derive(Debug, Clone, Copy)]
pub struct ConvParams {
    pub weight: ParamId,
    pub bias: Option<ParamId>,
}

/// A LayerNorm's scale and shift.
#[derive(Debug, Clone, Copy)]
pub struct LayerNormParams {
    pub weight: ParamId,
    pub bias: Option<ParamId>,
    pub eps: f64,
}

/// An RMSNorm's scale.
#[derive(Debug, Clone, Copy)]
pub struct RmsNormParams {
    pub weight: ParamId,
    pub eps: f64,
}

#[derive(Default)]
struct Inner {
    params: Vec<ParamSpec>,
    modules: Vec<ModuleSpec>,
    /// The parameters' full names, so a duplicate is found in constant time.
    names: HashSet<String>,
}

/// Collects parameters and modules; [`SpecBuilder::root`] gives the first path.
#[derive(Default)]
pub struct SpecBuilder {
    inner: Rc<RefCell<Inner>>,
}

/// A position in the module tree.
#[derive(Clone)]
pub struct SpecPath {
    inner: Rc<RefCell<Inner>>,
    prefix: String,
}

impl SpecBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The root of the module tree.
    pub fn root(&self) -> SpecPath {
        SpecPath { inner: Rc::clone(&self.inner), prefix: String::new() }
    }

    /// Finish: the spec of family `family`.
    pub fn build(
        self,
        family: &str,
        roles: Vec<RoleRule>,
        key_rules: Vec<KeyRule>,
        ignored_keys: Vec<String>,
        has_vision_encoder: bool,
    ) -> ModelSpec {
        let inner = self.inner.borrow();
        ModelSpec {
            family: family.into(),
            params: inner.params.clone().into(),
            modules: inner.modules.clone().into(),
            roles: roles.into(),
            key_rules: key_rules.into(),
            ignored_keys: ignored_keys.into_iter().map(RString::from).collect(),
            has_vision_encoder,
            transformers_names: RVec::new(),
        }
    }
}

/// A [`RoleRule`] from string patterns.
pub fn role_rule(role: Role, include: &[&str], exclude: &[&str], layers: &str) -> RoleRule {
    RoleRule {
        role,
        include: include.iter().map(|s| RString::from(*s)).collect(),
        exclude: exclude.iter().map(|s| RString::from(*s)).collect(),
        layers: layers.into(),
    }
}

/// A [`KeyRule`].
pub fn key_rule(from: &str, to: &str) -> KeyRule {
    KeyRule { from: from.into(), to: to.into() }
}

impl<T: Display> std::ops::Div<T> for &SpecPath {
    type Output = SpecPath;
    fn div(self, segment: T) -> SpecPath {
        self.pp(segment)
    }
}

impl<T: Display> std::ops::Div<T> for SpecPath {
    type Output = SpecPath;
    fn div(self, segment: T) -> SpecPath {
        self.pp(segment)
    }
}

impl SpecPath {
    /// The path one segment deeper.
    pub fn pp(&self, segment: impl Display) -> SpecPath {
        let prefix = if self.prefix.is_empty() {
            segment.to_string()
        } else {
            format!("{}.{segment}", self.prefix)
        };
        SpecPath { inner: Rc::clone(&self.inner), prefix }
    }

    /// The dotted path.
    pub fn path(&self) -> &str {
        &self.prefix
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Declare parameter `name` here.
    pub fn param(&self, name: &str, shape: &[i64], kind: ParamKind) -> ParamId {
        self.param_tied(name, shape, kind, "")
    }

    /// Declare parameter `name`, sharing storage with `tied_to` (full name).
    pub fn param_tied(&self, name: &str, shape: &[i64], kind: ParamKind, tied_to: &str) -> ParamId {
        let mut inner = self.inner.borrow_mut();
        let full = self.full(name);
        assert!(inner.names.insert(full.clone()), "parameter {full} declared twice");
        inner.params.push(ParamSpec {
            name: full.into(),
            shape: shape.iter().copied().collect(),
            kind,
            tied_to: tied_to.into(),
        });
        ParamId(inner.params.len() as u32 - 1)
    }

    /// Declare a `Linear(in, out)` at this path (weight `[out, in]`, optional bias).
    pub fn linear(&self, in_features: i64, out_features: i64, bias: bool) -> LinearId {
        self.linear_with(in_features, out_features, bias, true, "Linear")
    }

    /// A linear layer with an explicit LoRA eligibility and description
    /// (`Conv3d run as Linear`, say).
    pub fn linear_with(
        &self,
        in_features: i64,
        out_features: i64,
        bias: bool,
        lora: bool,
        description: &str,
    ) -> LinearId {
        let weight = self.param("weight", &[out_features, in_features], ParamKind::Weight);
        let bias = bias.then(|| self.param("bias", &[out_features], ParamKind::Bias));
        LinearId(self.push_module(ModuleKind::Linear, in_features, out_features, weight, bias, lora, description))
    }

    /// Record the module at this path; returns its index.
    #[allow(clippy::too_many_arguments)]
    fn push_module(
        &self,
        kind: ModuleKind,
        in_features: i64,
        out_features: i64,
        weight: ParamId,
        bias: Option<ParamId>,
        lora: bool,
        description: &str,
    ) -> u32 {
        let mut inner = self.inner.borrow_mut();
        inner.modules.push(ModuleSpec {
            name: self.prefix.clone().into(),
            kind,
            in_features,
            out_features,
            weight: weight.0,
            bias: bias.map_or(u32::MAX, |b| b.0),
            lora,
            description: description.into(),
        });
        inner.modules.len() as u32 - 1
    }

    /// A bias-free linear layer whose weight shares storage with parameter
    /// `tied_to` (a head tied to the input embeddings).
    pub fn linear_tied(&self, in_features: i64, out_features: i64, tied_to: &str) -> LinearId {
        let weight = self.param_tied("weight", &[out_features, in_features], ParamKind::Weight, tied_to);
        LinearId(self.push_module(ModuleKind::Linear, in_features, out_features, weight, None, true, "Linear (tied)"))
    }

    /// Declare a convolution kernel of `shape` (`[out, in, k...]`) here.
    pub fn conv(&self, shape: &[i64], bias: bool, description: &str) -> ConvParams {
        let weight = self.param("weight", shape, ParamKind::Weight);
        let bias = bias.then(|| self.param("bias", &shape[..1], ParamKind::Bias));
        let in_features: i64 = shape[1..].iter().product();
        self.push_module(ModuleKind::Conv, in_features, shape[0], weight, bias, false, description);
        ConvParams { weight, bias }
    }

    /// A LayerNorm over `dim` with scale and (optionally) shift.
    pub fn layer_norm(&self, dim: i64, bias: bool, eps: f64) -> LayerNormParams {
        let weight = self.param("weight", &[dim], ParamKind::Norm);
        let bias = bias.then(|| self.param("bias", &[dim], ParamKind::Norm));
        LayerNormParams { weight, bias, eps }
    }

    /// An RMSNorm over `dim`.
    pub fn rms_norm(&self, dim: i64, eps: f64) -> RmsNormParams {
        RmsNormParams { weight: self.param("weight", &[dim], ParamKind::Norm), eps }
    }

    /// An embedding table `[num, dim]` (parameter `weight`).
    pub fn embedding(&self, num: i64, dim: i64) -> ParamId {
        self.param("weight", &[num, dim], ParamKind::Embedding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_build_checkpoint_names() {
        let b = SpecBuilder::new();
        let root = b.root();
        let layer = &root / "model" / "layers" / 3;
        let q = (&layer / "self_attn" / "q_proj").linear(8, 4, true);
        let n = (&layer / "input_layernorm").rms_norm(8, 1e-6);
        let spec = b.build("fam", vec![], vec![], vec![], true);
        assert_eq!(q, LinearId(0));
        assert_eq!(spec.params[0].name, "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(spec.params[0].shape.as_slice(), &[4, 8]);
        assert_eq!(spec.params[1].name, "model.layers.3.self_attn.q_proj.bias");
        assert_eq!(spec.params[n.weight.0 as usize].name, "model.layers.3.input_layernorm.weight");
        assert_eq!(spec.modules[0].name, "model.layers.3.self_attn.q_proj");
        assert_eq!(spec.modules[0].bias, 1);
    }

    #[test]
    #[should_panic(expected = "parameter a.weight declared twice")]
    fn a_parameter_declared_twice_is_refused() {
        let b = SpecBuilder::new();
        (&b.root() / "a").linear(2, 2, false);
        (&b.root() / "a").rms_norm(2, 1e-6);
    }

    /// 5000 layers of 12 parameters (60 000 names) build in well under a
    /// second in a debug build; a quadratic duplicate check took minutes.
    #[test]
    fn building_is_linear_in_the_number_of_parameters() {
        let start = std::time::Instant::now();
        let b = SpecBuilder::new();
        let root = b.root();
        for i in 0..5000 {
            let layer = &root / "model" / "layers" / i;
            for name in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] {
                (&layer / "self_attn" / name).linear(4, 4, name.ends_with("_proj") && name.len() == 6);
            }
            (&layer / "input_layernorm").rms_norm(4, 1e-6);
        }
        let spec = b.build("fam", vec![], vec![], vec![], true);
        let took = start.elapsed();
        assert_eq!(spec.params.len(), 5000 * 12);
        assert!(took.as_secs_f64() < 10.0, "5000 layers took {took:?}");
        eprintln!("5000 layers, {} parameters: {took:?}", spec.params.len());
    }
}
