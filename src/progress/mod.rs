//! Build progress: the engine emits [`Event`]s, a [`Reporter`] shows them.
//!
//! The engine knows nothing about terminals, CI systems or JSON; it says what happened (a step
//! started at a Dockerfile line, printed a line, finished, failed, an image was pulled or
//! pushed) and hands the event to the [`Reporting`] handle in its options. The reporters here
//! cover the plain cases (the `#N [i/n] RUN ...` lines, terminal bars, JSON lines, nothing);
//! `ci/` wraps them with the CI system's own language (GitHub groups and annotations, GitLab
//! sections) and records the steps for job summaries and test reports.

mod limit;
mod order;
mod tty;

use std::fmt;
use std::io::{IsTerminal as _, Write as _};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

pub use limit::{LogLimit, max_bytes_from_env};
pub use order::StageOrder;
pub use tty::TtyReporter;

/// A place in a Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Location {
    pub file: String,
    pub line: usize,
    pub column: usize,
}

impl Location {
    pub fn new(file: &str, line: usize, column: usize) -> Location {
        Location {
            file: file.to_string(),
            line,
            column,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// Something that happened during a build. Steps are numbered from 1 across the whole build
/// (a stage's `FROM` is a step too), as the `#N` of the plain output.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A warning about the input (a Dockerfile line) or about a pulled layer.
    Warning {
        location: Option<Location>,
        message: String,
    },
    /// A build check's finding (see `dockerfile::checks`), already printed to standard error
    /// in the checks' own format; CI reporters annotate it at its Dockerfile line.
    CheckFinding {
        location: Location,
        /// `warning` or `error`.
        level: String,
        rule: String,
        message: String,
        url: String,
    },
    /// A stage begins; its FROM step follows.
    StageStarted {
        /// The stage's index in the Dockerfile, from 0.
        stage: usize,
        /// `AS name`, if it has one.
        name: Option<String>,
        /// The image or stage it starts from, after ARG expansion.
        base: String,
    },
    /// Every step of the stage is done (cached or run); a failed stage reports `StepFailed`
    /// instead.
    StageDone {
        stage: usize,
    },
    StepStarted {
        step: usize,
        /// The stage's name, or `stage-N`.
        stage: String,
        /// The step's place in its stage, from 1, and the stage's number of steps.
        index: usize,
        count: usize,
        /// The instruction as written, on one line.
        instruction: String,
        location: Location,
    },
    /// A base image's manifest was resolved (and its layers fetched).
    Pulled {
        step: usize,
        image: String,
        digest: String,
    },
    /// A line a step's process printed (stdout and stderr together).
    StepOutput {
        step: usize,
        elapsed_secs: f64,
        line: String,
    },
    /// The step's result came from the cache.
    StepCached {
        step: usize,
    },
    StepDone {
        step: usize,
        elapsed_secs: f64,
    },
    StepFailed {
        step: usize,
        location: Location,
        message: String,
    },
    /// The image was written somewhere (`what`: "an OCI image layout", ...).
    Exported {
        what: String,
        dest: String,
    },
    /// A line about the build as a whole (`#0 building 2 stage(s), 7 steps`, cache imports).
    Info {
        message: String,
    },
    Pushing {
        tag: String,
    },
    /// A long blob transfer is under way (throttled: none for quick ones, then one every few
    /// seconds and one at the end).
    Transfer {
        /// `pulling` or `pushing`.
        direction: String,
        image: String,
        digest: String,
        done: u64,
        total: u64,
        elapsed_secs: f64,
    },
    Pushed {
        tag: String,
        digest: String,
    },
    /// The image is complete (and pushed or exported, as asked).
    Finished {
        digest: String,
        elapsed_secs: f64,
    },
}

/// Shows or records build events.
///
/// A build holds one reporter (through [`Reporting`]) from start to end. The engine calls
/// [`report`](Reporter::report) as things happen, from its own task and from the blocking task
/// that streams a step's output, so a reporter is `Send + Sync` and keeps its state behind a
/// lock. Events come in build order: `StageStarted`, then for each step `StepStarted`, any
/// `StepOutput`/`Pulled` lines, and one of `StepDone`, `StepCached` or `StepFailed`; at the end
/// `Exported`/`Pushing`/`Pushed` and `Finished`. A failed build stops after `StepFailed` (or
/// after a `Warning`, for errors outside a step). Whoever runs the build calls
/// [`finish`](Reporter::finish) once, success or not, so a reporter can close what it opened
/// (a terminal bar, a CI log group) and print totals.
pub trait Reporter: Send + Sync {
    fn report(&self, event: &Event);
    fn finish(&self) {}
}

/// The reporter a build uses: cheap to clone, shared with the tasks that run steps.
#[derive(Clone)]
pub struct Reporting(Arc<dyn Reporter>);

impl Reporting {
    pub fn new(reporter: impl Reporter + 'static) -> Reporting {
        Reporting(Arc::new(reporter))
    }

    pub fn from_arc(reporter: Arc<dyn Reporter>) -> Reporting {
        Reporting(reporter)
    }

    pub fn report(&self, event: Event) {
        self.0.report(&event);
    }

    pub fn finish(&self) {
        self.0.finish();
    }
}

impl Default for Reporting {
    /// Today's plain lines on standard error.
    fn default() -> Reporting {
        Reporting::new(PlainReporter::stderr())
    }
}

impl fmt::Debug for Reporting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Reporting")
    }
}

/// `--progress`: how progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// Bars on a terminal; plain lines when standard error is not one or a CI is detected.
    Auto,
    /// Bars (indicatif).
    Tty,
    /// `#N [i/n] INSTRUCTION` lines, step output, `#N DONE 0.1s`.
    Plain,
    /// One JSON object per event, one per line, on standard error.
    Json,
    /// Nothing but errors and warnings.
    Quiet,
}

impl ProgressMode {
    /// `Auto` made concrete: a terminal without a CI gets bars.
    pub fn resolve(self) -> ProgressMode {
        match self {
            ProgressMode::Auto => {
                let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
                if std::io::stderr().is_terminal() && !ci {
                    ProgressMode::Tty
                } else {
                    ProgressMode::Plain
                }
            }
            m => m,
        }
    }

    /// The reporter for this mode, on standard error, with each step's output capped as
    /// [`limited`] says.
    pub fn reporter(self) -> Arc<dyn Reporter> {
        match self.resolve() {
            ProgressMode::Tty => limited(TtyReporter::new()),
            ProgressMode::Json => limited(JsonReporter),
            ProgressMode::Quiet => Arc::new(QuietReporter),
            _ => limited(PlainReporter::stderr()),
        }
    }
}

/// `reporter` with each step's shown output capped at the limit from the environment (BuildKit's
/// 2 MiB by default; see [`LogLimit`]).
pub fn limited(reporter: impl Reporter + 'static) -> Arc<dyn Reporter> {
    match max_bytes_from_env() {
        Some(max) => Arc::new(LogLimit::new(reporter, max)),
        None => Arc::new(reporter),
    }
}

/// Which standard stream a text reporter writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn write_line(self, line: &str) {
        // A closed pipe must not abort a build; the line is lost, the build goes on.
        let _ = match self {
            Stream::Stdout => writeln!(std::io::stdout().lock(), "{line}"),
            Stream::Stderr => writeln!(std::io::stderr().lock(), "{line}"),
        };
    }
}

/// How a stage is named in CI logs (GitHub groups, GitLab sections): `stage NAME: FROM BASE`,
/// or the stage's index when it has no name.
pub fn stage_title(stage: usize, name: Option<&str>, base: &str) -> String {
    match name {
        Some(n) => format!("stage {n}: FROM {base}"),
        None => format!("stage {stage}: FROM {base}"),
    }
}

/// The plain text of an event, as the plain reporter prints it (`None`: it prints nothing).
pub fn plain_line(event: &Event) -> Option<String> {
    Some(match event {
        Event::Warning {
            location: Some(l),
            message,
        } => format!("warning: {}:{}: {message}", l.file, l.line),
        Event::Warning {
            location: None,
            message,
        } => format!("warning: {message}"),
        Event::StageStarted { .. } | Event::StageDone { .. } | Event::CheckFinding { .. } => {
            return None;
        }
        Event::StepStarted {
            step,
            stage,
            index,
            count,
            instruction,
            ..
        } => format!("#{step} [{stage} {index}/{count}] {instruction}"),
        Event::Pulled {
            step,
            image,
            digest,
        } => format!("#{step} resolved {image} to {digest}"),
        Event::StepOutput {
            step,
            elapsed_secs,
            line,
        } => format!("#{step} {elapsed_secs:.3} {line}"),
        Event::StepCached { step } => format!("#{step} CACHED"),
        Event::StepDone { step, elapsed_secs } => format!("#{step} DONE {elapsed_secs:.1}s"),
        Event::StepFailed { step, message, .. } => format!("#{step} ERROR: {message}"),
        Event::Exported { what, dest } => format!("exported {what} to {dest}"),
        Event::Info { message } => message.clone(),
        Event::Pushing { tag } => format!("pushing {tag}"),
        Event::Transfer {
            direction,
            image,
            digest,
            done,
            total,
            elapsed_secs,
        } => {
            let short = digest.get(..19).unwrap_or(digest);
            let mb = |b: u64| b as f64 / 1_000_000.0;
            let rate = mb(*done) / elapsed_secs.max(0.001);
            format!(
                "{direction} {short} of {image}: {:.1} MB / {:.1} MB ({:.0}%) {rate:.1} MB/s {elapsed_secs:.1}s",
                mb(*done),
                mb(*total),
                if *total == 0 {
                    100.0
                } else {
                    *done as f64 * 100.0 / *total as f64
                },
            )
        }
        Event::Pushed { tag, digest } => format!("pushed {tag}@{digest}"),
        Event::Finished {
            digest,
            elapsed_secs,
        } => format!("built {digest} in {elapsed_secs:.1}s"),
    })
}

/// One line per event, as `docker build --progress=plain` does.
#[derive(Debug)]
pub struct PlainReporter {
    stream: Stream,
}

impl PlainReporter {
    pub fn stderr() -> PlainReporter {
        PlainReporter {
            stream: Stream::Stderr,
        }
    }

    pub fn new(stream: Stream) -> PlainReporter {
        PlainReporter { stream }
    }
}

impl Reporter for PlainReporter {
    fn report(&self, event: &Event) {
        if let Some(line) = plain_line(event) {
            self.stream.write_line(&line);
        }
    }
}

/// One JSON object per event on standard error: `{"event":"step_started","step":2,...}`.
#[derive(Debug)]
pub struct JsonReporter;

impl Reporter for JsonReporter {
    fn report(&self, event: &Event) {
        if let Ok(line) = serde_json::to_string(event) {
            Stream::Stderr.write_line(&line);
        }
    }
}

/// Only warnings and the failing step; errors themselves are printed by the caller.
#[derive(Debug)]
pub struct QuietReporter;

impl Reporter for QuietReporter {
    fn report(&self, event: &Event) {
        if matches!(event, Event::Warning { .. })
            && let Some(line) = plain_line(event)
        {
            Stream::Stderr.write_line(&line);
        }
    }
}

/// Sends every event to several reporters, in order.
pub struct Fanout(pub Vec<Arc<dyn Reporter>>);

impl Reporter for Fanout {
    fn report(&self, event: &Event) {
        for r in &self.0 {
            r.report(event);
        }
    }

    fn finish(&self) {
        for r in &self.0 {
            r.finish();
        }
    }
}

/// How one step went, as summaries and test reports show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepRecord {
    pub step: usize,
    /// The stage's name, or `stage-N`.
    pub stage: String,
    pub instruction: String,
    pub location: Location,
    pub outcome: Outcome,
    pub elapsed: Duration,
    /// The last lines of the step's output (for a failure's report).
    pub tail: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Running,
    Done,
    Cached,
    Failed(String),
}

/// What a build did, gathered from its events.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Record {
    pub steps: Vec<StepRecord>,
    pub warnings: Vec<(Option<Location>, String)>,
    pub pulled: Vec<(String, String)>,
    pub pushed: Vec<(String, String)>,
    pub elapsed: Option<Duration>,
}

/// Output lines kept per step for reports.
const TAIL_LINES: usize = 20;

/// A reporter that remembers: the source of job summaries and test reports.
#[derive(Debug, Default)]
pub struct Recorder {
    record: Mutex<Record>,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder::default()
    }

    pub fn snapshot(&self) -> Record {
        self.record.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Reporter for Recorder {
    fn report(&self, event: &Event) {
        let Ok(mut rec) = self.record.lock() else {
            return;
        };
        match event {
            Event::StepStarted {
                step,
                stage,
                instruction,
                location,
                ..
            } => {
                // Steps of a stage run one after the other: one that is still running when the
                // next starts (a FROM, which reports no DONE) has finished.
                for s in rec.steps.iter_mut() {
                    if s.stage == *stage && s.outcome == Outcome::Running {
                        s.outcome = Outcome::Done;
                    }
                }
                rec.steps.push(StepRecord {
                    step: *step,
                    stage: stage.clone(),
                    instruction: instruction.clone(),
                    location: location.clone(),
                    outcome: Outcome::Running,
                    elapsed: Duration::ZERO,
                    tail: vec![],
                });
            }
            Event::StepOutput { step, line, .. } => {
                if let Some(s) = rec.steps.iter_mut().rev().find(|s| s.step == *step) {
                    if s.tail.len() == TAIL_LINES {
                        s.tail.remove(0);
                    }
                    s.tail.push(line.clone());
                }
            }
            Event::StepCached { step } => {
                if let Some(s) = rec.steps.iter_mut().rev().find(|s| s.step == *step) {
                    s.outcome = Outcome::Cached;
                }
            }
            Event::StepDone { step, elapsed_secs } => {
                if let Some(s) = rec.steps.iter_mut().rev().find(|s| s.step == *step) {
                    if s.outcome == Outcome::Running {
                        s.outcome = Outcome::Done;
                    }
                    s.elapsed = Duration::from_secs_f64(elapsed_secs.max(0.0));
                }
            }
            Event::StepFailed { step, message, .. } => {
                if let Some(s) = rec.steps.iter_mut().rev().find(|s| s.step == *step) {
                    s.outcome = Outcome::Failed(message.clone());
                }
            }
            Event::Warning { location, message } => {
                rec.warnings.push((location.clone(), message.clone()));
            }
            // Summaries and reports list check findings with the other warnings.
            Event::CheckFinding {
                location,
                level,
                rule,
                message,
                ..
            } => {
                rec.warnings.push((
                    Some(location.clone()),
                    format!("{level}: {rule}: {message}"),
                ));
            }
            Event::Pulled { image, digest, .. } => rec.pulled.push((image.clone(), digest.clone())),
            Event::Pushed { tag, digest } => rec.pushed.push((tag.clone(), digest.clone())),
            Event::Finished { elapsed_secs, .. } => {
                rec.elapsed = Some(Duration::from_secs_f64(elapsed_secs.max(0.0)));
                for s in rec
                    .steps
                    .iter_mut()
                    .filter(|s| s.outcome == Outcome::Running)
                {
                    s.outcome = Outcome::Done;
                }
            }
            Event::StageStarted { .. }
            | Event::StageDone { .. }
            | Event::Exported { .. }
            | Event::Info { .. }
            | Event::Transfer { .. }
            | Event::Pushing { .. } => {}
        }
    }
}

/// A reporter for tests: remembers each event as a line (its plain line; stage starts and ends
/// as `start N` / `done N`), and `finish` as `finish`.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct TestLines(pub Mutex<Vec<String>>);

#[cfg(test)]
impl TestLines {
    pub(crate) fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

#[cfg(test)]
impl Reporter for Arc<TestLines> {
    fn report(&self, event: &Event) {
        let line = match event {
            Event::StageStarted { stage, .. } => format!("start {stage}"),
            Event::StageDone { stage } => format!("done {stage}"),
            e => plain_line(e).unwrap_or_default(),
        };
        self.0.lock().unwrap().push(line);
    }

    fn finish(&self) {
        self.0.lock().unwrap().push("finish".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(line: usize) -> Location {
        Location::new("Dockerfile", line, 1)
    }

    #[test]
    fn plain_lines_are_the_engines_historic_format() {
        let started = Event::StepStarted {
            step: 2,
            stage: "stage-0".into(),
            index: 2,
            count: 5,
            instruction: "RUN echo hi".into(),
            location: loc(3),
        };
        assert_eq!(
            plain_line(&started).unwrap(),
            "#2 [stage-0 2/5] RUN echo hi"
        );
        let out = Event::StepOutput {
            step: 2,
            elapsed_secs: 0.1234,
            line: "hi".into(),
        };
        assert_eq!(plain_line(&out).unwrap(), "#2 0.123 hi");
        let done = Event::StepDone {
            step: 2,
            elapsed_secs: 0.06,
        };
        assert_eq!(plain_line(&done).unwrap(), "#2 DONE 0.1s");
        let warn = Event::Warning {
            location: Some(loc(7)),
            message: "x".into(),
        };
        assert_eq!(plain_line(&warn).unwrap(), "warning: Dockerfile:7: x");
    }

    #[test]
    fn json_events_are_tagged() {
        let e = Event::StepCached { step: 4 };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"event":"step_cached","step":4}"#
        );
    }

    #[test]
    fn the_recorder_follows_steps_stages_and_failures() {
        let r = Recorder::new();
        r.report(&Event::StageStarted {
            stage: 1,
            name: Some("app".into()),
            base: "busybox".into(),
        });
        r.report(&Event::StepStarted {
            step: 3,
            stage: "app".into(),
            index: 3,
            count: 3,
            instruction: "RUN false".into(),
            location: loc(9),
        });
        for i in 0..(TAIL_LINES + 5) {
            r.report(&Event::StepOutput {
                step: 3,
                elapsed_secs: 0.0,
                line: format!("line {i}"),
            });
        }
        r.report(&Event::StepFailed {
            step: 3,
            location: loc(9),
            message: "exit code: 1".into(),
        });
        let rec = r.snapshot();
        let s = &rec.steps[0];
        assert_eq!(s.stage, "app");
        assert_eq!(s.outcome, Outcome::Failed("exit code: 1".into()));
        assert_eq!(s.tail.len(), TAIL_LINES);
        assert_eq!(s.tail.last().unwrap(), &format!("line {}", TAIL_LINES + 4));
    }
}
