//! Geometric operations: Pillow's `ImageOps.pad` and `Image.crop`, transformers' centre crop,
//! original LLaVA's `expand2square`.

use crate::{resize, ResampleFilter, RgbImage};

/// Original LLaVA's `expand2square`: pad the short side to a square filled with `fill`, the
/// image centred with offset `(long - short) // 2`.
pub fn expand_to_square(image: &RgbImage, fill: [u8; 3]) -> RgbImage {
    let (w, h) = (image.width, image.height);
    if w == h {
        return image.clone();
    }
    let side = w.max(h);
    let (x0, y0) = if w > h {
        (0, (w - h) / 2)
    } else {
        ((h - w) / 2, 0)
    };
    let mut data: Vec<u8> = fill.iter().copied().cycle().take(side * side * 3).collect();
    for y in 0..h {
        let src = &image.data[y * w * 3..(y + 1) * w * 3];
        let start = ((y + y0) * side + x0) * 3;
        data[start..start + w * 3].copy_from_slice(src);
    }
    RgbImage::new(side, side, data)
}

/// Centre crop to `crop_h` x `crop_w` (`image_transforms.center_crop`): top = (H - crop_h) // 2,
/// left = (W - crop_w) // 2 (floor division); where the image is smaller than the crop it is
/// zero-padded, which amounts to reading 0 outside the image.
pub fn center_crop(image: &RgbImage, crop_h: usize, crop_w: usize) -> RgbImage {
    let top = (image.height as i64 - crop_h as i64).div_euclid(2);
    let left = (image.width as i64 - crop_w as i64).div_euclid(2);
    let mut data = vec![0u8; crop_h * crop_w * 3];
    for y in 0..crop_h {
        let sy = y as i64 + top;
        if sy < 0 || sy >= image.height as i64 {
            continue;
        }
        for x in 0..crop_w {
            let sx = x as i64 + left;
            if sx < 0 || sx >= image.width as i64 {
                continue;
            }
            let s = (sy as usize * image.width + sx as usize) * 3;
            let d = (y * crop_w + x) * 3;
            data[d..d + 3].copy_from_slice(&image.data[s..s + 3]);
        }
    }
    RgbImage::new(crop_w, crop_h, data)
}

/// `Image.crop((x0, y0, x1, y1))`: the `x1 - x0` x `y1 - y0` region whose top-left pixel is
/// (`x0`, `y0`); where the box reaches past the image, Pillow (and this) reads 0.
///
/// Panics if `x1 < x0` or `y1 < y0` (Pillow raises `ValueError` there).
pub fn crop(image: &RgbImage, x0: usize, y0: usize, x1: usize, y1: usize) -> RgbImage {
    assert!(
        x1 >= x0 && y1 >= y0,
        "crop box ({x0}, {y0}, {x1}, {y1}) has a negative size"
    );
    let (w, h) = (x1 - x0, y1 - y0);
    let mut out = RgbImage::filled(w, h, [0, 0, 0]);
    // The part of the box inside the image.
    let cols = image.width.saturating_sub(x0).min(w);
    for y in 0..h.min(image.height.saturating_sub(y0)) {
        let s = ((y0 + y) * image.width + x0) * 3;
        let d = y * w * 3;
        out.data[d..d + cols * 3].copy_from_slice(&image.data[s..s + cols * 3]);
    }
    out
}

/// Size `ImageOps.contain(image, (width, height))` resizes to: the largest size with the image's
/// aspect ratio that fits, the free side computed in float64 and rounded half to even exactly as
/// Pillow 13 writes it (`round(image.height / image.width * width)`, or
/// `round(image.width / image.height * height)`). Returns (width, height).
pub fn contain_size(
    image_width: usize,
    image_height: usize,
    width: usize,
    height: usize,
) -> (usize, usize) {
    if image_height == 0 {
        return (width, 0);
    }
    if height == 0 {
        return (0, 0);
    }
    let im_ratio = image_width as f64 / image_height as f64;
    let dest_ratio = width as f64 / height as f64;
    if im_ratio > dest_ratio {
        let h = (image_height as f64 / image_width as f64 * width as f64).round_ties_even();
        (width, h as usize)
    } else if im_ratio < dest_ratio {
        let w = (image_width as f64 / image_height as f64 * height as f64).round_ties_even();
        (w as usize, height)
    } else {
        (width, height)
    }
}

/// Pillow 13's `ImageOps.pad(image, (width, height), method=BICUBIC, color=fill,
/// centering=(0.5, 0.5))`, bit for bit:
///
/// 1. `ImageOps.contain`: resize (bicubic, [`resize`]) to [`contain_size`]; a size with a zero
///    side gives an empty image;
/// 2. if that is already `width` x `height`, it is the result; otherwise it is pasted on a
///    `fill`-coloured canvas, offset along the padded axis by `round((size - resized) * 0.5)`
///    (Python's `round`: half to even, so an odd margin of 2k+1 puts k pixels first when k is
///    even and k+1 when k is odd).
pub fn pad(image: &RgbImage, width: usize, height: usize, fill: [u8; 3]) -> RgbImage {
    let (rw, rh) = contain_size(image.width, image.height, width, height);
    let resized = if rw == 0 || rh == 0 {
        RgbImage::filled(rw, rh, [0, 0, 0])
    } else {
        resize(image, rw, rh, ResampleFilter::Bicubic)
    };
    if (rw, rh) == (width, height) {
        return resized;
    }
    let mut out = RgbImage::filled(width, height, fill);
    let centre = |margin: usize| (margin as f64 * 0.5).round_ties_even() as usize;
    if rw != width {
        out.paste(&resized, centre(width.saturating_sub(rw)), 0);
    } else {
        out.paste(&resized, 0, centre(height.saturating_sub(rh)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test pattern the expected values below were made from with Pillow 13.0.0.
    fn pattern(w: usize, h: usize) -> RgbImage {
        let mut data = Vec::new();
        for y in 0..h {
            for x in 0..w {
                data.extend_from_slice(&[
                    ((x * 37 + y * 11) % 256) as u8,
                    ((x * x + 3 * y) % 256) as u8,
                    (((x + 1) * (y + 2) * 7) % 256) as u8,
                ]);
            }
        }
        RgbImage::new(w, h, data)
    }

    /// Rows of `img` that are entirely `fill`.
    fn fill_rows(img: &RgbImage, fill: [u8; 3]) -> Vec<usize> {
        (0..img.height)
            .filter(|&y| {
                img.data[y * img.width * 3..(y + 1) * img.width * 3]
                    .chunks_exact(3)
                    .all(|p| p == fill)
            })
            .collect()
    }

    #[test]
    fn pad_matches_pillow_imageops_pad() {
        const G: u8 = 127;
        // ImageOps.pad(pattern(3, 7), (4, 4), color=(127,)*3): contain -> 2x4, x = round(1.0).
        let out = pad(&pattern(3, 7), 4, 4, [G; 3]);
        let expect: Vec<u8> = vec![
            G, G, G, 15, 1, 22, 67, 4, 45, G, G, G, G, G, G, 34, 6, 38, 86, 9, 77, G, G, G, G, G,
            G, 54, 12, 54, 106, 15, 111, G, G, G, G, G, G, 73, 17, 69, 125, 20, 143, G, G, G,
        ];
        assert_eq!(out.data, expect);
        // ImageOps.pad(pattern(6, 4), (3, 5)): contain -> 3x2, y = round(1.5) = 2.
        let out = pad(&pattern(6, 4), 3, 5, [G; 3]);
        let mut expect = vec![G; 18];
        expect.extend_from_slice(&[
            26, 2, 28, 99, 9, 64, 171, 22, 99, 47, 7, 48, 120, 14, 108, 192, 27, 169,
        ]);
        expect.extend_from_slice(&[G; 9]);
        assert_eq!(out.data, expect);
    }

    #[test]
    fn pad_rounds_the_offset_half_to_even() {
        // Margin 3 -> round(1.5) = 2; margin 5 -> round(2.5) = 2 (Pillow 13, Python round).
        let out = pad(&pattern(5, 2), 5, 5, [127; 3]);
        assert_eq!(fill_rows(&out, [127; 3]), vec![0, 1, 4]);
        assert_eq!(&out.data[2 * 15..4 * 15], &pattern(5, 2).data[..]);
        let out = pad(&pattern(7, 2), 7, 7, [127; 3]);
        assert_eq!(fill_rows(&out, [127; 3]), vec![0, 1, 4, 5, 6]);
        assert_eq!(&out.data[2 * 21..4 * 21], &pattern(7, 2).data[..]);
    }

    #[test]
    fn contain_size_rounds_like_pillow() {
        // 200x120 into 256x256: round(0.6 * 256 = 153.6) = 154 (the DeepSeek-OCR fixture).
        assert_eq!(contain_size(200, 120, 256, 256), (256, 154));
        assert_eq!(contain_size(120, 200, 256, 256), (154, 256));
        assert_eq!(contain_size(64, 64, 256, 256), (256, 256));
        // round(1/4 * 2 = 0.5) = 0 (half to even): an empty resize, all padding.
        assert_eq!(contain_size(4, 1, 2, 2), (2, 0));
        assert_eq!(pad(&pattern(4, 1), 2, 2, [9; 3]).data, vec![9; 12]);
    }

    #[test]
    fn crop_matches_pillow_and_reads_zero_outside() {
        // pattern(4, 3).crop((1, 1, 6, 3)): 5x2, the last two columns outside.
        let out = crop(&pattern(4, 3), 1, 1, 6, 3);
        let expect: Vec<u8> = vec![
            48, 4, 42, 85, 7, 63, 122, 12, 84, 0, 0, 0, 0, 0, 0, 59, 7, 56, 96, 10, 84, 133, 15,
            112, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!((out.width, out.height), (5, 2));
        assert_eq!(out.data, expect);
        let img = pattern(6, 4);
        let tile = crop(&img, 3, 2, 6, 4);
        assert_eq!(&tile.data[..9], &img.data[(2 * 6 + 3) * 3..(2 * 6 + 6) * 3]);
    }

    #[test]
    fn center_crop_pads_with_zeros_when_too_small() {
        let img = RgbImage::new(1, 1, vec![9, 9, 9]);
        let out = center_crop(&img, 3, 2);
        // top = (1-3)//2 = -1, left = (1-2)//2 = -1: the pixel lands at (1, 1).
        let mut expect = vec![0u8; 3 * 2 * 3];
        expect[(2 + 1) * 3..(2 + 1) * 3 + 3].copy_from_slice(&[9, 9, 9]);
        assert_eq!(out.data, expect);
    }

    #[test]
    fn expand_to_square_centres_the_image() {
        let img = RgbImage::new(1, 3, vec![1, 1, 1, 2, 2, 2, 3, 3, 3]);
        let out = expand_to_square(&img, [7, 8, 9]);
        assert_eq!((out.width, out.height), (3, 3));
        assert_eq!(&out.data[3..6], &[1, 1, 1]); // column (3-1)//2 = 1
        assert_eq!(&out.data[0..3], &[7, 8, 9]);
    }
}
