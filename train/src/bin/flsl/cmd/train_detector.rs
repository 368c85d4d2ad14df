use std::process::ExitCode;

use burn::tensor::backend::AutodiffBackend;
use flsl_train::backend::{BackendTask, run_on};

use crate::args::TrainDetectorArgs;

pub fn run(a: TrainDetectorArgs) -> anyhow::Result<ExitCode> {
    let mut opts = flsl_train::detector::DetectorOptions::neon(a.checkpoint.clone(), a.out.clone());
    if !a.annotations.is_empty() {
        opts.annotations = a.annotations;
        opts.holdout = Vec::new();
    }
    if !a.holdout.is_empty() {
        opts.holdout = a.holdout;
    }
    if a.multi_class {
        opts.single_class = None;
    }
    opts.images = a.images;
    opts.steps = a.steps;
    opts.scale = a.scale;
    opts.tile = a.tile;
    opts.progress = crate::progress::bars();
    run_on(&super::cpu(), TrainDetector(opts))??;
    let size = super::parse_size(&a.export_size)?;
    let onnx = a.out.join("model.onnx");
    let eopts = flsl_train::export::ExportOptions {
        size,
        with_head: true,
        detector: Some(a.out.clone()),
        ..Default::default()
    };
    flsl_train::export::export_checkpoint(&a.checkpoint, &onnx, &eopts)?;
    println!(
        "wrote {} and {} (features, prototype_logits, det_heatmap, det_boxes)",
        a.out.join("det_head.safetensors").display(),
        onnx.display()
    );
    Ok(ExitCode::SUCCESS)
}

struct TrainDetector(flsl_train::detector::DetectorOptions);

impl BackendTask for TrainDetector {
    type Output = anyhow::Result<()>;

    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Self::Output {
        let device = devices.into_iter().next().ok_or_else(|| anyhow::anyhow!("no device"))?;
        let r = flsl_train::detector::train_detector::<B>(&self.0, device)?;
        println!(
            "trained the detection head ({} classes, hidden {}) on {} tiles: loss {:.3} -> {:.3} (heat {:.3}, offset {:.3}, size {:.3}); features {:.0} s, training {:.0} s",
            r.meta.head.classes,
            r.meta.head.hidden,
            r.tiles,
            r.loss_start.total,
            r.loss_end.total,
            r.loss_end.heat,
            r.loss_end.offset,
            r.loss_end.size,
            r.seconds.0,
            r.seconds.1
        );
        if let (Some(stats), Some((gt, dt))) = (&r.holdout_stats, &r.holdout_files) {
            println!(
                "held-out COCO stats (flsl eval-detections --gt {} --dt {}):\n{}",
                gt.display(),
                dt.display(),
                serde_json::to_string(stats)?
            );
        }
        Ok(())
    }
}
