//! Progress on a terminal: one spinner per running step that shows the step's latest output
//! line, left behind as a one-line result (`✔ [2/5] RUN make  3.1s`) when the step ends.

use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::{Event, Reporter, Stream, plain_line};

pub struct TtyReporter {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    bar: Option<ProgressBar>,
    /// `[i/n] INSTRUCTION` of the running step.
    title: String,
}

impl TtyReporter {
    pub fn new() -> TtyReporter {
        TtyReporter {
            state: Mutex::new(State::default()),
        }
    }
}

impl Default for TtyReporter {
    fn default() -> Self {
        TtyReporter::new()
    }
}

/// Cuts `s` to `max` characters, for a bar that stays on one line.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

impl Reporter for TtyReporter {
    fn report(&self, event: &Event) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        match event {
            Event::StepStarted {
                stage,
                index,
                count,
                instruction,
                ..
            } => {
                if let Some(old) = st.bar.take() {
                    old.finish_and_clear();
                }
                let bar = ProgressBar::new_spinner();
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {prefix} {elapsed:>3} {msg:.dim}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                st.title = clip(&format!("[{stage} {index}/{count}] {instruction}"), 70);
                bar.set_prefix(st.title.clone());
                bar.enable_steady_tick(Duration::from_millis(120));
                st.bar = Some(bar);
            }
            Event::StepOutput { line, .. } => {
                if let Some(bar) = &st.bar {
                    bar.set_message(clip(line, 60));
                }
            }
            Event::StepDone { elapsed_secs, .. } => {
                if let Some(bar) = st.bar.take() {
                    bar.finish_and_clear();
                    Stream::Stderr.write_line(&format!("✔ {}  {elapsed_secs:.1}s", st.title));
                }
            }
            Event::StepCached { .. } => {
                if let Some(bar) = st.bar.take() {
                    bar.finish_and_clear();
                    Stream::Stderr.write_line(&format!("✔ {}  CACHED", st.title));
                }
            }
            Event::StepFailed { message, .. } => {
                if let Some(bar) = st.bar.take() {
                    bar.finish_and_clear();
                }
                Stream::Stderr.write_line(&format!("✘ {}  {message}", st.title));
            }
            Event::StageStarted { .. } => {}
            other => {
                if let Some(line) = plain_line(other) {
                    match &st.bar {
                        Some(bar) => bar.println(line),
                        None => Stream::Stderr.write_line(&line),
                    }
                }
            }
        }
    }

    fn finish(&self) {
        if let Ok(mut st) = self.state.lock()
            && let Some(bar) = st.bar.take()
        {
            bar.finish_and_clear();
        }
    }
}
