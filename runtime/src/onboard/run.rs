//! The real-time frame loop.
//!
//! A capture thread reads the source into recycled [`FrameBuf`]s and hands them to the loop
//! through one slot:
//!
//! - [`FramePolicy::Latest`] (live sources): a new frame replaces an unprocessed one, which is
//!   counted as dropped. A camera faster than the model therefore costs at most one frame of
//!   latency, never a growing queue.
//! - [`FramePolicy::All`] (files, folders, or `--frames all`): the capture thread waits until
//!   the slot is free, so every frame is processed (back-pressure on a pipe's writer).
//!
//! The loop stops at the source's end, after `max_frames`, or when the stop flag is set
//! (SIGINT/SIGTERM in `flsl-onboard`), and returns a [`LoopSummary`]. Three buffers circulate,
//! so a steady-state frame allocates nothing here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::OnboardError;
use super::source::{FrameBuf, FrameSource, Next};
use crate::detect::StageTimes;

/// What to do with frames that arrive while the model is busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramePolicy {
    /// Process every frame (the source waits).
    All,
    /// Process the newest frame; older unprocessed ones are dropped and counted.
    Latest,
}

/// Loop settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopOptions {
    /// Frame policy.
    pub policy: FramePolicy,
    /// Stop after this many processed frames.
    pub max_frames: Option<u64>,
    /// Call the stats callback every this many processed frames (`0`: never).
    pub stats_every: u64,
}

impl LoopOptions {
    /// The policy for a source: [`FramePolicy::Latest`] when it is live.
    pub fn for_source(live: bool) -> Self {
        Self {
            policy: if live { FramePolicy::Latest } else { FramePolicy::All },
            max_frames: None,
            stats_every: 0,
        }
    }
}

/// Counters and timings of a loop, also the content of a stats line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoopSummary {
    /// Frames processed.
    pub frames: u64,
    /// Frames the source produced that were replaced by a newer one before processing.
    pub dropped: u64,
    /// Frames the source could not read (see `skip_reasons`).
    pub skipped: u64,
    /// The first reasons of skipped frames (at most 16).
    pub skip_reasons: Vec<String>,
    /// Per-stage time totals over processed frames.
    pub times: StageTimes,
    /// Time from the first frame handed over to now.
    pub wall: Duration,
    /// Worst time from a frame's capture to the end of its processing.
    pub max_latency: Duration,
    /// The loop ended because the stop flag was set.
    pub interrupted: bool,
    /// Resident memory at the end (bytes), where `/proc` has it.
    pub rss_bytes: Option<u64>,
    /// Heap bytes live at the end, where the binary counts them ([`super::heap`]).
    pub heap_live_bytes: Option<u64>,
    /// Allocations per processed frame since the first frame (whole process, capture thread
    /// included), where the binary counts them.
    pub allocations_per_frame: Option<f64>,
}

impl LoopSummary {
    /// One line: frames, frames/s, per-stage ms per frame, drops, skips, RSS, and the heap
    /// where it is counted.
    pub fn line(&self) -> String {
        let n = self.frames.max(1) as f64;
        let ms = |d: Duration| d.as_secs_f64() * 1e3 / n;
        let fps = self.frames as f64 / self.wall.as_secs_f64().max(1e-9);
        let rss =
            self.rss_bytes.map_or_else(|| "n/a".into(), |b| format!("{:.1} MB", b as f64 / 1e6));
        let heap = match (self.heap_live_bytes, self.allocations_per_frame) {
            (Some(live), Some(per)) => {
                format!("; heap {} kB live, {per:.1} allocations/frame", live / 1000)
            }
            _ => String::new(),
        };
        format!(
            "{} frames, {:.1} frames/s; ms per frame: decode {:.2}, preprocess {:.2}, model {:.2}, post-process {:.3}, output {:.2}; dropped {}, skipped {}, worst latency {:.1} ms; RSS {rss}{heap}",
            self.frames,
            fps,
            ms(self.times.decode),
            ms(self.times.preprocess),
            ms(self.times.model),
            ms(self.times.postprocess),
            ms(self.times.output),
            self.dropped,
            self.skipped,
            self.max_latency.as_secs_f64() * 1e3,
        )
    }
}

const MAX_REASONS: usize = 16;

#[derive(Default)]
struct Slot {
    full: Option<FrameBuf>,
    spare: Vec<FrameBuf>,
    /// The source ended (Ok) or failed (Err).
    done: Option<Result<(), OnboardError>>,
    dropped: u64,
    skipped: u64,
    skip_reasons: Vec<String>,
    /// The loop has finished: the capture thread stops at its next hand-over.
    closed: bool,
}

struct Handoff {
    slot: Mutex<Slot>,
    ready: Condvar,
    free: Condvar,
}

impl Handoff {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        // A poisoned lock means the other side panicked; its data is still consistent here
        // (every update is a plain field write), so keep going rather than panic too.
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn capture(mut source: Box<dyn FrameSource>, h: Arc<Handoff>, policy: FramePolicy) {
    let mut buf = FrameBuf::default();
    loop {
        let next = source.next(&mut buf);
        let mut s = h.lock();
        if s.closed {
            return;
        }
        match next {
            Ok(Next::Frame) => {
                if policy == FramePolicy::All {
                    while s.full.is_some() && !s.closed {
                        s = h.free.wait(s).unwrap_or_else(|p| p.into_inner());
                    }
                    if s.closed {
                        return;
                    }
                }
                if let Some(old) = s.full.replace(buf) {
                    s.dropped += 1;
                    buf = old;
                } else {
                    buf = s.spare.pop().unwrap_or_default();
                }
                h.ready.notify_one();
            }
            Ok(Next::Skipped(reason)) => {
                s.skipped += 1;
                if s.skip_reasons.len() < MAX_REASONS {
                    s.skip_reasons.push(reason);
                }
            }
            Ok(Next::End) => {
                s.done = Some(Ok(()));
                h.ready.notify_one();
                return;
            }
            Err(e) => {
                s.done = Some(Err(e));
                h.ready.notify_one();
                return;
            }
        }
    }
}

/// Runs `process` on the frames of `source` until it ends, `opts.max_frames`, or `stop`.
///
/// `process` returns the time of its stages (preprocess, model, post-process, output; the
/// decode time is the source's). `on_stats` gets the running summary every
/// `opts.stats_every` frames. An error of `process` ends the loop with that error; a source
/// error ends it too, after the frames already handed over.
pub fn run_loop(
    source: Box<dyn FrameSource>,
    opts: &LoopOptions,
    stop: &AtomicBool,
    mut process: impl FnMut(&FrameBuf) -> Result<StageTimes, OnboardError>,
    mut on_stats: impl FnMut(&LoopSummary),
) -> Result<LoopSummary, OnboardError> {
    let h = Arc::new(Handoff {
        slot: Mutex::new(Slot { spare: vec![FrameBuf::default()], ..Slot::default() }),
        ready: Condvar::new(),
        free: Condvar::new(),
    });
    let worker = {
        let h = Arc::clone(&h);
        let policy = opts.policy;
        std::thread::Builder::new()
            .name("flsl-capture".into())
            .spawn(move || capture(source, h, policy))
            .map_err(|e| OnboardError::Io {
                action: "starting the capture thread for",
                path: "the frame source".into(),
                source: e,
            })?
    };
    let mut summary = LoopSummary::default();
    let mut start: Option<Instant> = None;
    let mut heap_start: Option<super::heap::HeapStats> = None;
    let result = loop {
        if opts.max_frames.is_some_and(|m| summary.frames >= m) {
            break Ok(());
        }
        // Wait for a frame, the end, or the stop flag (checked every 50 ms).
        let frame = {
            let mut s = h.lock();
            loop {
                if stop.load(Ordering::Relaxed) {
                    summary.interrupted = true;
                    break None;
                }
                if let Some(f) = s.full.take() {
                    h.free.notify_one();
                    break Some(Ok(f));
                }
                if let Some(done) = s.done.take() {
                    break Some(Err(done));
                }
                s = h
                    .ready
                    .wait_timeout(s, Duration::from_millis(50))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        };
        let frame = match frame {
            None => break Ok(()),
            Some(Err(done)) => break done,
            Some(Ok(f)) => f,
        };
        start.get_or_insert_with(Instant::now);
        if summary.frames == 0 {
            heap_start = super::heap::snapshot();
        }
        let r = process(&frame);
        let latency = frame.captured.elapsed();
        let decode = frame.decode;
        h.lock().spare.push(frame);
        let mut t = match r {
            Ok(t) => t,
            Err(e) => break Err(e),
        };
        t.decode = decode;
        summary.times.add(&t);
        summary.max_latency = summary.max_latency.max(latency);
        summary.frames += 1;
        if opts.stats_every > 0 && summary.frames % opts.stats_every == 0 {
            fill_counters(&mut summary, &h, start, heap_start);
            on_stats(&summary);
        }
    };
    {
        let mut s = h.lock();
        s.closed = true;
        h.free.notify_all();
    }
    fill_counters(&mut summary, &h, start, heap_start);
    // The capture thread ends at its next hand-over; one blocked in a read (a quiet pipe or
    // camera) is left to end with the process rather than hold up the summary.
    if worker.is_finished() {
        let _ = worker.join();
    }
    result.map(|()| summary)
}

fn fill_counters(
    summary: &mut LoopSummary,
    h: &Handoff,
    start: Option<Instant>,
    heap_start: Option<super::heap::HeapStats>,
) {
    let s = h.lock();
    summary.dropped = s.dropped;
    summary.skipped = s.skipped;
    summary.skip_reasons.clone_from(&s.skip_reasons);
    drop(s);
    summary.wall = start.map_or(Duration::ZERO, |t| t.elapsed());
    summary.rss_bytes = super::rss_bytes();
    if let (Some(now), Some(first)) = (super::heap::snapshot(), heap_start) {
        summary.heap_live_bytes = Some(now.live_bytes);
        summary.allocations_per_frame = Some(
            now.allocations.saturating_sub(first.allocations) as f64 / summary.frames.max(1) as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A camera: frame `i` is ready `i * period` after the start, whether or not anyone reads.
    struct Camera {
        start: Option<Instant>,
        period: Duration,
        n: u64,
        next: u64,
    }

    impl FrameSource for Camera {
        fn next(&mut self, buf: &mut FrameBuf) -> Result<Next, OnboardError> {
            let start = *self.start.get_or_insert_with(Instant::now);
            if self.next == self.n {
                return Ok(Next::End);
            }
            let due = start + self.period * self.next as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            buf.index = self.next;
            buf.width = 2;
            buf.height = 1;
            buf.data.resize(6, self.next as u8);
            buf.captured = Instant::now();
            self.next += 1;
            Ok(Next::Frame)
        }
        fn is_live(&self) -> bool {
            true
        }
        fn describe(&self) -> String {
            "test camera".into()
        }
    }

    fn camera(n: u64, period_ms: u64) -> Box<dyn FrameSource> {
        Box::new(Camera { start: None, period: Duration::from_millis(period_ms), n, next: 0 })
    }

    #[test]
    fn a_slow_model_with_a_fast_camera_drops_stale_frames_instead_of_queueing_them() {
        // 100 frames at 1 ms; the "model" takes 10 ms per frame.
        let mut seen = Vec::new();
        let opts = LoopOptions::for_source(true);
        let s = run_loop(
            camera(100, 1),
            &opts,
            &AtomicBool::new(false),
            |f| {
                seen.push(f.index);
                std::thread::sleep(Duration::from_millis(10));
                Ok(StageTimes::default())
            },
            |_| {},
        )
        .unwrap();
        assert_eq!(s.frames as usize, seen.len());
        assert_eq!(
            s.frames + s.dropped,
            100,
            "every frame is either processed or counted as dropped"
        );
        assert!(
            s.frames < 40,
            "a queue would have processed all 100 frames; processed {}",
            s.frames
        );
        assert!(seen.windows(2).all(|w| w[1] > w[0]), "frames stay in order: {seen:?}");
        assert!(
            seen.windows(2).any(|w| w[1] > w[0] + 1),
            "newer frames replace stale ones: {seen:?}"
        );
        assert_eq!(
            *seen.last().unwrap(),
            99,
            "the last frame the camera produced is processed, not an old one"
        );
    }

    #[test]
    fn policy_all_processes_every_frame_in_order() {
        let mut seen = Vec::new();
        let opts = LoopOptions { policy: FramePolicy::All, max_frames: None, stats_every: 7 };
        let mut stats = 0;
        let s = run_loop(
            camera(30, 0),
            &opts,
            &AtomicBool::new(false),
            |f| {
                seen.push(f.index);
                std::thread::sleep(Duration::from_millis(1));
                Ok(StageTimes::default())
            },
            |_| stats += 1,
        )
        .unwrap();
        assert_eq!(seen, (0..30).collect::<Vec<_>>());
        assert_eq!((s.frames, s.dropped, stats), (30, 0, 4));
    }

    #[test]
    fn the_stop_flag_and_max_frames_end_the_loop_and_errors_propagate() {
        let stop = AtomicBool::new(false);
        let s = run_loop(
            camera(1000, 1),
            &LoopOptions::for_source(false),
            &stop,
            |f| {
                if f.index == 5 {
                    stop.store(true, Ordering::Relaxed);
                }
                Ok(StageTimes::default())
            },
            |_| {},
        )
        .unwrap();
        assert!(s.interrupted);
        assert_eq!(s.frames, 6);
        let opts = LoopOptions { max_frames: Some(3), ..LoopOptions::for_source(false) };
        assert_eq!(
            run_loop(
                camera(1000, 0),
                &opts,
                &AtomicBool::new(false),
                |_| Ok(StageTimes::default()),
                |_| {}
            )
            .unwrap()
            .frames,
            3
        );
        let e = run_loop(
            camera(10, 0),
            &LoopOptions::for_source(false),
            &AtomicBool::new(false),
            |_| Err(OnboardError::Source { input: "x".into(), reason: "model failed".into() }),
            |_| {},
        )
        .unwrap_err();
        assert!(e.to_string().contains("model failed"));
    }
}
