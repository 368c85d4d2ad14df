//! Token sampling masks ("random pooling"; reference `DataAugmentationFLSL._sampling_mask`).
//!
//! One query token is chosen per `ws x ws` window of the `(fs/ws)*ws` sub-grid of an `fs x fs`
//! token grid: the window's top-left token, or a uniformly random one with `random_sampling`.
//! When `fs` is not a multiple of `ws` the sub-grid sits in one of the four corners, chosen
//! uniformly (even without `random_sampling`).

use rand::Rng;

/// Where the sub-grid sits when the grid is not a multiple of the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corner {
    /// Rows and columns start at 0.
    TopLeft,
    /// Columns end at the grid's last column.
    TopRight,
    /// Rows end at the grid's last row.
    BottomLeft,
    /// Both end at the last row/column.
    BottomRight,
}

impl Corner {
    /// The reference's mapping of a uniform draw `p` in [0, 1).
    pub fn from_uniform(p: f64) -> Self {
        if p < 0.25 {
            Self::TopLeft
        } else if p < 0.5 {
            Self::TopRight
        } else if p < 0.75 {
            Self::BottomLeft
        } else {
            Self::BottomRight
        }
    }
}

/// Builds a flat `[fs*fs]` mask (1 = query) from the corner and the in-window choices
/// (`choices[gi * grid + gj]` in `[0, ws^2)`).
pub fn mask_from_choices(fs: usize, ws: usize, corner: Corner, choices: &[usize]) -> Vec<u8> {
    let grid = fs / ws;
    let s = grid * ws;
    let (r0, c0) = match corner {
        Corner::TopLeft => (0, 0),
        Corner::TopRight => (0, fs - s),
        Corner::BottomLeft => (fs - s, 0),
        Corner::BottomRight => (fs - s, fs - s),
    };
    let mut mask = vec![0u8; fs * fs];
    for gi in 0..grid {
        for gj in 0..grid {
            let k = choices.get(gi * grid + gj).copied().unwrap_or(0) % (ws * ws);
            let r = r0 + gi * ws + k / ws;
            let c = c0 + gj * ws + k % ws;
            mask[r * fs + c] = 1;
        }
    }
    mask
}

/// Draws a sampling mask for an `fs x fs` grid with window `ws`.
pub fn sampling_mask<R: Rng + ?Sized>(
    fs: usize,
    ws: usize,
    random_sampling: bool,
    rng: &mut R,
) -> Vec<u8> {
    let ws = ws.clamp(1, fs.max(1));
    let grid = fs / ws;
    let choices: Vec<usize> = (0..grid * grid)
        .map(|_| if random_sampling { rng.random_range(0..ws * ws) } else { 0 })
        .collect();
    let corner = if !fs.is_multiple_of(ws) {
        Corner::from_uniform(rng.random::<f64>())
    } else {
        Corner::TopLeft
    };
    mask_from_choices(fs, ws, corner, &choices)
}

/// Checks the structural rules of a mask; returns a description of the first violation.
///
/// Exactly one token per window of one of the four corner placements of the sub-grid, and the
/// window's top-left token when `random_sampling` is false.
pub fn check_mask(
    mask: &[u8],
    fs: usize,
    ws: usize,
    random_sampling: bool,
) -> crate::Result<Corner> {
    if mask.len() != fs * fs {
        return Err(crate::Error::Shape {
            op: "sampling mask",
            reason: format!("mask has {} entries, expected {}", mask.len(), fs * fs),
        });
    }
    let grid = fs / ws;
    let s = grid * ws;
    let selected = mask.iter().filter(|&&m| m != 0).count();
    if selected != grid * grid {
        return Err(crate::Error::Shape {
            op: "sampling mask",
            reason: format!("{selected} tokens selected, expected {}", grid * grid),
        });
    }
    let corners = if fs.is_multiple_of(ws) {
        vec![Corner::TopLeft]
    } else {
        vec![Corner::TopLeft, Corner::TopRight, Corner::BottomLeft, Corner::BottomRight]
    };
    'corner: for corner in corners {
        let (r0, c0) = match corner {
            Corner::TopLeft => (0, 0),
            Corner::TopRight => (0, fs - s),
            Corner::BottomLeft => (fs - s, 0),
            Corner::BottomRight => (fs - s, fs - s),
        };
        for gi in 0..grid {
            for gj in 0..grid {
                let mut hits = Vec::new();
                for dr in 0..ws {
                    for dc in 0..ws {
                        if mask[(r0 + gi * ws + dr) * fs + c0 + gj * ws + dc] != 0 {
                            hits.push(dr * ws + dc);
                        }
                    }
                }
                if hits.len() != 1 || (!random_sampling && hits[0] != 0) {
                    continue 'corner;
                }
            }
        }
        return Ok(corner);
    }
    Err(crate::Error::Shape {
        op: "sampling mask",
        reason: format!(
            "no corner placement of the {grid}x{grid} windows of size {ws} explains the mask"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn drawn_masks_follow_the_rules() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for (fs, ws) in [(14, 3), (6, 2), (7, 3), (4, 2), (3, 2)] {
            for random in [false, true] {
                for _ in 0..20 {
                    let m = sampling_mask(fs, ws, random, &mut rng);
                    check_mask(&m, fs, ws, random).unwrap();
                }
            }
        }
    }

    #[test]
    fn a_wrong_mask_is_rejected() {
        let mut m = mask_from_choices(6, 2, Corner::TopLeft, &[0; 9]);
        m[1] = 1;
        assert!(check_mask(&m, 6, 2, false).is_err());
        let m = mask_from_choices(6, 2, Corner::TopLeft, &[3; 9]);
        assert!(check_mask(&m, 6, 2, false).is_err(), "fixed masks use the top-left token");
        assert!(check_mask(&m, 6, 2, true).is_ok());
    }
}
