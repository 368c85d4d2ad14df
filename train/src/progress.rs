//! Progress of long work (training steps, feature caching, detector training), reported to
//! the caller. The library never draws: the `flsl` binary turns reports into progress bars, a
//! test or another program can log them or ignore them (the default).

use std::sync::Arc;

/// One report: `done` of `total` units of `task`, with a short status line.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// What is progressing (`"step"`, `"backbone features"`, `"detector"`).
    pub task: &'a str,
    /// Units done.
    pub done: u64,
    /// Units in all; `done == total` ends the task.
    pub total: u64,
    /// Status: losses, speed (may be empty).
    pub message: &'a str,
}

/// The callback behind a [`Reporter`].
type Sink = Arc<dyn Fn(&Progress<'_>) + Send + Sync>;

/// Where reports go; cheap to clone, shared by threads. `Reporter::default()` drops them.
#[derive(Clone, Default)]
pub struct Reporter(Option<Sink>);

impl Reporter {
    /// Sends reports to `f`.
    pub fn new(f: impl Fn(&Progress<'_>) + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(f)))
    }

    /// Whether anyone listens (skip building status lines otherwise).
    pub fn is_active(&self) -> bool {
        self.0.is_some()
    }

    /// Reports `done` of `total` units of `task`; `message` is built only when someone listens.
    pub fn report(&self, task: &str, done: u64, total: u64, message: impl FnOnce() -> String) {
        if let Some(f) = &self.0 {
            let message = message();
            f(&Progress { task, done, total, message: &message });
        }
    }
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_active() { "Reporter(active)" } else { "Reporter(none)" })
    }
}
