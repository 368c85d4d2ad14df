//! burn forward vs tract on our own ONNX export (issue 4, parity (a)): a checkpoint written by
//! the trainer is exported by `flsl_train::export` and run by `flsl_runtime::onnx`; features and
//! prototype logits must match burn's forward within 1e-4, at the training size and at a
//! non-square size that needs the position table resized.

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use flsl_runtime::onnx::{ModelOptions, OnnxModel};
use flsl_train::backend::{Cpu, CpuTrain, cpu_device};
use flsl_train::export::{ExportOptions, export_checkpoint};
use flsl_train::trainer::Run;

fn tmp(name: &str) -> PathBuf {
    let d = common::tmp("export", name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn micro_run(out: &Path) -> Run<CpuTrain> {
    // Initialised only (no training, so no data folder).
    let mut c = common::micro_config(Path::new("unused"), out, 64, 2, 2, 32, 64, 32);
    c.mlp_ratio = 2.0;
    c.seed = 7;
    Run::<CpuTrain>::new(c, cpu_device()).unwrap()
}

/// A deterministic ImageNet-normalised-looking input.
fn input(h: usize, w: usize) -> Vec<f32> {
    (0..3 * h * w)
        .map(|i| ((i as f32 * 0.7193).sin() * 1.7) + ((i % 7) as f32 - 3.0) * 0.1)
        .collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn check(run: &Run<CpuTrain>, ckpt: &Path, h: usize, w: usize, dir: &Path) {
    let onnx = dir.join(format!("micro_{h}x{w}.onnx"));
    let opts = ExportOptions { size: (h, w), with_head: true, ..ExportOptions::default() };
    let src = export_checkpoint(ckpt, &onnx, &opts).unwrap();
    assert_eq!(
        (src.spec.embed_dim, src.spec.depth, src.spec.num_heads, src.spec.patch_size),
        (64, 2, 2, 8)
    );

    let x = input(h, w);
    let dev = cpu_device();
    let xt = Tensor::<Cpu, 4>::from_data(TensorData::new(x.clone(), [1, 3, h, w]), &dev);
    let feats = run.teacher.features(xt);
    let logits = run.teacher.head.forward(feats.clone());
    let feats: Vec<f32> = feats.into_data().convert::<f32>().to_vec().unwrap();
    let logits: Vec<f32> = logits.into_data().convert::<f32>().to_vec().unwrap();

    let mut m = OnnxModel::load(&onnx, ModelOptions::new().with_threads(1)).unwrap();
    assert_eq!(m.input_shape(), [1, 3, h, w]);
    let out = m.run_tensor(&x).unwrap();
    let tf = out.features.as_slice().to_vec();
    let tl = out.logits.expect("exported with the head").as_slice().to_vec();
    let (ef, el) = (max_abs(&feats, &tf), max_abs(&logits, &tl));
    eprintln!("{h}x{w}: burn vs tract max abs: features {ef:.2e}, prototype logits {el:.2e}");
    assert!(ef < 1e-4, "{h}x{w}: features differ by {ef}");
    assert!(el < 1e-4, "{h}x{w}: prototype logits differ by {el}");
    // The check can fail: the same checkpoint with one bias of the last block nudged by 1e-3,
    // exported and run the same way, is caught by it.
    let (file, cfg) = flsl_train::export::resolve_checkpoint(ckpt, opts.part).unwrap();
    let bent = dir.join(format!("bent_{h}x{w}"));
    std::fs::create_dir_all(&bent).unwrap();
    if let Some(cfg) = cfg {
        std::fs::copy(cfg, bent.join("config.json")).unwrap();
    }
    let mut map = flsl_train::tensors::read_safetensors(&file).unwrap();
    let key = map.keys().find(|k| k.ends_with("blocks.1.mlp.fc2.bias")).unwrap().clone();
    let t = map.get_mut(&key).unwrap();
    let mut v = t.to_f32();
    v[0] += 1e-3;
    *t = flsl_train::tensors::HostTensor::f32(t.shape.clone(), v);
    flsl_train::tensors::write_safetensors(&bent.join(file.file_name().unwrap()), &map, None)
        .unwrap();
    let bent_onnx = dir.join(format!("bent_{h}x{w}.onnx"));
    export_checkpoint(&bent, &bent_onnx, &opts).unwrap();
    let mut m = OnnxModel::load(&bent_onnx, ModelOptions::new().with_threads(1)).unwrap();
    let bent_feats = m.run_tensor(&x).unwrap().features.as_slice().to_vec();
    let e = max_abs(&feats, &bent_feats);
    assert!(e > 1e-4, "{h}x{w}: a perturbed export passes the parity check ({e:.2e})");
}

#[test]
fn tract_runs_our_export_as_burn_does_at_training_and_resized_sizes() {
    let dir = tmp("parity");
    let run = micro_run(&dir.join("run"));
    let ckpt = run.save(false).unwrap();
    check(&run, &ckpt, 32, 32, &dir);
    // 48x40: a 6x5 grid from a 4x4 table (the +0.1 bicubic resize) through the run folder.
    check(&run, &dir.join("run"), 48, 40, &dir);
}

#[test]
fn export_errors_name_the_problem() {
    let dir = tmp("errors");
    let missing = dir.join("nothing-here");
    let e = export_checkpoint(&missing, &dir.join("a.onnx"), &ExportOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("nothing-here"), "{e}");
    assert!(!dir.join("a.onnx").exists());

    let run = micro_run(&dir.join("run"));
    let ckpt = run.save(false).unwrap();
    let e = export_checkpoint(
        &ckpt,
        &dir.join("b.onnx"),
        &ExportOptions { size: (30, 32), ..ExportOptions::default() },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("30x32") && e.contains("patch size 8"), "{e}");
    assert!(!dir.join("b.onnx").exists());

    // A garbage weights file: a clear error, nothing written.
    let bad = dir.join("bad.safetensors");
    std::fs::write(&bad, b"not a safetensors file at all").unwrap();
    let e = export_checkpoint(&bad, &dir.join("c.onnx"), &ExportOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad.safetensors"), "{e}");
    assert!(!dir.join("c.onnx").exists());
}

#[test]
fn the_detection_head_exports_into_the_same_onnx_and_matches_burn() {
    use burn::tensor::activation::sigmoid;
    use flsl_train::detector::DetHeadConfig;
    let dir = tmp("det");
    let run = micro_run(&dir.join("run"));
    let ckpt = run.save(false).unwrap();
    let dev = cpu_device();
    let head = DetHeadConfig { in_dim: 64, hidden: 16, classes: 2 }.init::<Cpu>(&dev, 3);
    let det_dir = dir.join("detector");
    std::fs::create_dir_all(&det_dir).unwrap();
    flsl_train::tensors::write_safetensors(
        &det_dir.join("det_head.safetensors"),
        &head.state_dict(),
        None,
    )
    .unwrap();
    // Round trip through the file the exporter reads.
    let loaded = DetHeadConfig { in_dim: 64, hidden: 16, classes: 2 }
        .init::<Cpu>(&dev, 99)
        .load(
            &flsl_train::tensors::read_safetensors(&det_dir.join("det_head.safetensors")).unwrap(),
            &det_dir,
            &dev,
        )
        .unwrap();

    let (h, w) = (40, 48);
    let onnx = dir.join("det.onnx");
    let opts = ExportOptions {
        size: (h, w),
        with_head: true,
        detector: Some(det_dir.clone()),
        ..ExportOptions::default()
    };
    export_checkpoint(&ckpt, &onnx, &opts).unwrap();

    let x = input(h, w);
    let xt = Tensor::<Cpu, 4>::from_data(TensorData::new(x.clone(), [1, 3, h, w]), &dev);
    let feats = run.teacher.features(xt);
    let maps = loaded.forward(feats, h / 8, w / 8);
    let heat: Vec<f32> = sigmoid(maps.heat).into_data().convert::<f32>().to_vec().unwrap();
    let boxes: Vec<f32> = Tensor::cat(vec![sigmoid(maps.offset), maps.log_size.exp()], 1)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap();

    let mut m = OnnxModel::load(&onnx, ModelOptions::new().with_threads(1)).unwrap();
    assert_eq!(m.output_names(), ["features", "prototype_logits", "det_heatmap", "det_boxes"]);
    m.run_tensor(&x).unwrap();
    let (hs, th) = m.output_f32("det_heatmap").unwrap();
    assert_eq!(hs, [1, 2, 10, 12]);
    let (bs, tb) = m.output_f32("det_boxes").unwrap();
    assert_eq!(bs, [1, 4, 10, 12]);
    let (eh, eb) = (max_abs(&heat, th), max_abs(&boxes, tb));
    eprintln!("detection maps burn vs tract: heatmap {eh:.2e}, boxes {eb:.2e}");
    assert!(eh < 1e-4 && eb < 1e-4, "heatmap {eh}, boxes {eb}");
    // A different head's maps differ (the comparison can fail).
    let other = DetHeadConfig { in_dim: 64, hidden: 16, classes: 2 }.init::<Cpu>(&dev, 5);
    let feats =
        run.teacher.features(Tensor::<Cpu, 4>::from_data(TensorData::new(x, [1, 3, h, w]), &dev));
    let o: Vec<f32> = sigmoid(other.forward(feats, h / 8, w / 8).heat)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap();
    assert!(max_abs(&o, th) > 1e-3);
}
