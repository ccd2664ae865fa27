//! The report queue: step, checkpoint, failure and result reports leave in the order the
//! sessions produced them, one at a time, each retried (with backoff) until the coordinator has
//! it. Training never waits for it — sessions push from their own thread and go on — so while
//! the coordinator is away the reports pile up here in order and leave when it is back (reports
//! are idempotent on the coordinator's side, so a retry after a lost answer is harmless).
//!
//! Answers flow back to the job they concern: a step acknowledgement's watermark and `stop`, an
//! `ABORTED` (that membership no longer exists: stop its session), `NOT_FOUND` (register again,
//! then retry).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Result, bail};
use protodino_proto::v1::{CheckpointReport, FailureReport, ResultReport, StepReport};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::backoff::Backoff;
use super::client::{Disposition, describe, disposition};
use super::job::JobShared;
use super::state::Agent;

pub enum Report {
    Step(StepReport),
    Checkpoint(CheckpointReport),
    Failure(FailureReport),
    Result(ResultReport),
}

impl Report {
    fn membership_epoch(&self) -> i64 {
        match self {
            Self::Step(r) => r.membership_epoch,
            Self::Checkpoint(r) => r.membership_epoch,
            Self::Failure(r) => r.membership_epoch,
            Self::Result(r) => r.membership_epoch,
        }
    }

    fn what(&self) -> String {
        match self {
            Self::Step(r) => format!("step {} report", r.step),
            Self::Checkpoint(r) => format!(
                "checkpoint report (step {})",
                r.checkpoint.as_ref().map_or(0, |c| c.step)
            ),
            Self::Failure(_) => "failure report".into(),
            Self::Result(_) => "result report".into(),
        }
    }
}

/// Runs on the queue once everything queued before it is delivered (or given up).
pub type AfterDelivery = Box<dyn FnOnce() + Send>;

enum Item {
    Report(Box<Report>),
    Then(AfterDelivery),
}

struct Envelope {
    item: Item,
    job: Arc<JobShared>,
}

/// The sessions' end of the queue.
#[derive(Clone)]
pub struct ReportSender {
    tx: UnboundedSender<Envelope>,
    depth: Arc<AtomicUsize>,
}

impl ReportSender {
    /// Queues `report` about `job` (never blocks).
    pub fn send(&self, job: &Arc<JobShared>, report: Report) {
        self.push(job, Item::Report(Box::new(report)));
    }

    /// Runs `f` once every report queued so far has left (a session's end becomes visible to
    /// the coordinator only after its last reports, so it never sees an idle worker whose
    /// final steps or failure are still on their way).
    pub fn then(&self, job: &Arc<JobShared>, f: AfterDelivery) {
        self.push(job, Item::Then(f));
    }

    fn push(&self, job: &Arc<JobShared>, item: Item) {
        self.depth.fetch_add(1, Ordering::SeqCst);
        let env = Envelope {
            item,
            job: job.clone(),
        };
        if self.tx.send(env).is_err() {
            // The agent is shutting down; nothing will be sent any more.
            self.depth.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Reports queued and not yet delivered (or given up).
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }
}

pub struct ReportQueue {
    rx: UnboundedReceiver<Envelope>,
    depth: Arc<AtomicUsize>,
}

pub fn report_queue() -> (ReportSender, ReportQueue) {
    let (tx, rx) = unbounded_channel();
    let depth = Arc::new(AtomicUsize::new(0));
    (
        ReportSender {
            tx,
            depth: depth.clone(),
        },
        ReportQueue { rx, depth },
    )
}

impl ReportQueue {
    /// Delivers reports in order until the agent ends; an error means the agent must stop
    /// (the coordinator refuses this worker's credentials).
    pub async fn run(mut self, agent: Arc<Agent>) -> Result<()> {
        while let Some(env) = self.rx.recv().await {
            let delivered = match env.item {
                Item::Report(report) => deliver(&agent, &report, &env.job).await,
                Item::Then(f) => {
                    f();
                    Ok(())
                }
            };
            self.depth.fetch_sub(1, Ordering::SeqCst);
            delivered?;
        }
        Ok(())
    }
}

async fn deliver(agent: &Agent, report: &Report, job: &JobShared) -> Result<()> {
    let mut backoff = Backoff::default();
    let epoch = report.membership_epoch();
    // NOT_FOUND right after registering again names the job, not this worker.
    let mut registered_again = false;
    loop {
        let generation = agent.generation();
        let worker_id = agent.worker_id();
        let mut client = agent.client();
        let sent = match report {
            Report::Step(r) => {
                let r = StepReport {
                    worker_id,
                    ..r.clone()
                };
                client.report_step(r).await.map(|ack| {
                    let ack = ack.into_inner();
                    job.observe_watermark(ack.committed_step);
                    if ack.stop {
                        job.stop(epoch);
                    }
                })
            }
            Report::Checkpoint(r) => {
                let r = CheckpointReport {
                    worker_id,
                    ..r.clone()
                };
                client.report_checkpoint(r).await.map(|_| ())
            }
            Report::Failure(r) => {
                let r = FailureReport {
                    worker_id,
                    ..r.clone()
                };
                client.report_failure(r).await.map(|_| ())
            }
            Report::Result(r) => {
                let r = ResultReport {
                    worker_id,
                    ..r.clone()
                };
                client.report_result(r).await.map(|_| ())
            }
        };
        let status = match sent {
            Ok(()) => return Ok(()),
            Err(s) => s,
        };
        let what = report.what();
        match disposition(&status) {
            Disposition::Retry => {
                tracing::debug!(
                    job_id = %job.job_id,
                    worker = %agent.worker_id(),
                    membership_epoch = epoch,
                    "{what}: {}; retrying",
                    describe(&status)
                );
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Disposition::Reregister if !registered_again => {
                agent.register(Some(generation)).await?;
                registered_again = true;
            }
            Disposition::Stale => {
                tracing::info!(
                    job_id = %job.job_id,
                    worker = %agent.worker_id(),
                    membership_epoch = epoch,
                    "{what} of job {} (membership {epoch}): {}; stopping that session",
                    job.job_id,
                    describe(&status)
                );
                job.stop(epoch);
                return Ok(());
            }
            Disposition::Reject | Disposition::Reregister => {
                tracing::warn!(
                    job_id = %job.job_id,
                    worker = %agent.worker_id(),
                    membership_epoch = epoch,
                    "{what} refused: {}",
                    describe(&status)
                );
                if matches!(report, Report::Step(_)) {
                    // The coordinator will not take this session's steps: end it.
                    job.stop(epoch);
                }
                return Ok(());
            }
            Disposition::Fatal => bail!("the coordinator refused a {what}: {}", describe(&status)),
        }
    }
}
