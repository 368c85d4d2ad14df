//! flsl microcontroller firmware core.
//!
//! On the airframe, the companion computer running `flsl detect` sends detections and
//! tracks over a serial link (the wire format of [`flsl_runtime::wire`], re-exported as
//! [`wire`]). This crate turns them into actions: it points a pan/tilt gimbal at the
//! selected track, raises an alert output for a chosen class, and fails safe (gimbal
//! centred, alert low) when the link goes quiet.
//!
//! It is `no_std`, has no `alloc`, no `unsafe`, and fixed memory; everything is written
//! against embedded-hal 1.0 and embedded-io traits, so it runs unchanged on any HAL and is
//! tested on the host with mocks.
//!
//! # Modules
//!
//! - [`link`]: [`link::LinkReceiver`] over an [`embedded_io::Read`] serial
//!   port, [`link::LinkDecoder`] for interrupt/DMA buffers, and
//!   [`link::LinkStats`] counters.
//! - [`control`]: [`control::Controller`]: target selection, PD loop,
//!   servo limits and slew rate ([`embedded_hal::pwm::SetDutyCycle`]), alert output
//!   ([`embedded_hal::digital::OutputPin`]) and link-loss fail-safe.
//! - [`app`]: [`app::Follower`], receiver and controller wired into one
//!   non-blocking `step(now_ms)` for the main loop.
//! - [`error`]: [`error::Error`] and [`error::OutputError`].
//!
//! # Features
//!
//! - `defmt`: log through defmt (MCU builds only).
//!
//! `firmware/board/` runs this crate as a Cortex-M4F image in qemu (`mps2-an386`);
//! `README.md` shows how to wire it into a real board.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code, missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]

// Must come first: the log macros are textually scoped.
mod fmt;

pub mod app;
pub mod control;
pub mod error;
pub mod link;

pub use app::Follower;
pub use control::{Controller, ControllerConfig};
pub use error::{Error, OutputError};
pub use flsl_runtime::wire;
pub use link::{LinkReceiver, LinkStats};
