//! The glue between a family crate and the ABI: a family implements
//! [`Family`] (who it is, open a folder, write a new one, prepare a sample,
//! run the decoder with or without a cache) and exports itself with
//!
//! ```text
//! vlmhost_plugin_api::export_plugin!(vlmhost_plugin_sdk::FamilyPlugin<MyModel>);
//! ```

use crate::chat::CommonOptions;
use std::marker::PhantomData;
use std::path::Path;
use tch::Tensor;
use vlmhost_plugin_api::sample::Sample;
use vlmhost_plugin_api::{
    BatchInputs, FamilyInfo, FamilyModel, Host, ModelOptions, ModelSpec, Plugin, PluginError, PreparedSample, Segment,
};

/// An architecture: its spec and its forward pass.
pub trait Architecture: Send + Sync + 'static {
    /// Parameters, modules, roles and key layouts.
    fn spec(&self) -> &ModelSpec;

    /// The forward pass: logits, and with `past` (empty on the first call) the
    /// cache for the next call.
    fn decode(&self, host: Host<'_, '_>, batch: &BatchInputs, past: Option<&[Tensor]>)
        -> Result<(Tensor, Vec<Tensor>), PluginError>;

    /// Segment `id` on `inputs`: what `decode` passed to [`Host::segment`]
    /// for one of its layers (the host calls it then, and again in the
    /// backward pass when it recomputes the layer).
    fn run_segment(&self, host: Host<'_, '_>, id: Segment, inputs: &[Tensor]) -> Result<Vec<Tensor>, PluginError> {
        let _ = host;
        Err(crate::decoder::segment_error(id, inputs.len()))
    }
}

/// Who a family is and which checkpoints it serves: the ABI's [`FamilyInfo`]
/// as a constant.
#[derive(Clone, Copy, Debug)]
pub struct About {
    /// What users pass to `--plugin`, and the name its errors are filed under.
    pub name: &'static str,
    /// One line: what the model is made of.
    pub description: &'static str,
    /// The `model_type`s served; empty: the family's name alone.
    pub model_types: &'static [&'static str],
    /// The `architectures` a checkpoint of the family names.
    pub architectures: &'static [&'static str],
}

impl About {
    /// A family serving the `model_type` of its own name.
    pub const fn new(name: &'static str, description: &'static str, architectures: &'static [&'static str]) -> About {
        About { name, description, model_types: &[], architectures }
    }

    /// Serving these `model_type`s instead of its name.
    pub const fn model_types(self, model_types: &'static [&'static str]) -> About {
        About { model_types, ..self }
    }

    /// As the ABI reports it.
    pub fn info(&self) -> FamilyInfo {
        let own = [self.name];
        let model_types = if self.model_types.is_empty() { &own[..] } else { self.model_types };
        FamilyInfo::new(self.name, self.description).model_types(model_types).architectures(self.architectures)
    }
}

/// Writes a new checkpoint's files for a preset into an empty folder (a
/// family's `init::init`).
pub type Init = fn(preset: &str, dir: &Path) -> Result<(), PluginError>;

/// One model family served by a plugin: an opened checkpoint folder.
pub trait Family: Sized + Send + Sync + 'static {
    /// Who the family is and which checkpoints it serves.
    const ABOUT: About;

    /// Write a new checkpoint's files for a preset into the empty folder
    /// ([`FamilyPlugin`] then checks that the family opens them).
    const INIT: Init;

    /// Open the checkpoint in `dir` with the user's processor `options` (the family's own:
    /// the common ones, [`CommonOptions`], are taken out).
    fn open(dir: &Path, options: &ModelOptions) -> Result<Self, PluginError>;

    /// Open with the common processor options too. The default is for a family whose processor
    /// writes conversations in a fixed layout: it refuses a `chat_template`, then [`open`]s.
    /// Families that render a Jinja chat template override it and hand the template on
    /// ([`crate::chat`]).
    ///
    /// [`open`]: Family::open
    fn open_with(dir: &Path, options: &ModelOptions, common: &CommonOptions) -> Result<Self, PluginError> {
        common.refuse_chat_template(Self::ABOUT.name)?;
        Self::open(dir, options)
    }

    /// The opened architecture.
    fn arch(&self) -> &dyn Architecture;

    /// One sample as model inputs.
    fn prepare(&self, sample: &Sample) -> Result<PreparedSample, PluginError>;
}

/// The ABI plugin serving family `F`.
pub struct FamilyPlugin<F>(PhantomData<F>);

/// An opened `F` as the ABI's model.
struct Served<F>(F);

impl<F: Family> Plugin for FamilyPlugin<F> {
    fn families() -> Vec<FamilyInfo> {
        vec![F::ABOUT.info()]
    }

    fn open(_family: &str, dir: &Path, options: &ModelOptions) -> Result<Box<dyn FamilyModel>, PluginError> {
        let (common, own) = CommonOptions::split(options)?;
        Ok(Box::new(Served(F::open_with(dir, &own, &common)?)))
    }

    fn init(_family: &str, preset: &str, dir: &Path) -> Result<(), PluginError> {
        (F::INIT)(preset, dir)?;
        crate::init::check_opens::<F>(preset, dir).map(drop)
    }
}

impl<F: Family> FamilyModel for Served<F> {
    fn spec(&self) -> ModelSpec {
        self.0.arch().spec().clone()
    }

    fn prepare(&self, sample: &Sample) -> Result<PreparedSample, PluginError> {
        self.0.prepare(sample)
    }

    fn forward(&self, host: Host<'_, '_>, batch: &BatchInputs) -> Result<Tensor, PluginError> {
        Ok(self.0.arch().decode(host, batch, None)?.0)
    }

    fn forward_cached(&self, host: Host<'_, '_>, batch: &BatchInputs, past: &[Tensor]) -> Result<(Tensor, Vec<Tensor>), PluginError> {
        self.0.arch().decode(host, batch, Some(past))
    }

    fn run_segment(&self, host: Host<'_, '_>, id: Segment, inputs: &[Tensor]) -> Result<Vec<Tensor>, PluginError> {
        self.0.arch().run_segment(host, id, inputs)
    }
}

/// A `[rows, cols...]` float tensor from a flat vector.
pub fn tensor_f32(values: &[f32], shape: &[i64]) -> Result<Tensor, PluginError> {
    Ok(Tensor::f_from_slice(values)?.f_view(shape)?)
}

/// A `[rows, cols...]` int64 tensor from a flat vector.
pub fn tensor_i64(values: &[i64], shape: &[i64]) -> Result<Tensor, PluginError> {
    Ok(Tensor::f_from_slice(values)?.f_view(shape)?)
}
