//! A drone's camera flying over an aerial image: frames for `flsl-onboard` when no camera is
//! at hand. The view (400 x 300 world pixels by default, the scale the bundled tree detector
//! was trained at) moves a few pixels per frame along a straight path across the image, so
//! objects stay in view for many frames and the tracker confirms them.
//!
//! ```text
//! cargo run --release -p flsl-examples --features onnx --example flyover -- --frames 60 \
//!   | flsl-onboard --bundle bundle --input - --size 400x300 --mavlink udpout:127.0.0.1:14550
//! cargo run --release -p flsl-examples --features onnx --example flyover -- --frames 60 --out frames/
//! ```
//!
//! Without `--out`, raw RGB24 frames go to standard output (what `flsl-onboard --input -
//! --size WxH` and `ffmpeg -f rawvideo -pix_fmt rgb24` read); with it, PNG files.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use image::RgbImage;

/// A camera flying over an aerial image: raw RGB24 frames on stdout, or PNGs in `--out`.
#[derive(Parser)]
struct Args {
    /// The image flown over.
    #[arg(long, default_value_os_t = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../data/neon-aerial-trees/images/2019_YELL_2_541000_4977000_image_crop.png"))]
    world: PathBuf,
    /// Frames to render (at least 1).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
    frames: u32,
    /// Pixels the camera moves per frame (>= 0).
    #[arg(long, default_value_t = 4.0)]
    step: f32,
    /// Frame size, WxH (at least 16x16).
    #[arg(long, default_value = "400x300", value_parser = parse_size)]
    size: (u32, u32),
    /// Write PNGs into this folder instead of raw frames on stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_size(v: &str) -> Result<(u32, u32), String> {
    let bad = || format!("{v}: expected WxH, each at least 16");
    let (w, h) = v.split_once('x').ok_or_else(bad)?;
    let (w, h): (u32, u32) = (w.parse().map_err(|_| bad())?, h.parse().map_err(|_| bad())?);
    if w < 16 || h < 16 {
        return Err(bad());
    }
    Ok((w, h))
}

fn parse() -> anyhow::Result<Args> {
    let a = Args::parse();
    if !(a.step.is_finite() && a.step >= 0.0) {
        bail!("--step {}: a finite number of pixels >= 0", a.step);
    }
    Ok(a)
}

fn main() -> anyhow::Result<()> {
    let a = parse()?;
    let world = image::open(&a.world)
        .with_context(|| format!("reading the world image {}", a.world.display()))?
        .to_rgb8();
    let (ww, wh) = (world.width() as f32, world.height() as f32);
    let (vw, vh) = a.size;
    if ww < vw as f32 || wh < vh as f32 {
        bail!(
            "the world image {} is {ww}x{wh}, smaller than the {vw}x{vh} view",
            a.world.display()
        );
    }
    // From the upper left towards the lower right, through the middle of the image.
    let start =
        (vw as f32 / 2.0 + 0.1 * (ww - vw as f32), vh as f32 / 2.0 + 0.1 * (wh - vh as f32));
    let end = (ww - vw as f32 / 2.0, wh - vh as f32 / 2.0);
    let (dx, dy) = (end.0 - start.0, end.1 - start.1);
    let len = (dx * dx + dy * dy).sqrt().max(1.0);
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut stdout = std::io::stdout().lock();
    for i in 0..a.frames {
        // Back and forth along the path.
        let d = (i as f32 * a.step) % (2.0 * len);
        let s = if d <= len { d } else { 2.0 * len - d } / len;
        let (cx, cy) = (start.0 + s * dx, start.1 + s * dy);
        let (x0, y0) =
            ((cx - vw as f32 / 2.0).round() as u32, (cy - vh as f32 / 2.0).round() as u32);
        let view: RgbImage = image::imageops::crop_imm(&world, x0, y0, vw, vh).to_image();
        match &a.out {
            Some(dir) => {
                let p = dir.join(format!("frame_{i:05}.png"));
                view.save(&p).with_context(|| format!("writing {}", p.display()))?;
            }
            None => match stdout.write_all(view.as_raw()) {
                Ok(()) => {}
                // The reader stopped (flsl-onboard --max-frames): not an error.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                Err(e) => return Err(e).context("writing frames to standard output"),
            },
        }
    }
    stdout
        .flush()
        .or_else(|e| if e.kind() == std::io::ErrorKind::BrokenPipe { Ok(()) } else { Err(e) })?;
    Ok(())
}
