//! Controller tests against embedded-hal-mock transaction lists: every PWM duty cycle and
//! pin level the controller writes is listed, in order (lsm303agr's test style).
//!
//! Servo mapping used throughout (the default [`ServoConfig`]): max duty 20 000 = 20 ms,
//! so duty = pulse in microseconds = 1500 + angle_deg * 1000 / 180.

use embedded_hal::pwm;
use embedded_hal_mock::eh1::MockError;
use embedded_hal_mock::eh1::digital::{Mock as PinMock, State, Transaction as Pin};
use embedded_hal_mock::eh1::pwm::{Mock as PwmMock, Transaction as Pwm};
use flsl_firmware::control::{ControllerConfig, LinkState, ServoConfig};
use flsl_firmware::wire::{Frame, Message, Object, Selection};
use flsl_firmware::{Controller, OutputError};

const MAX_DUTY: u16 = 20_000;
const CENTER: u16 = 1_500;

/// An object centred at `(cx, cy)`.
fn obj(cx: f32, cy: f32, class: u16, score: f32, track_id: u32) -> Object {
    Object { bbox: [cx - 0.05, cy - 0.05, cx + 0.05, cy + 0.05], class, score, track_id }
}

fn frame(seq: u32, timestamp_us: u64, objects: impl IntoIterator<Item = Object>) -> Message {
    Message::frame(seq, timestamp_us, Frame::from_objects(objects))
}

/// Default config with the derivative term off, so expected angles are `kp * e`.
fn p_only() -> ControllerConfig {
    let mut c = ControllerConfig::new();
    c.pan.kd_deg_s = 0.0;
    c.tilt.kd_deg_s = 0.0;
    assert_eq!(c.pan.servo, ServoConfig::new());
    c
}

fn pwm(duties: &[u16]) -> PwmMock {
    let mut t = vec![Pwm::max_duty_cycle(MAX_DUTY)];
    t.extend(duties.iter().map(|&d| Pwm::set_duty_cycle(d)));
    PwmMock::new(&t)
}

fn pin(states: &[State]) -> PinMock {
    let t: Vec<Pin> = states.iter().map(|&s| Pin::set(s)).collect();
    PinMock::new(&t)
}

fn done(c: Controller<PwmMock, PwmMock, PinMock>) {
    let (mut p, mut t, mut a) = c.release();
    p.done();
    t.done();
    a.done();
}

#[test]
fn centres_on_start_then_follows_within_slew_limit() {
    // Pan: kp 36 deg, offset +0.25 -> target +9 deg; 120 deg/s -> 6 deg per 50 ms tick.
    // 6 deg -> 1533.3 us -> 1533; 9 deg -> 1550.
    let mut c =
        Controller::new(p_only(), pwm(&[CENTER, 1533, 1550]), pwm(&[CENTER]), pin(&[State::Low]))
            .unwrap();
    assert_eq!(c.status().link, LinkState::Waiting);

    c.handle(&frame(1, 0, [obj(0.75, 0.5, 0, 0.9, 4)]), 0).unwrap();
    let s = c.tick(0).unwrap();
    assert_eq!((s.link, s.target, s.pan_duty), (LinkState::Up, Some(4), CENTER));
    let s = c.tick(50).unwrap();
    assert!((s.pan_deg - 6.0).abs() < 1e-4, "{s:?}");
    let s = c.tick(100).unwrap();
    assert!((s.pan_deg - 9.0).abs() < 1e-4, "{s:?}");
    assert_eq!((s.pan_duty, s.tilt_duty), (1550, CENTER));
    // Nothing changes, nothing is written.
    c.tick(150).unwrap();
    done(c);
}

#[test]
fn tilt_moves_down_for_targets_below_centre() {
    // Tilt kp is -27: offset +0.2 (below centre) -> -5.4 deg -> 1470 us.
    let mut c = Controller::new(p_only(), pwm(&[CENTER]), pwm(&[CENTER, 1470]), pin(&[State::Low]))
        .unwrap();
    c.tick(0).unwrap();
    c.handle(&frame(1, 0, [obj(0.5, 0.7, 0, 0.9, 1)]), 0).unwrap();
    let s = c.tick(400).unwrap();
    assert!((s.tilt_deg + 5.4).abs() < 1e-3, "{s:?}");
    done(c);
}

#[test]
fn angle_limits_hold() {
    // Offset +0.5 per frame -> +18 deg per frame until the +80 deg limit (1944.4 us).
    let mut cfg = p_only();
    cfg.pan.max_rate_deg_s = f32::INFINITY;
    let mut c = Controller::new(
        cfg,
        pwm(&[CENTER, 1600, 1700, 1800, 1900, 1944]),
        pwm(&[CENTER]),
        pin(&[State::Low]),
    )
    .unwrap();
    c.tick(0).unwrap();
    for i in 1..=8u32 {
        c.handle(&frame(i, u64::from(i) * 2_000_000, [obj(1.0, 0.5, 0, 0.9, 1)]), i * 10).unwrap();
        let s = c.tick(i * 10).unwrap();
        assert!(s.pan_deg <= 80.0, "{s:?}");
    }
    assert_eq!(c.status().pan_deg, 80.0);
    done(c);
}

#[test]
fn alert_follows_class_and_link_loss_centres_the_gimbal() {
    let mut cfg = p_only();
    cfg.alert_class = Some(2);
    cfg.alert_min_score = 0.5;
    cfg.link_timeout_ms = 500;
    let mut c = Controller::new(
        cfg,
        // The fail-safe tick at 667 ms slews 0.12 deg (1549 us); the next one reaches 0.
        pwm(&[CENTER, 1550, 1549, CENTER]),
        pwm(&[CENTER]),
        pin(&[State::Low, State::High, State::Low, State::High, State::Low]),
    )
    .unwrap();
    c.tick(0).unwrap();

    // Class 2 at 0.9 raises the alert.
    c.handle(&frame(1, 0, [obj(0.75, 0.5, 2, 0.9, 1)]), 0).unwrap();
    assert!(c.status().alert);
    let s = c.tick(100).unwrap();
    assert_eq!(s.pan_duty, 1550);
    // Class 2 below its threshold lowers it; another class never raises it.
    c.handle(&frame(2, 133_000, [obj(0.5, 0.5, 2, 0.4, 1), obj(0.5, 0.5, 3, 0.99, 2)]), 133)
        .unwrap();
    assert!(!c.status().alert);
    c.handle(&frame(3, 166_000, [obj(0.5, 0.5, 2, 0.95, 1)]), 166).unwrap();
    assert!(c.status().alert);
    assert_eq!(c.tick(170).unwrap().pan_duty, 1550);

    // Still up 500 ms after the last message...
    assert_eq!(c.tick(666).unwrap().link, LinkState::Up);
    // ...lost after that: alert low, gimbal slews back to centre (120 deg/s covers 9 deg).
    let s = c.tick(667).unwrap();
    assert_eq!((s.link, s.alert, s.target), (LinkState::Lost, false, None));
    let s = c.tick(800).unwrap();
    assert_eq!((s.pan_deg, s.pan_duty), (0.0, CENTER));

    // Any valid message brings the link back.
    c.handle(&Message::heartbeat(4, 800_000), 801).unwrap();
    assert_eq!(c.tick(802).unwrap().link, LinkState::Up);
    done(c);
}

#[test]
fn commanded_track_wins_over_score() {
    // Track 7 at +0.25 (score 0.4) while track 3 at -0.25 has 0.99.
    let mut cfg = p_only();
    cfg.pan.max_rate_deg_s = f32::INFINITY;
    let mut c =
        Controller::new(cfg, pwm(&[CENTER, 1550, CENTER]), pwm(&[CENTER]), pin(&[State::Low]))
            .unwrap();
    c.tick(0).unwrap();
    let objects = [obj(0.25, 0.5, 0, 0.99, 3), obj(0.75, 0.5, 0, 0.4, 7)];

    c.handle(&Message::select(1, 0, Selection::Track(7)), 1).unwrap();
    assert_eq!(c.selection(), Selection::Track(7));
    c.handle(&frame(2, 0, objects), 2).unwrap();
    let s = c.tick(3).unwrap();
    assert_eq!((s.target, s.pan_duty), (Some(7), 1550));

    // A frame without track 7 holds position instead of jumping to another target.
    c.handle(&frame(3, 33_000, [obj(0.25, 0.5, 0, 0.99, 3)]), 4).unwrap();
    let s = c.tick(5).unwrap();
    assert_eq!((s.target, s.pan_duty), (None, 1550));

    // Back to automatic: the best score (track 3, -0.25 -> -9 deg from +9) wins.
    c.handle(&Message::select(4, 0, Selection::Auto), 6).unwrap();
    c.handle(&frame(5, 66_000, objects), 7).unwrap();
    let s = c.tick(8).unwrap();
    assert_eq!((s.target, s.pan_duty), (Some(3), CENTER));
    done(c);
}

#[test]
fn derivative_uses_consecutive_frames_of_one_track() {
    // kp 36, kd 2: e goes 0 -> 0.1 in 100 ms, de/dt = 1/s -> 3.6 + 2.0 = 5.6 deg (1531 us).
    // The same step by a different track gets no derivative: 3.6 deg (1520 us).
    let mut cfg = ControllerConfig::new();
    cfg.pan.max_rate_deg_s = f32::INFINITY;
    cfg.pan.kd_deg_s = 2.0;
    let mut c =
        Controller::new(cfg, pwm(&[CENTER, 1531]), pwm(&[CENTER]), pin(&[State::Low])).unwrap();
    c.tick(0).unwrap();
    c.handle(&frame(1, 0, [obj(0.5, 0.5, 0, 0.9, 1)]), 0).unwrap();
    c.tick(1).unwrap();
    c.handle(&frame(2, 100_000, [obj(0.6, 0.5, 0, 0.9, 1)]), 100).unwrap();
    let s = c.tick(101).unwrap();
    assert!((s.pan_deg - 5.6).abs() < 1e-3, "{s:?}");
    done(c);

    let mut c =
        Controller::new(cfg, pwm(&[CENTER, 1520]), pwm(&[CENTER]), pin(&[State::Low])).unwrap();
    c.tick(0).unwrap();
    c.handle(&frame(1, 0, [obj(0.5, 0.5, 0, 0.9, 1)]), 0).unwrap();
    c.tick(1).unwrap();
    c.handle(&frame(2, 100_000, [obj(0.6, 0.5, 0, 0.9, 2)]), 100).unwrap();
    let s = c.tick(101).unwrap();
    assert!((s.pan_deg - 3.6).abs() < 1e-3, "{s:?}");
    done(c);
}

#[test]
fn nan_and_empty_frames_move_nothing() {
    let mut c =
        Controller::new(p_only(), pwm(&[CENTER]), pwm(&[CENTER]), pin(&[State::Low])).unwrap();
    c.tick(0).unwrap();
    let nan_box = Object { bbox: [f32::NAN, 0.1, 0.2, 0.2], class: 0, score: 0.9, track_id: 1 };
    let nan_score = obj(0.9, 0.9, 0, f32::NAN, 2);
    let inf_box =
        Object { bbox: [0.1, 0.1, f32::INFINITY, 0.2], class: 0, score: 0.9, track_id: 3 };
    c.handle(&frame(1, 0, [nan_box, nan_score, inf_box]), 0).unwrap();
    c.handle(&frame(2, 1, []), 1).unwrap();
    let s = c.tick(100).unwrap();
    assert_eq!((s.target, s.pan_duty, s.tilt_duty), (None, CENTER, CENTER));
    done(c);
}

#[test]
fn peripheral_errors_are_reported() {
    let err = MockError::Io(std::io::ErrorKind::Other);
    let mut pan = PwmMock::new(&[
        Pwm::max_duty_cycle(MAX_DUTY),
        Pwm::set_duty_cycle(CENTER).with_error(err.clone()),
    ]);
    let (mut tilt, mut alert) = (PwmMock::new(&[]), PinMock::new(&[]));
    let r = Controller::new(p_only(), pan.clone(), tilt.clone(), alert.clone());
    assert_eq!(r.err(), Some(OutputError::Pan(pwm::ErrorKind::Other)));
    pan.done();
    tilt.done();
    alert.done();

    let (mut pan, mut tilt) = (pwm(&[CENTER]), pwm(&[CENTER]));
    let mut alert = PinMock::new(&[Pin::set(State::Low).with_error(err)]);
    let r = Controller::new(p_only(), pan.clone(), tilt.clone(), alert.clone());
    assert!(matches!(r.err(), Some(OutputError::Alert(_))));
    pan.done();
    tilt.done();
    alert.done();
}
