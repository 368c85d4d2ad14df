//! Progress bars for the library's progress reports (`flsl_train::progress`): one bar per
//! task, created on its first report and cleared when `done == total`.

use std::collections::HashMap;
use std::sync::Mutex;

use flsl_train::progress::Reporter;
use indicatif::{ProgressBar, ProgressStyle};

/// A reporter that draws a bar per task on standard error.
pub fn bars() -> Reporter {
    let bars: Mutex<HashMap<String, ProgressBar>> = Mutex::new(HashMap::new());
    Reporter::new(move |p| {
        let Ok(mut bars) = bars.lock() else { return };
        let bar = bars.entry(p.task.to_string()).or_insert_with(|| {
            let b = ProgressBar::new(p.total);
            if let Ok(style) = ProgressStyle::with_template(&format!(
                "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {}  {{msg}}",
                p.task
            )) {
                b.set_style(style.progress_chars("=> "));
            }
            b
        });
        bar.set_length(p.total);
        bar.set_position(p.done);
        if !p.message.is_empty() {
            bar.set_message(p.message.to_string());
        }
        if p.done >= p.total {
            bar.finish();
            bars.remove(p.task);
        }
    })
}
