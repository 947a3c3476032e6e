//! From 8-bit pixels to model values, as transformers' image processors do it
//! (`image_transforms.rescale`: `float32(float64(u8) * factor)`; `normalize`:
//! `(x - float32(mean)) / float32(std)` in float32), and the keys of an image
//! processor config that say how ([`RawPixels`], flattened into each family's
//! serde struct of its config file).

use serde::Deserialize;
use vlmhost_imaging::{ResampleFilter, RgbImage};

/// OpenAI CLIP mean/std (`transformers.image_utils.OPENAI_CLIP_MEAN/STD`).
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Rescale and normalise settings, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Pixels {
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

impl Pixels {
    /// Rescale by 1/255, normalise with `mean` and `std`.
    pub const fn new(image_mean: [f64; 3], image_std: [f64; 3]) -> Self {
        Pixels { do_rescale: true, rescale_factor: 1.0 / 255.0, do_normalize: true, image_mean, image_std }
    }

    /// CLIP's settings (the default of CLIP-style processors).
    pub const CLIP: Pixels = Pixels::new(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD);

    /// The settings as an image processor's config writes them (a new checkpoint's).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
        })
    }

    /// One uint8 value of channel `c`, rescaled and normalised.
    #[inline]
    pub fn value(&self, u: u8, c: usize) -> f32 {
        let mut x = if self.do_rescale { (u as f64 * self.rescale_factor) as f32 } else { u as f32 };
        if self.do_normalize {
            x = (x - self.image_mean[c] as f32) / self.image_std[c] as f32;
        }
        x
    }

    /// A uint8 image as channel-first float32 values `[3, H, W]`.
    pub fn to_chw(&self, image: &RgbImage) -> Vec<f32> {
        let n = image.height * image.width;
        let mut out = vec![0f32; 3 * n];
        for c in 0..3 {
            for (i, v) in out[c * n..(c + 1) * n].iter_mut().enumerate() {
                *v = self.value(image.data[i * 3 + c], c);
            }
        }
        out
    }
}

/// `image_mean` / `image_std`: one number for every channel, or three.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MeanStd {
    One(f64),
    PerChannel(Vec<f64>),
}

/// The rescale / normalise / resample keys of an image processor config, as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RawPixels {
    pub resample: Option<u32>,
    pub do_rescale: Option<bool>,
    pub rescale_factor: Option<f64>,
    pub do_normalize: Option<bool>,
    pub image_mean: Option<MeanStd>,
    pub image_std: Option<MeanStd>,
}

impl RawPixels {
    /// The settings, `defaults` where a key is absent; an error names the key.
    pub fn resolve(&self, defaults: &Pixels) -> Result<Pixels, String> {
        let channels = |v: &Option<MeanStd>, default: [f64; 3], key: &str| match v {
            None => Ok(default),
            Some(MeanStd::One(x)) => Ok([*x; 3]),
            Some(MeanStd::PerChannel(v)) if v.len() == 3 => Ok([v[0], v[1], v[2]]),
            Some(MeanStd::PerChannel(v)) => Err(format!("`{key}` has {} values, expected 3 (RGB)", v.len())),
        };
        let image_std = channels(&self.image_std, defaults.image_std, "image_std")?;
        if image_std.contains(&0.0) {
            return Err("`image_std` contains 0".into());
        }
        Ok(Pixels {
            do_rescale: self.do_rescale.unwrap_or(defaults.do_rescale),
            rescale_factor: self.rescale_factor.unwrap_or(defaults.rescale_factor),
            do_normalize: self.do_normalize.unwrap_or(defaults.do_normalize),
            image_mean: channels(&self.image_mean, defaults.image_mean, "image_mean")?,
            image_std,
        })
    }

    /// The resampling filter (`default` when absent).
    pub fn resample(&self, default: ResampleFilter) -> Result<ResampleFilter, String> {
        match self.resample {
            None => Ok(default),
            Some(code) => ResampleFilter::from_pil(code)
                .ok_or_else(|| format!("`resample` {code} is not supported (2 = bilinear, 3 = bicubic)")),
        }
    }
}
