//! MAVLink v2 out of `flsl-onboard`: the companion computer as a camera component that
//! PX4, ArduPilot and ground stations understand.
//!
//! - `HEARTBEAT` once a second (`MAV_TYPE_CAMERA`, `MAV_AUTOPILOT_INVALID`: not an autopilot);
//! - `CAMERA_TRACKING_IMAGE_STATUS` (#275) at `rate_hz`: the locked track's rectangle in
//!   normalized image coordinates (`0..1`, origin top left), status `ACTIVE` and mode
//!   `RECTANGLE`; status `IDLE` and mode `NONE` (every coordinate NaN) while nothing is locked;
//! - with a gimbal configured, `GIMBAL_MANAGER_SET_PITCHYAW` (#287) with the angles the
//!   firmware's controller (`flsl_firmware::control`) would command for the same track: the
//!   same PD law, limits and slew rate, by default the firmware's defaults.
//!
//! The lock follows the firmware's automatic selection: the confirmed track with the highest
//! score at or above `min_score`, kept while it stays in view (a better-scoring track does not
//! steal it), given up after `lock_timeout_s` unseen.
//!
//! Encoding is the `mavlink` crate (0.21, `common` dialect, generated from the MAVLink XML):
//! CRC extra per message, v2 framing, no signing. Every message is one unit on the
//! [`Transport`]: one UDP datagram, or a contiguous write on a serial device.

use crate::error::Invalid;
use std::time::{Duration, Instant};

use mavlink::MavHeader;
use mavlink::dialects::common::{
    CAMERA_TRACKING_IMAGE_STATUS_DATA, CameraTrackingMode, CameraTrackingStatusFlags,
    CameraTrackingTargetData, GIMBAL_MANAGER_SET_PITCHYAW_DATA, GimbalManagerFlags, HEARTBEAT_DATA,
    MavAutopilot, MavMessage, MavModeFlag, MavState, MavType,
};
use serde::{Deserialize, Serialize};

use super::OnboardError;
use super::output::{LinkTarget, Transport};
use crate::detect::{FrameBox, FrameResult};

/// `[mavlink]` of `onboard.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MavlinkConfig {
    /// Where to send (`udpout:HOST:PORT` or `serial:DEVICE[:BAUD]`); `--mavlink` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Our MAVLink system id: the vehicle's (a companion computer is part of the vehicle).
    #[serde(default = "default_system_id")]
    pub system_id: u8,
    /// Our component id (100: `MAV_COMP_ID_CAMERA`).
    #[serde(default = "default_component_id")]
    pub component_id: u8,
    /// `CAMERA_TRACKING_IMAGE_STATUS` (and gimbal set-point) messages per second.
    #[serde(default = "default_rate_hz")]
    pub rate_hz: f32,
    /// Least score of a track to lock on (the firmware's `min_score`).
    #[serde(default = "default_min_score")]
    pub min_score: f32,
    /// A locked track unseen this long is given up.
    #[serde(default = "default_lock_timeout_s")]
    pub lock_timeout_s: f32,
    /// A gimbal to point at the locked track (`GIMBAL_MANAGER_SET_PITCHYAW`); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gimbal: Option<GimbalConfig>,
}

fn default_system_id() -> u8 {
    1
}
fn default_component_id() -> u8 {
    100
}
fn default_rate_hz() -> f32 {
    10.0
}
fn default_min_score() -> f32 {
    0.3
}
fn default_lock_timeout_s() -> f32 {
    1.0
}

impl Default for MavlinkConfig {
    fn default() -> Self {
        Self {
            target: None,
            system_id: default_system_id(),
            component_id: default_component_id(),
            rate_hz: default_rate_hz(),
            min_score: default_min_score(),
            lock_timeout_s: default_lock_timeout_s(),
            gimbal: None,
        }
    }
}

impl MavlinkConfig {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), Invalid> {
        if !(self.rate_hz.is_finite() && self.rate_hz > 0.0 && self.rate_hz <= 100.0) {
            return Err(Invalid::from(format!(
                "mavlink.rate_hz = {}: expected more than 0 and at most 100",
                self.rate_hz
            )));
        }
        if self.system_id == 0 {
            return Err(Invalid::from("mavlink.system_id = 0: 0 is the broadcast id, use 1..=255"));
        }
        if self.component_id == 0 {
            return Err(Invalid::from(
                "mavlink.component_id = 0: 0 is the broadcast id, use 1..=255 (100 is MAV_COMP_ID_CAMERA)",
            ));
        }
        if !(0.0..=1.0).contains(&self.min_score) {
            return Err(Invalid::from(format!(
                "mavlink.min_score = {}: expected 0..=1",
                self.min_score
            )));
        }
        if !(self.lock_timeout_s.is_finite() && self.lock_timeout_s > 0.0) {
            return Err(Invalid::from(format!(
                "mavlink.lock_timeout_s = {}: expected a positive number of seconds",
                self.lock_timeout_s
            )));
        }
        if let Some(t) = &self.target {
            parse_target(t).map_err(|e| format!("mavlink.target: {e}"))?;
        }
        if let Some(g) = &self.gimbal {
            for (name, a) in [("pan", &g.pan), ("tilt", &g.tilt)] {
                a.validate().map_err(|e| format!("mavlink.gimbal.{name}.{e}"))?;
            }
        }
        Ok(())
    }
}

/// `[mavlink.gimbal]`: the pan (yaw) and tilt (pitch) axes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GimbalConfig {
    /// Yaw axis (the firmware's pan).
    #[serde(default = "GimbalAxis::pan")]
    pub pan: GimbalAxis,
    /// Pitch axis (the firmware's tilt).
    #[serde(default = "GimbalAxis::tilt")]
    pub tilt: GimbalAxis,
}

impl Default for GimbalConfig {
    fn default() -> Self {
        Self { pan: GimbalAxis::pan(), tilt: GimbalAxis::tilt() }
    }
}

/// One gimbal axis: the firmware controller's `AxisConfig` without the servo.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GimbalAxis {
    /// Degrees of correction per unit of normalized image offset.
    pub kp_deg: f32,
    /// Degrees per unit of normalized offset per second.
    pub kd_deg_s: f32,
    /// Lowest angle, degrees.
    pub min_deg: f32,
    /// Highest angle, degrees.
    pub max_deg: f32,
    /// Rest angle (no lock), degrees.
    pub center_deg: f32,
    /// Slew limit, degrees per second.
    pub max_rate_deg_s: f32,
}

impl GimbalAxis {
    /// The firmware's pan defaults (`AxisConfig::pan`).
    pub const fn pan() -> Self {
        Self {
            kp_deg: 36.0,
            kd_deg_s: 2.0,
            min_deg: -80.0,
            max_deg: 80.0,
            center_deg: 0.0,
            max_rate_deg_s: 120.0,
        }
    }

    /// The firmware's tilt defaults (`AxisConfig::tilt`).
    pub const fn tilt() -> Self {
        Self {
            kp_deg: -27.0,
            kd_deg_s: -1.5,
            min_deg: -60.0,
            max_deg: 30.0,
            center_deg: 0.0,
            max_rate_deg_s: 90.0,
        }
    }

    fn validate(&self) -> Result<(), String> {
        let finite = [
            self.kp_deg,
            self.kd_deg_s,
            self.min_deg,
            self.max_deg,
            self.center_deg,
            self.max_rate_deg_s,
        ];
        if !finite.iter().all(|v| v.is_finite()) {
            return Err(format!("{self:?}: every value must be finite"));
        }
        if self.min_deg > self.max_deg {
            return Err(format!("min_deg = {} is above max_deg = {}", self.min_deg, self.max_deg));
        }
        if self.max_rate_deg_s <= 0.0 {
            return Err(format!("max_rate_deg_s = {}: expected > 0", self.max_rate_deg_s));
        }
        Ok(())
    }

    fn center(&self) -> f32 {
        self.center_deg.max(self.min_deg).min(self.max_deg)
    }
}

/// Parses a MAVLink target: `udpout:HOST:PORT` or `serial:DEVICE[:BAUD]` (57600 baud, the
/// autopilots' usual TELEM setting, when none is given).
pub fn parse_target(s: &str) -> Result<LinkTarget, Invalid> {
    if let Some(addr) = s.strip_prefix("udpout:") {
        let (host, port) =
            addr.rsplit_once(':').ok_or_else(|| format!("`{s}`: expected udpout:HOST:PORT"))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(Invalid::from(format!(
                "`{s}`: expected udpout:HOST:PORT with a port number 0..=65535"
            )));
        }
        return Ok(LinkTarget::Udp(addr.to_string()));
    }
    if let Some(rest) = s.strip_prefix("serial:") {
        let (path, baud) = match rest.rsplit_once(':') {
            Some((p, b)) if b.bytes().all(|c| c.is_ascii_digit()) && !b.is_empty() => {
                (p, b.parse::<u32>().map_err(|_| format!("`{s}`: baud `{b}` is too large"))?)
            }
            _ => (rest, 57_600),
        };
        if path.is_empty() || baud == 0 {
            return Err(Invalid::from(format!("`{s}`: expected serial:DEVICE[:BAUD]")));
        }
        return Ok(LinkTarget::Serial { path: path.to_string(), baud });
    }
    Err(Invalid::from(format!("`{s}`: expected udpout:HOST:PORT or serial:DEVICE[:BAUD]")))
}

/// What one processed frame sent, for the JSON-lines record (`"mavlink"`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrackingReport {
    /// MAVLink sequence number of the `CAMERA_TRACKING_IMAGE_STATUS` message.
    pub seq: u8,
    /// `"active"` (a track is locked) or `"idle"`.
    pub status: &'static str,
    /// The locked track.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track: Option<u32>,
    /// The rectangle sent: `[top_x, top_y, bottom_x, bottom_y]`, normalized (absent when idle).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rect: Option<[f32; 4]>,
    /// The gimbal set-point sent, degrees: `[pitch, yaw]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gimbal_deg: Option<[f32; 2]>,
}

/// A locked track.
#[derive(Debug, Clone, Copy)]
struct Lock {
    track: u32,
    last_seen: Instant,
    /// The last normalized offset from the image centre and when it was seen (for de/dt).
    e: (f32, f32),
    at: Instant,
}

/// The gimbal's commanded angles, moved as the firmware's controller moves them.
#[derive(Debug, Clone, Copy)]
struct Gimbal {
    cfg_pan: GimbalAxis,
    cfg_tilt: GimbalAxis,
    pan: f32,
    tilt: f32,
    pan_target: f32,
    tilt_target: f32,
    last: Option<Instant>,
}

impl Gimbal {
    fn new(c: &GimbalConfig) -> Self {
        let (pan, tilt) = (c.pan.center(), c.tilt.center());
        Self {
            cfg_pan: c.pan,
            cfg_tilt: c.tilt,
            pan,
            tilt,
            pan_target: pan,
            tilt_target: tilt,
            last: None,
        }
    }

    /// A new observation of the locked target: `target = clamp(angle + kp e + kd de/dt)`.
    fn correct(&mut self, e: (f32, f32), de_dt: (f32, f32)) {
        let set = |cfg: &GimbalAxis, angle: f32, e: f32, d: f32| {
            let t = angle + cfg.kp_deg * e + cfg.kd_deg_s * d;
            if t.is_finite() { t.max(cfg.min_deg).min(cfg.max_deg) } else { angle }
        };
        self.pan_target = set(&self.cfg_pan, self.pan, e.0, de_dt.0);
        self.tilt_target = set(&self.cfg_tilt, self.tilt, e.1, de_dt.1);
    }

    /// No lock: back to the rest angles.
    fn rest(&mut self) {
        self.pan_target = self.cfg_pan.center();
        self.tilt_target = self.cfg_tilt.center();
    }

    /// Moves the angles towards their targets by at most the slew limit since the last call.
    fn slew(&mut self, now: Instant) {
        let dt = self.last.map_or(0.0, |l| now.saturating_duration_since(l).as_secs_f32());
        self.last = Some(now);
        let step = |cfg: &GimbalAxis, angle: f32, target: f32| {
            let s = (cfg.max_rate_deg_s * dt).max(0.0);
            let a = (angle + (target - angle).max(-s).min(s)).max(cfg.min_deg).min(cfg.max_deg);
            if (target - a).abs() < 1e-4 { target } else { a }
        };
        self.pan = step(&self.cfg_pan, self.pan, self.pan_target);
        self.tilt = step(&self.cfg_tilt, self.tilt, self.tilt_target);
    }
}

/// MAVLink messages of the frame loop over a [`Transport`].
pub struct MavlinkOutput {
    /// The transport and its counters (messages sent / lost, bytes).
    pub transport: Transport,
    config: MavlinkConfig,
    seq: u8,
    buf: Vec<u8>,
    last_heartbeat: Option<Instant>,
    last_status: Option<Instant>,
    lock: Option<Lock>,
    gimbal: Option<Gimbal>,
    /// Messages sent by kind: heartbeats, tracking status (active, idle), gimbal set-points.
    pub counts: MavlinkCounts,
}

/// Messages sent, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MavlinkCounts {
    /// `HEARTBEAT`.
    pub heartbeats: u64,
    /// `CAMERA_TRACKING_IMAGE_STATUS` with a track locked.
    pub active: u64,
    /// `CAMERA_TRACKING_IMAGE_STATUS` with nothing locked.
    pub idle: u64,
    /// `GIMBAL_MANAGER_SET_PITCHYAW`.
    pub gimbal: u64,
}

impl MavlinkOutput {
    /// Opens `target` (see [`parse_target`]) with `config`'s ids, rate and gimbal.
    pub fn open(target: &str, config: MavlinkConfig) -> Result<Self, OnboardError> {
        config.validate().map_err(|e| OnboardError::Output {
            what: format!("MAVLink to {target}"),
            source: std::io::Error::other(e),
        })?;
        let t = parse_target(target).map_err(|e| OnboardError::Output {
            what: "MAVLink".into(),
            source: std::io::Error::other(e),
        })?;
        Ok(Self {
            transport: Transport::open(t, "MAVLink")?,
            gimbal: config.gimbal.as_ref().map(Gimbal::new),
            config,
            seq: 0,
            buf: Vec::with_capacity(300),
            last_heartbeat: None,
            last_status: None,
            lock: None,
            counts: MavlinkCounts::default(),
        })
    }

    /// The target.
    pub fn target(&self) -> &LinkTarget {
        self.transport.target()
    }

    /// One processed frame at `now`: a heartbeat when one is due, then (at `rate_hz`) the
    /// tracking status and gimbal set-point. Returns what the tracking status said, when one
    /// was sent.
    pub fn on_frame(
        &mut self,
        r: &FrameResult,
        now: Instant,
    ) -> Result<Option<TrackingReport>, OnboardError> {
        if self
            .last_heartbeat
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            self.last_heartbeat = Some(now);
            let hb = MavMessage::HEARTBEAT(HEARTBEAT_DATA {
                custom_mode: 0,
                mavtype: MavType::MAV_TYPE_CAMERA,
                autopilot: MavAutopilot::MAV_AUTOPILOT_INVALID,
                base_mode: MavModeFlag::empty(),
                system_status: MavState::MAV_STATE_ACTIVE,
                mavlink_version: 3,
            });
            if self.send(&hb)? {
                self.counts.heartbeats += 1;
            }
        }
        let [w, h] = r.size;
        let (fw, fh) = (w.max(1) as f32, h.max(1) as f32);
        let locked = self.update_lock(&r.tracks, now, fw, fh);
        if let (Some(g), Some((e, de))) =
            (self.gimbal.as_mut(), locked.map(|(_, _, e, de)| (e, de)))
        {
            g.correct(e, de);
        } else if let Some(g) = self.gimbal.as_mut()
            && locked.is_none()
        {
            g.rest();
        }
        let period = Duration::from_nanos((1e9 / f64::from(self.config.rate_hz)) as u64);
        if self.last_status.is_some_and(|t| now.saturating_duration_since(t) < period) {
            return Ok(None);
        }
        self.last_status = Some(now);
        let status_seq = self.seq;
        let nan = f32::NAN;
        let (msg, report) = match locked {
            Some((track, rect, _, _)) => (
                CAMERA_TRACKING_IMAGE_STATUS_DATA {
                    tracking_status: CameraTrackingStatusFlags::CAMERA_TRACKING_STATUS_FLAGS_ACTIVE,
                    tracking_mode: CameraTrackingMode::CAMERA_TRACKING_MODE_RECTANGLE,
                    target_data: CameraTrackingTargetData::CAMERA_TRACKING_TARGET_DATA_IN_STATUS,
                    point_x: (rect[0] + rect[2]) / 2.0,
                    point_y: (rect[1] + rect[3]) / 2.0,
                    radius: nan,
                    rec_top_x: rect[0],
                    rec_top_y: rect[1],
                    rec_bottom_x: rect[2],
                    rec_bottom_y: rect[3],
                },
                TrackingReport {
                    seq: status_seq,
                    status: "active",
                    track: Some(track),
                    rect: Some(rect),
                    gimbal_deg: None,
                },
            ),
            None => (
                CAMERA_TRACKING_IMAGE_STATUS_DATA {
                    tracking_status: CameraTrackingStatusFlags::CAMERA_TRACKING_STATUS_FLAGS_IDLE,
                    tracking_mode: CameraTrackingMode::CAMERA_TRACKING_MODE_NONE,
                    target_data: CameraTrackingTargetData::empty(),
                    point_x: nan,
                    point_y: nan,
                    radius: nan,
                    rec_top_x: nan,
                    rec_top_y: nan,
                    rec_bottom_x: nan,
                    rec_bottom_y: nan,
                },
                TrackingReport {
                    seq: status_seq,
                    status: "idle",
                    track: None,
                    rect: None,
                    gimbal_deg: None,
                },
            ),
        };
        let mut report = report;
        if self.send(&MavMessage::CAMERA_TRACKING_IMAGE_STATUS(msg))? {
            if locked.is_some() {
                self.counts.active += 1;
            } else {
                self.counts.idle += 1;
            }
        }
        if let Some(g) = self.gimbal.as_mut() {
            g.slew(now);
            let (pitch, yaw) = (g.tilt, g.pan);
            report.gimbal_deg = Some([pitch, yaw]);
            let m = MavMessage::GIMBAL_MANAGER_SET_PITCHYAW(GIMBAL_MANAGER_SET_PITCHYAW_DATA {
                flags: GimbalManagerFlags::GIMBAL_MANAGER_FLAGS_ROLL_LOCK
                    | GimbalManagerFlags::GIMBAL_MANAGER_FLAGS_PITCH_LOCK,
                pitch: pitch.to_radians(),
                yaw: yaw.to_radians(),
                pitch_rate: nan,
                yaw_rate: nan,
                target_system: self.config.system_id,
                target_component: 0,
                gimbal_device_id: 0,
            });
            if self.send(&m)? {
                self.counts.gimbal += 1;
            }
        }
        Ok(Some(report))
    }

    /// Keeps or picks the locked track. Returns `(track, rect, e, de/dt)` of the lock seen in
    /// this frame.
    #[allow(clippy::type_complexity)]
    fn update_lock(
        &mut self,
        tracks: &[FrameBox],
        now: Instant,
        fw: f32,
        fh: f32,
    ) -> Option<(u32, [f32; 4], (f32, f32), (f32, f32))> {
        let usable = |b: &&FrameBox| b.track_id != 0 && b.bbox.iter().all(|v| v.is_finite());
        let current =
            self.lock.and_then(|l| tracks.iter().filter(usable).find(|b| b.track_id == l.track));
        let chosen = match current {
            Some(b) => Some(b),
            None => {
                let expired = self.lock.is_none_or(|l| {
                    now.saturating_duration_since(l.last_seen).as_secs_f32()
                        >= self.config.lock_timeout_s
                });
                if !expired {
                    return None;
                }
                self.lock = None;
                tracks
                    .iter()
                    .filter(usable)
                    .filter(|b| b.score >= self.config.min_score)
                    .max_by(|a, b| a.score.total_cmp(&b.score))
            }
        };
        let b = chosen?;
        let rect = [
            (b.bbox[0] / fw).clamp(0.0, 1.0),
            (b.bbox[1] / fh).clamp(0.0, 1.0),
            (b.bbox[2] / fw).clamp(0.0, 1.0),
            (b.bbox[3] / fh).clamp(0.0, 1.0),
        ];
        let e = (
            ((rect[0] + rect[2]) / 2.0 - 0.5).clamp(-0.5, 0.5),
            ((rect[1] + rect[3]) / 2.0 - 0.5).clamp(-0.5, 0.5),
        );
        let de = match self.lock {
            Some(l) if l.track == b.track_id => {
                let dt = now.saturating_duration_since(l.at).as_secs_f32();
                if dt > 0.0 { ((e.0 - l.e.0) / dt, (e.1 - l.e.1) / dt) } else { (0.0, 0.0) }
            }
            _ => (0.0, 0.0),
        };
        self.lock = Some(Lock { track: b.track_id, last_seen: now, e, at: now });
        Some((b.track_id, rect, e, de))
    }

    fn send(&mut self, msg: &MavMessage) -> Result<bool, OnboardError> {
        let header = MavHeader {
            system_id: self.config.system_id.into(),
            component_id: self.config.component_id,
            sequence: self.seq,
        };
        self.seq = self.seq.wrapping_add(1);
        self.buf.clear();
        mavlink::write_v2_msg(&mut self.buf, header, msg).map_err(|e| OnboardError::Output {
            what: format!("MAVLink to {}", self.transport.target()),
            source: std::io::Error::other(e.to_string()),
        })?;
        self.transport.send(&self.buf)
    }

    /// Flushes buffered bytes (file targets).
    pub fn flush(&mut self) -> Result<(), OnboardError> {
        self.transport.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use mavlink::{MavlinkReader, MavlinkVersion};

    use super::*;

    fn fb(bbox: [f32; 4], score: f32, id: u32) -> FrameBox {
        FrameBox { bbox, class: 0, score, track_id: id }
    }

    fn frame(tracks: Vec<FrameBox>) -> FrameResult {
        FrameResult { size: [200, 100], tracks, ..FrameResult::default() }
    }

    #[test]
    fn targets_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_target("udpout:127.0.0.1:14550").unwrap(),
            LinkTarget::Udp("127.0.0.1:14550".into())
        );
        assert_eq!(
            parse_target("serial:/dev/ttyTHS1:921600").unwrap(),
            LinkTarget::Serial { path: "/dev/ttyTHS1".into(), baud: 921_600 }
        );
        assert_eq!(
            parse_target("serial:/dev/ttyUSB0").unwrap(),
            LinkTarget::Serial { path: "/dev/ttyUSB0".into(), baud: 57_600 }
        );
        for bad in ["udp:1.2.3.4:5", "udpout:1.2.3.4", "udpout:host:99999", "serial:", "tcp:x:1"] {
            assert!(parse_target(bad).unwrap_err().reason.contains(bad), "{bad}");
        }
        let mut c = MavlinkConfig { rate_hz: 0.0, ..MavlinkConfig::default() };
        assert!(c.validate().unwrap_err().reason.contains("mavlink.rate_hz"));
        c = MavlinkConfig {
            gimbal: Some(GimbalConfig {
                tilt: GimbalAxis { min_deg: 10.0, max_deg: -10.0, ..GimbalAxis::tilt() },
                ..GimbalConfig::default()
            }),
            ..MavlinkConfig::default()
        };
        assert!(c.validate().unwrap_err().reason.contains("mavlink.gimbal.tilt.min_deg"));
    }

    /// Every datagram decodes as MAVLink v2 (CRC checked by the decoder), in sequence, with
    /// the ids of the config; the rectangle is the locked track's, normalized; the lock
    /// holds against a better-scoring newcomer and idles once the track is gone.
    #[test]
    fn udp_stream_decodes_with_lock_rect_and_gimbal() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let target = format!("udpout:{}", rx.local_addr().unwrap());
        let cfg = MavlinkConfig {
            system_id: 7,
            component_id: 100,
            rate_hz: 10.0,
            gimbal: Some(GimbalConfig::default()),
            ..MavlinkConfig::default()
        };
        let mut out = MavlinkOutput::open(&target, cfg).unwrap();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Frame 0: track 3 (score 0.6) right of centre; unconfirmed (id 0) and weak ones ignored.
        let f0 = frame(vec![
            fb([150.0, 40.0, 170.0, 60.0], 0.6, 3),
            fb([0.0, 0.0, 10.0, 10.0], 0.9, 0),
            fb([0.0, 0.0, 10.0, 10.0], 0.1, 4),
        ]);
        let r0 = out.on_frame(&f0, at(0)).unwrap().unwrap();
        assert_eq!(
            (r0.status, r0.track, r0.rect),
            ("active", Some(3), Some([0.75, 0.4, 0.85, 0.6]))
        );
        // 50 ms later: below the 10 Hz period, no status.
        assert!(out.on_frame(&f0, at(50)).unwrap().is_none());
        // A better track appears: the lock stays on 3.
        let f1 = frame(vec![
            fb([150.0, 40.0, 170.0, 60.0], 0.6, 3),
            fb([20.0, 20.0, 40.0, 40.0], 0.95, 9),
        ]);
        let r1 = out.on_frame(&f1, at(100)).unwrap().unwrap();
        assert_eq!(r1.track, Some(3));
        // Track 3 gone: no new lock until the timeout, then 9.
        let f2 = frame(vec![fb([20.0, 20.0, 40.0, 40.0], 0.95, 9)]);
        let r2 = out.on_frame(&f2, at(200)).unwrap().unwrap();
        assert_eq!(r2.status, "idle");
        let r3 = out.on_frame(&f2, at(1300)).unwrap().unwrap();
        assert_eq!((r3.status, r3.track), ("active", Some(9)));
        let r4 = out.on_frame(&frame(vec![]), at(1400)).unwrap().unwrap();
        assert_eq!(r4.status, "idle");

        let reports = [&r0, &r1, &r2, &r3, &r4];
        let mut statuses = 0;
        let mut heartbeats = 0;
        let mut gimbals = Vec::new();
        let mut last_seq = None;
        for _ in 0..out.transport.sent {
            let mut b = [0u8; 300];
            let n = rx.recv(&mut b).unwrap();
            // One datagram, one message, CRC-valid (the reader skips anything else, which would
            // leave nothing to read here).
            let (h, m) =
                MavlinkReader::new(&b[..n]).read_message::<MavMessage>(MavlinkVersion::V2).unwrap();
            assert_eq!((h.system_id, h.component_id), (7, 100));
            if let Some(s) = last_seq {
                assert_eq!(h.sequence, u8::wrapping_add(s, 1), "sequence numbers increase by one");
            }
            last_seq = Some(h.sequence);
            match m {
                MavMessage::HEARTBEAT(hb) => {
                    assert_eq!(hb.mavtype, MavType::MAV_TYPE_CAMERA);
                    heartbeats += 1;
                }
                MavMessage::CAMERA_TRACKING_IMAGE_STATUS(s) => {
                    let r = reports[statuses];
                    assert_eq!(h.sequence, r.seq);
                    match r.rect {
                        Some(rect) => {
                            assert_eq!(
                                s.tracking_status,
                                CameraTrackingStatusFlags::CAMERA_TRACKING_STATUS_FLAGS_ACTIVE
                            );
                            assert_eq!(
                                s.tracking_mode,
                                CameraTrackingMode::CAMERA_TRACKING_MODE_RECTANGLE
                            );
                            assert_eq!(
                                [s.rec_top_x, s.rec_top_y, s.rec_bottom_x, s.rec_bottom_y],
                                rect
                            );
                        }
                        None => {
                            assert_eq!(
                                s.tracking_status,
                                CameraTrackingStatusFlags::CAMERA_TRACKING_STATUS_FLAGS_IDLE
                            );
                            assert!(s.rec_top_x.is_nan());
                        }
                    }
                    statuses += 1;
                }
                MavMessage::GIMBAL_MANAGER_SET_PITCHYAW(g) => {
                    assert_eq!(g.target_system, 7);
                    gimbals.push((g.pitch.to_degrees(), g.yaw.to_degrees()));
                }
                other => panic!("unexpected message {other:?}"),
            }
        }
        assert_eq!((statuses, heartbeats, gimbals.len()), (5, 2, 5), "heartbeats at 0 s and 1.3 s");
        assert_eq!(out.counts, MavlinkCounts { heartbeats: 2, active: 3, idle: 2, gimbal: 5 });
        // The gimbal: first set-point at rest (no time to slew yet), then yaw towards the
        // target right of centre (pan kp 36 deg x e 0.3 = 10.8 deg, 120 deg/s: reached in
        // 0.1 s), tilt unchanged (target on the centre line).
        assert_eq!(gimbals[0], (0.0, 0.0));
        let (p1, y1) = gimbals[1];
        assert!(p1.abs() < 1e-4 && (y1 - 10.8).abs() < 0.01, "{gimbals:?}");
        for (p, y) in &gimbals {
            assert!(
                (-60.0..=30.0).contains(p) && (-80.0..=80.0).contains(y),
                "within the limits: {gimbals:?}"
            );
        }
    }

    #[test]
    fn a_bad_target_or_config_is_a_clear_error() {
        let e =
            MavlinkOutput::open("udp:1.2.3.4", MavlinkConfig::default()).err().unwrap().to_string();
        assert!(e.contains("MAVLink"), "{e}");
        let e = MavlinkOutput::open("serial:/dev/flsl-no-such-tty", MavlinkConfig::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/dev/flsl-no-such-tty"), "{e}");
    }
}
