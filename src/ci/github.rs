//! GitHub Actions' language: workflow commands in the log, step outputs, the job summary.
//!
//! The log: a `::group::` per stage; plain progress lines inside it, always printed between
//! `::stop-commands::<random token>` and `::<token>::`, so that neither a RUN step's output nor
//! a Dockerfile line shown in the progress can issue workflow commands by printing
//! `::set-output`, `::add-mask::` or `##[...]` (GitHub docs, "Stopping and starting workflow
//! commands"); our own commands are printed with commands resumed; `::error file=…,line=…::` annotations at
//! the Dockerfile line of the failing step and `::warning` ones for warnings with a line, at
//! most [`ANNOTATIONS_PER_LEVEL`] of each (GitHub shows no more per step), then one `::notice`
//! with the totals. Secrets are announced with `::add-mask::` before anything else is printed.
//! Everything goes to standard output, so the commands and the lines they wrap stay in order.
//!
//! After the build, [`write_outputs`] appends `imageid`, `digest` and `metadata` to
//! `$GITHUB_OUTPUT` with random heredoc delimiters, and the job summary (see
//! [`super::reports::summary_markdown`]) is appended to `$GITHUB_STEP_SUMMARY`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::progress::{Event, Location, Reporter, plain_line};

/// GitHub keeps at most 10 error and 10 warning annotations per step.
pub const ANNOTATIONS_PER_LEVEL: usize = 10;

/// `%`, CR and LF escaped, as the runner unescapes a command's message.
pub fn escape_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// A command property value: also `:` and `,`.
pub fn escape_property(s: &str) -> String {
    escape_data(s).replace(':', "%3A").replace(',', "%2C")
}

/// 32 random hex digits from the kernel (tokens and delimiters nobody can guess in advance).
pub fn random_token() -> String {
    let mut buf = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .is_ok();
    if !ok {
        // Without /dev/urandom: time and pid, still unknown to a RUN step that has not run.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        buf[..16].copy_from_slice(&(t ^ (std::process::id() as u128) << 64).to_le_bytes());
    }
    hex::encode(buf)
}

struct State {
    out: Box<dyn Write + Send>,
    group_open: bool,
    /// The token of an active `::stop-commands::`, while a step's output is being printed.
    stopped: Option<String>,
    errors: usize,
    warnings: usize,
}

pub struct GithubReporter {
    workspace: Option<PathBuf>,
    state: Mutex<State>,
}

impl GithubReporter {
    /// A reporter on standard output; Dockerfile paths in annotations are made relative to
    /// `workspace` ($GITHUB_WORKSPACE), as GitHub expects.
    pub fn stdout(workspace: Option<PathBuf>) -> GithubReporter {
        GithubReporter::new(Box::new(std::io::stdout()), workspace)
    }

    pub fn new(out: Box<dyn Write + Send>, workspace: Option<PathBuf>) -> GithubReporter {
        GithubReporter {
            workspace,
            state: Mutex::new(State {
                out,
                group_open: false,
                stopped: None,
                errors: 0,
                warnings: 0,
            }),
        }
    }

    /// Tells the runner to hide `secret` in every later log line.
    pub fn mask(&self, secret: &str) {
        if let Ok(mut st) = self.state.lock() {
            for line in secret.lines().filter(|l| !l.trim().is_empty()) {
                command(&mut st, &format!("::add-mask::{}", escape_data(line)));
            }
        }
    }

    fn file_of(&self, loc: &Location) -> String {
        let p = Path::new(&loc.file);
        self.workspace
            .as_deref()
            .and_then(|w| p.strip_prefix(w).ok())
            .map(|r| r.display().to_string())
            .unwrap_or_else(|| loc.file.clone())
    }

    fn annotate(
        &self,
        st: &mut State,
        level: &str,
        loc: Option<&Location>,
        title: &str,
        msg: &str,
    ) {
        let count = if level == "error" {
            &mut st.errors
        } else {
            &mut st.warnings
        };
        *count += 1;
        if *count > ANNOTATIONS_PER_LEVEL {
            return;
        }
        let mut props = Vec::new();
        if let Some(l) = loc {
            props.push(format!("file={}", escape_property(&self.file_of(l))));
            props.push(format!("line={}", l.line));
            props.push(format!("col={}", l.column));
        }
        props.push(format!("title={}", escape_property(title)));
        let _ = writeln!(
            st.out,
            "::{level} {}::{}",
            props.join(","),
            escape_data(msg)
        );
    }
}

/// Prints a line of text with workflow commands stopped: nothing in it (a Dockerfile line, a
/// step's output) can be taken for a command.
fn text(st: &mut State, line: &str) {
    if st.stopped.is_none() {
        let token = random_token();
        let _ = writeln!(st.out, "::stop-commands::{token}");
        st.stopped = Some(token);
    }
    let _ = writeln!(st.out, "{line}");
}

/// Prints one of our own workflow commands, with commands resumed.
fn command(st: &mut State, line: &str) {
    resume(st);
    let _ = writeln!(st.out, "{line}");
}

fn resume(st: &mut State) {
    if let Some(token) = st.stopped.take() {
        let _ = writeln!(st.out, "::{token}::");
    }
}

fn close_group(st: &mut State) {
    if st.group_open {
        command(st, "::endgroup::");
        st.group_open = false;
    }
}

impl Reporter for GithubReporter {
    fn report(&self, event: &Event) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let st = &mut *st;
        match event {
            Event::StageStarted { stage, name, base } => {
                close_group(st);
                let title = crate::progress::stage_title(*stage, name.as_deref(), base);
                command(st, &format!("::group::{}", escape_data(&title)));
                st.group_open = true;
            }
            Event::StageDone { .. } => close_group(st),
            Event::StepFailed {
                location, message, ..
            } => {
                if let Some(line) = plain_line(event) {
                    text(st, &line);
                }
                close_group(st);
                self.annotate(
                    st,
                    "error",
                    Some(location),
                    "shmocker: step failed",
                    message,
                );
            }
            Event::CheckFinding {
                location,
                level,
                rule,
                message,
                url,
            } => {
                let level = if level == "error" { "error" } else { "warning" };
                self.annotate(
                    st,
                    level,
                    Some(location),
                    rule,
                    &format!("{message} ({url})"),
                );
            }
            Event::Warning { location, message } => {
                if let Some(line) = plain_line(event) {
                    text(st, &line);
                }
                if location.is_some() {
                    self.annotate(st, "warning", location.as_ref(), "shmocker", message);
                }
            }
            Event::Exported { .. } | Event::Pushing { .. } | Event::Finished { .. } => {
                close_group(st);
                if let Some(line) = plain_line(event) {
                    text(st, &line);
                }
            }
            other => {
                if let Some(line) = plain_line(other) {
                    text(st, &line);
                }
            }
        }
        let _ = st.out.flush();
    }

    fn finish(&self) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let st = &mut *st;
        close_group(st);
        if st.errors > ANNOTATIONS_PER_LEVEL || st.warnings > ANNOTATIONS_PER_LEVEL {
            let notice = format!(
                "::notice title=shmocker::{} errors and {} warnings in all; only the first {ANNOTATIONS_PER_LEVEL} of each are annotations, the log has every one",
                st.errors, st.warnings
            );
            command(st, &notice);
        }
        // Whatever runs after shmocker in this step gets its commands back.
        resume(st);
        let _ = st.out.flush();
    }
}

/// Appends `name<<DELIMITER\nvalue\nDELIMITER` entries to a `$GITHUB_OUTPUT` (or
/// `$GITHUB_ENV`) file, with a fresh random delimiter that the value does not contain.
pub fn write_outputs(path: &Path, outputs: &[(&str, String)]) -> std::io::Result<()> {
    let mut text = String::new();
    for (name, value) in outputs {
        let delimiter = loop {
            let d = format!("ghadelimiter_{}", random_token());
            if !value.contains(&d) {
                break d;
            }
        };
        text.push_str(&format!("{name}<<{delimiter}\n{value}\n{delimiter}\n"));
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn loc(line: usize) -> Location {
        Location::new("/ws/app/Dockerfile", line, 1)
    }

    #[test]
    fn text_lines_cannot_issue_workflow_commands() {
        let sink = Sink::default();
        let r = GithubReporter::new(Box::new(sink.clone()), Some("/ws".into()));
        r.report(&Event::StageStarted {
            stage: 0,
            name: None,
            base: "busybox".into(),
        });
        r.report(&Event::StepStarted {
            step: 2,
            stage: "stage-0".into(),
            index: 2,
            count: 2,
            instruction: "RUN echo ##[set-output name=a;]b".into(),
            location: loc(2),
        });
        r.report(&Event::StepOutput {
            step: 2,
            elapsed_secs: 0.1,
            line: "::add-mask::x".into(),
        });
        r.report(&Event::StepDone {
            step: 2,
            elapsed_secs: 0.2,
        });
        r.finish();
        let text = sink.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "::group::stage 0: FROM busybox");
        let token = lines[1].strip_prefix("::stop-commands::").expect(&text);
        assert_eq!(token.len(), 32);
        assert_eq!(
            &lines[2..],
            &[
                "#2 [stage-0 2/2] RUN echo ##[set-output name=a;]b",
                "#2 0.100 ::add-mask::x",
                "#2 DONE 0.2s",
                &format!("::{token}::"),
                "::endgroup::",
            ]
        );
    }

    #[test]
    fn annotations_are_capped_at_ten_per_level_with_a_notice() {
        let sink = Sink::default();
        let r = GithubReporter::new(Box::new(sink.clone()), Some("/ws".into()));
        for i in 0..13 {
            r.report(&Event::Warning {
                location: Some(loc(i + 1)),
                message: format!("w{i}, with: punctuation\nand a newline"),
            });
        }
        r.report(&Event::StepFailed {
            step: 3,
            location: loc(20),
            message: "exit code: 1".into(),
        });
        r.finish();
        let text = sink.text();
        let warnings: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("::warning "))
            .collect();
        assert_eq!(warnings.len(), ANNOTATIONS_PER_LEVEL);
        assert_eq!(
            warnings[0],
            "::warning file=app/Dockerfile,line=1,col=1,title=shmocker::w0, with: punctuation%0Aand a newline"
        );
        assert!(text.contains(
            "::error file=app/Dockerfile,line=20,col=1,title=shmocker%3A step failed::exit code: 1"
        ));
        assert!(
            text.contains("::notice title=shmocker::1 errors and 13 warnings in all"),
            "{text}"
        );
    }

    #[test]
    fn check_findings_are_annotated_at_their_line_without_a_second_log_line() {
        let sink = Sink::default();
        let r = GithubReporter::new(Box::new(sink.clone()), Some("/ws".into()));
        for (level, rule) in [("warning", "FromAsCasing"), ("error", "UndefinedVar")] {
            r.report(&Event::CheckFinding {
                location: loc(4),
                level: level.into(),
                rule: rule.into(),
                message: "the message".into(),
                url: "https://docs.docker.com/go/dockerfile/rule/x/".into(),
            });
        }
        r.finish();
        let text = sink.text();
        assert!(text.contains(
            "::warning file=app/Dockerfile,line=4,col=1,title=FromAsCasing::the message (https://docs.docker.com/go/dockerfile/rule/x/)"
        ), "{text}");
        assert!(
            text.contains("::error file=app/Dockerfile,line=4,col=1,title=UndefinedVar::"),
            "{text}"
        );
        assert!(
            !text.contains("warning: "),
            "the checks print their own lines: {text}"
        );
    }

    #[test]
    fn masks_and_outputs_use_the_documented_syntax() {
        let sink = Sink::default();
        let r = GithubReporter::new(Box::new(sink.clone()), None);
        r.mask("s3cret%");
        assert_eq!(sink.text(), "::add-mask::s3cret%25\n");

        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        write_outputs(
            &out,
            &[("digest", "sha256:ab".into()), ("m", "{\n}".into())],
        )
        .unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let d = lines[0].strip_prefix("digest<<").unwrap();
        assert!(d.starts_with("ghadelimiter_") && d.len() > 20);
        assert_eq!(lines[1], "sha256:ab");
        assert_eq!(lines[2], d);
        let d2 = lines[3].strip_prefix("m<<").unwrap();
        assert_ne!(d, d2, "each output has its own delimiter");
        assert_eq!(&lines[4..], &["{", "}", d2]);
    }
}
