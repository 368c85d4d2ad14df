use std::process::ExitCode;

use crate::args::EvalClustersArgs;

pub fn run(a: EvalClustersArgs) -> anyhow::Result<ExitCode> {
    let mut rows = Vec::new();
    for m in std::iter::once(&a.model).chain(a.baseline.as_ref()) {
        let r = flsl_train::clusters_eval::eval_davis(m, &a.davis, a.k, a.frames)?;
        rows.push((m.clone(), r));
    }
    if a.json {
        let v: Vec<_> =
            rows.iter().map(|(m, r)| serde_json::json!({"model": m, "result": r})).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<48} {:>8} {:>10} {:>12} {:>8}",
            "model", "mIoU", "pixel acc", "per-image mIoU", "images"
        );
        for (m, r) in &rows {
            println!(
                "{:<48} {:>8.4} {:>10.4} {:>12.4} {:>8}",
                m.display(),
                r.miou,
                r.pixel_accuracy,
                r.per_image_miou,
                r.images
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
