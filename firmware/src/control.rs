//! Target-following controller: target selection, a PD loop on the image-plane offset,
//! pan/tilt servos with limits and slew rate, an alert output, and the link-loss fail-safe.
//!
//! # Control law
//!
//! For the selected object with box centre `(cx, cy)` (normalized, see
//! [`flsl_runtime::wire`]), the offset from the image centre is `e = (cx - 0.5, cy - 0.5)`,
//! clamped to `[-0.5, 0.5]`. Each frame moves an axis's *target* angle to
//!
//! ```text
//! target = clamp(angle + kp * e + kd * de/dt, min_deg, max_deg)
//! ```
//!
//! where `angle` is the axis's current commanded angle and `de/dt` comes from two
//! consecutive frames of the same track (their sender timestamps give `dt`).
//! With `kp` equal to the camera's field of view in degrees a single frame would centre
//! the target; a fraction of it (the defaults use 0.6) gives a damped approach.
//! Every [`Controller::tick`] then moves the commanded angle towards the target by at most
//! `max_rate_deg_s * dt` (the slew limit) and writes the servo duty cycle when it changed.
//!
//! # Fail-safe
//!
//! When no valid message (frame, heartbeat or command) arrived for
//! [`ControllerConfig::link_timeout_ms`], [`Controller::tick`] switches to
//! [`LinkState::Lost`]: both axes slew back to their centre angle, the alert output goes
//! low, and the tracked target is forgotten. The next valid message restores
//! [`LinkState::Up`].
//!
//! Time is a caller-provided monotonic millisecond tick (`u32`, wrapping after 49 days;
//! differences are taken with wrapping arithmetic).

use embedded_hal::digital::{self, OutputPin, PinState};
use embedded_hal::pwm::{self, SetDutyCycle};
use flsl_runtime::wire::{Body, Frame, Message, Object, Selection};

use crate::error::OutputError;

/// Clamps without panicking: a NaN bound is ignored and a NaN value becomes a bound.
fn clamp(value: f32, lo: f32, hi: f32) -> f32 {
    value.max(lo).min(hi)
}

/// How a hobby servo's pulse width maps to its angle.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ServoConfig {
    /// PWM period in microseconds (20 000 for the usual 50 Hz).
    pub period_us: u32,
    /// Pulse width at [`ServoConfig::min_angle_deg`], in microseconds.
    pub min_pulse_us: u32,
    /// Pulse width at [`ServoConfig::max_angle_deg`], in microseconds.
    pub max_pulse_us: u32,
    /// Servo angle at the shortest pulse, in degrees.
    pub min_angle_deg: f32,
    /// Servo angle at the longest pulse, in degrees.
    pub max_angle_deg: f32,
}

impl ServoConfig {
    /// A standard 50 Hz servo: 1000..2000 us for -90..+90 degrees.
    pub const fn new() -> Self {
        Self {
            period_us: 20_000,
            min_pulse_us: 1_000,
            max_pulse_us: 2_000,
            min_angle_deg: -90.0,
            max_angle_deg: 90.0,
        }
    }

    /// The duty cycle (out of `max_duty`) that holds `angle_deg`; angles outside the servo's
    /// range saturate at its end pulses.
    pub fn duty(&self, angle_deg: f32, max_duty: u16) -> u16 {
        let span = self.max_angle_deg - self.min_angle_deg;
        let t = clamp((angle_deg - self.min_angle_deg) / span, 0.0, 1.0);
        let pulse =
            self.min_pulse_us as f32 + t * (self.max_pulse_us as f32 - self.min_pulse_us as f32);
        let duty = libm::roundf(pulse * f32::from(max_duty) / self.period_us as f32);
        // `as` saturates (and maps NaN to 0); the clamp keeps it within the PWM's range.
        (duty as u16).min(max_duty)
    }
}

impl Default for ServoConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// One gimbal axis.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AxisConfig {
    /// Proportional gain: degrees of correction per unit of normalized image offset
    /// (`e` in `[-0.5, 0.5]`). Negative flips the direction (e.g. for tilt, since image y
    /// grows downwards).
    pub kp_deg: f32,
    /// Derivative gain: degrees per unit of normalized offset per second.
    pub kd_deg_s: f32,
    /// Lowest allowed angle, in degrees.
    pub min_deg: f32,
    /// Highest allowed angle, in degrees.
    pub max_deg: f32,
    /// Rest and fail-safe angle, in degrees (clamped to the limits).
    pub center_deg: f32,
    /// Slew-rate limit in degrees per second (`f32::INFINITY` disables it).
    pub max_rate_deg_s: f32,
    /// Pulse-width mapping of this axis's servo.
    pub servo: ServoConfig,
}

impl AxisConfig {
    /// Pan defaults: a 60 degree horizontal field of view (kp = 0.6 * 60), +-80 degrees of
    /// travel, 120 degrees per second.
    pub const fn pan() -> Self {
        Self {
            kp_deg: 36.0,
            kd_deg_s: 2.0,
            min_deg: -80.0,
            max_deg: 80.0,
            center_deg: 0.0,
            max_rate_deg_s: 120.0,
            servo: ServoConfig::new(),
        }
    }

    /// Tilt defaults: a 45 degree vertical field of view (kp = -0.6 * 45: a target below the
    /// image centre tilts down), -60..+30 degrees, 90 degrees per second.
    pub const fn tilt() -> Self {
        Self {
            kp_deg: -27.0,
            kd_deg_s: -1.5,
            min_deg: -60.0,
            max_deg: 30.0,
            center_deg: 0.0,
            max_rate_deg_s: 90.0,
            servo: ServoConfig::new(),
        }
    }
}

/// Controller settings. Plain `Copy` data with a `const fn new`, so it can live in a
/// `static`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ControllerConfig {
    /// Pan axis (image x).
    pub pan: AxisConfig,
    /// Tilt axis (image y).
    pub tilt: AxisConfig,
    /// Lowest score an object needs to be picked automatically.
    pub min_score: f32,
    /// Class index that raises the alert output; `None` disables the alert.
    pub alert_class: Option<u16>,
    /// Lowest score of an `alert_class` object that raises the alert.
    pub alert_min_score: f32,
    /// Silence on the link, in milliseconds, after which the fail-safe engages.
    pub link_timeout_ms: u32,
}

impl ControllerConfig {
    /// Defaults: [`AxisConfig::pan`], [`AxisConfig::tilt`], min score 0.3, no alert class
    /// (alert threshold 0.5), 500 ms link timeout.
    pub const fn new() -> Self {
        Self {
            pan: AxisConfig::pan(),
            tilt: AxisConfig::tilt(),
            min_score: 0.3,
            alert_class: None,
            alert_min_score: 0.5,
            link_timeout_ms: 500,
        }
    }
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// State of the link as the controller sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum LinkState {
    /// No valid message yet since start-up; the gimbal rests at its centre.
    Waiting,
    /// Messages arrive within the timeout.
    Up,
    /// The link went quiet for longer than the timeout; fail-safe engaged.
    Lost,
}

/// A snapshot of the controller, returned by [`Controller::tick`].
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Status {
    /// Link state.
    pub link: LinkState,
    /// Commanded pan angle, degrees.
    pub pan_deg: f32,
    /// Commanded tilt angle, degrees.
    pub tilt_deg: f32,
    /// Pan duty cycle last written.
    pub pan_duty: u16,
    /// Tilt duty cycle last written.
    pub tilt_duty: u16,
    /// Track id of the object being followed, if one was in the last frame.
    pub target: Option<u32>,
    /// Alert output level.
    pub alert: bool,
}

/// Picks the object to follow from `frame`.
///
/// [`Selection::Auto`] takes the highest score among objects with a finite centre and a
/// score of at least `min_score` (NaN scores never qualify).
/// [`Selection::Track`] takes the object with that track id (any score), or none.
pub fn select_target(frame: &Frame, selection: Selection, min_score: f32) -> Option<&Object> {
    let usable = |o: &&Object| {
        let (x, y) = o.center();
        x.is_finite() && y.is_finite()
    };
    match selection {
        Selection::Auto => frame
            .objects
            .iter()
            .filter(usable)
            .filter(|o| o.score >= min_score)
            .max_by(|a, b| a.score.total_cmp(&b.score)),
        Selection::Track(id) => frame.objects.iter().filter(usable).find(|o| o.track_id == id),
    }
}

/// One servo axis: PWM channel, limits and slew state.
/// Its [`AxisConfig`] lives in the controller's config and is passed in, not copied.
struct Axis<P> {
    pwm: P,
    max_duty: u16,
    /// Commanded angle (after slew limiting), degrees.
    angle: f32,
    /// Where the angle is heading, degrees.
    target: f32,
    /// Duty cycle last written.
    duty: u16,
}

impl<P: SetDutyCycle> Axis<P> {
    fn new(pwm: P, cfg: &AxisConfig) -> Result<Self, pwm::ErrorKind> {
        let max_duty = pwm.max_duty_cycle();
        let center = Self::center(cfg);
        let mut axis = Self { pwm, max_duty, angle: center, target: center, duty: 0 };
        axis.write(cfg, true)?;
        Ok(axis)
    }

    fn center(cfg: &AxisConfig) -> f32 {
        clamp(cfg.center_deg, cfg.min_deg, cfg.max_deg)
    }

    fn set_target(&mut self, cfg: &AxisConfig, angle: f32) {
        if angle.is_finite() {
            self.target = clamp(angle, cfg.min_deg, cfg.max_deg);
        }
    }

    /// PD step on offset `e` with derivative `de_dt`.
    fn correct(&mut self, cfg: &AxisConfig, e: f32, de_dt: f32) {
        self.set_target(cfg, self.angle + cfg.kp_deg * e + cfg.kd_deg_s * de_dt);
    }

    /// Moves the angle towards the target by at most the slew limit over `dt_s` seconds.
    fn slew(&mut self, cfg: &AxisConfig, dt_s: f32) {
        // A negative or NaN step (bad config, or infinity * 0) moves nothing.
        let step = (cfg.max_rate_deg_s * dt_s).max(0.0);
        let moved = clamp(self.target - self.angle, -step, step);
        self.angle = clamp(self.angle + moved, cfg.min_deg, cfg.max_deg);
        if (self.target - self.angle).abs() < 1e-4 {
            self.angle = self.target;
        }
    }

    /// Writes the duty cycle if it changed (or when `force`d).
    fn write(&mut self, cfg: &AxisConfig, force: bool) -> Result<(), pwm::ErrorKind> {
        let duty = cfg.servo.duty(self.angle, self.max_duty);
        if force || duty != self.duty {
            self.pwm.set_duty_cycle(duty).map_err(|e| pwm::Error::kind(&e))?;
            self.duty = duty;
        }
        Ok(())
    }
}

/// What the controller remembers of the followed object between frames.
#[derive(Clone, Copy, Debug)]
struct Tracked {
    track_id: u32,
    e: (f32, f32),
    timestamp_us: u64,
}

/// The target-following controller.
///
/// Drives a pan and a tilt servo through [`SetDutyCycle`] and an alert line through
/// [`OutputPin`]. Feed it every decoded message with [`Controller::handle`] and call
/// [`Controller::tick`] regularly (every few milliseconds), whether or not messages arrive:
/// the tick runs the slew limiter and the fail-safe.
pub struct Controller<P, T, A> {
    config: ControllerConfig,
    pan: Axis<P>,
    tilt: Axis<T>,
    alert: A,
    alert_on: bool,
    selection: Selection,
    link: LinkState,
    last_rx_ms: u32,
    last_tick_ms: Option<u32>,
    tracked: Option<Tracked>,
}

impl<P, T, A> Controller<P, T, A>
where
    P: SetDutyCycle,
    T: SetDutyCycle,
    A: OutputPin,
{
    /// Takes the peripherals, centres both servos and drives the alert low.
    ///
    /// Each servo's `max_duty_cycle` is read once here.
    pub fn new(
        config: ControllerConfig,
        pan: P,
        tilt: T,
        mut alert: A,
    ) -> Result<Self, OutputError> {
        let pan = Axis::new(pan, &config.pan).map_err(OutputError::Pan)?;
        let tilt = Axis::new(tilt, &config.tilt).map_err(OutputError::Tilt)?;
        alert.set_low().map_err(|e| OutputError::Alert(digital::Error::kind(&e)))?;
        Ok(Self {
            config,
            pan,
            tilt,
            alert,
            alert_on: false,
            selection: Selection::Auto,
            link: LinkState::Waiting,
            last_rx_ms: 0,
            last_tick_ms: None,
            tracked: None,
        })
    }

    /// The settings.
    pub const fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// The current target selection (changed by [`Body::Select`] messages or
    /// [`Controller::select`]).
    pub const fn selection(&self) -> Selection {
        self.selection
    }

    /// Selects which target to follow (as a [`Body::Select`] message would).
    pub fn select(&mut self, selection: Selection) {
        if selection != self.selection {
            info!("control: selection {}", selection);
            self.selection = selection;
            self.tracked = None;
        }
    }

    /// A snapshot of the controller.
    pub fn status(&self) -> Status {
        Status {
            link: self.link,
            pan_deg: self.pan.angle,
            tilt_deg: self.tilt.angle,
            pan_duty: self.pan.duty,
            tilt_duty: self.tilt.duty,
            target: self.tracked.map(|t| t.track_id),
            alert: self.alert_on,
        }
    }

    /// Gives the peripherals back.
    pub fn release(self) -> (P, T, A) {
        (self.pan.pwm, self.tilt.pwm, self.alert)
    }

    /// Handles one decoded message received at `now_ms`.
    ///
    /// Frames update the axis targets and the alert output; the servos move on the next
    /// [`Controller::tick`].
    pub fn handle(&mut self, message: &Message, now_ms: u32) -> Result<(), OutputError> {
        if self.link != LinkState::Up {
            info!("control: link up (seq {})", message.seq);
            self.link = LinkState::Up;
        }
        self.last_rx_ms = now_ms;
        match &message.body {
            Body::Frame(frame) => {
                self.follow(frame, message.timestamp_us);
                let alert = self.config.alert_class.is_some_and(|class| {
                    frame
                        .objects
                        .iter()
                        .any(|o| o.class == class && o.score >= self.config.alert_min_score)
                });
                self.set_alert(alert)
            }
            Body::Heartbeat => Ok(()),
            Body::Select(selection) => {
                self.select(*selection);
                Ok(())
            }
        }
    }

    /// Advances time to `now_ms`: checks the link timeout, slews the axes and writes the
    /// servos whose duty cycle changed.
    pub fn tick(&mut self, now_ms: u32) -> Result<Status, OutputError> {
        if self.link == LinkState::Up
            && now_ms.wrapping_sub(self.last_rx_ms) > self.config.link_timeout_ms
        {
            warn!("control: link lost, fail-safe: centring gimbal");
            self.link = LinkState::Lost;
            self.tracked = None;
            self.pan.target = Axis::<P>::center(&self.config.pan);
            self.tilt.target = Axis::<T>::center(&self.config.tilt);
            self.set_alert(false)?;
        }
        let dt_s = self.last_tick_ms.map_or(0.0, |last| now_ms.wrapping_sub(last) as f32 * 1e-3);
        self.last_tick_ms = Some(now_ms);
        self.pan.slew(&self.config.pan, dt_s);
        self.tilt.slew(&self.config.tilt, dt_s);
        self.pan.write(&self.config.pan, false).map_err(OutputError::Pan)?;
        self.tilt.write(&self.config.tilt, false).map_err(OutputError::Tilt)?;
        Ok(self.status())
    }

    fn follow(&mut self, frame: &Frame, timestamp_us: u64) {
        let Some(object) = select_target(frame, self.selection, self.config.min_score) else {
            // Nothing to follow: hold the current angle.
            self.tracked = None;
            self.pan.set_target(&self.config.pan, self.pan.angle);
            self.tilt.set_target(&self.config.tilt, self.tilt.angle);
            return;
        };
        let (cx, cy) = object.center();
        let e = (clamp(cx - 0.5, -0.5, 0.5), clamp(cy - 0.5, -0.5, 0.5));
        let de_dt = match self.tracked {
            Some(prev) if prev.track_id == object.track_id && timestamp_us > prev.timestamp_us => {
                let dt_s = timestamp_us.wrapping_sub(prev.timestamp_us) as f32 * 1e-6;
                if dt_s <= 1.0 {
                    ((e.0 - prev.e.0) / dt_s, (e.1 - prev.e.1) / dt_s)
                } else {
                    (0.0, 0.0)
                }
            }
            _ => (0.0, 0.0),
        };
        if self.tracked.map(|t| t.track_id) != Some(object.track_id) {
            debug!("control: following track {}", object.track_id);
        }
        self.tracked = Some(Tracked { track_id: object.track_id, e, timestamp_us });
        self.pan.correct(&self.config.pan, e.0, de_dt.0);
        self.tilt.correct(&self.config.tilt, e.1, de_dt.1);
    }

    fn set_alert(&mut self, on: bool) -> Result<(), OutputError> {
        if on != self.alert_on {
            self.alert
                .set_state(PinState::from(on))
                .map_err(|e| OutputError::Alert(digital::Error::kind(&e)))?;
            self.alert_on = on;
            info!("control: alert {}", on);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(cx: f32, cy: f32, score: f32, track_id: u32) -> Object {
        Object { bbox: [cx - 0.05, cy - 0.05, cx + 0.05, cy + 0.05], class: 0, score, track_id }
    }

    #[test]
    fn servo_duty_mapping() {
        let s = ServoConfig::new();
        assert_eq!(s.duty(-90.0, 20_000), 1_000);
        assert_eq!(s.duty(0.0, 20_000), 1_500);
        assert_eq!(s.duty(90.0, 20_000), 2_000);
        assert_eq!(s.duty(500.0, 20_000), 2_000);
        assert_eq!(s.duty(f32::NAN, 20_000), 1_000);
        assert_eq!(s.duty(0.0, 1_000), 75);
        let broken = ServoConfig { period_us: 0, ..s };
        assert_eq!(broken.duty(0.0, 1_000), 1_000);
    }

    #[test]
    fn auto_selection_takes_highest_finite_score() {
        let frame = Frame::from_objects([
            obj(0.2, 0.2, 0.5, 1),
            obj(0.3, 0.3, f32::NAN, 2),
            obj(f32::NAN, 0.3, 0.99, 3),
            obj(0.6, 0.6, 0.9, 4),
            obj(0.7, 0.7, 0.1, 5),
        ]);
        assert_eq!(select_target(&frame, Selection::Auto, 0.3).map(|o| o.track_id), Some(4));
        assert_eq!(select_target(&frame, Selection::Auto, 0.95).map(|o| o.track_id), None);
        assert_eq!(select_target(&frame, Selection::Track(5), 0.3).map(|o| o.track_id), Some(5));
        assert_eq!(select_target(&frame, Selection::Track(3), 0.3).map(|o| o.track_id), None);
        assert_eq!(select_target(&frame, Selection::Track(9), 0.3).map(|o| o.track_id), None);
    }

    #[test]
    fn clamp_never_panics() {
        assert_eq!(clamp(f32::NAN, -1.0, 1.0), -1.0);
        assert_eq!(clamp(2.0, f32::NAN, 1.0), 1.0);
        assert_eq!(clamp(0.5, 1.0, -1.0), -1.0);
    }
}
