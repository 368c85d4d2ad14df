//! The synthetic 14x14 frame shared by the post-process allocation test
//! (`tests/perception_alloc.rs`) and benchmark (`benches/postprocess.rs`): three rectangular
//! objects over a background (two of them moving by up to one patch every 10 frames), as
//! features (object direction + noise), `prototype_logits` (K = 64) peaking at the object's
//! prototype, and a 1-class 28x28 heatmap (stride 8) with one peak and a shoulder per object.
#![allow(dead_code)]

pub const GH: usize = 14;
pub const GW: usize = 14;
pub const N: usize = GH * GW;
pub const K: usize = 64;
pub const HS: usize = 28;
pub const WS: usize = 28;

/// Deterministic pseudo-random values in [-1, 1).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// One synthetic frame's model outputs.
pub struct Synthetic {
    pub features: Vec<f32>,
    pub logits: Vec<f32>,
    pub prototypes: Vec<f32>,
    pub heatmap: Vec<f32>,
    pub boxes: Vec<f32>,
}

/// Frame `frame` with `d`-wide features.
pub fn synthetic(frame: usize, d: usize) -> Synthetic {
    let mut rng = Lcg(frame as u64 + 1);
    let mut dirs = Lcg(99);
    let prototypes: Vec<f32> = (0..K * d).map(|_| dirs.next()).collect();
    let shift = frame / 10;
    let objects = [(1 + shift, 2, 4, 3), (8, 6 + shift / 3, 3, 5), (3, 10, 5, 3)];
    let owner = |x: usize, y: usize| {
        objects
            .iter()
            .position(|&(ox, oy, w, h)| x >= ox && x < ox + w && y >= oy && y < oy + h)
            .map_or(0, |o| o + 1)
    };
    let mut features = vec![0.0; N * d];
    let mut logits = vec![0.0; N * K];
    for i in 0..N {
        let c = owner(i % GW, i / GW);
        for j in 0..d {
            features[i * d + j] = 3.0 * prototypes[c * d + j] + 0.3 * rng.next();
        }
        for j in 0..K {
            logits[i * K + j] = if j == c { 4.0 } else { 0.0 } + 0.1 * rng.next();
        }
    }
    let mut heatmap = vec![0.0; HS * WS];
    let mut boxes = vec![0.0; 4 * HS * WS];
    for (o, &(ox, oy, w, h)) in objects.iter().enumerate() {
        // Centre in stride-8 cells (patch 16 = 2 cells).
        let at = (oy * 2 + h) * WS + ox * 2 + w;
        heatmap[at] = 0.9 - o as f32 * 0.1;
        heatmap[at + 1] = 0.5; // a shoulder, not a peak
        boxes[2 * HS * WS + at] = (2 * w) as f32;
        boxes[3 * HS * WS + at] = (2 * h) as f32;
    }
    Synthetic { features, logits, prototypes, heatmap, boxes }
}
