//! ViT forward on the CPU backend (burn-ndarray), batch 1, 224x224: the baseline later work
//! compares against. Run: `cargo bench -p flsl-train --bench vit_forward`.

use burn::tensor::{Distribution, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use flsl_train::backend::{Cpu, cpu_device};
use flsl_train::model::VitConfig;

fn vit_forward(c: &mut Criterion) {
    let device = cpu_device();
    let mut group = c.benchmark_group("vit_forward_ndarray_b1_224");
    group.sample_size(10);
    for (name, cfg) in
        [("vit_tiny16", VitConfig::vit_tiny(16)), ("vit_small16", VitConfig::vit_small(16))]
    {
        let vit = cfg.init::<Cpu>(&device);
        let x = Tensor::<Cpu, 4>::random([1, 3, 224, 224], Distribution::Normal(0.0, 1.0), &device);
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

criterion_group!(benches, vit_forward);
criterion_main!(benches);
