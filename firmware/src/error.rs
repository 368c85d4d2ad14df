//! Error types: small `Copy` enums with hand-written `Display`, as postcard and lsm303agr do.
//!
//! Decoding errors are not here: a bad frame is counted in
//! [`LinkStats`](crate::link::LinkStats) and logged, never returned, because the receiver
//! simply resynchronizes.

use core::fmt;
use embedded_hal::{digital, pwm};

/// A peripheral write failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum OutputError {
    /// Setting the pan servo's duty cycle failed.
    Pan(pwm::ErrorKind),
    /// Setting the tilt servo's duty cycle failed.
    Tilt(pwm::ErrorKind),
    /// Driving the alert pin failed.
    Alert(digital::ErrorKind),
}

impl fmt::Display for OutputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pan(kind) => write!(f, "pan servo PWM: {kind}"),
            Self::Tilt(kind) => write!(f, "tilt servo PWM: {kind}"),
            Self::Alert(kind) => write!(f, "alert pin: {kind}"),
        }
    }
}

impl core::error::Error for OutputError {}

/// The firmware failed; `E` is the serial reader's error type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Error<E> {
    /// Reading the serial link failed.
    Read(E),
    /// The reader reported end of stream (a closed port, or the end of a test slice).
    EndOfStream,
    /// A peripheral write failed.
    Output(OutputError),
}

impl<E> From<OutputError> for Error<E> {
    fn from(e: OutputError) -> Self {
        Self::Output(e)
    }
}

impl<E: fmt::Display> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read(e) => write!(f, "serial read failed: {e}"),
            Self::EndOfStream => f.write_str("serial link reached end of stream"),
            Self::Output(e) => write!(f, "output failed: {e}"),
        }
    }
}

impl<E: core::error::Error> core::error::Error for Error<E> {}
