//! `dynamic_preprocess` of DeepSeek-OCR's remote code: which grid of tiles an
//! image is cut into in crop mode (`find_closest_aspect_ratio` among 2..=9
//! tiles), and the cutting.

use vlmhost_imaging::{crop, resize, ResampleFilter, RgbImage};

/// Tile counts `dynamic_preprocess` chooses between (infer uses its defaults).
pub const MIN_TILES: usize = 2;
pub const MAX_TILES: usize = 9;

/// The grids (columns, rows) `dynamic_preprocess` considers, in the order it tries them: every
/// (i, j) with `min_tiles <= i * j <= max_tiles`, sorted by i * j.
///
/// The original builds them as a Python `set` and sorts with a stable sort by i * j, so grids
/// with equal products keep the set's iteration order. That order (deterministic in CPython:
/// tuples of ints hash without randomisation, but not obviously i-ascending) cannot change the
/// result, so this uses i ascending: see [`find_closest_grid`].
pub fn candidate_grids(min_tiles: usize, max_tiles: usize) -> Vec<(usize, usize)> {
    let mut grids = Vec::new();
    for n in min_tiles..=max_tiles {
        for i in 1..=n {
            if n % i == 0 {
                grids.push((i, n / i));
            }
        }
    }
    grids
}

/// `find_closest_aspect_ratio`: the grid whose i / j is closest to `width / height` (float64,
/// as Python); on an exact tie with the best so far, a later grid replaces it when the image
/// area exceeds half the grid's pixel area (`area > 0.5 * tile * tile * i * j`, compared here
/// in exact integers, as Python compares int and float exactly).
///
/// Why the order of grids with equal i * j does not matter: the result is decided among the
/// grids at the minimum distance, whose ratios are `a - d` and `a + d` (at most two distinct
/// ratios). Grids of equal product and equal ratio are the same grid, so two of them could only
/// tie at distinct ratios `a - d` < `a + d`; no candidate ratio lies strictly between those (it
/// would be strictly closer), so they are neighbours in the sorted list of candidate ratios, and
/// no two neighbouring ratios share a product (`neighbouring_ratios_never_share_a_product`
/// checks this for 2..=9 tiles). Ties that do happen (e.g. (2, 2) and (3, 3) for a square image,
/// or (2, 2), (3, 2), (3, 3) at 5:4) are between different products, whose order the sort fixes.
pub fn find_closest_grid(
    width: usize,
    height: usize,
    tile: usize,
    grids: &[(usize, usize)],
) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let area = width as u128 * height as u128;
    let mut best_diff = f64::INFINITY;
    let mut best = (1, 1);
    for &(i, j) in grids {
        let diff = (aspect - i as f64 / j as f64).abs();
        if diff < best_diff {
            best_diff = diff;
            best = (i, j);
        } else if diff == best_diff && 2 * area > (tile * tile * i * j) as u128 {
            best = (i, j);
        }
    }
    best
}

/// The tile grid (columns, rows) infer uses in crop mode for a `width` x `height` image:
/// `None` when both sides are at most `tile` (no tiles), else `dynamic_preprocess`'s choice
/// among 2..=9 tiles.
pub fn tile_grid(width: usize, height: usize, tile: usize) -> Option<(usize, usize)> {
    if width <= tile && height <= tile {
        return None;
    }
    let grids = candidate_grids(MIN_TILES, MAX_TILES);
    Some(find_closest_grid(width, height, tile, &grids))
}

/// `dynamic_preprocess` after the grid choice: resize (bicubic) to the grid's pixel size, cut
/// `tile` x `tile` tiles left to right, top to bottom.
pub fn cut_tiles(image: &RgbImage, grid: (usize, usize), tile: usize) -> Vec<RgbImage> {
    let (cols, rows) = grid;
    let resized = resize(image, cols * tile, rows * tile, ResampleFilter::Bicubic);
    let mut tiles = Vec::with_capacity(cols * rows);
    for r in 0..rows {
        for c in 0..cols {
            let (x0, y0) = (c * tile, r * tile);
            tiles.push(crop(&resized, x0, y0, x0 + tile, y0 + tile));
        }
    }
    tiles
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_grids_are_sorted_by_tile_count() {
        let g = candidate_grids(MIN_TILES, MAX_TILES);
        // Every (i, j) with 2 <= i*j <= 9, once.
        let mut expect = Vec::new();
        for i in 1..=9usize {
            for j in 1..=9usize {
                if (2..=9).contains(&(i * j)) {
                    expect.push((i, j));
                }
            }
        }
        let mut sorted = g.clone();
        sorted.sort();
        assert_eq!(sorted, expect);
        assert!(g.windows(2).all(|w| w[0].0 * w[0].1 <= w[1].0 * w[1].1));
    }

    /// The premise of `find_closest_grid`'s argument that the order within a product does not
    /// matter: neighbouring distinct ratios never come from grids of equal product.
    #[test]
    fn neighbouring_ratios_never_share_a_product() {
        let g = candidate_grids(MIN_TILES, MAX_TILES);
        let mut ratios: Vec<(usize, usize)> = g.clone();
        // Sort by exact ratio i/j (cross-multiplication), keep one representative per ratio.
        ratios.sort_by(|a, b| (a.0 * b.1).cmp(&(b.0 * a.1)));
        ratios.dedup_by(|a, b| a.0 * b.1 == b.0 * a.1);
        let products = |r: (usize, usize)| -> Vec<usize> {
            g.iter()
                .filter(|c| c.0 * r.1 == r.0 * c.1)
                .map(|c| c.0 * c.1)
                .collect()
        };
        for w in ratios.windows(2) {
            let (a, b) = (products(w[0]), products(w[1]));
            assert!(a.iter().all(|p| !b.contains(p)), "{:?} {:?}", w[0], w[1]);
        }
    }

    /// Brute force: reversing the order within each product never changes the choice, for every
    /// image size up to 400 px and the tile sizes used.
    #[test]
    fn order_within_a_product_does_not_matter() {
        let g = candidate_grids(MIN_TILES, MAX_TILES);
        let mut rev = g.clone();
        rev.sort_by_key(|&(i, j)| (i * j, std::cmp::Reverse(i)));
        for tile in [128, 640] {
            for w in (1..=400).step_by(3) {
                for h in 1..=400 {
                    assert_eq!(
                        find_closest_grid(w, h, tile, &g),
                        find_closest_grid(w, h, tile, &rev),
                        "{w}x{h} tile {tile}"
                    );
                }
            }
        }
    }

    #[test]
    fn ties_prefer_the_larger_grid_for_large_images() {
        let g = candidate_grids(MIN_TILES, MAX_TILES);
        // Square: (2,2) and (3,3) tie; (3,3) when area > 0.5 * 128^2 * 9 = 73728.
        assert_eq!(find_closest_grid(200, 200, 128, &g), (2, 2));
        assert_eq!(find_closest_grid(272, 272, 128, &g), (3, 3)); // 73984
        assert_eq!(find_closest_grid(271, 272, 128, &g), (2, 2)); // 73712: the same tie, kept
                                                                  // 5:4 lies halfway between 1 and 3/2: (2,2), (3,2), (3,3) all at 0.25.
        assert_eq!(find_closest_grid(250, 200, 128, &g), (3, 2)); // 50000 > 49152
        assert_eq!(find_closest_grid(245, 196, 128, &g), (2, 2)); // 48020
                                                                  // The fixture image: 200x120 -> 3x2.
        assert_eq!(tile_grid(200, 120, 128), Some((3, 2)));
        assert_eq!(tile_grid(128, 128, 128), None);
    }
}
