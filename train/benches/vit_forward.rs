//! ViT forward on each CPU backend compiled in (burn-flex, burn-ndarray), batch 1, 224x224.
//! Run: `cargo bench -p flsl-train --features ndarray --bench vit_forward` (both backends).

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use flsl_train::backend::{CpuBackendVisitor, each_cpu_backend};
use flsl_train::model::VitConfig;

fn forward<B: Backend>(c: &mut Criterion, backend: &str) {
    let device = B::Device::default();
    let mut group = c.benchmark_group(format!("vit_forward_{backend}_b1_224"));
    group.sample_size(10);
    for (name, cfg) in
        [("vit_tiny16", VitConfig::vit_tiny(16)), ("vit_small16", VitConfig::vit_small(16))]
    {
        let vit = cfg.init::<B>(&device);
        let x = Tensor::<B, 4>::random([1, 3, 224, 224], Distribution::Normal(0.0, 1.0), &device);
        group.bench_function(name, |b| {
            b.iter(|| {
                let y = vit.forward(x.clone());
                // Force the computation to finish.
                std::hint::black_box(y.into_data());
            })
        });
    }
    group.finish();
}

struct Forward<'a>(&'a mut Criterion);

impl CpuBackendVisitor for Forward<'_> {
    fn visit<B: AutodiffBackend>(&mut self, name: &str) {
        forward::<B::InnerBackend>(self.0, name);
    }
}

fn vit_forward(c: &mut Criterion) {
    each_cpu_backend(&mut Forward(c));
}

criterion_group!(benches, vit_forward);
criterion_main!(benches);
