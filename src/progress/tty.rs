//! Progress on a terminal: a spinner per running step (several when stages run in parallel)
//! that shows the step's latest output line, left behind as a one-line result
//! (`✔ [app 2/5] RUN make  3.1s`) when the step ends.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{Event, Reporter, Stream, plain_line};

pub struct TtyReporter {
    multi: MultiProgress,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The running steps by number: their spinner and `[stage i/n] INSTRUCTION`.
    running: BTreeMap<usize, (ProgressBar, String)>,
}

impl TtyReporter {
    /// Bars on standard error.
    pub fn new() -> TtyReporter {
        TtyReporter::with_target(ProgressDrawTarget::stderr())
    }

    /// Bars drawn on `target` (tests draw on an in-memory terminal).
    pub fn with_target(target: ProgressDrawTarget) -> TtyReporter {
        TtyReporter {
            multi: MultiProgress::with_draw_target(target),
            state: Mutex::new(State::default()),
        }
    }

    /// A line above the bars (or just a line, when `--progress=tty` writes to no terminal and
    /// indicatif draws nothing).
    fn line(&self, text: &str) {
        if self.multi.is_hidden() {
            Stream::Stderr.write_line(text);
        } else {
            // Only fails when the terminal is gone; the build goes on without its progress.
            let _ = self.multi.println(text);
        }
    }

    /// Removes a step's spinner and leaves `result` in its place.
    fn end(&self, st: &mut State, step: usize, result: impl FnOnce(&str) -> String) {
        if let Some((bar, title)) = st.running.remove(&step) {
            bar.finish_and_clear();
            self.multi.remove(&bar);
            self.line(&result(&title));
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
        let st = &mut *st;
        match event {
            Event::StepStarted {
                step,
                stage,
                index,
                count,
                instruction,
                ..
            } => {
                // A stage's steps run one after the other: its earlier step that is still
                // shown (a FROM, which reports no DONE) has ended.
                let prefix = format!("[{stage} ");
                let ended: Vec<usize> = st
                    .running
                    .iter()
                    .filter(|(_, (_, t))| t.starts_with(&prefix))
                    .map(|(s, _)| *s)
                    .collect();
                for s in ended {
                    if let Some((bar, _)) = st.running.remove(&s) {
                        bar.finish_and_clear();
                        self.multi.remove(&bar);
                    }
                }
                let bar = self.multi.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {prefix} {elapsed:>3} {msg:.dim}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                let title = clip(&format!("[{stage} {index}/{count}] {instruction}"), 70);
                bar.set_prefix(title.clone());
                bar.enable_steady_tick(Duration::from_millis(120));
                st.running.insert(*step, (bar, title));
            }
            Event::StepOutput { step, line, .. } => {
                if let Some((bar, _)) = st.running.get(step) {
                    bar.set_message(clip(line, 60));
                }
            }
            Event::StepDone { step, elapsed_secs } => {
                self.end(st, *step, |t| format!("✔ {t}  {elapsed_secs:.1}s"));
            }
            Event::StepCached { step } => {
                self.end(st, *step, |t| format!("✔ {t}  CACHED"));
            }
            Event::StepFailed { step, message, .. } => {
                self.end(st, *step, |t| format!("✘ {t}  {message}"));
            }
            Event::StageStarted { .. } | Event::StageDone { .. } => {}
            other => {
                if let Some(line) = plain_line(other) {
                    self.line(&line);
                }
            }
        }
    }

    fn finish(&self) {
        if let Ok(mut st) = self.state.lock() {
            for (_, (bar, _)) in std::mem::take(&mut st.running) {
                bar.finish_and_clear();
                self.multi.remove(&bar);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use indicatif::InMemoryTerm;

    use super::*;
    use crate::progress::Location;

    fn started(step: usize, stage: &str, index: usize, instruction: &str) -> Event {
        Event::StepStarted {
            step,
            stage: stage.into(),
            index,
            count: 2,
            instruction: instruction.into(),
            location: Location::new("Dockerfile", step, 1),
        }
    }

    #[test]
    fn parallel_steps_each_have_a_spinner_and_leave_a_result_line() {
        let term = InMemoryTerm::new(20, 100);
        let r = TtyReporter::with_target(ProgressDrawTarget::term_like_with_hz(
            Box::new(term.clone()),
            255,
        ));
        r.report(&started(2, "a", 2, "RUN make a"));
        r.report(&started(3, "b", 2, "RUN make b"));
        r.report(&Event::StepOutput {
            step: 3,
            elapsed_secs: 0.1,
            line: "compiling b".into(),
        });
        r.report(&Event::StepOutput {
            step: 2,
            elapsed_secs: 0.1,
            line: "compiling a".into(),
        });
        // Both steps are on screen at once, each with its own latest line.
        let screen = term.contents();
        let a = screen.lines().find(|l| l.contains("[a 2/2] RUN make a"));
        let b = screen.lines().find(|l| l.contains("[b 2/2] RUN make b"));
        assert!(a.is_some_and(|l| l.contains("compiling a")), "{screen}");
        assert!(b.is_some_and(|l| l.contains("compiling b")), "{screen}");

        r.report(&Event::StepDone {
            step: 3,
            elapsed_secs: 1.25,
        });
        let screen = term.contents();
        assert!(screen.contains("✔ [b 2/2] RUN make b  1.2s"), "{screen}");
        assert!(
            screen
                .lines()
                .any(|l| l.contains("[a 2/2] RUN make a") && !l.starts_with('✔')),
            "a is still running: {screen}"
        );
        r.report(&Event::StepFailed {
            step: 2,
            location: Location::new("Dockerfile", 2, 1),
            message: "exit code: 2".into(),
        });
        r.report(&Event::Finished {
            digest: "sha256:abc".into(),
            elapsed_secs: 2.0,
        });
        r.finish();
        let screen = term.contents();
        assert!(
            screen.contains("✘ [a 2/2] RUN make a  exit code: 2"),
            "{screen}"
        );
        assert!(screen.contains("built sha256:abc in 2.0s"), "{screen}");
        // No spinner is left behind: every line is a result or a plain line.
        for l in screen.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                l.starts_with('✔') || l.starts_with('✘') || l.starts_with("built"),
                "left on screen: {l:?}\n{screen}"
            );
        }
    }

    #[test]
    fn a_stage_moving_on_clears_its_from_spinner() {
        let term = InMemoryTerm::new(10, 100);
        let r = TtyReporter::with_target(ProgressDrawTarget::term_like_with_hz(
            Box::new(term.clone()),
            255,
        ));
        r.report(&started(1, "app", 1, "FROM busybox"));
        r.report(&started(2, "app", 2, "RUN true"));
        let screen = term.contents();
        assert!(!screen.contains("FROM busybox"), "{screen}");
        assert!(screen.contains("[app 2/2] RUN true"), "{screen}");
    }
}
