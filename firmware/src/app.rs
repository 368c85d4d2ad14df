//! The firmware main loop body: receive, control, tick.

use embedded_hal::digital::OutputPin;
use embedded_hal::pwm::SetDutyCycle;
use embedded_io::{Read, ReadReady};

use crate::control::{Controller, Status};
use crate::error::Error;
use crate::link::{LinkReceiver, LinkStats};

/// Most messages handled per [`Follower::step`], so a flood of messages cannot starve the
/// tick (and with it the slew limiter and the fail-safe).
pub const MAX_MESSAGES_PER_STEP: usize = 4;

/// A [`LinkReceiver`] wired to a [`Controller`]: call [`Follower::step`] from the main loop
/// (or a timer task) every few milliseconds.
pub struct Follower<R, P, T, A> {
    receiver: LinkReceiver<R>,
    controller: Controller<P, T, A>,
}

impl<R, P, T, A> Follower<R, P, T, A>
where
    R: Read + ReadReady,
    P: SetDutyCycle,
    T: SetDutyCycle,
    A: OutputPin,
{
    /// Wires `receiver` to `controller`.
    pub const fn new(receiver: LinkReceiver<R>, controller: Controller<P, T, A>) -> Self {
        Self { receiver, controller }
    }

    /// Handles the messages that are ready (at most [`MAX_MESSAGES_PER_STEP`]) without
    /// blocking, then ticks the controller at `now_ms`.
    pub fn step(&mut self, now_ms: u32) -> Result<Status, Error<R::Error>> {
        for _ in 0..MAX_MESSAGES_PER_STEP {
            match self.receiver.poll_ready()? {
                Some(message) => self.controller.handle(&message, now_ms)?,
                None => break,
            }
        }
        Ok(self.controller.tick(now_ms)?)
    }

    /// Link statistics.
    pub const fn stats(&self) -> &LinkStats {
        self.receiver.stats()
    }

    /// The controller (for status and selection).
    pub const fn controller(&self) -> &Controller<P, T, A> {
        &self.controller
    }

    /// The controller, mutably (e.g. to select a target from a local button).
    pub const fn controller_mut(&mut self) -> &mut Controller<P, T, A> {
        &mut self.controller
    }

    /// Splits the follower back into its parts.
    pub fn release(self) -> (LinkReceiver<R>, Controller<P, T, A>) {
        (self.receiver, self.controller)
    }
}
