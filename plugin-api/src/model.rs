#![allow(non_local_definitions)] // abi_stable's #[sabi_trait] expansion
//! The model interface: what a plugin declares about an architecture, and the
//! calls the host makes to prepare samples and run forward passes.
//!
//! The split of work:
//! * the plugin declares every parameter and every module under its real
//!   checkpoint name ([`ModelSpec`]), which roles own which names
//!   ([`RoleRule`]), and how other checkpoint key layouts map onto its names
//!   ([`KeyRule`]);
//! * the host creates and loads the parameters, decides what trains and how
//!   (frozen / full / LoRA), and runs every linear layer ([`HostOps::linear`]),
//!   so adapter kinds are the host's business;
//! * the plugin turns a sample into tensors ([`Model::prepare`]) and runs the
//!   architecture ([`Model::forward`]) with the host's parameters.

use crate::tensor::{OwnedTensor, TensorRef};
use crate::PluginError;
use abi_stable::sabi_trait;
use abi_stable::std_types::{RBox, RResult, RStr, RString, RVec};
use abi_stable::StableAbi;

/// The three parts of a VLM.
#[repr(u8)]
#[derive(
    StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The vision encoder.
    Vision = 0,
    /// The projector / adapter from vision features to the LLM's input space.
    Projector = 1,
    /// The language model (embeddings, decoder layers, final norm, head).
    Llm = 2,
}

impl Role {
    /// Every role, in report order.
    pub const ALL: [Role; 3] = [Role::Vision, Role::Projector, Role::Llm];

    /// The lower-case name used in configs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Role::Vision => "vision",
            Role::Projector => "projector",
            Role::Llm => "llm",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a parameter is, for the rules that depend on it (no weight decay on
/// biases, norms and embeddings).
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// A weight matrix or convolution kernel.
    Weight = 0,
    /// A bias vector.
    Bias = 1,
    /// A normalisation scale or shift.
    Norm = 2,
    /// An embedding table or learned position / special embedding.
    Embedding = 3,
}

/// One parameter, under its checkpoint name.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// Full checkpoint name (`language_model.model.layers.0.self_attn.q_proj.weight`).
    pub name: RString,
    pub shape: RVec<i64>,
    pub kind: ParamKind,
    /// The name of the parameter this one shares storage with (a tied
    /// `lm_head`), or empty. A tied parameter may be absent from checkpoints.
    pub tied_to: RString,
}

/// The kind of a module the plugin declares.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModuleKind {
    /// `y = x W^T + b`, run by the host ([`HostOps::linear`]); LoRA-able unless
    /// [`ModuleSpec::lora`] is false.
    Linear = 0,
    /// A convolution, run by the plugin; never a LoRA target.
    Conv = 1,
}

/// One module, under its checkpoint path (the parameter names minus the last
/// segment).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct ModuleSpec {
    /// Module path (`language_model.model.layers.0.self_attn.q_proj`).
    pub name: RString,
    pub kind: ModuleKind,
    pub in_features: i64,
    pub out_features: i64,
    /// Index of the weight in [`ModelSpec::params`].
    pub weight: u32,
    /// Index of the bias in [`ModelSpec::params`], or `u32::MAX` for none.
    pub bias: u32,
    /// Whether LoRA may target it.
    pub lora: bool,
    /// How the checkpoint knows it (`Linear`, `Conv2d`, `Conv3d run as Linear`).
    pub description: RString,
}

/// Which parameter names belong to a role: segment-wise patterns, anchored at
/// both ends (`vision_tower.**`, `visual.**` minus `visual.merger.**`).
///
/// Pattern segments are separated by `.`; `*` matches one segment, `**` any
/// number (including none); anything else matches that segment exactly.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct RoleRule {
    pub role: Role,
    pub include: RVec<RString>,
    pub exclude: RVec<RString>,
    /// The path of the role's repeated layers, with `*` where the layer index
    /// is (`language_model.model.layers.*`), or empty. Used by "train only
    /// the last k layers".
    pub layers: RString,
}

/// Maps one checkpoint key layout onto the plugin's names: a key starting
/// with `from` has that prefix replaced by `to`. Rules are tried in order
/// and the first match wins (a rule with `from == to` keeps a key as it is).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct KeyRule {
    pub from: RString,
    pub to: RString,
}

/// Map a checkpoint key onto the plugin's names with the first matching rule
/// (unchanged when none matches).
pub fn map_key(rules: &[KeyRule], key: &str) -> String {
    for r in rules {
        if let Some(rest) = key.strip_prefix(r.from.as_str()) {
            return format!("{}{rest}", r.to);
        }
    }
    key.to_owned()
}

/// Everything the host needs to know about one model.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// The family name.
    pub family: RString,
    pub params: RVec<ParamSpec>,
    pub modules: RVec<ModuleSpec>,
    pub roles: RVec<RoleRule>,
    pub key_rules: RVec<KeyRule>,
    /// Checkpoint keys to ignore (non-persistent buffers such as
    /// `position_ids`), as role-style patterns.
    pub ignored_keys: RVec<RString>,
    /// False for encoder-free families (Fuyu): there is no vision role.
    pub has_vision_encoder: bool,
    /// How transformers names these parameters in memory (the names PEFT
    /// saves adapters under, after `base_model.model.`): prefix rewrites from
    /// the plugin's names, first match wins.
    pub transformers_names: RVec<KeyRule>,
}

/// A named tensor moving from the plugin to the host.
#[repr(C)]
#[derive(StableAbi)]
pub struct NamedTensor {
    pub name: RString,
    pub tensor: OwnedTensor,
}

/// A named tensor lent by the host for one call.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct NamedTensorRef<'a> {
    pub name: RStr<'a>,
    pub tensor: TensorRef<'a>,
}

/// One sample turned into model inputs.
#[repr(C)]
#[derive(StableAbi)]
pub struct Prepared {
    /// Token ids of the whole rendered conversation.
    pub input_ids: RVec<i64>,
    /// Per token: the id to predict there, or -100 (not supervised). Not
    /// shifted: the host shifts when computing the loss, as transformers does.
    pub labels: RVec<i64>,
    /// Which tokens stand for image content (`true`): truncation never cuts
    /// into them.
    pub image_token_mask: RVec<bool>,
    /// Other inputs (`pixel_values`, ...). The host concatenates each along
    /// dimension 0 across the samples of a batch, in sample order.
    pub tensors: RVec<NamedTensor>,
}

/// A padded batch lent to [`Model::forward`].
#[repr(C)]
#[derive(StableAbi)]
pub struct Batch<'a> {
    /// `[batch, seq]` int64, right-padded.
    pub input_ids: TensorRef<'a>,
    /// `[batch, seq]` int64, 1 for real tokens, 0 for padding.
    pub attention_mask: TensorRef<'a>,
    /// The [`Prepared::tensors`], concatenated.
    pub tensors: RVec<NamedTensorRef<'a>>,
}

/// What the host provides to a forward pass.
#[sabi_trait]
pub trait HostOps {
    /// Parameter `index` of [`ModelSpec::params`] (a new handle on the host's
    /// tensor, so gradients flow back to it).
    fn param(&self, index: u32) -> RResult<OwnedTensor, PluginError>;

    /// Run module `index` of [`ModelSpec::modules`] (a `Linear`) on `x`:
    /// `x W^T + b`, plus the LoRA update where the host applied one.
    fn linear(&self, index: u32, x: TensorRef<'_>) -> RResult<OwnedTensor, PluginError>;

    /// Whether this is a training forward (dropout on).
    fn training(&self) -> bool;

    /// Whether anything in `role` trains. When false the plugin may run that
    /// part without building an autograd graph.
    #[sabi(last_prefix_field)]
    fn role_trains(&self, role: Role) -> bool;

    /// Run segment `id` (a decoder layer, a vision block) on `inputs`: the
    /// host calls back [`Model::run_segment`] with them, either directly or,
    /// with activation checkpointing, without keeping the segment's
    /// activations, recomputing it (the same call, the same inputs) in the
    /// backward pass. So a segment must be a function of its inputs and the
    /// host's parameters alone. Added after the prefix: a host older than the
    /// plugin lacks it (the call fails inside the SDK's panic guard, which
    /// returns it as an error).
    fn segment(&self, id: Segment, inputs: RVec<TensorRef<'_>>) -> RResult<RVec<OwnedTensor>, PluginError>;
}

/// A part of a forward pass the host may recompute instead of keeping its
/// activations ([`HostOps::segment`]): layer `layer` of the family's stack
/// `stack` (its numbering: `0` the LLM's decoder layers, say, `1` a vision
/// tower's blocks), which belongs to `role`.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Segment {
    pub role: Role,
    pub stack: u32,
    pub layer: u32,
}

impl Segment {
    /// Layer `layer` of stack `stack`, in `role`.
    pub const fn new(role: Role, stack: u32, layer: u32) -> Segment {
        Segment { role, stack, layer }
    }
}

/// A borrowed [`HostOps`] trait object.
pub type HostOpsRef<'a> = HostOps_TO<'a, abi_stable::sabi_types::RRef<'a, ()>>;

/// A model opened by a plugin.
#[sabi_trait]
pub trait Model: Send + Sync {
    /// The architecture: parameters, modules, roles, key layouts.
    fn spec(&self) -> ModelSpec;

    /// Turn one sample (JSON, see [`crate::sample::Sample`]) into inputs.
    fn prepare(&self, sample_json: RStr<'_>) -> RResult<Prepared, PluginError>;

    /// Run the model on a batch; returns the logits `[batch, seq, vocab]`.
    fn forward(&self, host: &HostOpsRef<'_>, batch: &Batch<'_>) -> RResult<OwnedTensor, PluginError>;

    /// Incremental decoding: run the model on the new tokens of `batch`
    /// (`input_ids` `[batch, new]`; `attention_mask` covers the cached and the
    /// new tokens, `[batch, past + new]`; the images only on the first call)
    /// with `past`, the cache the previous call returned (empty at first).
    /// Returns the logits of the new tokens and the cache for the next call,
    /// whose layout is the plugin's business (keys and values per layer,
    /// position offsets, ...).
    #[sabi(last_prefix_field)]
    fn forward_cached(
        &self,
        host: &HostOpsRef<'_>,
        batch: &Batch<'_>,
        past: RVec<TensorRef<'_>>,
    ) -> RResult<CachedOutput, PluginError>;

    /// Run segment `id` on `inputs` (what the plugin passed to
    /// [`HostOps::segment`]); the host calls it only for segments the plugin
    /// asked it to run. Added after the prefix.
    fn run_segment(
        &self,
        host: &HostOpsRef<'_>,
        id: Segment,
        inputs: RVec<TensorRef<'_>>,
    ) -> RResult<RVec<OwnedTensor>, PluginError>;
}

/// What [`Model::forward_cached`] returns.
#[repr(C)]
#[derive(StableAbi)]
pub struct CachedOutput {
    /// `[batch, new, vocab]`.
    pub logits: OwnedTensor,
    /// The cache to pass to the next call.
    pub cache: RVec<OwnedTensor>,
}

/// An owned [`Model`] trait object, as plugins return it.
pub type ModelBox = Model_TO<'static, RBox<()>>;
