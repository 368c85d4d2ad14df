//! End-to-end link simulation: detections on the companion computer, through a lossy serial
//! link, into the microcontroller firmware driving a pan/tilt gimbal.
//!
//! ```text
//! synthetic scene -> Frame/Message -> wire::encode -> lossy 115200 baud UART
//!   -> LinkReceiver (embedded-io Read) -> Controller -> SetDutyCycle servos, OutputPin alert
//! ```
//!
//! **The detections are synthetic.** The detection pipeline (`flsl detect`) does not exist
//! yet, so [`Scene`] plays it: a target (track 7, class 1) moving across the sky and a
//! distractor (track 12), seen by a camera on the simulated gimbal (closed loop: where the
//! target appears in the image depends on where the gimbal points).
//! Once `flsl detect` exists, this example will take its real output instead: the
//! boxes, classes, scores and track ids of each processed frame go into the same
//! [`Frame::from_objects`] call, and everything downstream stays as it is.
//!
//! The link drops bytes, flips bits and injects garbage bursts with a seeded RNG, and goes
//! completely silent from 6.0 s to 7.5 s so that the fail-safe (gimbal back to centre,
//! alert low) shows. The peripherals are plain structs implementing `SetDutyCycle` and
//! `OutputPin`. Everything is deterministic for a given seed.
//!
//! ```text
//! cargo run -p flsl-examples --example link_sim            # seed 7
//! cargo run -p flsl-examples --example link_sim -- 1234    # another seed
//! ```

use std::collections::VecDeque;
use std::convert::Infallible;
use std::f32::consts::TAU;
use std::process::ExitCode;

use embedded_hal::digital::{self, OutputPin};
use embedded_hal::pwm::{self, SetDutyCycle};
use embedded_io::{ErrorType, Read, ReadReady};
use flsl_firmware::control::{ControllerConfig, LinkState, Status};
use flsl_firmware::{Controller, Follower, LinkReceiver};
use flsl_runtime::wire::{Frame, MAX_ENCODED_LEN, Message, Object, Selection, encode};

/// Simulated time, milliseconds.
const DURATION_MS: u32 = 10_000;
/// Camera frame interval, microseconds (30 fps).
const FRAME_INTERVAL_US: u64 = 33_333;
/// Heartbeat interval, milliseconds.
const HEARTBEAT_MS: u32 = 200;
/// Serial link speed: 115200 baud, 10 bits per byte.
const BYTES_PER_S: u32 = 11_520;
/// The link is cut completely in this window (milliseconds).
const OUTAGE_MS: (u32, u32) = (6_000, 7_500);
/// Camera field of view, degrees (matches the default controller gains).
const HFOV_DEG: f32 = 60.0;
const VFOV_DEG: f32 = 45.0;
/// The followed target and the alert class.
const TARGET_TRACK: u32 = 7;
const TARGET_CLASS: u16 = 1;

/// SplitMix64: a small, seedable, deterministic generator (no dependency needed).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// The synthetic world: where the target and the distractor are, in gimbal angles.
struct Scene;

impl Scene {
    /// Target azimuth/elevation at `t` seconds: a slow figure sweeping +-25 degrees.
    fn target(t: f32) -> (f32, f32) {
        (
            25.0 * (TAU * t / 8.0).sin(),
            -10.0 + 6.0 * (TAU * t / 5.0).sin(),
        )
    }

    /// A distractor drifting the other way.
    fn distractor(t: f32) -> (f32, f32) {
        (-20.0 + 4.0 * t, -5.0)
    }

    /// What the camera sees with the gimbal at `(pan, tilt)`: objects in normalized image
    /// coordinates (x right, y down), best score first.
    fn detect(t: f32, pan: f32, tilt: f32) -> Vec<Object> {
        let mut objects = Vec::new();
        for ((az, el), class, score, track_id) in [
            (Self::target(t), TARGET_CLASS, 0.88, TARGET_TRACK),
            (Self::distractor(t), 3, 0.61, 12),
        ] {
            let cx = 0.5 + (az - pan) / HFOV_DEG;
            let cy = 0.5 - (el - tilt) / VFOV_DEG;
            if (0.0..=1.0).contains(&cx) && (0.0..=1.0).contains(&cy) {
                objects.push(Object {
                    bbox: [cx - 0.03, cy - 0.04, cx + 0.03, cy + 0.04],
                    class,
                    score,
                    track_id,
                });
            }
        }
        objects
    }
}

/// Fault counts injected by the link.
#[derive(Default)]
struct Faults {
    dropped: u32,
    flipped: u32,
    garbage: u32,
    outage: u32,
}

/// The serial line: bytes written by the companion, delivered at the baud rate with faults.
struct Line {
    rng: Rng,
    /// Bytes in flight, not yet delivered.
    in_flight: VecDeque<u8>,
    /// Bytes delivered to the UART, waiting for the firmware to read them.
    rx: VecDeque<u8>,
    /// Fractional byte budget carried between milliseconds.
    budget: u32,
    faults: Faults,
}

impl Line {
    fn new(seed: u64) -> Self {
        Self {
            rng: Rng(seed),
            in_flight: VecDeque::new(),
            rx: VecDeque::new(),
            budget: 0,
            faults: Faults::default(),
        }
    }

    /// The companion writes `bytes` to its UART.
    fn send(&mut self, bytes: &[u8], now_ms: u32) {
        for &b in bytes {
            if (OUTAGE_MS.0..OUTAGE_MS.1).contains(&now_ms) {
                self.faults.outage += 1;
                continue;
            }
            if self.rng.chance(0.002) {
                self.faults.dropped += 1;
                continue;
            }
            let mut b = b;
            if self.rng.chance(0.002) {
                b ^= 1 << (self.rng.next_u64() % 8);
                self.faults.flipped += 1;
            }
            self.in_flight.push_back(b);
            if self.rng.chance(0.0005) {
                let burst = 1 + self.rng.next_u64() % 24;
                for _ in 0..burst {
                    self.in_flight.push_back(self.rng.next_u64() as u8);
                }
                self.faults.garbage += burst as u32;
            }
        }
    }

    /// One millisecond of transmission.
    fn advance_1ms(&mut self) {
        self.budget += BYTES_PER_S;
        while self.budget >= 1_000 {
            self.budget -= 1_000;
            match self.in_flight.pop_front() {
                Some(b) => self.rx.push_back(b),
                None => {
                    self.budget = 0;
                    break;
                }
            }
        }
    }
}

/// The MCU's UART as the firmware sees it (embedded-io).
struct Uart<'a>(&'a std::cell::RefCell<Line>);

impl ErrorType for Uart<'_> {
    type Error = Infallible;
}

impl Read for Uart<'_> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Infallible> {
        let mut line = self.0.borrow_mut();
        let n = buf.len().min(line.rx.len());
        for (dst, src) in buf.iter_mut().zip(line.rx.drain(..n)) {
            *dst = src;
        }
        Ok(n)
    }
}

impl ReadReady for Uart<'_> {
    fn read_ready(&mut self) -> Result<bool, Infallible> {
        Ok(!self.0.borrow().rx.is_empty())
    }
}

/// A servo PWM channel: remembers the last duty cycle.
struct Servo {
    duty: u16,
    writes: u32,
}

impl pwm::ErrorType for Servo {
    type Error = Infallible;
}

impl SetDutyCycle for Servo {
    fn max_duty_cycle(&self) -> u16 {
        // 50 Hz with 1 us resolution.
        20_000
    }

    fn set_duty_cycle(&mut self, duty: u16) -> Result<(), Infallible> {
        self.duty = duty;
        self.writes += 1;
        Ok(())
    }
}

/// The alert line: remembers its level and counts rising edges.
struct AlertPin {
    high: bool,
    rises: u32,
}

impl digital::ErrorType for AlertPin {
    type Error = Infallible;
}

impl OutputPin for AlertPin {
    fn set_low(&mut self) -> Result<(), Infallible> {
        self.high = false;
        Ok(())
    }

    fn set_high(&mut self) -> Result<(), Infallible> {
        self.rises += u32::from(!self.high);
        self.high = true;
        Ok(())
    }
}

fn link_name(state: LinkState) -> &'static str {
    match state {
        LinkState::Waiting => "waiting",
        LinkState::Up => "up",
        LinkState::Lost => "LOST",
    }
}

fn main() -> ExitCode {
    let seed = match std::env::args().nth(1).map(|s| s.parse::<u64>()) {
        None => 7,
        Some(Ok(seed)) => seed,
        Some(Err(e)) => {
            eprintln!("usage: link_sim [SEED]: {e}");
            return ExitCode::FAILURE;
        }
    };

    let line = std::cell::RefCell::new(Line::new(seed));
    let mut config = ControllerConfig::new();
    config.alert_class = Some(TARGET_CLASS);
    config.link_timeout_ms = 500;
    let controller = match Controller::new(
        config,
        Servo { duty: 0, writes: 0 },
        Servo { duty: 0, writes: 0 },
        AlertPin {
            high: false,
            rises: 0,
        },
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("controller start-up failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut follower = Follower::new(LinkReceiver::new(Uart(&line)), controller);

    println!(
        "link_sim: seed {seed}, {} s at 115200 baud, outage {:.1}..{:.1} s",
        DURATION_MS / 1000,
        OUTAGE_MS.0 as f32 / 1e3,
        OUTAGE_MS.1 as f32 / 1e3
    );
    println!(
        "{:>6} {:>7} {:>14} {:>14} {:>11} {:>8} {:>6} {:>5}",
        "t [s]",
        "link",
        "target az/el",
        "gimbal pan/tilt",
        "duty [us]",
        "err[deg]",
        "track",
        "alert"
    );

    let mut buf = [0u8; MAX_ENCODED_LEN];
    let mut seq = 0u32;
    let mut sent = 0u32;
    let mut next_frame_us = 0u64;
    let mut status: Status = follower.controller().status();
    let mut last_link = status.link;
    let mut err_sum = 0.0f64;
    let mut err_n = 0u32;

    for now_ms in 0..DURATION_MS {
        let now_us = u64::from(now_ms) * 1_000;
        let t = now_ms as f32 / 1e3;

        // Companion computer: a detection frame every 33.3 ms, a heartbeat every 200 ms, and
        // the operator's target lock at 0.5 s.
        let mut outgoing = Vec::new();
        if now_ms == 500 {
            outgoing.push(Message::select(seq, now_us, Selection::Track(TARGET_TRACK)));
        }
        if now_us >= next_frame_us {
            let objects = Scene::detect(t, status.pan_deg, status.tilt_deg);
            outgoing.push(Message::frame(seq, now_us, Frame::from_objects(objects)));
            next_frame_us += FRAME_INTERVAL_US;
        }
        if now_ms % HEARTBEAT_MS == 0 {
            outgoing.push(Message::heartbeat(seq, now_us));
        }
        for mut message in outgoing {
            message.seq = seq;
            seq = seq.wrapping_add(1);
            match encode(&message, &mut buf) {
                Ok(n) => line.borrow_mut().send(&buf[..n], now_ms),
                Err(e) => {
                    eprintln!("encode failed: {e}");
                    return ExitCode::FAILURE;
                }
            }
            sent += 1;
        }

        // The wire, then the firmware's 1 kHz main loop.
        line.borrow_mut().advance_1ms();
        status = match follower.step(now_ms) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("firmware error: {e:?}");
                return ExitCode::FAILURE;
            }
        };

        let (az, el) = Scene::target(t);
        let err = ((az - status.pan_deg).powi(2) + (el - status.tilt_deg).powi(2)).sqrt();
        if status.link == LinkState::Up && t > 1.5 {
            err_sum += f64::from(err);
            err_n += 1;
        }
        if status.link != last_link || now_ms % 500 == 0 {
            if status.link != last_link {
                println!(
                    "       -- link {} -> {} at {:.3} s",
                    link_name(last_link),
                    link_name(status.link),
                    t
                );
                last_link = status.link;
            }
            println!(
                "{:>6.2} {:>7} {:>6.1}/{:>6.1}  {:>6.1}/{:>6.1}  {:>5}/{:>5} {:>8.2} {:>6} {:>5}",
                t,
                link_name(status.link),
                az,
                el,
                status.pan_deg,
                status.tilt_deg,
                status.pan_duty,
                status.tilt_duty,
                err,
                status.target.map_or("-".to_string(), |id| id.to_string()),
                if status.alert { "ON" } else { "off" },
            );
        }
    }

    let stats = *follower.stats();
    let (_receiver, controller) = follower.release();
    let (pan, tilt, alert) = controller.release();
    let line = line.into_inner();
    let f = &line.faults;
    println!();
    println!("companion: {sent} messages sent ({seq} sequence numbers)");
    println!(
        "line:      {} bytes dropped, {} bits flipped, {} garbage bytes injected, {} bytes lost in the outage",
        f.dropped, f.flipped, f.garbage, f.outage
    );
    println!(
        "receiver:  {} bytes, {} frames, {} heartbeats, {} selects; {} CRC errors, {} overflows, {} malformed, {} resyncs, {} messages lost",
        stats.bytes,
        stats.frames,
        stats.heartbeats,
        stats.selects,
        stats.crc_errors,
        stats.overflows,
        stats.malformed,
        stats.resyncs,
        stats.lost
    );
    println!(
        "outputs:   pan {} duty writes (last {} us), tilt {} (last {} us), alert raised {} times",
        pan.writes, pan.duty, tilt.writes, tilt.duty, alert.rises
    );
    let mean_err = if err_n > 0 {
        err_sum / f64::from(err_n)
    } else {
        f64::NAN
    };
    println!(
        "tracking:  mean pointing error {mean_err:.2} deg while the link was up (after 1.5 s)"
    );

    if stats.frames == 0 || mean_err.is_nan() || mean_err >= 10.0 {
        eprintln!("link_sim: the firmware did not follow the target");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
