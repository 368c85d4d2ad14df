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
use image::RgbImage;

struct Args {
    world: PathBuf,
    frames: u32,
    step: f32,
    size: (u32, u32),
    out: Option<PathBuf>,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        world: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../data/neon-aerial-trees/images/2019_YELL_2_541000_4977000_image_crop.png"),
        frames: 60,
        step: 4.0,
        size: (400, 300),
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--world" => a.world = value()?.into(),
            "--frames" => a.frames = value()?.parse().context("--frames: a number")?,
            "--step" => a.step = value()?.parse().context("--step: pixels per frame")?,
            "--size" => {
                let v = value()?;
                let (w, h) =
                    v.split_once('x').with_context(|| format!("--size {v}: expected WxH"))?;
                a.size =
                    (w.parse().context("--size: width")?, h.parse().context("--size: height")?);
            }
            "--out" => a.out = Some(value()?.into()),
            "-h" | "--help" => {
                println!(
                    "flyover [--world IMAGE] [--frames N] [--step PX] [--size WxH] [--out DIR]\nRaw RGB24 frames on stdout, or PNGs in DIR."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other} (see --help)"),
        }
    }
    if a.frames == 0 || a.size.0 < 16 || a.size.1 < 16 || !(a.step.is_finite() && a.step >= 0.0) {
        bail!("--frames >= 1, --size at least 16x16, --step >= 0");
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
