//! GitLab CI's language in the job log: a collapsible section per stage
//! (`\e[0Ksection_start:<unix time>:<name>[collapsed=true]\r\e[0K<header>` ... `section_end`),
//! plain progress lines inside. The reports GitLab reads (junit, code quality, dotenv,
//! annotations) are written after the build by [`super::reports`].

use std::io::Write;
use std::sync::Mutex;

use crate::progress::{Event, Reporter, plain_line};

struct State {
    out: Box<dyn Write + Send>,
    open: Option<String>,
}

pub struct GitlabReporter {
    state: Mutex<State>,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A section name GitLab accepts: `[a-z0-9_.-]`.
fn section_name(stage: usize, name: Option<&str>) -> String {
    let raw = match name {
        Some(n) => format!("shmocker_stage_{stage}_{n}"),
        None => format!("shmocker_stage_{stage}"),
    };
    raw.to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl GitlabReporter {
    pub fn stdout() -> GitlabReporter {
        GitlabReporter::new(Box::new(std::io::stdout()))
    }

    pub fn new(out: Box<dyn Write + Send>) -> GitlabReporter {
        GitlabReporter {
            state: Mutex::new(State { out, open: None }),
        }
    }
}

fn end_section(st: &mut State) {
    if let Some(name) = st.open.take() {
        let _ = writeln!(st.out, "\x1b[0Ksection_end:{}:{name}\r\x1b[0K", now());
    }
}

impl Reporter for GitlabReporter {
    fn report(&self, event: &Event) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let st = &mut *st;
        match event {
            Event::StageStarted { stage, name, base } => {
                end_section(st);
                let section = section_name(*stage, name.as_deref());
                let header = crate::progress::stage_title(*stage, name.as_deref(), base);
                let _ = writeln!(
                    st.out,
                    "\x1b[0Ksection_start:{}:{section}[collapsed=true]\r\x1b[0K{header}",
                    now()
                );
                st.open = Some(section);
            }
            Event::Exported { .. } | Event::Pushing { .. } | Event::Finished { .. } => {
                end_section(st);
                if let Some(line) = plain_line(event) {
                    let _ = writeln!(st.out, "{line}");
                }
            }
            Event::StageDone { .. } => end_section(st),
            Event::StepFailed { .. } => {
                if let Some(line) = plain_line(event) {
                    let _ = writeln!(st.out, "{line}");
                }
                // The failing stage stays open (and expanded by the reader) where it failed.
                end_section(st);
            }
            other => {
                if let Some(line) = plain_line(other) {
                    let _ = writeln!(st.out, "{line}");
                }
            }
        }
        let _ = st.out.flush();
    }

    fn finish(&self) {
        if let Ok(mut st) = self.state.lock() {
            end_section(&mut st);
            let _ = st.out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_names_are_what_gitlab_accepts() {
        assert_eq!(section_name(0, None), "shmocker_stage_0");
        assert_eq!(
            section_name(1, Some("Build Env")),
            "shmocker_stage_1_build_env"
        );
    }

    #[test]
    fn stages_open_and_close_sections() {
        #[derive(Clone, Default)]
        struct Sink(std::sync::Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let r = GitlabReporter::new(Box::new(sink.clone()));
        r.report(&Event::StageStarted {
            stage: 0,
            name: Some("build".into()),
            base: "busybox".into(),
        });
        r.report(&Event::StepDone {
            step: 1,
            elapsed_secs: 0.0,
        });
        r.finish();
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("\x1b[0Ksection_start:"), "{text:?}");
        assert!(lines[0].ends_with(
            ":shmocker_stage_0_build[collapsed=true]\r\x1b[0Kstage build: FROM busybox"
        ));
        assert_eq!(lines[1], "#1 DONE 0.0s");
        assert!(
            lines[2].starts_with("\x1b[0Ksection_end:")
                && lines[2].contains(":shmocker_stage_0_build\r")
        );
    }
}
