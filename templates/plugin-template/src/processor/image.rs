//! Images: loaded as Pillow does (`vlmhost_imaging::load_image`: EXIF
//! orientation, `convert("RGB")`), resized to `image_size` x `image_size`
//! (bilinear by default; processor option `resample=bicubic`), scaled to
//! [-1, 1] (`x / 127.5 - 1`), channels first: `[3, size, size]`.

use std::path::Path;
use vlmhost_imaging::{load_image, resize, ResampleFilter};
use vlmhost_plugin_api::{ModelOptions, PluginError};

/// How images become pixel values.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    pub image_size: usize,
    pub resample: ResampleFilter,
}

impl ImageProcessor {
    /// The image processor for `image_size` images, with the user's
    /// `resample` option.
    pub fn new(image_size: usize, options: &ModelOptions) -> Result<Self, PluginError> {
        let resample = match options.string("resample").as_deref() {
            None | Some("bilinear") => ResampleFilter::Bilinear,
            Some("bicubic") => ResampleFilter::Bicubic,
            Some(other) => {
                return Err(PluginError::invalid_with_hint(
                    "processor option resample",
                    format!("unknown filter {other:?}"),
                    "use bilinear or bicubic",
                ))
            }
        };
        Ok(ImageProcessor { image_size, resample })
    }

    /// An image file as `[3, size, size]` values in [-1, 1].
    pub fn pixels(&self, path: &Path) -> Result<Vec<f32>, PluginError> {
        let image = load_image(path).map_err(|e| PluginError::Io {
            path: path.display().to_string().into(),
            message: e.to_string().into(),
        })?;
        let image = resize(&image, self.image_size, self.image_size, self.resample);
        Ok(image.to_chw().into_iter().map(|v| v as f32 / 127.5 - 1.0).collect())
    }
}
