//! The job state machine: which transitions exist, and the rule that each one carries a
//! reason, which becomes the job's `message`.
//!
//! `QUEUED → RENDEZVOUS → RUNNING → SUCCEEDED`; `FAILED` and `CANCELLED` from every non-final
//! state; `RUNNING → RECOVERING → RUNNING` when a failure re-forms the group (a lost member, a
//! peer failure, a replica-hash mismatch) and `RUNNING → RENDEZVOUS → RUNNING` when workers join;
//! `RENDEZVOUS | RECOVERING → SUCCEEDED` when a re-formed group only had the final report left. A final
//! state never changes again; asking for a transition the design does not have is a broken
//! invariant (`INTERNAL`), never a client error: handlers check the state first.

use protodino_proto::v1::{Job, JobState};

use crate::error::Error;

pub const ALL_STATES: [JobState; 7] = [
    JobState::Queued,
    JobState::Rendezvous,
    JobState::Running,
    JobState::Recovering,
    JobState::Succeeded,
    JobState::Failed,
    JobState::Cancelled,
];

pub fn state_of(job: &Job) -> JobState {
    JobState::try_from(job.state).unwrap_or(JobState::Unspecified)
}

pub fn is_final(s: JobState) -> bool {
    matches!(
        s,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled
    )
}

/// Lower-case name without the enum prefix (`JOB_STATE_QUEUED` → `queued`).
pub fn state_name(s: JobState) -> String {
    s.as_str_name()
        .trim_start_matches("JOB_STATE_")
        .to_ascii_lowercase()
}

/// Whether the design has the transition `from → to` (a state to itself only re-words the
/// message, which the non-final states allow).
pub fn allowed(from: JobState, to: JobState) -> bool {
    use JobState::*;
    match from {
        Queued => matches!(to, Queued | Rendezvous | Failed | Cancelled),
        Rendezvous | Recovering | Running => matches!(
            to,
            Rendezvous | Recovering | Running | Succeeded | Failed | Cancelled
        ),
        Succeeded | Failed | Cancelled | Unspecified => false,
    }
}

/// Move `job` to `to`, with `reason` as its message.
pub fn transition(job: &mut Job, to: JobState, reason: impl Into<String>) -> Result<(), Error> {
    let from = state_of(job);
    if !allowed(from, to) {
        return Err(Error::Internal(format!(
            "job {}: no transition {} → {}",
            job.job_id,
            state_name(from),
            state_name(to)
        )));
    }
    job.state = to as i32;
    job.message = reason.into();
    Ok(())
}

/// Re-word the message of a job without changing its state; true when it changed.
pub fn set_message(job: &mut Job, text: &str) -> bool {
    if job.message == text {
        return false;
    }
    job.message = text.to_string();
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_states_never_change_and_failure_is_reachable_from_every_other() {
        for from in ALL_STATES {
            for to in ALL_STATES {
                if is_final(from) {
                    assert!(!allowed(from, to), "{from:?} → {to:?}");
                }
            }
            if !is_final(from) {
                assert!(allowed(from, JobState::Failed));
                assert!(allowed(from, JobState::Cancelled));
            }
        }
        assert!(!allowed(JobState::Queued, JobState::Running));
        assert!(!allowed(JobState::Queued, JobState::Succeeded));
        assert!(allowed(JobState::Running, JobState::Rendezvous));
    }

    #[test]
    fn a_refused_transition_is_internal_and_changes_nothing() {
        let mut job = Job {
            job_id: "j".into(),
            state: JobState::Cancelled as i32,
            message: "cancelled".into(),
            ..Default::default()
        };
        let e = transition(&mut job, JobState::Running, "x").unwrap_err();
        assert!(matches!(e, Error::Internal(_)));
        assert_eq!(job.message, "cancelled");
        assert_eq!(state_name(JobState::Rendezvous), "rendezvous");
    }
}
