//! Deterministic replay of a recorded link byte stream through [`Follower`], shared by the
//! board image (`src/main.rs`) and the host model (`firmware/tests/board_stream.rs`, which
//! includes this file with `#[path]`), so both run the very same code on the same bytes.
//!
//! # Clock: the byte clock
//!
//! Time is virtual and comes from the input stream, never from the emulator: byte `i` of the
//! stream arrives at `i / 11.52` ms, the pace of a saturated 115 200 baud 8N1 link
//! ([`LINK_BYTES_PER_S`]). The main loop advances a millisecond counter by one per
//! iteration and calls [`Follower::step`] with it; the reader the follower polls
//! ([`Paced`]) hands out only the bytes due by then ([`bytes_due`]), however early or late
//! the UART actually delivered them (on the board it waits for a due byte).
//! Every decision of the follower is therefore a function of the bytes alone, and the
//! report is reproducible and equal on the board and on the host.
//!
//! Silence on the link is written into a stream as `0x00` bytes, one per byte time
//! (the wire format's delimiter: consecutive delimiters are skipped by the decoder, so they
//! carry no message and the link-loss timer runs). A recording without idle bytes replays
//! as a link that was busy all the time.
//!
//! # Report
//!
//! One line per event (start, link state, followed track, alert, selection, end) and one
//! every [`REPORT_PERIOD_MS`], all in the same `key=value` format, for example:
//!
//! ```text
//! t=3245 target+alert link=up sel=track:7 target=7 alert=1 pan=1501 tilt=1501 pan_deg=0.120 tilt_deg=0.090 trace=add9dfcc writes=744/356/6 rx=37382 frames=48 hb=2 selects=1 crc=1 overflows=1 malformed=3 lost=25
//! ```
//!
//! `pan`/`tilt` are the duty cycles last written to the PWM channels (out of
//! [`SERVO_MAX_DUTY`], i.e. microseconds of pulse at 50 Hz), `alert` the level last driven on
//! the alert pin; `pan_deg`/`tilt_deg` the controller's commanded angles rounded to a
//! millidegree; `trace` a hash (FNV-1a) of the exact bits of both angles, both duty cycles,
//! the alert level, the link state and the target after every step so far, so two reports
//! agree only if the runs agreed at every millisecond, not just at the printed ones;
//! `writes` the number of pan, tilt and alert writes; `rx..lost` the link statistics.
//!
//! Floats are printed without `core`'s float formatting (whose internal assertions are the
//! only panic paths it would link into the image).
//!
//! Nothing here allocates, blocks (except in the caller's reader) or panics.
#![forbid(unsafe_code)]

use core::cell::Cell;
use core::convert::Infallible;
use core::fmt::{self, Write};

use embedded_hal::digital::{self, OutputPin};
use embedded_hal::pwm::{self, SetDutyCycle};
use embedded_io::{Error as _, ErrorKind, ErrorType, Read, ReadReady};
use flsl_firmware::control::{LinkState, Status};
use flsl_firmware::wire::Selection;
use flsl_firmware::{Controller, ControllerConfig, Error, Follower, LinkReceiver};

/// Bytes per second of the replayed link: 115 200 baud, 8N1 (10 bits per byte).
pub const LINK_BYTES_PER_S: u64 = 11_520;

/// A status line every this many milliseconds of virtual time.
pub const REPORT_PERIOD_MS: u32 = 100;

/// Full scale of the recording PWM channels: one count per microsecond of a 20 ms period.
pub const SERVO_MAX_DUTY: u16 = 20_000;

/// The class whose detections raise the alert pin.
pub const ALERT_CLASS: u16 = 1;

/// Bytes of the stream that have arrived by virtual time `now_ms`.
pub const fn bytes_due(now_ms: u32) -> u64 {
    (now_ms as u64) * LINK_BYTES_PER_S / 1_000
}

/// The controller settings of the replay: the defaults, with [`ALERT_CLASS`] raising the alert
/// (500 ms link timeout).
pub const fn controller_config() -> ControllerConfig {
    let mut config = ControllerConfig::new();
    config.alert_class = Some(ALERT_CLASS);
    config
}

/// What was last written to one PWM channel.
#[derive(Debug, Default)]
pub struct PwmRecord {
    duty: Cell<u16>,
    writes: Cell<u32>,
}

impl PwmRecord {
    /// Nothing written yet.
    pub const fn new() -> Self {
        Self { duty: Cell::new(0), writes: Cell::new(0) }
    }

    /// The duty cycle last written.
    pub fn duty(&self) -> u16 {
        self.duty.get()
    }

    /// Number of writes.
    pub fn writes(&self) -> u32 {
        self.writes.get()
    }
}

/// A PWM channel that records its duty cycle (full scale [`SERVO_MAX_DUTY`]).
#[derive(Debug)]
pub struct RecordingPwm<'a>(pub &'a PwmRecord);

impl pwm::ErrorType for RecordingPwm<'_> {
    type Error = Infallible;
}

impl SetDutyCycle for RecordingPwm<'_> {
    fn max_duty_cycle(&self) -> u16 {
        SERVO_MAX_DUTY
    }

    fn set_duty_cycle(&mut self, duty: u16) -> Result<(), Infallible> {
        self.0.duty.set(duty);
        self.0.writes.set(self.0.writes.get().wrapping_add(1));
        Ok(())
    }
}

/// What was last driven on the alert pin.
#[derive(Debug, Default)]
pub struct PinRecord {
    high: Cell<bool>,
    writes: Cell<u32>,
}

impl PinRecord {
    /// Low, never written.
    pub const fn new() -> Self {
        Self { high: Cell::new(false), writes: Cell::new(0) }
    }

    /// The level last driven.
    pub fn is_high(&self) -> bool {
        self.high.get()
    }

    /// Number of writes.
    pub fn writes(&self) -> u32 {
        self.writes.get()
    }
}

/// An output pin that records its level.
#[derive(Debug)]
pub struct RecordingPin<'a>(pub &'a PinRecord);

impl RecordingPin<'_> {
    fn drive(&mut self, high: bool) -> Result<(), Infallible> {
        self.0.high.set(high);
        self.0.writes.set(self.0.writes.get().wrapping_add(1));
        Ok(())
    }
}

impl digital::ErrorType for RecordingPin<'_> {
    type Error = Infallible;
}

impl OutputPin for RecordingPin<'_> {
    fn set_low(&mut self) -> Result<(), Infallible> {
        self.drive(false)
    }

    fn set_high(&mut self) -> Result<(), Infallible> {
        self.drive(true)
    }
}

/// A reader that hands out `source`'s bytes at the byte clock: by virtual time `clock` ms,
/// at most [`bytes_due`]`(clock)` bytes in all.
///
/// `read_ready` is true while a byte is due; `read` then reads from `source` (which may block
/// until the byte is physically there, as a UART does). Reading when nothing is due is an
/// [`ErrorKind::Other`] error ([`Follower::step`] never does it: it reads only when ready).
/// `source` returning 0 (its end) is passed on as the end of the stream.
#[derive(Debug)]
pub struct Paced<'a, R> {
    source: R,
    clock: &'a Cell<u32>,
    taken: u64,
}

impl<'a, R> Paced<'a, R> {
    /// Paces `source` by `clock` (virtual milliseconds).
    pub const fn new(source: R, clock: &'a Cell<u32>) -> Self {
        Self { source, clock, taken: 0 }
    }

    /// Bytes read from the source so far.
    pub const fn taken(&self) -> u64 {
        self.taken
    }

    fn room(&self) -> u64 {
        bytes_due(self.clock.get()).saturating_sub(self.taken)
    }
}

impl<R: ErrorType> ErrorType for Paced<'_, R> {
    type Error = ErrorKind;
}

impl<R: Read> Read for Paced<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ErrorKind> {
        if buf.is_empty() {
            return Ok(0);
        }
        let room = usize::try_from(self.room()).unwrap_or(usize::MAX);
        if room == 0 {
            return Err(ErrorKind::Other);
        }
        let dst = buf.get_mut(..room.min(buf.len())).unwrap_or_default();
        let n = self.source.read(dst).map_err(|e| e.kind())?;
        self.taken = self.taken.saturating_add(n as u64);
        Ok(n)
    }
}

impl<R: Read> ReadReady for Paced<'_, R> {
    fn read_ready(&mut self) -> Result<bool, ErrorKind> {
        Ok(self.room() > 0)
    }
}

/// An angle in degrees, printed rounded to a millidegree (`-12.345`).
struct Mdeg(f32);

impl fmt::Display for Mdeg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scaled = self.0 * 1_000.0;
        // `as` saturates and maps NaN to 0; angles are finite and within +-180 anyway.
        let m = if scaled < 0.0 { (scaled - 0.5) as i32 } else { (scaled + 0.5) as i32 };
        let sign = if m < 0 { "-" } else { "" };
        let abs = m.unsigned_abs();
        write!(f, "{sign}{}.{:03}", abs / 1_000, abs % 1_000)
    }
}

/// FNV-1a over the controller's outputs after every step.
#[derive(Clone, Copy, Debug)]
struct Trace(u32);

impl Trace {
    const fn new() -> Self {
        Self(0x811C_9DC5)
    }

    fn word(&mut self, word: u32) {
        for byte in word.to_le_bytes() {
            self.0 = (self.0 ^ u32::from(byte)).wrapping_mul(0x0100_0193);
        }
    }

    fn step(&mut self, status: &Status, records: &Records) {
        self.word(status.pan_deg.to_bits());
        self.word(status.tilt_deg.to_bits());
        self.word(u32::from(records.pan.duty()) << 16 | u32::from(records.tilt.duty()));
        let link = match status.link {
            LinkState::Waiting => 0,
            LinkState::Up => 1,
            LinkState::Lost => 2,
        };
        self.word(link << 1 | u32::from(records.alert.is_high()));
        self.word(status.target.map_or(u32::MAX, |id| id));
    }
}

/// Why [`run`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The source reached its end (the normal way).
    Eof,
    /// The source failed (on the board: a due byte never arrived).
    Read(ErrorKind),
    /// A peripheral write failed (impossible with the recording peripherals).
    Output,
    /// Writing the report failed.
    Report,
}

/// How a [`run`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Why it stopped.
    pub end: End,
    /// Virtual time of the last step, milliseconds.
    pub now_ms: u32,
    /// Bytes taken from the source.
    pub bytes: u64,
}

/// What a report line shows, and what is compared to find events.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Snapshot {
    status: Status,
    selection: Selection,
}

const CHANGE_LINK: u8 = 1;
const CHANGE_TARGET: u8 = 2;
const CHANGE_ALERT: u8 = 4;
const CHANGE_SELECT: u8 = 8;

impl Snapshot {
    fn changes(&self, before: &Self) -> u8 {
        let mut changes = 0;
        if self.status.link != before.status.link {
            changes |= CHANGE_LINK;
        }
        if self.status.target != before.status.target {
            changes |= CHANGE_TARGET;
        }
        if self.status.alert != before.status.alert {
            changes |= CHANGE_ALERT;
        }
        if self.selection != before.selection {
            changes |= CHANGE_SELECT;
        }
        changes
    }
}

/// The recording peripherals of one run.
struct Records {
    pan: PwmRecord,
    tilt: PwmRecord,
    alert: PinRecord,
}

/// Writes `why` as `a+b+c`.
fn write_changes(out: &mut dyn Write, changes: u8) -> fmt::Result {
    let mut first = true;
    for (bit, name) in [
        (CHANGE_LINK, "link"),
        (CHANGE_TARGET, "target"),
        (CHANGE_ALERT, "alert"),
        (CHANGE_SELECT, "select"),
    ] {
        if changes & bit != 0 {
            if !first {
                out.write_char('+')?;
            }
            out.write_str(name)?;
            first = false;
        }
    }
    Ok(())
}

/// One report line.
fn write_line<R, P, T, A>(
    out: &mut impl Write,
    now_ms: u32,
    why: &dyn Fn(&mut dyn Write) -> fmt::Result,
    follower: &Follower<R, P, T, A>,
    records: &Records,
    trace: Trace,
) -> fmt::Result
where
    R: Read + ReadReady,
    P: SetDutyCycle,
    T: SetDutyCycle,
    A: OutputPin,
{
    let status = follower.controller().status();
    write!(out, "t={now_ms} ")?;
    why(out)?;
    let link = match status.link {
        LinkState::Waiting => "waiting",
        LinkState::Up => "up",
        LinkState::Lost => "lost",
    };
    write!(out, " link={link} sel=")?;
    match follower.controller().selection() {
        Selection::Auto => out.write_str("auto")?,
        Selection::Track(id) => write!(out, "track:{id}")?,
    }
    match status.target {
        Some(id) => write!(out, " target={id}")?,
        None => out.write_str(" target=-")?,
    }
    let s = follower.stats();
    writeln!(
        out,
        " alert={} pan={} tilt={} pan_deg={} tilt_deg={} trace={:08x} writes={}/{}/{} \
         rx={} frames={} hb={} selects={} crc={} overflows={} malformed={} lost={}",
        u8::from(records.alert.is_high()),
        records.pan.duty(),
        records.tilt.duty(),
        Mdeg(status.pan_deg),
        Mdeg(status.tilt_deg),
        trace.0,
        records.pan.writes(),
        records.tilt.writes(),
        records.alert.writes(),
        s.bytes,
        s.frames,
        s.heartbeats,
        s.selects,
        s.crc_errors,
        s.overflows,
        s.malformed,
        s.lost,
    )
}

/// Replays `source` through a [`Follower`] with [`controller_config`] and recording
/// peripherals, one virtual millisecond per step, and writes the report to `out` until the
/// source ends or fails.
pub fn run<R: Read>(source: R, out: &mut impl Write) -> Outcome {
    let clock = Cell::new(0u32);
    let records =
        Records { pan: PwmRecord::new(), tilt: PwmRecord::new(), alert: PinRecord::new() };
    let mut outcome = Outcome { end: End::Output, now_ms: 0, bytes: 0 };
    let Ok(controller) = Controller::new(
        controller_config(),
        RecordingPwm(&records.pan),
        RecordingPwm(&records.tilt),
        RecordingPin(&records.alert),
    ) else {
        return outcome;
    };
    let mut follower = Follower::new(LinkReceiver::new(Paced::new(source, &clock)), controller);
    let snapshot = |f: &Follower<_, _, _, _>| Snapshot {
        status: f.controller().status(),
        selection: f.controller().selection(),
    };
    let mut last = snapshot(&follower);
    let mut trace = Trace::new();
    let started = write_line(out, 0, &|o| o.write_str("start"), &follower, &records, trace);
    if started.is_err() {
        outcome.end = End::Report;
        return outcome;
    }
    let mut now_ms = 0u32;
    let end = loop {
        now_ms = now_ms.wrapping_add(1);
        clock.set(now_ms);
        let end = match follower.step(now_ms) {
            Ok(status) => {
                trace.step(&status, &records);
                None
            }
            Err(Error::EndOfStream) => Some(End::Eof),
            Err(Error::Read(kind)) => Some(End::Read(kind)),
            Err(Error::Output(_)) => Some(End::Output),
        };
        if let Some(end) = end {
            let why = |o: &mut dyn Write| match end {
                End::Eof => o.write_str("end:eof"),
                End::Read(kind) => write!(o, "end:read-error:{kind:?}"),
                End::Output | End::Report => o.write_str("end:output-error"),
            };
            if write_line(out, now_ms, &why, &follower, &records, trace).is_err() {
                break End::Report;
            }
            break end;
        }
        let now = snapshot(&follower);
        let changes = now.changes(&last);
        last = now;
        if changes != 0 || now_ms.is_multiple_of(REPORT_PERIOD_MS) {
            let why = |o: &mut dyn Write| {
                if changes == 0 { o.write_str("tick") } else { write_changes(o, changes) }
            };
            if write_line(out, now_ms, &why, &follower, &records, trace).is_err() {
                break End::Report;
            }
        }
    };
    let (receiver, _controller) = follower.release();
    outcome.end = end;
    outcome.now_ms = now_ms;
    outcome.bytes = receiver.release().taken();
    outcome
}
