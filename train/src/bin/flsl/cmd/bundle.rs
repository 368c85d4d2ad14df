use std::process::ExitCode;

use anyhow::Context;
use flsl_runtime::onboard::bundle::{
    BundleOptions, DetectionConfig, LinkConfig, MODEL_FILE, write_bundle,
};
use flsl_runtime::onboard::mavlink::{GimbalConfig, MavlinkConfig};

use crate::args::BundleArgs;

pub fn run(a: BundleArgs) -> anyhow::Result<ExitCode> {
    let opts = BundleOptions {
        classes: a.classes,
        detection: DetectionConfig {
            score_threshold: a.score,
            kmeans_k: a.kmeans_k,
            meanshift: a.meanshift,
        },
        threads: a.threads,
        link: LinkConfig { serial: a.serial, baud: a.baud, udp: a.udp },
        input_size: a.size.as_deref().map(super::parse_size).transpose()?,
        mavlink: MavlinkConfig {
            target: a.mavlink,
            system_id: a.mavlink_system,
            component_id: a.mavlink_component,
            rate_hz: a.mavlink_rate,
            // Lock on what the detector reports: the same floor.
            min_score: a.score,
            gimbal: a.gimbal.then(GimbalConfig::default),
            ..MavlinkConfig::default()
        },
    };
    let b = write_bundle(&a.model, &a.out, &opts)
        .with_context(|| format!("bundling {}", a.model.display()))?;
    let c = &b.config;
    let size = std::fs::metadata(b.model_path()).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {}: {MODEL_FILE} ({:.1} MB), onboard.toml (input {}x{}, outputs {:?}, classes {:?}), SHA256SUMS",
        b.dir.display(),
        size as f64 / 1e6,
        c.input.width,
        c.input.height,
        c.outputs,
        c.classes
    );
    println!(
        "run it: flsl-onboard --bundle {} --input FRAMES_DIR|VIDEO|-|/dev/videoN",
        b.dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
