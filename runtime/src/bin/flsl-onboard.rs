//! `flsl-onboard`: the companion computer's runtime. A verified model bundle and a frame
//! source in; JSON lines, link wire frames (serial, UDP, or a recording file) and MAVLink v2
//! (camera tracking status, gimbal set-points) out.
//!
//! ```text
//! flsl-onboard --bundle DIR --input FRAMES_DIR|VIDEO|-|/dev/videoN [--size WxH]
//!              [--json FILE|-] [--serial DEV [--baud N]] [--udp HOST:PORT] [--link-file F]
//!              [--mavlink udpout:HOST:PORT|serial:DEV[:BAUD]]
//!              [--frames latest|all] [--max-frames N] [--stats-every N] [--threads N]
//! ```
//!
//! No burn, no plotting, no host tooling in this binary (`cargo tree` in `.ci/run` checks it).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use flsl_runtime::detect::{DetectOptions, Detector, DetectorScratch, StageTimes};
use flsl_runtime::onboard::bundle::Bundle;
use flsl_runtime::onboard::heap::CountingAlloc;
use flsl_runtime::onboard::mavlink::MavlinkOutput;
use flsl_runtime::onboard::output::{LinkOutput, LinkTarget, frame_record, wire_frame};
use flsl_runtime::onboard::run::{FramePolicy, LoopOptions, run_loop};
use flsl_runtime::onboard::{OnboardError, source};
use flsl_runtime::preprocess::Normalization;

/// Counts live heap bytes and allocations for the stats line (two relaxed atomic adds per
/// allocation; see `flsl_runtime::onboard::heap`).
#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

#[derive(Parser)]
#[command(
    name = "flsl-onboard",
    version,
    about = "flsl's onboard runtime: bundle + frames in; detections, tracks and clusters out as JSON lines and link wire frames"
)]
struct Args {
    /// Model bundle folder (`flsl bundle --model M.onnx --out DIR`); verified before use.
    #[arg(long)]
    bundle: PathBuf,
    /// Frames: a folder of .png/.jpg, a video file (through ffmpeg), `-` for raw RGB24 frames
    /// on standard input (with --size), or a V4L2 camera `/dev/videoN` (build feature `v4l2`).
    #[arg(long)]
    input: String,
    /// Frame size `WxH` of raw frames on standard input (camera size request for V4L2).
    #[arg(long, value_parser = parse_size)]
    size: Option<(u32, u32)>,
    /// JSON lines, one per frame, to this file (`-`: standard output). The default when no
    /// link output is given.
    #[arg(long)]
    json: Option<String>,
    /// Serial device for the link wire frames (default: the bundle's `link.serial`).
    #[arg(long)]
    serial: Option<String>,
    /// Baud rate of the serial device (default: the bundle's `link.baud`, else 115200).
    #[arg(long)]
    baud: Option<u32>,
    /// UDP address `HOST:PORT` for the link wire frames, one datagram per frame (default:
    /// the bundle's `link.udp`).
    #[arg(long)]
    udp: Option<String>,
    /// Record the link byte stream into this file (to replay it into the firmware).
    #[arg(long)]
    link_file: Option<PathBuf>,
    /// MAVLink v2 to `udpout:HOST:PORT` or `serial:DEVICE[:BAUD]` (default: the bundle's
    /// `mavlink.target`): HEARTBEAT, CAMERA_TRACKING_IMAGE_STATUS of the locked track, and
    /// GIMBAL_MANAGER_SET_PITCHYAW with `[mavlink.gimbal]`.
    #[arg(long)]
    mavlink: Option<String>,
    /// Frames arriving while the model is busy: `latest` drops the stale ones (default for
    /// standard input and cameras), `all` processes every frame (default for files and folders).
    #[arg(long, value_enum)]
    frames: Option<Frames>,
    /// Stop after this many processed frames.
    #[arg(long)]
    max_frames: Option<u64>,
    /// A stats line on standard error every this many frames (0: none).
    #[arg(long, default_value_t = 100)]
    stats_every: u64,
    /// tract threads (default: the bundle's `threads`).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Frames {
    Latest,
    All,
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) =
        s.split_once(['x', 'X']).ok_or_else(|| format!("`{s}`: expected WxH, e.g. 640x480"))?;
    let n = |t: &str| {
        t.trim().parse::<u32>().map_err(|_| format!("`{s}`: `{t}` is not a number of pixels"))
    };
    Ok((n(w)?, n(h)?))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprint!("error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprint!(": {s}");
                source = s.source();
            }
            eprintln!();
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<ExitCode, OnboardError> {
    let bundle = Bundle::load(&args.bundle)?;
    let c = &bundle.config;
    let mut opts = DetectOptions::new(bundle.model_path());
    opts.threads = args.threads.unwrap_or(c.threads);
    opts.score_threshold = c.detection.score_threshold;
    opts.kmeans_k = c.detection.kmeans_k;
    opts.meanshift = c.detection.meanshift;
    opts.input_size = Some((c.input.height, c.input.width));
    opts.normalization = Normalization::new(c.input.mean, c.input.std);
    let mut scratch = DetectorScratch::default();
    let mut detector = Detector::new(&opts, &mut scratch)?;
    if detector.output_names() != c.outputs.as_slice() {
        return Err(OnboardError::Bundle {
            dir: bundle.dir.clone(),
            reason: format!(
                "onboard.toml lists outputs {:?}, the model has {:?}",
                c.outputs,
                detector.output_names()
            ),
        });
    }

    let src = source::open(&args.input, args.size)?;
    let live = src.is_live();
    let policy = match args.frames {
        Some(Frames::All) => FramePolicy::All,
        Some(Frames::Latest) => FramePolicy::Latest,
        None if live => FramePolicy::Latest,
        None => FramePolicy::All,
    };

    let serial = args.serial.clone().or_else(|| c.link.serial.clone());
    let udp = args.udp.clone().or_else(|| c.link.udp.clone());
    let mut links = Vec::new();
    if let Some(path) = serial {
        links.push(LinkOutput::open(LinkTarget::Serial {
            path,
            baud: args.baud.or(c.link.baud).unwrap_or(115_200),
        })?);
    }
    if let Some(addr) = udp {
        links.push(LinkOutput::open(LinkTarget::Udp(addr))?);
    }
    if let Some(path) = &args.link_file {
        links.push(LinkOutput::open(LinkTarget::File(path.clone()))?);
    }
    let mut mavlink = match args.mavlink.clone().or_else(|| c.mavlink.target.clone()) {
        Some(t) => Some(MavlinkOutput::open(&t, c.mavlink.clone())?),
        None => None,
    };
    let json_target = args
        .json
        .clone()
        .or_else(|| (links.is_empty() && mavlink.is_none()).then(|| "-".to_string()));
    let mut json: Option<Box<dyn Write>> = match json_target.as_deref() {
        None => None,
        Some("-") => Some(Box::new(std::io::BufWriter::new(std::io::stdout()))),
        Some(p) => {
            Some(Box::new(std::io::BufWriter::new(std::fs::File::create(p).map_err(|e| {
                OnboardError::Io { action: "creating", path: p.into(), source: e }
            })?)))
        }
    };

    let [_, _, ih, iw] = detector.input_shape();
    eprintln!(
        "flsl-onboard {}: bundle {} verified; model {}x{} -> {:?}, {} thread(s); {}",
        env!("CARGO_PKG_VERSION"),
        bundle.dir.display(),
        iw,
        ih,
        detector.output_names(),
        opts.threads,
        flsl_runtime::ops::isa::kernels_line()
    );
    eprintln!(
        "source: {} ({}); frames: {}; outputs: {}{}",
        src.describe(),
        if live { "live" } else { "on demand" },
        match policy {
            FramePolicy::Latest => "latest (stale frames dropped)",
            FramePolicy::All => "all",
        },
        json_target.as_deref().map_or_else(String::new, |t| format!(
            "JSON lines to {} ",
            if t == "-" { "stdout" } else { t }
        )),
        links
            .iter()
            .map(|l| l.target().to_string())
            .chain(mavlink.as_ref().map(|m| format!("MAVLink to {}", m.target())))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).map_err(|e| OnboardError::Io {
            action: "installing a handler for",
            path: format!("signal {sig}").into(),
            source: e,
        })?;
    }
    let lopts = LoopOptions { policy, max_frames: args.max_frames, stats_every: args.stats_every };
    let mut processed = 0u64;
    let summary = run_loop(
        src,
        &lopts,
        &stop,
        |frame| {
            let r = detector.process_rgb8(&frame.data, frame.width, frame.height)?;
            let t0 = Instant::now();
            let report = match mavlink.as_mut() {
                Some(m) => m.on_frame(&r, t0)?,
                None => None,
            };
            if let Some(out) = json.as_mut() {
                let mut line = frame_record(processed, &frame.name, &r, frame.decode);
                if let Some(rep) = &report {
                    line["mavlink"] = serde_json::json!(rep);
                }
                writeln!(out, "{line}")
                    .map_err(|e| OnboardError::Output { what: "JSON lines".into(), source: e })?;
            }
            for link in &mut links {
                link.send(wire_frame(&r))?;
            }
            processed += 1;
            Ok(StageTimes {
                preprocess: r.preprocess,
                model: r.model,
                postprocess: r.postprocess,
                output: t0.elapsed(),
                ..StageTimes::default()
            })
        },
        |s| eprintln!("stats: {}", s.line()),
    )?;
    if let Some(out) = json.as_mut() {
        out.flush().map_err(|e| OnboardError::Output { what: "JSON lines".into(), source: e })?;
    }
    for link in &mut links {
        link.flush()?;
    }
    if let Some(m) = mavlink.as_mut() {
        m.flush()?;
    }
    for reason in &summary.skip_reasons {
        eprintln!("skipped: {reason}");
    }
    let mut link_text: Vec<String> = links
        .iter()
        .map(|l| {
            format!(
                "{}: {} frames, {} bytes, {} lost",
                l.target(),
                l.transport.sent,
                l.transport.bytes,
                l.transport.lost
            )
        })
        .collect();
    if let Some(m) = &mavlink {
        let n = m.counts;
        link_text.push(format!(
            "MAVLink to {}: {} heartbeats, {} tracking status ({} active, {} idle), {} gimbal set-points, {} bytes, {} lost",
            m.target(),
            n.heartbeats,
            n.active + n.idle,
            n.active,
            n.idle,
            n.gimbal,
            m.transport.bytes,
            m.transport.lost
        ));
    }
    eprintln!(
        "summary{}: {}{}",
        if summary.interrupted { " (interrupted)" } else { "" },
        summary.line(),
        if link_text.is_empty() {
            String::new()
        } else {
            format!("; link {}", link_text.join("; "))
        }
    );
    if summary.frames == 0 {
        eprintln!("error: no frame was processed");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
