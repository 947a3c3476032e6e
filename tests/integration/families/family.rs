//! [`Family`]: how the tests open a family's fixture through its plugin, and
//! the data each generic check takes (per-family quirks as data or small
//! functions).

use crate::common::*;
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};
use vlmhost::config::{Mode, TrainConfig};
use vlmhost::model::{BatchTensors, HostModel, OpenOptions, PreparedSample};
use vlmhost::plugin_api::Role;

/// Tensors by name: a reference file of a fixture.
pub type Tensors = HashMap<String, Tensor>;

/// A model family as the tests see it: its plugin library and its fixture.
#[derive(Clone, Copy)]
pub struct Family {
    /// The family's name: what the plugin serves (`inspect` reports it), the
    /// folder `target/fixtures/NAME` its fixture script
    /// (`scripts/fixtures/make_NAME_fixture.py`) writes.
    pub name: &'static str,
    /// The plugin library, `libLIB.so` next to the binary.
    pub lib: &'static str,
    /// Processor options the fixture model is opened with (`--processor KEY=VALUE`).
    pub processor: fn() -> serde_json::Map<String, serde_json::Value>,
    /// The id batches are padded with.
    pub pad_id: fn(&Family) -> i64,
}

impl Family {
    /// A family with no processor options, padding with 0.
    pub fn new(name: &'static str, lib: &'static str) -> Family {
        Family { name, lib, processor: serde_json::Map::new, pad_id: |_| 0 }
    }

    /// The plugin library's path.
    pub fn plugin(&self) -> String {
        member_plugin(self.lib).display().to_string()
    }

    /// `target/fixtures/NAME`.
    pub fn fixture(&self) -> PathBuf {
        let dir = workspace_root().join("target/fixtures").join(self.name);
        assert!(dir.join("model").is_dir(), "{} is missing: run scripts/fixtures.sh", dir.display());
        dir
    }

    /// How the tests open the fixture model `model` (a folder of the fixture) through the plugin library.
    pub fn options_for(&self, model: &str, mode: Mode) -> OpenOptions {
        OpenOptions {
            plugin: self.plugin(),
            model_dir: self.fixture().join(model),
            mode,
            kind: Kind::Float,
            device: Device::Cpu,
            allow_missing: false,
            load_weights: true,
            processor: (self.processor)(),
        }
    }

    /// How the tests open the fixture model (`model`).
    pub fn options(&self, mode: Mode) -> OpenOptions {
        self.options_for("model", mode)
    }

    /// The fixture model, opened by the host as training does.
    pub fn open(&self, mode: Mode, cfg: &TrainConfig) -> HostModel {
        self.open_with(&self.options(mode), cfg)
    }

    /// The model `opts` names, opened by the host.
    pub fn open_with(&self, opts: &OpenOptions, cfg: &TrainConfig) -> HostModel {
        vlmhost::model::open(opts, cfg).unwrap_or_else(|e| panic!("{}: {e:#}", self.name))
    }

    /// Every sample of the fixture (`samples/data.jsonl`), prepared by `m`.
    pub fn samples(&self, m: &HostModel) -> Vec<PreparedSample> {
        prepare_file(m, &self.fixture().join("samples/data.jsonl"))
    }

    /// A reference file of the fixture (`reference/NAME`), computed by transformers or PEFT.
    pub fn reference(&self, name: &str) -> Tensors {
        read_tensors(&self.fixture().join("reference").join(name))
    }

    /// A JSON file of the fixture (`NAME`, relative to the fixture's folder).
    pub fn json(&self, name: &str) -> serde_json::Value {
        let path = self.fixture().join(name);
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
    }

    /// The id batches are padded with.
    pub fn pad_id(&self) -> i64 {
        (self.pad_id)(self)
    }

    /// Samples `which` of `samples`, collated (right-padded) as training does.
    pub fn collate(&self, samples: &[PreparedSample], which: &[usize]) -> BatchTensors {
        let picked: Vec<&PreparedSample> = which.iter().map(|&i| &samples[i]).collect();
        vlmhost::model::collate(&picked, self.pad_id(), Device::Cpu).unwrap()
    }
}

/// A prepared sample's tensor `name`.
pub fn tensor<'a>(p: &'a PreparedSample, name: &str) -> &'a Tensor {
    &p.tensors.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1
}

/// [`checks::inputs_match_transformers`](super::checks::inputs_match_transformers).
pub struct Inputs {
    /// How many samples the fixture has.
    pub samples: usize,
    /// How far the processor's pixel values may be from transformers' (0: bit for bit).
    pub pixel_atol: f64,
    /// The family's own checks of sample `i` against its reference.
    pub extra: fn(usize, &PreparedSample, &Tensors),
}

/// [`checks::padded_batch_matches_transformers`](super::checks::padded_batch_matches_transformers).
pub struct PaddedBatch {
    /// The reference file of the batch.
    pub reference: &'static str,
    /// The samples batched, in order.
    pub samples: &'static [usize],
}

/// [`checks::cached_decoding_equals_the_full_forward`](super::checks::cached_decoding_equals_the_full_forward).
pub struct CachedDecoding {
    /// The sample decoded: its prompt in one call (images included), then the rest token by token.
    pub sample: usize,
    /// Where the prompt ends, from the sample's length and its reference.
    pub prompt_len: fn(i64, &Tensors) -> i64,
    /// How many tensors the cache holds.
    pub cache_tensors: usize,
    /// A cache cut to this many tensors is refused, with a message saying these.
    pub short_cache: (usize, &'static [&'static str]),
    /// The family's own checks of the decoding.
    pub extra: fn(&Decoded),
}

/// What [`CachedDecoding::extra`] checks.
pub struct Decoded<'a> {
    pub m: &'a HostModel,
    pub sample: &'a PreparedSample,
    /// The sample, collated.
    pub batch: &'a BatchTensors,
    /// Its reference (`reference/sample_N.safetensors`).
    pub reference: &'a Tensors,
    /// The logits of the prompt and of every step, concatenated.
    pub logits: &'a Tensor,
    /// The cache after the last step.
    pub cache: &'a [Tensor],
}

/// PEFT's `LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")`, for the
/// checks against the PEFT fixture (`peft_manifest.json`, `reference/lora_*`).
pub struct Peft {
    /// The mode the model is opened in.
    pub mode: Mode,
    /// The roles whose linears PEFT targets.
    pub targets: &'static [Role],
    /// The projector's adapters.
    pub projector_modules: &'static [&'static str],
    /// Module names (a part of them) that take no adapter, and why.
    pub never: &'static [(&'static str, &'static str)],
    /// The samples whose LoRA logits and loss are compared (`reference/lora_sample_N`); the last one's gradients too.
    pub samples: &'static [usize],
    /// How many LoRA gradients PEFT's fixture holds (A and B of every module).
    pub gradients: usize,
}

/// [`checks::frozen_stays_bit_identical_and_trainable_moves_in_every_mode`](super::checks::frozen_stays_bit_identical_and_trainable_moves_in_every_mode).
pub struct Training {
    pub modes: &'static [Mode],
    /// The samples of the batch trained on.
    pub samples: &'static [usize],
    pub steps: usize,
    /// Trainable parameters (or LoRA modules) that get no gradient, so may stay as they were.
    pub may_stay: fn(&str) -> bool,
}

/// [`checks::gradient_checkpointing_keeps_gradients`](super::checks::gradient_checkpointing_keeps_gradients).
pub struct Checkpointing {
    /// The samples of the fixture's data the batch holds (with images)...
    pub samples: &'static [usize],
    /// ...or the batch itself, for a fixture without data.
    pub batch: Option<fn() -> BatchTensors>,
    /// The bound on the gradients' relative difference in bf16: [`RTOL_ACT`] (the fp32 bound)
    /// where every tensor's gradient contributions are summed in the same order either way,
    /// which also shows that the recomputation ran under the forward's autocast state.
    pub bf16_rtol: f64,
}

/// Which roles train in `mode`: (vision, projector, llm).
pub fn roles_trained(mode: Mode) -> (bool, bool, bool) {
    match mode {
        Mode::Projector => (false, true, false),
        Mode::Llm => (false, true, true),
        Mode::Vision => (true, true, false),
        Mode::Both => (true, true, true),
    }
}
