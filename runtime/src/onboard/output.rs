//! Outputs of the frame loop: the JSON-lines record of a frame, and the link to the aircraft
//! (wire frames of [`crate::wire`] over a serial device, UDP, or into a file).

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::OnboardError;
use crate::detect::{FrameBox, FrameResult};
use crate::wire::{self, Frame, MAX_ENCODED_LEN, MAX_OBJECTS, Message, Object};

/// The JSON object of one processed frame (one line of `--json`).
pub fn frame_record(
    frame: u64,
    source: &str,
    r: &FrameResult,
    decode: Duration,
) -> serde_json::Value {
    let boxes = |v: &[FrameBox], with_id: bool| -> Vec<serde_json::Value> {
        v.iter()
            .map(|b| {
                if with_id {
                    serde_json::json!({"id": b.track_id, "bbox": b.bbox, "class": b.class, "score": b.score})
                } else {
                    serde_json::json!({"bbox": b.bbox, "class": b.class, "score": b.score})
                }
            })
            .collect()
    };
    let segs: Vec<serde_json::Value> = r.segments.iter().map(|s| serde_json::json!({"label": s.label, "area_patches": s.area, "cells": s.cells, "bbox": s.bbox})).collect();
    serde_json::json!({
        "frame": frame,
        "source": source,
        "size": r.size,
        "detections": boxes(&r.detections, false),
        "tracks": boxes(&r.tracks, true),
        "segments": segs,
        "clusters": r.clusters,
        "segments_overflowed": r.segments_overflowed,
        "ms": {"decode": ms(decode), "preprocess": ms(r.preprocess), "model": ms(r.model), "postprocess": ms(r.postprocess)},
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The wire objects of a frame: confirmed tracks first (by score), then untracked detections
/// (by score), boxes normalized by the frame size and clamped to `[0, 1]`; at most
/// [`MAX_OBJECTS`], with the overflow flag set when more were found.
pub fn wire_frame(r: &FrameResult) -> Frame {
    let [w, h] = r.size;
    let (fw, fh) = (w.max(1) as f32, h.max(1) as f32);
    let object = |b: &FrameBox, id: u32| Object {
        bbox: [
            (b.bbox[0] / fw).clamp(0.0, 1.0),
            (b.bbox[1] / fh).clamp(0.0, 1.0),
            (b.bbox[2] / fw).clamp(0.0, 1.0),
            (b.bbox[3] / fh).clamp(0.0, 1.0),
        ],
        class: b.class,
        score: b.score,
        track_id: id,
    };
    let mut tracks: Vec<&FrameBox> = r.tracks.iter().filter(|t| t.track_id != 0).collect();
    tracks.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut dets: Vec<&FrameBox> = r.detections.iter().collect();
    dets.sort_by(|a, b| b.score.total_cmp(&a.score));
    let total = tracks.len() + dets.len();
    let mut frame = Frame::from_objects(
        tracks
            .into_iter()
            .map(|t| object(t, t.track_id))
            .chain(dets.into_iter().map(|d| object(d, Object::UNTRACKED)))
            .take(MAX_OBJECTS),
    );
    frame.overflow = total > MAX_OBJECTS;
    frame
}

/// Where link wire frames (or MAVLink messages) go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkTarget {
    /// A serial device at a baud rate (`/dev/ttyTHS1`, `/dev/ttyUSB0`).
    Serial {
        /// The device.
        path: String,
        /// Baud rate.
        baud: u32,
    },
    /// UDP datagrams, one wire frame (or MAVLink message) each, to this address.
    Udp(String),
    /// The raw byte stream into a file (a recording to replay into the firmware).
    File(PathBuf),
}

impl std::fmt::Display for LinkTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Serial { path, baud } => write!(f, "serial {path} at {baud} baud"),
            Self::Udp(a) => write!(f, "UDP {a}"),
            Self::File(p) => write!(f, "file {}", p.display()),
        }
    }
}

enum Port {
    Serial(Box<dyn serialport::SerialPort>),
    Udp(UdpSocket, SocketAddr),
    File(std::io::BufWriter<std::fs::File>),
}

/// A byte transport to a [`LinkTarget`], shared by the wire-frame link and MAVLink.
///
/// Each [`Transport::send`] is one unit (one UDP datagram; a contiguous write on serial and
/// files). A serial device that vanishes (unplugged adapter) is reported once and reopened at
/// most once a second; units in between are counted as lost and the loop goes on. UDP and file
/// errors are errors.
pub struct Transport {
    target: LinkTarget,
    what: &'static str,
    port: Option<Port>,
    last_attempt: Option<Instant>,
    /// Units written.
    pub sent: u64,
    /// Units not written because the device was gone.
    pub lost: u64,
    /// Bytes written.
    pub bytes: u64,
}

impl Transport {
    /// Opens `target` for `what` (`"wire frames"`, `"MAVLink"`: named in errors).
    pub fn open(target: LinkTarget, what: &'static str) -> Result<Self, OnboardError> {
        let port = open_port(&target, what)?;
        Ok(Self { target, what, port: Some(port), last_attempt: None, sent: 0, lost: 0, bytes: 0 })
    }

    /// The target.
    pub fn target(&self) -> &LinkTarget {
        &self.target
    }

    /// Writes `bytes` as one unit: `Ok(true)` when written, `Ok(false)` when lost to a serial
    /// device that is gone (reopened at most once a second).
    pub fn send(&mut self, bytes: &[u8]) -> Result<bool, OnboardError> {
        if self.port.is_none() {
            let due = self.last_attempt.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
            if !due {
                self.lost += 1;
                return Ok(false);
            }
            self.last_attempt = Some(Instant::now());
            match open_port(&self.target, self.what) {
                Ok(p) => {
                    tracing::info!("{}: {} is back", self.what, self.target);
                    self.port = Some(p);
                }
                Err(e) => {
                    self.lost += 1;
                    tracing::debug!("{}: reopening {} failed: {e}", self.what, self.target);
                    return Ok(false);
                }
            }
        }
        let result = match self.port.as_mut() {
            Some(Port::Serial(p)) => p.write_all(bytes).and_then(|()| p.flush()),
            Some(Port::Udp(s, addr)) => s.send_to(bytes, *addr).map(|_| ()),
            Some(Port::File(f)) => f.write_all(bytes),
            None => Ok(()),
        };
        match result {
            Ok(()) => {
                self.sent += 1;
                self.bytes += bytes.len() as u64;
                Ok(true)
            }
            Err(e) if matches!(self.target, LinkTarget::Serial { .. }) => {
                tracing::warn!(
                    "{}: writing to {} failed ({e}); reopening it once a second",
                    self.what,
                    self.target
                );
                self.port = None;
                self.last_attempt = Some(Instant::now());
                self.lost += 1;
                Ok(false)
            }
            Err(e) => Err(OnboardError::Output {
                what: format!("{} to {}", self.what, self.target),
                source: e,
            }),
        }
    }

    /// Flushes buffered bytes (file targets).
    pub fn flush(&mut self) -> Result<(), OnboardError> {
        if let Some(Port::File(f)) = &mut self.port {
            f.flush().map_err(|e| OnboardError::Output {
                what: format!("{} to {}", self.what, self.target),
                source: e,
            })?;
        }
        Ok(())
    }
}

/// Sends one wire frame of [`crate::wire`] per processed frame over a [`Transport`].
pub struct LinkOutput {
    /// The transport and its counters (wire frames sent / lost, bytes).
    pub transport: Transport,
    seq: u32,
    epoch: Instant,
    buf: [u8; MAX_ENCODED_LEN],
}

impl LinkOutput {
    /// Opens the target; an error names it.
    pub fn open(target: LinkTarget) -> Result<Self, OnboardError> {
        Ok(Self {
            transport: Transport::open(target, "wire frames")?,
            seq: 0,
            epoch: Instant::now(),
            buf: [0; MAX_ENCODED_LEN],
        })
    }

    /// The target.
    pub fn target(&self) -> &LinkTarget {
        self.transport.target()
    }

    /// Encodes `frame` as the next message and writes it.
    pub fn send(&mut self, frame: Frame) -> Result<(), OnboardError> {
        let t_us = self.epoch.elapsed().as_micros() as u64;
        let msg = Message::frame(self.seq, t_us, frame);
        self.seq = self.seq.wrapping_add(1);
        let n = wire::encode(&msg, &mut self.buf).map_err(|e| OnboardError::Output {
            what: format!("wire frame for {}", self.target()),
            source: std::io::Error::other(format!("{e:?}")),
        })?;
        self.transport.send(&self.buf[..n]).map(|_| ())
    }

    /// Flushes buffered bytes (file targets).
    pub fn flush(&mut self) -> Result<(), OnboardError> {
        self.transport.flush()
    }
}

fn open_port(target: &LinkTarget, what: &str) -> Result<Port, OnboardError> {
    match target {
        LinkTarget::Serial { path, baud } => serialport::new(path.as_str(), *baud)
            .timeout(Duration::from_millis(200))
            .open()
            .map(Port::Serial)
            .map_err(|e| OnboardError::Output {
                what: format!("{what} to {target}"),
                source: std::io::Error::other(e.to_string()),
            }),
        LinkTarget::Udp(addr) => {
            let err = |e: std::io::Error| OnboardError::Output {
                what: format!("{what} to {target}"),
                source: e,
            };
            let to = addr
                .to_socket_addrs()
                .map_err(err)?
                .next()
                .ok_or_else(|| err(std::io::Error::other("the address resolves to nothing")))?;
            let bind: SocketAddr = if to.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            Ok(Port::Udp(UdpSocket::bind(bind).map_err(err)?, to))
        }
        LinkTarget::File(p) => std::fs::File::create(p)
            .map(|f| Port::File(std::io::BufWriter::new(f)))
            .map_err(|e| OnboardError::Io {
                action: "creating the link recording",
                path: p.clone(),
                source: e,
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fb(bbox: [f32; 4], score: f32, id: u32) -> FrameBox {
        FrameBox { bbox, class: 1, score, track_id: id }
    }

    #[test]
    fn wire_frame_puts_tracks_first_normalizes_and_flags_overflow() {
        let r = FrameResult {
            size: [200, 100],
            detections: vec![
                fb([0.0, 0.0, 100.0, 50.0], 0.9, 0),
                fb([-10.0, 0.0, 300.0, 100.0], 0.4, 0),
            ],
            tracks: vec![fb([20.0, 10.0, 40.0, 30.0], 0.5, 7), fb([0.0, 0.0, 1.0, 1.0], 0.8, 0)],
            ..FrameResult::default()
        };
        let f = wire_frame(&r);
        let objects: Vec<&Object> = f.objects.iter().collect();
        assert_eq!(objects.len(), 3, "the unconfirmed track (id 0) is not sent twice");
        assert_eq!((objects[0].track_id, objects[0].bbox), (7, [0.1, 0.1, 0.2, 0.3]));
        assert_eq!((objects[1].score, objects[1].bbox), (0.9, [0.0, 0.0, 0.5, 0.5]));
        assert_eq!(objects[2].bbox, [0.0, 0.0, 1.0, 1.0], "clamped");
        assert!(!f.overflow);
        let many = FrameResult {
            size: [10, 10],
            detections: vec![fb([0.0, 0.0, 1.0, 1.0], 0.5, 0); MAX_OBJECTS + 3],
            ..FrameResult::default()
        };
        let f = wire_frame(&many);
        assert_eq!(f.objects.len(), MAX_OBJECTS);
        assert!(f.overflow);
    }

    #[test]
    fn link_output_to_udp_sends_decodable_frames_in_sequence() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let addr = rx.local_addr().unwrap().to_string();
        let mut link = LinkOutput::open(LinkTarget::Udp(addr)).unwrap();
        let r = FrameResult {
            size: [100, 100],
            tracks: vec![fb([10.0, 20.0, 30.0, 40.0], 0.7, 3)],
            ..FrameResult::default()
        };
        for _ in 0..3 {
            link.send(wire_frame(&r)).unwrap();
        }
        for seq in 0..3 {
            let mut b = [0u8; MAX_ENCODED_LEN];
            let n = rx.recv(&mut b).unwrap();
            assert_eq!((b[0], b[n - 1]), (0, 0), "COBS frame delimiters");
            let msg = wire::decode_chunk(&mut b[1..n - 1]).unwrap();
            assert_eq!(msg.seq, seq);
        }
        assert_eq!((link.transport.sent, link.transport.lost), (3, 0));
    }

    #[test]
    fn a_missing_serial_device_is_a_clear_error() {
        let e = LinkOutput::open(LinkTarget::Serial {
            path: "/dev/flsl-no-such-tty".into(),
            baud: 115_200,
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("/dev/flsl-no-such-tty"), "{e}");
    }
}
