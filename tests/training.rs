//! End-to-end pretraining on tiny synthetic images: the loss goes down, prototypes stay in use,
//! a resumed run equals an uninterrupted one, unreadable images are skipped.

mod common;

use std::path::{Path, PathBuf};

use flsl_train::backend::{CpuTrain, cpu_device};
use flsl_train::config::TrainConfig;
use flsl_train::model::named;
use flsl_train::trainer::{Run, TrainOptions, checkpoints_dir, train, train_on_devices};

/// Writes `n` 48x48 two-colour scenes.
fn synthetic_images(dir: &Path, n: usize) {
    flsl_train::data::write_synthetic_scenes(dir, n, 48).unwrap();
}

fn tmp(name: &str) -> PathBuf {
    common::tmp("training", name)
}

fn micro_config(data: &Path, out: &Path) -> TrainConfig {
    let mut c = common::micro_config(data, out, 32, 1, 2, 16, 32, 32);
    c.epochs = 6;
    c.epoch_len = Some(8);
    c.drop_path_rate = 0.1;
    c.validate().unwrap();
    c
}

#[test]
fn a_short_run_lowers_the_loss_and_keeps_prototypes_in_use() {
    let root = tmp("loss");
    synthetic_images(&root.join("img"), 12);
    let mut cfg = micro_config(&root.join("img"), &root.join("run"));
    cfg.epochs = 10;
    let run =
        train(Run::<CpuTrain>::new(cfg, cpu_device()).unwrap(), &TrainOptions::default()).unwrap();
    let h: Vec<f64> = run.state.history.iter().map(|(_, l)| l.total).collect();
    assert_eq!(h.len(), 20);
    let first = h[..4].iter().sum::<f64>() / 4.0;
    let last = h[h.len() - 4..].iter().sum::<f64>() / 4.0;
    assert!(last < first, "loss should decrease: first steps {first:.4}, last steps {last:.4}");
    // Collapse monitor: the teacher does not put every token on one prototype (floor: 2 of
    // 16 in use, normalised assignment entropy above 0.05) after 20 steps of a micro model.
    let last_epoch = run.state.epochs.last().unwrap();
    assert!(last_epoch.prototypes_used >= 2, "{last_epoch:?}");
    assert!(last_epoch.assignment_entropy > 0.05, "{last_epoch:?}");
    assert!(root.join("run/loss.png").exists());
    assert!(root.join("run/log.jsonl").exists());
    assert!(checkpoints_dir(&root.join("run")).join("latest/student.safetensors").exists());
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn resuming_gives_the_same_weights_as_an_uninterrupted_run() {
    let root = tmp("resume");
    synthetic_images(&root.join("img"), 8);
    // K = 3 steps, then save (mid-epoch: epochs have 2 steps), resume, 3 more.
    let mut a = micro_config(&root.join("img"), &root.join("a"));
    a.epochs = 3;
    let full =
        train(Run::<CpuTrain>::new(a, cpu_device()).unwrap(), &TrainOptions::default()).unwrap();
    assert_eq!(full.state.step, 6);

    let mut b = micro_config(&root.join("img"), &root.join("b"));
    b.epochs = 3;
    let half = train(
        Run::<CpuTrain>::new(b, cpu_device()).unwrap(),
        &TrainOptions { max_steps: Some(3), ..Default::default() },
    )
    .unwrap();
    assert_eq!(half.state.step, 3);
    let resumed =
        Run::<CpuTrain>::load(&checkpoints_dir(&root.join("b")).join("latest"), cpu_device())
            .unwrap();
    assert_eq!(resumed.state.step, 3);
    // The saved state is restored bit for bit: weights, EMA teacher, Adam moments and steps.
    assert_eq!(
        named::state_dict::<CpuTrain, _>(&resumed.student),
        named::state_dict::<CpuTrain, _>(&half.student)
    );
    assert_eq!(named::state_dict(&resumed.teacher), named::state_dict(&half.teacher));
    assert_eq!(resumed.adam.to_host(), half.adam.to_host());
    assert_eq!(resumed.state, half.state);
    drop(half);
    let done = train(resumed, &TrainOptions::default()).unwrap();
    assert_eq!(done.state.step, 6);

    // Same data, same masks, same drop-path draws, same schedules, and a backend whose
    // products and reductions run in a fixed order: the continuation equals the uninterrupted
    // run bit for bit (weights, EMA teacher, Adam moments, every logged loss).
    assert_eq!(
        named::state_dict::<CpuTrain, _>(&full.student),
        named::state_dict::<CpuTrain, _>(&done.student)
    );
    assert_eq!(named::state_dict(&full.teacher), named::state_dict(&done.teacher));
    assert_eq!(full.adam.to_host(), done.adam.to_host());
    assert_eq!(full.state.history, done.state.history);
    // The epoch cut by the resume (step 3 is the middle of epoch 1) reports all of its batches:
    // the same summaries as the uninterrupted run, throughput aside.
    let summaries = |r: &Run<CpuTrain>| {
        let mut v = r.state.epochs.clone();
        v.iter_mut().for_each(|e| e.images_per_s = 0.0);
        v
    };
    assert_eq!(summaries(&full), summaries(&done));
    assert!(done.state.epochs[1].loss.is_some());
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn two_data_parallel_replicas_equal_one_device_on_the_whole_batch() {
    // Two replicas with 2 samples each (gradients averaged by burn-collective) against one
    // device with the same 4 samples: the mean-shift and k-means terms are means over samples,
    // and the VMR takes the replicas' mean assignment (the reference's AllReduce), so the
    // averaged gradient is the whole batch's gradient and both runs apply the same AdamW
    // updates. Drop path is off (its draws differ per replica by design).
    let root = tmp("ddp");
    synthetic_images(&root.join("img"), 8);
    let cfg = |out: &str, device: &str, per_device: usize| {
        let mut c = micro_config(&root.join("img"), &root.join(out));
        c.batch_size_per_gpu = per_device;
        c.device = device.into();
        c.drop_path_rate = 0.0;
        c.epochs = 2;
        c.lr = 0.5; // peak 0.5 * 4 / 256 ~ 8e-3: AdamW moves weights by ~1e-2 in 4 steps
        c.validate().unwrap();
        c
    };
    let init = Run::<CpuTrain>::new(cfg("init", "cpu", 4), cpu_device()).unwrap();
    let one = train(
        Run::<CpuTrain>::new(cfg("one", "cpu", 4), cpu_device()).unwrap(),
        &TrainOptions::default(),
    )
    .unwrap();
    let two = train_on_devices(
        Run::<CpuTrain>::new(cfg("two", "cpu,cpu", 2), cpu_device()).unwrap(),
        vec![cpu_device()],
        &TrainOptions::default(),
    )
    .unwrap();
    assert_eq!((one.state.step, two.state.step), (4, 4));
    let (w0, w1, w2) = (
        named::state_dict::<CpuTrain, _>(&init.student),
        named::state_dict::<CpuTrain, _>(&one.student),
        named::state_dict::<CpuTrain, _>(&two.student),
    );
    let (mut moved, mut worst) = (0f32, (0f32, String::new()));
    let width = 32; // micro_config's embed_dim
    for (name, t) in &w1 {
        let (a, b, z) = (t.to_f32(), w2[name].to_f32(), w0[name].to_f32());
        moved = moved.max(a.iter().zip(&z).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max));
        // The key bias (`qkv.bias[C..2C]`) has a zero true gradient (softmax is invariant to
        // it): AdamW turns its float32 rounding noise into lr-sized steps in any two runs.
        let key_bias =
            |i: usize| name.ends_with("attn.qkv.bias") && (width..2 * width).contains(&i);
        let d = a
            .iter()
            .zip(&b)
            .enumerate()
            .filter(|(i, _)| !key_bias(*i))
            .map(|(_, (p, q))| (p - q).abs())
            .fold(0f32, f32::max);
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    // Training moved the weights by ~1e-2; the two runs agree to float32 summation order.
    eprintln!("weights moved up to {moved:e}; 2 replicas vs 1 device: {:e} ({})", worst.0, worst.1);
    assert!(moved > 1e-3, "training did not move the weights ({moved:e})");
    assert!(
        worst.0 <= 1e-5,
        "parameter {} differs by {:e} between 2 replicas and 1 device",
        worst.1,
        worst.0
    );
    // The logged loss is the replicas' mean, i.e. the whole batch's loss.
    for ((sa, la), (sb, lb)) in one.state.history.iter().zip(&two.state.history) {
        assert_eq!(sa, sb);
        assert!((la.total - lb.total).abs() < 1e-4, "step {sa}: {la} vs {lb}");
    }
    // The device list and the replicas given must agree.
    let err = train(
        Run::<CpuTrain>::new(cfg("bad", "cpu,cpu", 2), cpu_device()).unwrap(),
        &TrainOptions::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("`device`") && err.contains("2 devices"), "{err}");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn multi_stage_training_is_guided_by_the_previous_stage() {
    let root = tmp("stage");
    synthetic_images(&root.join("img"), 8);
    // Stage 1: two steps; its checkpoint folder is the previous stage.
    let mut first = micro_config(&root.join("img"), &root.join("stage1"));
    first.epochs = 1;
    train(Run::<CpuTrain>::new(first, cpu_device()).unwrap(), &TrainOptions::default()).unwrap();
    // Stage 2 from the same initialisation, with and without it (same data, masks, seeds).
    let stage2 = |out: &str, prev: Option<PathBuf>, level: usize| {
        let mut c = micro_config(&root.join("img"), &root.join(out));
        c.epochs = 1;
        c.drop_path_rate = 0.0;
        c.model_previous_stage = prev;
        c.attention_level = level;
        c.validate().unwrap();
        c
    };
    let plain = train(
        Run::<CpuTrain>::new(stage2("plain", None, 1), cpu_device()).unwrap(),
        &TrainOptions::default(),
    )
    .unwrap();
    let staged = train(
        Run::<CpuTrain>::new(stage2("staged", Some(root.join("stage1")), 1), cpu_device()).unwrap(),
        &TrainOptions::default(),
    )
    .unwrap();
    let (p, s) = (&plain.state.history[0].1, &staged.state.history[0].1);
    assert!(s.total.is_finite(), "{s}");
    // The intra-view term does not involve the previous stage; the k-means term's targets do.
    assert!((p.mean_shift - s.mean_shift).abs() < 1e-6, "{p} vs {s}");
    assert!((p.kmeans - s.kmeans).abs() > 1e-4, "the previous stage changed nothing: {p} vs {s}");
    // Clear errors naming the key.
    let run = |c| {
        train(Run::<CpuTrain>::new(c, cpu_device()).unwrap(), &TrainOptions::default())
            .err()
            .unwrap()
            .to_string()
    };
    let e = run(stage2("deep", Some(root.join("stage1")), 5));
    assert!(e.contains("attention_level") && e.contains("1..=1"), "{e}");
    let e = run(stage2("missing", Some(root.join("nowhere")), 1));
    assert!(e.contains("model_previous_stage") && e.contains("nowhere"), "{e}");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn a_corrupt_image_is_skipped_and_counted() {
    let root = tmp("corrupt");
    synthetic_images(&root.join("img"), 8);
    let bytes = std::fs::read(root.join("img/scene03.png")).unwrap();
    std::fs::write(root.join("img/scene03.png"), &bytes[..bytes.len() / 3]).unwrap();
    std::fs::write(root.join("img/notes.jpg"), b"this is not a jpeg").unwrap();
    let mut cfg = micro_config(&root.join("img"), &root.join("run"));
    cfg.epochs = 1;
    cfg.epoch_len = None;
    let run =
        train(Run::<CpuTrain>::new(cfg, cpu_device()).unwrap(), &TrainOptions::default()).unwrap();
    let summary = run.state.epochs.last().unwrap();
    assert_eq!(summary.skipped_images, 2, "{summary:?}");
    assert_eq!(run.state.step, 1, "7 readable items make one full batch of 4");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn an_empty_folder_is_a_clear_error() {
    let root = tmp("empty");
    std::fs::create_dir_all(root.join("img")).unwrap();
    let cfg = micro_config(&root.join("img"), &root.join("run"));
    let err = train(Run::<CpuTrain>::new(cfg, cpu_device()).unwrap(), &TrainOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("data_path") && err.contains("no readable"), "{err}");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn a_learnable_position_table_is_resized_like_the_fixed_one_and_gets_gradients() {
    use burn::tensor::{Distribution, Tensor};
    use flsl_train::model::vit::{VitConfig, interpolate_pos_embed};
    let device = cpu_device();
    // Table for a 4x4 grid (32 px, patch 8); a 16-px crop needs it resized to 2x2.
    let vit = VitConfig::new(32, 1, 2)
        .with_patch_size(8)
        .with_img_size(32)
        .with_sincos_pos(false)
        .init::<CpuTrain>(&device);
    let table: Vec<f32> = vit.pos_embed.val().into_data().convert::<f32>().to_vec().unwrap();
    let host = interpolate_pos_embed(&table, 4, 32, 2, 2);
    let resized: Vec<f32> = vit.pos_embed_for(2, 2).into_data().convert::<f32>().to_vec().unwrap();
    let worst = host.iter().zip(&resized).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-6, "product form differs from the bicubic resize by {worst}");
    let x = Tensor::<CpuTrain, 4>::random([1, 3, 16, 16], Distribution::Normal(0.0, 1.0), &device);
    let grads = vit.forward(x).powi_scalar(2).sum().backward();
    let g = vit
        .pos_embed
        .val()
        .grad(&grads)
        .expect("the learnable table gets a gradient from a resized crop");
    let norm: f32 = g.abs().sum().into_scalar();
    assert!(norm > 0.0);
}

#[test]
fn a_grid_with_the_tables_token_count_but_another_shape_is_resized() {
    use flsl_train::model::vit::{VitConfig, interpolate_pos_embed};
    let device = cpu_device();
    // A 4x4 table (32 px, patch 8); a 16x64-px crop has a 2x8 grid: 16 tokens like the table,
    // but the reference (`npatch == N and w == h`) resizes it, and so must we.
    let vit =
        VitConfig::new(16, 1, 2).with_patch_size(8).with_img_size(32).init::<CpuTrain>(&device);
    let table: Vec<f32> = vit.pos_embed.val().into_data().convert::<f32>().to_vec().unwrap();
    let ours: Vec<f32> = vit.pos_embed_for(2, 8).into_data().convert::<f32>().to_vec().unwrap();
    let expected = interpolate_pos_embed(&table, 4, 16, 2, 8);
    assert_eq!(ours, expected);
    assert_ne!(ours, table, "the 4x4 table itself is wrong for a 2x8 grid");
    // The same grid keeps the table exactly.
    let same: Vec<f32> = vit.pos_embed_for(4, 4).into_data().convert::<f32>().to_vec().unwrap();
    assert_eq!(same, table);
    // The exporter resizes the same way: a 16x64 export carries the 2x8 table.
    let root = tmp("nonsquare");
    std::fs::create_dir_all(&root).unwrap();
    let file = root.join("vit.safetensors");
    flsl_train::tensors::write_safetensors(&file, &named::state_dict::<CpuTrain, _>(&vit), None)
        .unwrap();
    let opts =
        flsl_train::export::ExportOptions { size: (16, 64), heads: Some(2), ..Default::default() };
    let src = flsl_train::export::load_source(&file, &opts).unwrap();
    assert_eq!(src.pos_embed, expected);
    std::fs::remove_dir_all(root).unwrap();
}

/// Deterministic values in [-1, 1).
fn wave(n: usize, phase: f64) -> Vec<f64> {
    (0..n).map(|i| ((i as f64 * 0.913 + phase).sin() * 1.3).clamp(-1.0, 0.999)).collect()
}

#[test]
fn the_multi_stage_mixture_equals_a_hand_computation() {
    use burn::tensor::{Tensor, TensorData};
    use flsl_train::meanshift::{TokenSelection, meanshift_mixed, sharpened_attention_map};
    let (b, ns, nt, c) = (2, 5, 6, 4);
    let (temp, prev_temp, sharpness, mix) = (0.7, 1.3, 3.0, 0.3);
    let src = wave(b * ns * c, 0.1);
    let tgt = wave(b * nt * c, 1.7);
    let prev_src = wave(b * ns * c, 2.9);
    let prev_tgt = wave(b * nt * c, 4.2);
    let rows = vec![vec![0, 3], vec![1, 4]];
    let sel = TokenSelection::new(rows.clone(), ns).unwrap();
    let dev = cpu_device();
    let t = |v: &[f64], n: usize| {
        Tensor::<CpuTrain, 3>::from_data(
            TensorData::new(v.iter().map(|&x| x as f32).collect::<Vec<_>>(), [b, n, c]),
            &dev,
        )
    };
    let prev =
        sharpened_attention_map(t(&prev_src, ns), t(&prev_tgt, nt), &sel, prev_temp, sharpness);
    let (_, mode) = meanshift_mixed(t(&src, ns), t(&tgt, nt), &sel, temp, prev.clone(), mix);
    let prev: Vec<f32> = prev.into_data().convert::<f32>().to_vec().unwrap();
    let mode: Vec<f32> = mode.into_data().convert::<f32>().to_vec().unwrap();

    // By hand, in f64: softmax(temp * q.k) over keys; the previous map sigmoid-sharpened around
    // its mean and renormalised; mixed, renormalised, applied to the target tokens.
    let softmax_row = |q: &[f64], keys: &[f64], temp: f64| -> Vec<f64> {
        let logits: Vec<f64> =
            (0..nt).map(|k| temp * (0..c).map(|j| q[j] * keys[k * c + j]).sum::<f64>()).collect();
        let m = logits.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    };
    for (bi, row) in rows.iter().enumerate() {
        for (mi, &n) in row.iter().enumerate() {
            let q = &src[(bi * ns + n) * c..][..c];
            let pq = &prev_src[(bi * ns + n) * c..][..c];
            let keys = &tgt[bi * nt * c..][..nt * c];
            let pkeys = &prev_tgt[bi * nt * c..][..nt * c];
            let pa = softmax_row(pq, pkeys, prev_temp);
            let mean = pa.iter().sum::<f64>() / nt as f64;
            let sig: Vec<f64> =
                pa.iter().map(|a| 1.0 / (1.0 + (-(sharpness * (a - mean))).exp())).collect();
            let ssum: f64 = sig.iter().sum();
            let pmap: Vec<f64> = sig.iter().map(|s| s / ssum).collect();
            let a = softmax_row(q, keys, temp);
            let mixed: Vec<f64> =
                a.iter().zip(&pmap).map(|(a, p)| mix * a + (1.0 - mix) * p).collect();
            let msum: f64 = mixed.iter().sum();
            for k in 0..nt {
                let got = f64::from(prev[(bi * 2 + mi) * nt + k]);
                assert!(
                    (got - pmap[k]).abs() < 1e-6,
                    "previous map [{bi},{mi},{k}]: {got} vs {}",
                    pmap[k]
                );
            }
            for j in 0..c {
                let want: f64 = (0..nt).map(|k| mixed[k] / msum * keys[k * c + j]).sum();
                let got = f64::from(mode[(bi * 2 + mi) * c + j]);
                assert!((got - want).abs() < 1e-5, "mode [{bi},{mi},{j}]: {got} vs {want}");
            }
            // The mixture matters here: the unmixed mode differs by more than the tolerance.
            let plain: f64 = (0..nt).map(|k| a[k] * keys[k * c]).sum();
            let want0: f64 = (0..nt).map(|k| mixed[k] / msum * keys[k * c]).sum();
            assert!((plain - want0).abs() > 1e-3, "the test would not see a missing mixture");
        }
    }
}
