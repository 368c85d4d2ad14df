//! The method: FLSL's pieces as the paper defines them, each in its own file.
//!
//! - [`meanshift`]: the mean-shift operator (intra- and inter-view).
//! - [`loss`]: the FLSL loss with every term (mean shift, k-means, volume maximisation).
//! - [`masks`]: token sampling masks (one query per sampling window).
//! - [`schedule`]: cosine and temperature schedules.

pub mod loss;
pub mod masks;
pub mod meanshift;
pub mod schedule;
