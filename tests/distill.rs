//! Distillation end to end on tiny synthetic images: a micro FLSL teacher (trained here) is
//! distilled into a smaller student with another patch size; the student agrees with the
//! teacher more than the same student untrained and more than the same student pretrained
//! without the teacher; a resumed distillation equals an uninterrupted one; the run exports
//! like any other; a changed teacher refuses to resume.

mod common;

use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::tensor::{Tensor, TensorData};
use flsl_runtime::onnx::{ModelOptions, OnnxModel};
use flsl_train::backend::{Cpu, CpuTrain, cpu_device};
use flsl_train::config::{DistillConfig, TrainConfig};
use flsl_train::distill::report::{Agreement, compare, load_images};
use flsl_train::distill::{self, DistillTeacher};
use flsl_train::model::named;
use flsl_train::trainer::{Run, TrainOptions, checkpoints_dir, train};

fn tmp(name: &str) -> PathBuf {
    common::tmp("distill", name)
}

/// The micro teacher's configuration: width 64, one block with one head (the `D / 64` heads
/// that a weights file without `config.json` is read with), patch 8, 16 prototypes.
fn teacher_config(data: &Path, out: &Path) -> TrainConfig {
    let mut c = common::micro_config(data, out, 64, 1, 1, 16, 32, 64);
    c.epochs = 4;
    c.epoch_len = Some(8);
    c.drop_path_rate = 0.0;
    c.validate().unwrap();
    c
}

/// A smaller student with patch 16 (the teacher's 8: grid factor 2): width 16, one block.
/// `momentum_teacher = 0`, so the checkpoint's EMA student is the student itself.
fn student_config(data: &Path, out: &Path, teacher: Option<&Path>) -> TrainConfig {
    let mut c = teacher_config(data, out);
    c.embed_dim = 16;
    c.num_heads = 2;
    c.patch_size = 16;
    c.head_hidden_dim = 32;
    c.lr = 2.0; // peak 2 * 4 / 256 ~ 3e-2: a micro model learns in a few dozen steps
    c.momentum_teacher = 0.0;
    c.epochs = 16;
    c.distill = teacher.map(|t| DistillConfig {
        teacher: t.to_path_buf(),
        teacher_sha256: None,
        feature_weight: 1.0,
    });
    c
}

struct Fixture {
    root: PathBuf,
    teacher: PathBuf,
    heldout: Vec<image::RgbImage>,
}

fn fixture(name: &str) -> Fixture {
    let root = tmp(name);
    flsl_train::data::write_synthetic_scenes(&root.join("img"), 12, 48).unwrap();
    flsl_train::data::write_synthetic_scenes(&root.join("heldout"), 16, 64).unwrap();
    let cfg = teacher_config(&root.join("img"), &root.join("teacher"));
    train(Run::<CpuTrain>::new(cfg, cpu_device()).unwrap(), &TrainOptions::default()).unwrap();
    let paths = flsl_runtime::quantize::list_images(&root.join("heldout")).unwrap();
    let heldout = load_images(&paths[8..]).unwrap();
    Fixture { teacher: root.join("teacher"), root, heldout }
}

fn distil(f: &Fixture, out: &str, max_steps: Option<usize>) -> Run<CpuTrain> {
    let mut cfg = student_config(&f.root.join("img"), &f.root.join(out), Some(&f.teacher));
    distill::prepare(&mut cfg).unwrap();
    train(
        Run::<CpuTrain>::new(cfg, cpu_device()).unwrap(),
        &TrainOptions { max_steps, ..Default::default() },
    )
    .unwrap()
}

fn agreement(
    run_student: &flsl_train::model::FlslModel<Cpu>,
    cfg: &TrainConfig,
    f: &Fixture,
) -> Agreement {
    let teacher = DistillTeacher::<Cpu>::load(cfg, &cpu_device()).unwrap().unwrap();
    compare(run_student, &teacher, &f.heldout, 64, &cpu_device()).unwrap()
}

#[test]
fn distillation_raises_agreement_and_cosine_over_the_untrained_and_the_self_taught_student() {
    let f = fixture("gain");
    let run = distil(&f, "student", None);
    assert_eq!(run.state.step, 32);
    // The teacher's prototype count was given to the student.
    assert_eq!(run.cfg.out_dim, 16);
    let trained = agreement(&run.teacher, &run.cfg, &f);
    let untrained = {
        let init = Run::<CpuTrain>::new(run.cfg.clone(), cpu_device()).unwrap();
        agreement(&init.student.valid(), &run.cfg, &f)
    };
    // The same student pretrained for as many steps with FLSL alone (no teacher): its
    // prototypes are its own, so it agrees with the teacher only by chance.
    let self_taught = {
        let cfg = student_config(&f.root.join("img"), &f.root.join("self"), None);
        let run = train(Run::<CpuTrain>::new(cfg, cpu_device()).unwrap(), &TrainOptions::default())
            .unwrap();
        let teacher_cfg = run_with_teacher(&run.cfg, &f);
        let teacher = DistillTeacher::<Cpu>::load(&teacher_cfg, &cpu_device()).unwrap().unwrap();
        compare(&run.teacher, &teacher, &f.heldout, 64, &cpu_device()).unwrap()
    };
    eprintln!("distilled {trained:?}\nuntrained {untrained:?}\nself-taught {self_taught:?}");
    assert_eq!(trained.tokens, 8 * 16);
    assert!(
        trained.agreement > untrained.agreement + 0.1,
        "agreement {:.3} distilled vs {:.3} untrained",
        trained.agreement,
        untrained.agreement
    );
    assert!(
        trained.agreement > self_taught.agreement + 0.1,
        "agreement {:.3} distilled vs {:.3} pretrained without the teacher",
        trained.agreement,
        self_taught.agreement
    );
    let (c1, c0) = (trained.feature_cosine.unwrap(), untrained.feature_cosine.unwrap());
    assert!(c1 > c0 + 0.1, "feature cosine {c1:.3} distilled vs {c0:.3} untrained");
    assert!(trained.miou > untrained.miou, "{trained:?} vs {untrained:?}");
    // Logged: the feature term is part of the loss and it went down.
    let feat: Vec<f64> = run.state.history.iter().map(|(_, l)| l.feature).collect();
    assert!(feat.iter().all(|v| *v > 0.0));
    assert!(feat[feat.len() - 1] < feat[0], "feature term {feat:?}");
    std::fs::remove_dir_all(&f.root).unwrap();
}

/// `cfg` (a student without `[distill]`, 16 prototypes) with the fixture's teacher attached,
/// for comparing a non-distilled student with it.
fn run_with_teacher(cfg: &TrainConfig, f: &Fixture) -> TrainConfig {
    let mut c = cfg.clone();
    c.distill = Some(DistillConfig {
        teacher: f.teacher.clone(),
        teacher_sha256: None,
        feature_weight: 0.0,
    });
    c
}

#[test]
fn a_resumed_distillation_equals_an_uninterrupted_one_and_exports() {
    let f = fixture("resume");
    let full = distil(&f, "full", Some(6));
    let half = distil(&f, "half", Some(3));
    assert_eq!(half.state.step, 3);
    drop(half);
    let resumed =
        Run::<CpuTrain>::load(&checkpoints_dir(&f.root.join("half")).join("latest"), cpu_device())
            .unwrap();
    let done = train(resumed, &TrainOptions { max_steps: Some(6), ..Default::default() }).unwrap();
    assert_eq!(done.state.step, 6);
    assert_eq!(
        named::state_dict::<CpuTrain, _>(&full.student),
        named::state_dict::<CpuTrain, _>(&done.student)
    );
    assert_eq!(named::state_dict(&full.teacher), named::state_dict(&done.teacher));
    assert_eq!(full.adam.to_host(), done.adam.to_host());
    assert_eq!(full.state.history, done.state.history);

    // The run folder exports like a pretraining run: the student's backbone and head, without
    // the distillation projection.
    let onnx = f.root.join("student.onnx");
    let opts =
        flsl_train::export::ExportOptions { size: (64, 64), with_head: true, ..Default::default() };
    let src = flsl_train::export::export_checkpoint(&f.root.join("full"), &onnx, &opts).unwrap();
    assert_eq!((src.spec.embed_dim, src.spec.patch_size), (16, 16));
    assert!(!src.weights.keys().any(|k| k.contains("distill_proj")), "{:?}", src.weights.keys());
    let x: Vec<f32> = (0..3 * 64 * 64).map(|i| ((i % 97) as f32 / 48.0) - 1.0).collect();
    let xt = Tensor::<Cpu, 4>::from_data(TensorData::new(x.clone(), [1, 3, 64, 64]), &cpu_device());
    let logits: Vec<f32> =
        full.teacher.head.forward(full.teacher.features(xt)).into_data().to_vec().unwrap();
    let mut m = OnnxModel::load(&onnx, ModelOptions::new().with_threads(1)).unwrap();
    let out = m.run_tensor(&x).unwrap();
    let tl = out.logits.expect("exported with the head").as_slice().to_vec();
    assert_eq!((out.features.as_slice().len(), tl.len()), (16 * 16, 16 * 16));
    let diff = logits.iter().zip(&tl).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-4, "the exported student's prototype logits differ by {diff}");

    // A teacher file that changed since the run started cannot resume it.
    let w = checkpoints_dir(&f.teacher).join("latest/teacher.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&w, bytes).unwrap();
    let run =
        Run::<CpuTrain>::load(&checkpoints_dir(&f.root.join("full")).join("latest"), cpu_device())
            .unwrap();
    let err = train(run, &TrainOptions { max_steps: Some(8), ..Default::default() })
        .err()
        .expect("a changed teacher must not resume")
        .to_string();
    assert!(err.contains("teacher_sha256") && err.contains("changed"), "{err}");
    std::fs::remove_dir_all(&f.root).unwrap();
}

#[test]
fn a_bare_weights_file_gives_the_same_teacher_as_its_run_folder() {
    // Without config.json beside it, the architecture comes from the tensor shapes (the
    // official `.pth` case): the same targets as the run folder's.
    let f = fixture("bare");
    let bare = f.root.join("bare/teacher.safetensors");
    std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
    std::fs::copy(checkpoints_dir(&f.teacher).join("latest/teacher.safetensors"), &bare).unwrap();
    let cfg = |t: &Path| {
        let mut c = student_config(&f.root.join("img"), &f.root.join("x"), Some(t));
        distill::prepare(&mut c).unwrap();
        c
    };
    let (a, b) = (cfg(&f.teacher), cfg(&bare));
    assert_eq!(a.out_dim, b.out_dim);
    let x = Tensor::<Cpu, 4>::from_data(
        TensorData::new(
            (0..3 * 64 * 64).map(|i| (i % 13) as f32 / 6.0 - 1.0).collect::<Vec<_>>(),
            [1, 3, 64, 64],
        ),
        &cpu_device(),
    );
    let targets = |c: &TrainConfig| {
        let t = DistillTeacher::<Cpu>::load(c, &cpu_device()).unwrap().unwrap();
        let r = t.targets(x.clone(), 16, distill::HeadInput::Modes).unwrap();
        assert_eq!(r.logits.dims(), [1, 16, 16]);
        assert_eq!(r.features.dims(), [1, 16, 64]);
        r.logits.into_data().to_vec::<f32>().unwrap()
    };
    assert_eq!(targets(&a), targets(&b));
    std::fs::remove_dir_all(&f.root).unwrap();
}

#[test]
fn two_data_parallel_replicas_distil_as_one_device_on_the_whole_batch() {
    // Each replica gets its own copy of the frozen teacher (`DistillTeacher::to_device`): two
    // replicas with 2 samples each apply the same updates as one device with the 4 samples.
    let f = fixture("ddp");
    let run = |out: &str, device: &str, per_device: usize, replicas: usize| {
        let mut c = student_config(&f.root.join("img"), &f.root.join(out), Some(&f.teacher));
        c.batch_size_per_gpu = per_device;
        c.device = device.into();
        c.epochs = 2;
        // Smaller steps than the other tests' (peak 0.5 * 4 / 256 ~ 8e-3, as tests/training.rs):
        // AdamW turns float32 summation-order noise into differences that grow with the step.
        c.lr = 0.5;
        distill::prepare(&mut c).unwrap();
        flsl_train::trainer::train_on_devices(
            Run::<CpuTrain>::new(c, cpu_device()).unwrap(),
            vec![cpu_device(); replicas],
            &TrainOptions::default(),
        )
        .unwrap()
    };
    let one = run("one", "cpu", 4, 0);
    let two = run("two", "cpu,cpu", 2, 1);
    assert_eq!((one.state.step, two.state.step), (4, 4));
    let (w1, w2) = (
        named::state_dict::<CpuTrain, _>(&one.student),
        named::state_dict::<CpuTrain, _>(&two.student),
    );
    let width = 16; // the student's embed_dim
    for (name, t) in &w1 {
        // The key bias has a zero true gradient (see tests/training.rs): left out.
        let key_bias =
            |i: usize| name.ends_with("attn.qkv.bias") && (width..2 * width).contains(&i);
        let d = t
            .to_f32()
            .iter()
            .zip(w2[name].to_f32())
            .enumerate()
            .filter(|(i, _)| !key_bias(*i))
            .map(|(_, (p, q))| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-5, "{name} differs by {d:e} between 2 replicas and 1 device");
    }
    for ((sa, la), (sb, lb)) in one.state.history.iter().zip(&two.state.history) {
        assert_eq!(sa, sb);
        assert!((la.feature - lb.feature).abs() < 1e-4, "step {sa}: {la} vs {lb}");
        assert!((la.total - lb.total).abs() < 1e-4, "step {sa}: {la} vs {lb}");
    }
    std::fs::remove_dir_all(&f.root).unwrap();
}
