//! A cap on how much of a step's output reaches the log, as BuildKit's: a step that prints
//! megabytes (a verbose compiler, `tar -v` of a large tree) would otherwise make a CI log too
//! big to open. After [`DEFAULT_MAX_BYTES`] (2 MiB, BuildKit's default) of one step's output,
//! the log shows `[output clipped, log limit 2MiB reached]` once and nothing more of that step;
//! the step runs on untouched, and its result line (`DONE`, `ERROR`) is always shown.
//!
//! `SHMOCKER_STEP_LOG_MAX_SIZE` (or BuildKit's own `BUILDKIT_STEP_LOG_MAX_SIZE`) sets the limit
//! in bytes; `-1` lifts it. Only what is shown is clipped: job summaries and test reports keep
//! the last lines of every step, since they read the events before this cap.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{Event, Reporter};

/// BuildKit's default step log limit.
pub const DEFAULT_MAX_BYTES: u64 = 2 * 1024 * 1024;

/// The limit from the environment: `None` for unlimited.
pub fn max_bytes_from_env() -> Option<u64> {
    let value = ["SHMOCKER_STEP_LOG_MAX_SIZE", "BUILDKIT_STEP_LOG_MAX_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()));
    parse_max(value.as_deref())
}

fn parse_max(value: Option<&str>) -> Option<u64> {
    match value.map(str::trim) {
        None => Some(DEFAULT_MAX_BYTES),
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n < 0 => None,
            Ok(n) => Some(n.cast_unsigned()),
            // Not a number: the default, rather than an unlimited log by accident.
            Err(_) => Some(DEFAULT_MAX_BYTES),
        },
    }
}

/// `1048576` as `1MiB`, as BuildKit's message shows sizes.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0}{}", UNITS[unit])
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

/// Wraps a reporter so that each step's output stops after `max` bytes.
pub struct LogLimit<R> {
    inner: R,
    max: u64,
    /// Bytes of output shown per step, and whether the clip notice was shown.
    shown: Mutex<HashMap<usize, (u64, bool)>>,
}

impl<R: Reporter> LogLimit<R> {
    pub fn new(inner: R, max: u64) -> LogLimit<R> {
        LogLimit {
            inner,
            max,
            shown: Mutex::new(HashMap::new()),
        }
    }
}

impl<R: Reporter> Reporter for LogLimit<R> {
    fn report(&self, event: &Event) {
        if let Event::StepOutput {
            step,
            elapsed_secs,
            line,
        } = event
        {
            let Ok(mut shown) = self.shown.lock() else {
                return;
            };
            let (bytes, clipped) = shown.entry(*step).or_insert((0, false));
            if *clipped {
                return;
            }
            let len = line.len() as u64 + 1;
            if *bytes + len > self.max {
                *clipped = true;
                drop(shown);
                self.inner.report(&Event::StepOutput {
                    step: *step,
                    elapsed_secs: *elapsed_secs,
                    line: format!("[output clipped, log limit {} reached]", human(self.max)),
                });
                return;
            }
            *bytes += len;
        }
        self.inner.report(event);
    }

    fn finish(&self) {
        self.inner.finish();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::progress::TestLines;

    fn out(step: usize, line: &str) -> Event {
        Event::StepOutput {
            step,
            elapsed_secs: 1.0,
            line: line.into(),
        }
    }

    #[test]
    fn a_step_is_clipped_once_past_the_limit_others_go_on() {
        let sink = Arc::new(TestLines::default());
        // 20 bytes: two lines of 9 bytes (+ newline) fit, the third does not.
        let r = LogLimit::new(sink.clone(), 20);
        for i in 0..5 {
            r.report(&out(2, &format!("line-{i:03}")));
        }
        r.report(&out(3, "other step"));
        r.report(&Event::StepDone {
            step: 2,
            elapsed_secs: 1.0,
        });
        let got = sink.lines();
        assert_eq!(
            got,
            [
                "#2 1.000 line-000",
                "#2 1.000 line-001",
                "#2 1.000 [output clipped, log limit 20B reached]",
                "#3 1.000 other step",
                "#2 DONE 1.0s",
            ]
        );
    }

    #[test]
    fn limits_parse_like_buildkits() {
        assert_eq!(parse_max(None), Some(2 * 1024 * 1024));
        assert_eq!(parse_max(Some("-1")), None);
        assert_eq!(parse_max(Some("1048576")), Some(1048576));
        assert_eq!(parse_max(Some("lots")), Some(DEFAULT_MAX_BYTES));
        assert_eq!(human(2 * 1024 * 1024), "2MiB");
        assert_eq!(human(1536), "1.5KiB");
    }
}
