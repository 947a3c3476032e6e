//! Bit-exact port of Pillow 13.0.0's 8-bit resampling (`src/libImaging/Resample.c`).

use crate::RgbImage;

/// Pillow resampling filters supported here (`PIL.Image.Resampling` codes 2 and 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResampleFilter {
    Bilinear,
    Bicubic,
}

impl ResampleFilter {
    /// The filter of a `PIL.Image.Resampling` code (2 = bilinear, 3 = bicubic); `None` for
    /// the others.
    pub fn from_pil(code: u32) -> Option<Self> {
        match code {
            2 => Some(Self::Bilinear),
            3 => Some(Self::Bicubic),
            _ => None,
        }
    }

    /// Filter support in input pixels at scale 1 (Resample.c: `BILINEAR = {.., 1.0}`,
    /// `BICUBIC = {.., 2.0}`).
    fn support(self) -> f64 {
        match self {
            Self::Bilinear => 1.0,
            Self::Bicubic => 2.0,
        }
    }

    /// The filter kernel, with Resample.c's exact operation order (`bilinear_filter`,
    /// `bicubic_filter` with a = -0.5), so that the coefficients are bit-identical.
    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Self::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fixed-point precision of Pillow's 8-bit resampling (Resample.c `PRECISION_BITS`):
/// 8 bits for the result, 2 bits of headroom for the negative lobes.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per-output-pixel filter windows along one axis (Resample.c `precompute_coeffs` followed by
/// `normalize_coeffs_8bpc`).
struct AxisCoeffs {
    /// First input index of each output pixel's window.
    start: Vec<usize>,
    /// Window length of each output pixel.
    len: Vec<usize>,
    /// Fixed-point weights, `ksize` per output pixel (only the first `len` are used).
    weights: Vec<i32>,
    ksize: usize,
}

fn axis_coeffs(in_size: usize, out_size: usize, filter: ResampleFilter) -> AxisCoeffs {
    // The box is the whole input (in0 = 0, in1 = in_size).
    let scale = in_size as f64 / out_size as f64;
    // When downscaling the kernel is stretched by the scale factor (antialiasing).
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;

    let mut start = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C `(int)` casts truncate toward zero, as `as i64` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let (xmin, n) = (xmin as usize, xmax.max(0) as usize);
        let mut total = 0.0f64;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter.weight(((x + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            total += w;
        }
        let row = &mut weights[xx * ksize..xx * ksize + n];
        for (dst, &w) in row.iter_mut().zip(&k[..n]) {
            let w = if total != 0.0 { w / total } else { w };
            // Round half away from zero, then truncate (normalize_coeffs_8bpc).
            let scaled = w * (1u32 << PRECISION_BITS) as f64;
            *dst = if w < 0.0 {
                (scaled - 0.5) as i32
            } else {
                (scaled + 0.5) as i32
            };
        }
        start.push(xmin);
        len.push(n);
    }
    AxisCoeffs {
        start,
        len,
        weights,
        ksize,
    }
}

/// Clip a fixed-point accumulator to uint8 (Resample.c `clip8`: arithmetic shift, clamp).
#[inline]
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Adds one weighted RGB pixel to the three channel accumulators.
#[inline]
fn accumulate(acc: &mut [i64; 3], pixel: &[u8], weight: i32) {
    for (a, &v) in acc.iter_mut().zip(pixel) {
        *a += v as i64 * weight as i64;
    }
}

/// Writes the three clipped channels of a finished output pixel.
#[inline]
fn store(out: &mut [u8], acc: &[i64; 3]) {
    for (o, &a) in out.iter_mut().zip(acc) {
        *o = clip8(a);
    }
}

/// Bit-exact port of Pillow 13's `Image.resize((width, height), filter)` for 8-bit RGB
/// (Resample.c `ImagingResampleInner`): two separable passes, each rounding and clipping to
/// uint8; a pass whose size does not change is skipped, and a resize to the same size is a
/// plain copy.
///
/// Pass order: Pillow 13 runs the vertical pass FIRST when the height shrinks by more than twice
/// as many pixels as the width does (`in_h - out_h > 0 && in_h - out_h > 2 * (in_w - out_w)`,
/// signed), otherwise horizontal first. Older Pillow always ran horizontal first. The order
/// changes the result (the intermediate image is 8-bit); for a shortest-edge resize it matters
/// for downscaled images more than twice as tall as wide.
pub fn resize(image: &RgbImage, width: usize, height: usize, filter: ResampleFilter) -> RgbImage {
    let shrink_y = image.height as i64 - height as i64;
    let shrink_x = image.width as i64 - width as i64;
    let vertical_first = shrink_y > 0 && shrink_y > shrink_x * 2;

    let mut img = image.clone();
    if vertical_first {
        if height != img.height {
            img = resample_vertical(&img, height, filter);
        }
        if width != img.width {
            img = resample_horizontal(&img, width, filter);
        }
    } else {
        if width != img.width {
            img = resample_horizontal(&img, width, filter);
        }
        if height != img.height {
            img = resample_vertical(&img, height, filter);
        }
    }
    img
}

fn resample_horizontal(src: &RgbImage, out_w: usize, filter: ResampleFilter) -> RgbImage {
    let c = axis_coeffs(src.width, out_w, filter);
    let h = src.height;
    let mut data = vec![0u8; out_w * h * 3];
    for y in 0..h {
        let row = &src.data[y * src.width * 3..(y + 1) * src.width * 3];
        for xx in 0..out_w {
            let k = &c.weights[xx * c.ksize..xx * c.ksize + c.len[xx]];
            let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
            for (i, &kw) in k.iter().enumerate() {
                let p = (c.start[xx] + i) * 3;
                accumulate(&mut acc, &row[p..p + 3], kw);
            }
            let d = (y * out_w + xx) * 3;
            store(&mut data[d..d + 3], &acc);
        }
    }
    RgbImage::new(out_w, h, data)
}

fn resample_vertical(src: &RgbImage, out_h: usize, filter: ResampleFilter) -> RgbImage {
    let c = axis_coeffs(src.height, out_h, filter);
    let w = src.width;
    let mut data = vec![0u8; w * out_h * 3];
    for yy in 0..out_h {
        let k = &c.weights[yy * c.ksize..yy * c.ksize + c.len[yy]];
        for x in 0..w {
            let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
            for (i, &kw) in k.iter().enumerate() {
                let p = ((c.start[yy] + i) * w + x) * 3;
                accumulate(&mut acc, &src.data[p..p + 3], kw);
            }
            let d = (yy * w + x) * 3;
            store(&mut data[d..d + 3], &acc);
        }
    }
    RgbImage::new(w, out_h, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 5x16 -> 4x5 bicubic shrinks the height by 11 > 2 * 1 pixels, so Pillow 13 runs the
    /// vertical pass first. Expected bytes from Pillow 13.0.0 `Image.resize((4, 5), BICUBIC)`;
    /// horizontal-first gives 5 different bytes.
    #[test]
    fn resize_runs_the_vertical_pass_first_like_pillow_13() {
        let (w, h) = (5usize, 16usize);
        let mut data = Vec::new();
        for y in 0..h {
            for x in 0..w {
                data.extend_from_slice(&[
                    (((x + y) % 2) * 255) as u8,
                    ((x * 61 + y * 17) % 256) as u8,
                    ((y * 40) % 256) as u8,
                ]);
            }
        }
        let img = RgbImage::new(w, h, data);
        let expect: Vec<u8> = vec![
            122, 28, 48, 129, 102, 48, 129, 195, 48, 122, 104, 48, 128, 80, 171, 127, 166, 171,
            127, 175, 171, 128, 68, 171, 127, 144, 99, 127, 174, 99, 127, 67, 99, 127, 97, 99, 127,
            189, 154, 128, 118, 154, 128, 72, 154, 127, 163, 154, 133, 194, 72, 126, 50, 72, 126,
            140, 72, 133, 215, 72,
        ];
        assert_eq!(resize(&img, 4, 5, ResampleFilter::Bicubic).data, expect);
        let horizontal_first = resample_vertical(
            &resample_horizontal(&img, 4, ResampleFilter::Bicubic),
            5,
            ResampleFilter::Bicubic,
        );
        assert_ne!(horizontal_first.data, expect);
    }
}
