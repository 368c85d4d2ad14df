//! The onboard engine around [`Detector`](crate::detect::Detector): what `flsl-onboard` runs on
//! the companion computer.
//!
//! ```text
//! FrameSource (folder | video via ffmpeg | raw RGB on stdin | V4L2 camera)
//!   --capture thread--> Handoff (one slot: the latest frame, or back-pressure)
//!   --frame loop--> Detector (preprocess -> model -> perception core)
//!   --> outputs: JSON lines, link wire frames (serial | UDP | file), MAVLink v2 (UDP | serial)
//! ```
//!
//! - [`bundle`]: a model bundle (`model.onnx` + `onboard.toml` + `SHA256SUMS`), verified before
//!   anything runs; [`bundle::write_bundle`] (feature `tools`) makes one on the host.
//! - [`source`]: frame sources and the reusable [`FrameBuf`](source::FrameBuf).
//! - [`run`]: the real-time loop: a capture thread hands frames over one slot, so a source
//!   faster than the model loses stale frames (counted) instead of queueing them; clean stop
//!   on a flag (SIGINT/SIGTERM in the binary); a stats line every N frames.
//! - [`output`]: the JSON-lines record of a frame and the link output (wire frames).
//! - [`heap`]: the counting global allocator of `flsl-onboard` (live heap bytes and
//!   allocations per frame in the stats line).
//! - [`mavlink`]: HEARTBEAT, CAMERA_TRACKING_IMAGE_STATUS and GIMBAL_MANAGER_SET_PITCHYAW for
//!   PX4 / ArduPilot / ground stations.

use std::path::PathBuf;

use crate::error::ModelError;

pub mod bundle;
pub mod heap;
pub mod mavlink;
pub mod output;
pub mod run;
pub mod source;

/// Errors of the onboard engine: each names the file, field, device or frame concerned.
#[derive(Debug, thiserror::Error)]
pub enum OnboardError {
    /// A bundle is missing a file, or a field of its `onboard.toml` is wrong.
    #[error("bundle {dir}: {reason}")]
    Bundle {
        /// The bundle folder.
        dir: PathBuf,
        /// What is wrong, naming the file or field.
        reason: String,
    },
    /// A bundle file does not match its checksum.
    #[error(
        "bundle {dir}: {file} does not match its SHA-256 in SHA256SUMS (expected {expected}, got {got}): the bundle is corrupted, copy it again"
    )]
    Checksum {
        /// The bundle folder.
        dir: PathBuf,
        /// The file.
        file: String,
        /// The checksum listed.
        expected: String,
        /// The checksum of the file on disk.
        got: String,
    },
    /// A frame source could not be opened or read.
    #[error("frame source {input}: {reason}")]
    Source {
        /// The source as given (`-`, a folder, a file, `/dev/videoN`).
        input: String,
        /// What went wrong.
        reason: String,
    },
    /// File or device I/O failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or device.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An output could not be written.
    #[error("writing {what}")]
    Output {
        /// The output (`JSON lines to out.jsonl`, `wire frames to /dev/ttyUSB0`, ...).
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Loading or running the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Resident memory of this process in bytes (`VmRSS` of `/proc/self/status`; `None` where
/// that file does not exist).
pub fn rss_bytes() -> Option<u64> {
    proc_status_kb("VmRSS:")
}

/// Peak resident memory of this process in bytes (`VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_kb("VmHWM:")
}

fn proc_status_kb(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}
