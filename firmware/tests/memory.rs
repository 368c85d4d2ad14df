//! RAM the receiver and the controller need, fixed at compile time (issue 7).
//!
//! The peripherals are zero-sized stand-ins, so the sizes are the firmware's own state;
//! a real HAL's UART, PWM and pin handles add their own (usually a few bytes each).
//! Sizes are measured on the host (64-bit `usize`); on a 32-bit Cortex-M the `usize`
//! fields shrink, so these are upper bounds there. `firmware/README.md` quotes them.

use core::convert::Infallible;
use core::mem::size_of;
use embedded_hal::digital::{self, OutputPin};
use embedded_hal::pwm::{self, SetDutyCycle};
use embedded_io::{ErrorType, Read, ReadReady};
use flsl_firmware::link::{LinkDecoder, LinkReceiver};
use flsl_firmware::wire::{FrameAccumulator, Message};
use flsl_firmware::{Controller, Follower};

struct Uart;
impl ErrorType for Uart {
    type Error = Infallible;
}
impl Read for Uart {
    fn read(&mut self, _: &mut [u8]) -> Result<usize, Infallible> {
        Ok(0)
    }
}
impl ReadReady for Uart {
    fn read_ready(&mut self) -> Result<bool, Infallible> {
        Ok(false)
    }
}

struct Servo;
impl pwm::ErrorType for Servo {
    type Error = Infallible;
}
impl SetDutyCycle for Servo {
    fn max_duty_cycle(&self) -> u16 {
        20_000
    }
    fn set_duty_cycle(&mut self, _: u16) -> Result<(), Infallible> {
        Ok(())
    }
}

struct Led;
impl digital::ErrorType for Led {
    type Error = Infallible;
}
impl OutputPin for Led {
    fn set_low(&mut self) -> Result<(), Infallible> {
        Ok(())
    }
    fn set_high(&mut self) -> Result<(), Infallible> {
        Ok(())
    }
}

#[test]
fn ram_is_fixed_and_small() {
    let accumulator = size_of::<FrameAccumulator>();
    let decoder = size_of::<LinkDecoder>();
    let receiver = size_of::<LinkReceiver<Uart>>();
    let controller = size_of::<Controller<Servo, Servo, Led>>();
    let follower = size_of::<Follower<Uart, Servo, Servo, Led>>();
    let message = size_of::<Message>();
    println!(
        "RAM (host, 64-bit usize): accumulator {accumulator} B, decoder {decoder} B, receiver {receiver} B, controller {controller} B, follower {follower} B; one decoded Message (stack) {message} B"
    );

    // Budgets from firmware/README.md; raise them there too if the layout grows.
    assert!(accumulator <= 880, "{accumulator}");
    assert!(receiver <= 1_024, "{receiver}");
    assert!(controller <= 192, "{controller}");
    assert!(follower <= receiver + controller + 16, "{follower}");
    assert!(message <= 960, "{message}");
}
