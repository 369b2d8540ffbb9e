//! Stage by stage: a reporter wrapper that shows stages which ran in parallel one after the
//! other.
//!
//! Independent stages run at once, so their events interleave. Plain lines cope (each carries
//! its `#N`), but a CI log cannot: GitHub's `::group::` and GitLab's sections neither nest
//! nor interleave, so a stage's lines would land in whichever group was opened last.
//! [`StageOrder`] passes one stage's events through as they happen (the *live* stage) and
//! holds the others' back, in arrival order, until the live stage is done; then the next
//! stage's held events are released at once and it becomes live. Nothing is dropped: when the
//! build ends (including by a failure in a held stage), [`finish`](Reporter::finish) releases
//! whatever is still held before the wrapped reporter finishes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use super::{Event, Reporter};

#[derive(Default)]
struct State {
    live: Option<usize>,
    /// Stages started while another was live, in start order, with their held events.
    waiting: VecDeque<(usize, Vec<Event>)>,
    /// Waiting stages that are already done (their StageDone is held too).
    finished: HashSet<usize>,
    /// Step numbers and stage labels (`name` or `stage-N`) to stage indexes.
    step_stage: HashMap<usize, usize>,
    label_stage: HashMap<String, usize>,
}

impl State {
    /// The stage an event belongs to; `None` for events about the build as a whole.
    fn stage_of(&mut self, event: &Event) -> Option<usize> {
        match event {
            Event::StageStarted { stage, name, .. } => {
                let label = name.clone().unwrap_or_else(|| format!("stage-{stage}"));
                self.label_stage.insert(label, *stage);
                Some(*stage)
            }
            Event::StageDone { stage } => Some(*stage),
            Event::StepStarted { step, stage, .. } => {
                let s = *self.label_stage.get(stage)?;
                self.step_stage.insert(*step, s);
                Some(s)
            }
            Event::Pulled { step, .. }
            | Event::StepOutput { step, .. }
            | Event::StepCached { step }
            | Event::StepDone { step, .. }
            | Event::StepFailed { step, .. } => self.step_stage.get(step).copied(),
            _ => None,
        }
    }
}

/// Wraps a reporter so that it sees one stage at a time (see the module's documentation).
pub struct StageOrder<R> {
    inner: R,
    state: Mutex<State>,
}

impl<R: Reporter> StageOrder<R> {
    pub fn new(inner: R) -> StageOrder<R> {
        StageOrder {
            inner,
            state: Mutex::new(State::default()),
        }
    }

    /// Makes the next waiting stage live, releasing its held events; stages that finished
    /// while waiting are released whole, one after the other.
    fn promote(&self, st: &mut State) {
        st.live = None;
        while let Some((stage, held)) = st.waiting.pop_front() {
            for e in &held {
                self.inner.report(e);
            }
            if !st.finished.remove(&stage) {
                st.live = Some(stage);
                return;
            }
        }
    }
}

impl<R: Reporter> Reporter for StageOrder<R> {
    fn report(&self, event: &Event) {
        // The lock is held while the inner reporter prints, so released events cannot be
        // overtaken by a live one from another thread.
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let st = &mut *st;
        let Some(stage) = st.stage_of(event) else {
            self.inner.report(event);
            return;
        };
        if st.live.is_none() && st.waiting.is_empty() {
            st.live = Some(stage);
        }
        if st.live == Some(stage) {
            self.inner.report(event);
            if matches!(event, Event::StageDone { .. }) {
                self.promote(st);
            }
            return;
        }
        if matches!(event, Event::StageDone { .. }) {
            st.finished.insert(stage);
        }
        match st.waiting.iter_mut().find(|(s, _)| *s == stage) {
            Some((_, held)) => held.push(event.clone()),
            None => st.waiting.push_back((stage, vec![event.clone()])),
        }
    }

    fn finish(&self) {
        if let Ok(mut st) = self.state.lock() {
            while let Some((_, held)) = st.waiting.pop_front() {
                for e in &held {
                    self.inner.report(e);
                }
            }
            st.live = None;
        }
        self.inner.finish();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::progress::{Location, TestLines};

    fn started(stage: usize, name: &str) -> Event {
        Event::StageStarted {
            stage,
            name: Some(name.into()),
            base: "busybox".into(),
        }
    }

    fn step(step: usize, stage: &str) -> Event {
        Event::StepStarted {
            step,
            stage: stage.into(),
            index: 1,
            count: 1,
            instruction: format!("RUN {step}"),
            location: Location::new("Dockerfile", step, 1),
        }
    }

    fn out(step: usize, line: &str) -> Event {
        Event::StepOutput {
            step,
            elapsed_secs: 0.0,
            line: line.into(),
        }
    }

    fn lines(events: &[Event]) -> Vec<String> {
        let sink = Arc::new(TestLines::default());
        let r = StageOrder::new(sink.clone());
        for e in events {
            r.report(e);
        }
        r.finish();
        sink.lines()
    }

    #[test]
    fn interleaved_stages_come_out_one_after_the_other() {
        let got = lines(&[
            Event::Info {
                message: "#0 building".into(),
            },
            started(0, "a"),
            started(1, "b"),
            step(1, "a"),
            step(2, "b"),
            out(2, "from b"),
            out(1, "from a"),
            Event::StepDone {
                step: 2,
                elapsed_secs: 0.0,
            },
            Event::StageDone { stage: 1 },
            Event::StepDone {
                step: 1,
                elapsed_secs: 0.0,
            },
            Event::StageDone { stage: 0 },
            started(2, "final"),
            step(3, "final"),
            Event::StageDone { stage: 2 },
            Event::Finished {
                digest: "sha256:x".into(),
                elapsed_secs: 1.0,
            },
        ]);
        assert_eq!(
            got,
            [
                "#0 building",
                "start 0",
                "#1 [a 1/1] RUN 1",
                "#1 0.000 from a",
                "#1 DONE 0.0s",
                "done 0",
                // b ran meanwhile; all of it comes out now, in its own order.
                "start 1",
                "#2 [b 1/1] RUN 2",
                "#2 0.000 from b",
                "#2 DONE 0.0s",
                "done 1",
                "start 2",
                "#3 [final 1/1] RUN 3",
                "done 2",
                "built sha256:x in 1.0s",
                "finish",
            ]
        );
    }

    #[test]
    fn a_held_stage_that_fails_is_released_when_the_build_ends() {
        let got = lines(&[
            started(0, "a"),
            started(1, "b"),
            step(1, "a"),
            step(2, "b"),
            Event::StepFailed {
                step: 2,
                location: Location::new("Dockerfile", 2, 1),
                message: "exit code: 1".into(),
            },
            out(1, "a goes on"),
        ]);
        assert_eq!(
            got,
            [
                "start 0",
                "#1 [a 1/1] RUN 1",
                "#1 0.000 a goes on",
                "start 1",
                "#2 [b 1/1] RUN 2",
                "#2 ERROR: exit code: 1",
                "finish",
            ]
        );
    }

    #[test]
    fn a_stage_that_starts_after_the_live_one_ended_is_live_at_once() {
        let got = lines(&[
            started(0, "a"),
            Event::StageDone { stage: 0 },
            started(1, "b"),
            step(1, "b"),
            out(1, "now"),
        ]);
        assert_eq!(
            got,
            [
                "start 0",
                "done 0",
                "start 1",
                "#1 [b 1/1] RUN 1",
                "#1 0.000 now",
                "finish"
            ]
        );
    }
}
