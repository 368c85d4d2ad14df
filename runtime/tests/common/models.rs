//! Shared fixtures of the detection tests: a micro ViT with the FLSL head (and optionally a
//! detection head) exported to ONNX, and a folder of synthetic frames with one broken file.

use std::path::PathBuf;

use flsl_runtime::export::{HeadSpec, HostTensors, VitSpec, random_vit_weights, vit_model_proto};
use flsl_runtime::export_det::append_det_head;
use prost::Message;

pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flsl-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Seeded pseudo-random weights for the detection head (`det.*`).
pub fn det_weights(d: usize, hidden: usize, classes: usize) -> HostTensors {
    let mut w = HostTensors::new();
    let mut s = 12345u64;
    let mut put = |name: &str, shape: Vec<usize>, scale: f32| {
        let n = shape.iter().product();
        let v = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect();
        w.insert(name.to_string(), (shape, v));
    };
    put("det.up.weight", vec![d, hidden, 2, 2], 0.3);
    put("det.up.bias", vec![hidden], 0.1);
    put("det.conv.weight", vec![hidden, hidden, 3, 3], 0.3);
    put("det.conv.bias", vec![hidden], 0.1);
    put("det.heat.weight", vec![classes, hidden, 1, 1], 1.0);
    put("det.heat.bias", vec![classes], 0.5);
    put("det.offset.weight", vec![2, hidden, 1, 1], 0.3);
    put("det.offset.bias", vec![2], 0.0);
    put("det.size.weight", vec![2, hidden, 1, 1], 0.3);
    put("det.size.bias", vec![2], 0.5);
    w
}

pub fn micro_model(dir: &std::path::Path, with_det: bool) -> PathBuf {
    let spec = VitSpec::new(32, 1, 2, 16, 64, 1e-6, 64, 96);
    let mut w = random_vit_weights(&spec, 1);
    // A small FLSL head: 32 -> 48 -> 48 -> 16, then 24 prototypes.
    let mut put = |k: &str, shape: Vec<usize>| {
        let n: usize = shape.iter().product();
        w.insert(
            k.to_string(),
            (shape, (0..n).map(|i| ((i * 7919 % 997) as f32 / 997.0 - 0.5) * 0.2).collect()),
        );
    };
    put("head.mlp.0.weight", vec![48, 32]);
    put("head.mlp.0.bias", vec![48]);
    put("head.mlp.2.weight", vec![48, 48]);
    put("head.mlp.2.bias", vec![48]);
    put("head.mlp.4.weight", vec![16, 48]);
    put("head.mlp.4.bias", vec![16]);
    put("head.last_layer.weight", vec![24, 16]);
    let (gh, gw) = spec.grid();
    let pos = vec![0.01; gh * gw * 32];
    let mut proto = vit_model_proto(&w, &spec, &pos, Some(&HeadSpec::default())).unwrap();
    if with_det {
        append_det_head(&mut proto, &spec, &det_weights(32, 8, 2)).unwrap();
    }
    let path = dir.join(if with_det { "det.onnx" } else { "plain.onnx" });
    std::fs::write(&path, proto.encode_to_vec()).unwrap();
    path
}

pub fn frames(dir: &std::path::Path, n: usize) -> PathBuf {
    let f = dir.join("frames");
    std::fs::create_dir_all(&f).unwrap();
    for i in 0..n {
        let img = image::RgbImage::from_fn(120, 80, |x, y| {
            let inside = (x as i64 - 40 - 4 * i as i64).abs() < 15 && (y as i64 - 40).abs() < 12;
            image::Rgb(if inside { [220, 40, 30] } else { [30, (x % 200) as u8, 90] })
        });
        img.save(f.join(format!("{i:04}.png"))).unwrap();
    }
    std::fs::write(f.join("broken.png"), b"not a png").unwrap();
    f
}
