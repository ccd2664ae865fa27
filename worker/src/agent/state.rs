//! The agent's own state ([`Agent`]): who it is to the coordinator (registration, re-attaching
//! after a coordinator restart with its old id and the session it still runs), what its
//! heartbeats say, and what it does with the answers — start, hand over or retire a job's
//! thread, or ask a session to stop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Result, bail};
use protodino_proto::v1::heartbeat_response::Action;
use protodino_proto::v1::{
    Assignment, Capabilities, HeartbeatRequest, RegisterRequest, WorkerPhase,
};

use super::backoff::Backoff;
use super::client::{Disposition, WorkerClient, describe, disposition};
use super::job::{JobHandle, session_span};
use super::session::SessionContext;

/// What a heartbeat described, to interpret its answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    pub job_id: String,
    pub membership_epoch: i64,
    pub phase: WorkerPhase,
}

pub struct Agent {
    client: WorkerClient,
    name: String,
    capabilities: Capabilities,
    worker_id: Mutex<String>,
    /// Bumped by every successful registration.
    generation: AtomicU64,
    registering: tokio::sync::Mutex<()>,
    heartbeat_ms: AtomicU64,
    job: Mutex<Option<JobHandle>>,
    ctx: SessionContext,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Agent {
    pub fn new(
        client: WorkerClient,
        name: String,
        capabilities: Capabilities,
        ctx: SessionContext,
    ) -> Self {
        Self {
            client,
            name,
            capabilities,
            worker_id: Mutex::new(String::new()),
            generation: AtomicU64::new(0),
            registering: tokio::sync::Mutex::new(()),
            heartbeat_ms: AtomicU64::new(1000),
            job: Mutex::new(None),
            ctx,
        }
    }

    pub fn client(&self) -> WorkerClient {
        self.client.clone()
    }

    pub fn worker_id(&self) -> String {
        lock(&self.worker_id).clone()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.load(Ordering::SeqCst))
    }

    pub fn wake(&self) -> Arc<tokio::sync::Notify> {
        self.ctx.wake.clone()
    }

    /// Registers — again, with the id it had and the session it runs, after a `NOT_FOUND` —
    /// unless another registration succeeded since generation `seen`. Retries while the
    /// coordinator is away; a refused join token is an error (the agent stops).
    pub async fn register(&self, seen: Option<u64>) -> Result<()> {
        let _one_at_a_time = self.registering.lock().await;
        if seen.is_some_and(|g| g != self.generation()) {
            return Ok(());
        }
        let mut backoff = Backoff::default();
        let mut warned = false;
        loop {
            let req = self.register_request();
            match self.client().register(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    if r.heartbeat_interval_ms > 0 {
                        self.heartbeat_ms
                            .store(r.heartbeat_interval_ms as u64, Ordering::SeqCst);
                    }
                    *lock(&self.worker_id) = r.worker_id.clone();
                    self.generation.fetch_add(1, Ordering::SeqCst);
                    tracing::info!(
                        worker = %r.worker_id,
                        worker_name = %self.name,
                        "registered as {}",
                        r.worker_id
                    );
                    return Ok(());
                }
                Err(s) => match disposition(&s) {
                    Disposition::Fatal | Disposition::Reject => {
                        bail!("registering with the coordinator: {}", describe(&s))
                    }
                    _ => {
                        if !warned {
                            tracing::warn!(
                                "coordinator not reachable ({}); retrying",
                                describe(&s)
                            );
                            warned = true;
                        }
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                },
            }
        }
    }

    fn register_request(&self) -> RegisterRequest {
        let mut req = RegisterRequest {
            worker_name: self.name.clone(),
            capabilities: Some(self.capabilities.clone()),
            worker_id: self.worker_id(),
            ..RegisterRequest::default()
        };
        if let Some(h) = lock(&self.job).as_ref() {
            let s = h.shared.status();
            req.job_id = h.shared.job_id.clone();
            req.membership_epoch = s.membership_epoch;
            req.committed_step = s.completed_step;
        }
        req
    }

    /// The next heartbeat: the running session, or the replica an idle worker still holds.
    pub fn heartbeat_request(&self) -> (HeartbeatRequest, Sent) {
        let mut req = HeartbeatRequest {
            worker_id: self.worker_id(),
            phase: WorkerPhase::Idle as i32,
            ..HeartbeatRequest::default()
        };
        if let Some(h) = lock(&self.job).as_ref() {
            let s = h.shared.status();
            req.job_id = h.shared.job_id.clone();
            req.membership_epoch = s.membership_epoch;
            req.committed_step = s.completed_step;
            req.phase = s.phase as i32;
            req.state_hash = s.state_hash;
        }
        let sent = Sent {
            job_id: req.job_id.clone(),
            membership_epoch: req.membership_epoch,
            phase: WorkerPhase::try_from(req.phase).unwrap_or(WorkerPhase::Idle),
        };
        (req, sent)
    }

    /// Acts on a heartbeat's answer.
    pub fn on_heartbeat(&self, action: Option<Action>, sent: &Sent) {
        match action {
            Some(Action::Assign(a)) => self.on_assign(a),
            Some(Action::Stop(true)) => self.on_stop(sent),
            Some(Action::Stop(false)) | Some(Action::KeepGoing(_)) | None => {}
        }
    }

    /// The coordinator stayed away past the grace: the running session stops at its next step
    /// boundary (its replica is kept). True when a session was told to.
    pub fn stop_for_outage(&self) -> bool {
        let slot = lock(&self.job);
        match slot.as_ref() {
            Some(h) if !h.shared.stop_requested(h.latest_epoch) => {
                h.shared.stop(h.latest_epoch);
                true
            }
            _ => false,
        }
    }

    /// `ABORTED`: the membership the heartbeat named no longer exists.
    pub fn on_stale(&self, sent: &Sent) {
        tracing::info!(
            job_id = %sent.job_id,
            worker = %self.worker_id(),
            membership_epoch = sent.membership_epoch,
            "job {} membership {} no longer exists",
            sent.job_id,
            sent.membership_epoch
        );
        self.on_stop(sent);
    }

    /// `stop`: a training session stops at its next step boundary; an idle replica is dropped.
    fn on_stop(&self, sent: &Sent) {
        let mut slot = lock(&self.job);
        let Some(h) = slot.as_ref() else { return };
        if h.shared.job_id != sent.job_id || h.latest_epoch != sent.membership_epoch {
            return; // the answer is about a session that has already been replaced
        }
        if sent.phase == WorkerPhase::Training {
            h.shared.stop(sent.membership_epoch);
        } else if let Some(h) = slot.take() {
            tracing::info!(
                job_id = %h.shared.job_id,
                worker = %self.worker_id(),
                "dropping the replica of job {}",
                h.shared.job_id
            );
            // The thread ends by itself; nothing waits for it here.
            drop(h.retire());
        }
    }

    fn on_assign(&self, a: Assignment) {
        // The assignment's own lines are logged in the session's span too.
        let span = session_span(&a, &self.worker_id(), &self.name);
        let mut slot = lock(&self.job);
        if let Some(h) = slot.as_mut()
            && h.shared.job_id == a.job_id
        {
            if a.membership_epoch <= h.latest_epoch {
                return; // the same assignment again
            }
            span.in_scope(|| {
                tracing::info!(
                    "job {}: new membership {} (rank {} of {})",
                    a.job_id,
                    a.membership_epoch,
                    a.rank,
                    a.world_size
                )
            });
            if h.reassign(a.clone(), span.clone()) {
                return;
            }
        }
        span.in_scope(|| {
            tracing::info!(
                "assigned job {} (membership {}, rank {} of {})",
                a.job_id,
                a.membership_epoch,
                a.rank,
                a.world_size
            )
        });
        let previous = slot.take().and_then(JobHandle::retire);
        self.ctx.metrics.start_job(&a.job_id);
        match JobHandle::spawn(a, span.clone(), previous, self.ctx.clone()) {
            Ok(h) => *slot = Some(h),
            Err(e) => span.in_scope(|| tracing::error!("cannot start a training thread: {e}")),
        }
    }
}
