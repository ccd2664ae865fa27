//! What is due after a step: a pure function of the number of completed steps, the planned total
//! and the cadences, so every member of a group takes the same decisions without talking (the
//! barrier around a checkpoint, for instance, is entered by all ranks or none).
//!
//! Conventions: `step` counts completed steps (1 after the first), as `StepReport.step` and the
//! trainer's own counter do. The last step has no periodic analysis or checkpoint of its own:
//! the final report analyses and checkpoints the final state anyway.

/// Cadences in steps; 0 disables a periodic action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cadence {
    /// A logged step record (the last step is always logged).
    pub log_every: i64,
    /// The background collapse analysis of the teacher's prototypes (rank 0).
    pub analysis_every: i64,
    /// A periodic checkpoint (rank 0, with a barrier on every rank).
    pub checkpoint_every: i64,
    /// A replica hash in the step report (agent sessions).
    pub hash_every: i64,
}

impl Cadence {
    /// The cadences a training configuration asks for (no replica hashes).
    pub fn of(cfg: &protodino_config::TrainConfig) -> Self {
        Self {
            log_every: cfg.train.log_every_steps,
            analysis_every: cfg.eval.analysis_every_steps,
            checkpoint_every: cfg.train.checkpoint_every_steps,
            hash_every: 0,
        }
    }
}

/// What is due once `step` steps are complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Due {
    pub log: bool,
    pub analysis: bool,
    pub checkpoint: bool,
    pub hash: bool,
    /// The planned run is complete: the loop ends after this step.
    pub end: bool,
}

fn every(step: i64, n: i64) -> bool {
    n > 0 && step > 0 && step % n == 0
}

/// The actions due after `step` completed steps of a run of `total` steps.
pub fn due(step: i64, total: i64, c: &Cadence) -> Due {
    let end = step >= total;
    Due {
        log: end || every(step, c.log_every),
        analysis: !end && every(step, c.analysis_every),
        checkpoint: !end && every(step, c.checkpoint_every),
        hash: every(step, c.hash_every),
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: Cadence = Cadence {
        log_every: 2,
        analysis_every: 3,
        checkpoint_every: 4,
        hash_every: 5,
    };

    #[test]
    fn periodic_actions_fall_on_their_multiples() {
        let d = |s| due(s, 100, &C);
        assert_eq!(d(1), Due::default());
        assert_eq!(
            d(2),
            Due {
                log: true,
                ..Due::default()
            }
        );
        assert!(d(3).analysis && !d(3).log);
        assert!(d(4).checkpoint && d(4).log && !d(4).analysis);
        assert!(d(5).hash && !d(5).log);
        let all = d(60);
        assert!(all.log && all.analysis && all.checkpoint && all.hash && !all.end);
    }

    #[test]
    fn the_last_step_is_logged_and_ends_without_periodic_analysis_or_checkpoint() {
        // 60 is a multiple of every cadence.
        let last = due(60, 60, &C);
        assert_eq!(
            last,
            Due {
                log: true,
                analysis: false,
                checkpoint: false,
                hash: true,
                end: true
            }
        );
        // A last step off every cadence still logs and ends.
        let odd = due(7, 7, &C);
        assert!(odd.log && odd.end && !odd.hash);
        // Past the plan (a resumed run whose total shrank) ends at once.
        assert!(due(9, 7, &C).end);
    }

    #[test]
    fn zero_disables_a_cadence() {
        let off = Cadence::default();
        for s in 1..50 {
            let d = due(s, 50, &off);
            assert_eq!(d, Due::default(), "step {s}");
        }
        assert_eq!(
            due(50, 50, &off),
            Due {
                log: true,
                end: true,
                ..Due::default()
            }
        );
    }
}
