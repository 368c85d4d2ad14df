//! One training step on each CPU backend compiled in (burn-flex, burn-ndarray; groups
//! `train_step_flex` and `train_step_ndarray`, run one after the other in one process):
//! - `vit_tiny16_backbone`: the ViT-Ti/16 backbone on 2 global 224x224 and 8 local 96x96
//!   crops, forward + backward + AdamW (the configuration of `../shared/anchors.md`);
//! - `flsl_full_tiny_preset`: the complete FLSL iteration (teacher, mean shift, heads, loss,
//!   clipping, AdamW, EMA) of the `tiny` preset on a batch of 16 images;
//! - `augment_tiny_preset`: multi-crop augmentation of one image (samples/s of the loader
//!   per thread).
//!
//! Run: `cargo bench -p flsl-train --features ndarray --bench train_step` (both backends).

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use flsl_train::augment::augment;
use flsl_train::backend::{CpuBackendVisitor, each_cpu_backend};
use flsl_train::config::TrainConfig;
use flsl_train::loss::{FlslLoss, VmrPrior};
use flsl_train::masks::sampling_mask;
use flsl_train::meanshift::TokenSelection;
use flsl_train::model::{FlslModel, VitConfig};
use flsl_train::step::{
    AdamState, StepHyper, StepOptions, StepReport, View, apply_adamw, train_step,
};
use rand::SeedableRng;

fn hyper() -> StepHyper {
    StepHyper {
        iteration: 0,
        epoch: 1,
        lr: 5e-4,
        weight_decay: 0.04,
        momentum: 0.996,
        sa_temp: 0.1 / 384f64.sqrt(),
        ca_temp: 0.2 / 384f64.sqrt(),
        ups: 0.03,
        mixture: 1.0,
        clip_grad: Some(3.0),
        freeze_last_layer: 1,
        betas: (0.9, 0.999),
        eps: 1e-8,
    }
}

fn steps<B: AutodiffBackend>(c: &mut Criterion, backend: &str) {
    let device = B::Device::default();
    let mut vit = VitConfig::vit_tiny(16).init::<B>(&device);
    let mut adam = AdamState::default();
    let g = Tensor::<B, 4>::random([2, 3, 224, 224], Distribution::Normal(0.0, 1.0), &device);
    let l = Tensor::<B, 4>::random([8, 3, 96, 96], Distribution::Normal(0.0, 1.0), &device);
    let mut group = c.benchmark_group(format!("train_step_{backend}"));
    group.sample_size(10);
    group.bench_function("vit_tiny16_backbone_2x224_8x96", |b| {
        b.iter(|| {
            let loss = vit.forward(g.clone()).powi_scalar(2).mean()
                + vit.forward(l.clone()).powi_scalar(2).mean();
            let grads = loss.backward();
            let empty = StepReport {
                loss: Default::default(),
                grad_norms: vec![],
                clipped: vec![],
                teacher_assign: vec![],
            };
            let (v, _) = apply_adamw(vit.clone(), grads, &mut adam, &hyper(), None, empty);
            vit = v;
        })
    });

    let cfg = TrainConfig::tiny();
    let vcfg = cfg.vit_config().unwrap();
    let mut student = FlslModel::<B>::init(&vcfg, &cfg.head_config(), &device);
    let mut teacher = student.valid();
    let mut adam = AdamState::default();
    let mut loss = FlslLoss {
        student_temp: 0.1,
        teacher_temp_schedule: vec![0.04],
        coefficients: [0.03, 1.0, 5.0],
        vmr: Some(VmrPrior::Uniform),
        centering: None,
    };
    let bt = cfg.batch_size_per_gpu;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut view = |size: usize, ws: Option<usize>| {
        let images =
            Tensor::<B, 4>::random([bt, 3, size, size], Distribution::Normal(0.0, 1.0), &device);
        let mask = ws.map(|ws| {
            let fs = size / cfg.patch_size;
            let m: Vec<u8> = (0..bt).flat_map(|_| sampling_mask(fs, ws, false, &mut rng)).collect();
            TokenSelection::from_mask(&m, bt, fs * fs).unwrap()
        });
        View { images, mask, crops: None }
    };
    let (gs, ls) = (cfg.augment.global_resize as usize, cfg.augment.local_resize as usize);
    let views = vec![view(gs, None), view(gs, Some(3)), view(ls, Some(2)), view(ls, Some(2))];
    group.bench_function("flsl_full_tiny_preset_b16", |b| {
        b.iter(|| {
            let (s, _) = train_step(
                student.clone(),
                &mut teacher,
                None,
                None,
                &mut loss,
                &mut adam,
                &views,
                &hyper(),
                StepOptions::default(),
            )
            .unwrap();
            student = s;
        })
    });

    group.finish();
}

struct Steps<'a>(&'a mut Criterion);

impl CpuBackendVisitor for Steps<'_> {
    fn visit<B: AutodiffBackend>(&mut self, name: &str) {
        steps::<B>(self.0, name);
    }
}

fn train_steps(c: &mut Criterion) {
    each_cpu_backend(&mut Steps(c));
}

fn augmentation(c: &mut Criterion) {
    let cfg = TrainConfig::tiny();
    let img = image::RgbImage::from_fn(256, 256, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x * y) % 256) as u8])
    });
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut group = c.benchmark_group("augment");
    group.bench_function("augment_tiny_preset_one_image", |b| {
        b.iter(|| augment(&img, &cfg.augment, cfg.patch_size, &mut rng))
    });
    group.finish();
}

criterion_group!(benches, train_steps, augmentation);
criterion_main!(benches);
