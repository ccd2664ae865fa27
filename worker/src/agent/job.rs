//! One job on this worker: the OS thread that owns its replica ([`JobHandle`]) and the few
//! values the async agent and that thread share ([`JobShared`]).
//!
//! The thread runs one session per assignment of the job, one after the other, keeping the
//! replica in memory between them (a regroup hands a new assignment of the same job to the same
//! thread); a job change retires the thread, and the next job's thread starts only once the old
//! one has let go of the collective listener. The agent never waits for the thread: it sets
//! flags (the stop vote, retirement), reads the session's status for heartbeats, and feeds the
//! watermark from step acknowledgements.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use protodino_proto::v1::{Assignment, WorkerPhase};

use super::session::{JobRunner, SessionContext};

/// What a heartbeat says about the session (or, when idle, about the replica).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionStatus {
    pub phase: WorkerPhase,
    pub membership_epoch: i64,
    /// Steps the replica has completed.
    pub completed_step: i64,
    /// Idle: the end-of-session hash of the replica; empty while training, or when the replica
    /// is invalid (a failure left it half-updated) or gone.
    pub state_hash: Vec<u8>,
}

/// Shared between the agent and a job's thread.
pub struct JobShared {
    pub job_id: String,
    /// Sessions whose membership epoch is at most this vote to stop.
    stop_through: AtomicI64,
    watermark: Mutex<i64>,
    changed: Condvar,
    retired: AtomicBool,
    status: Mutex<SessionStatus>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these plain values inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl JobShared {
    pub fn new(a: &Assignment) -> Self {
        Self {
            job_id: a.job_id.clone(),
            stop_through: AtomicI64::new(i64::MIN),
            watermark: Mutex::new(a.resume_step),
            changed: Condvar::new(),
            retired: AtomicBool::new(false),
            status: Mutex::new(SessionStatus {
                phase: WorkerPhase::Training,
                membership_epoch: a.membership_epoch,
                completed_step: a.resume_step,
                state_hash: Vec::new(),
            }),
        }
    }

    /// Every session of this job with membership epoch `<= epoch` stops at its next step
    /// boundary.
    pub fn stop(&self, epoch: i64) {
        self.stop_through.fetch_max(epoch, Ordering::SeqCst);
        self.changed.notify_all();
    }

    pub fn stop_requested(&self, epoch: i64) -> bool {
        self.stop_through.load(Ordering::SeqCst) >= epoch
    }

    /// The job moved away from this worker (another job, or `stop` while idle).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        self.stop(i64::MAX);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// The ledger's watermark as a step acknowledgement reported it (only ever rises).
    pub fn observe_watermark(&self, committed: i64) {
        let mut w = lock(&self.watermark);
        if committed > *w {
            *w = committed;
            self.changed.notify_all();
        }
    }

    pub fn watermark(&self) -> i64 {
        *lock(&self.watermark)
    }

    /// Waits up to `timeout` for the watermark to reach `step` (or a stop / retirement);
    /// returns the watermark.
    pub fn wait_watermark(&self, step: i64, timeout: Duration) -> i64 {
        let deadline = Instant::now() + timeout;
        let mut w = lock(&self.watermark);
        while *w < step && !self.is_retired() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            w = self
                .changed
                .wait_timeout(w, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *w
    }

    pub fn status(&self) -> SessionStatus {
        lock(&self.status).clone()
    }

    pub fn update_status(&self, f: impl FnOnce(&mut SessionStatus)) {
        f(&mut lock(&self.status));
    }
}

/// The span every line of one session is logged in (`docs/service.md`, "Logs"): entered on the
/// job's thread around the session, so every event of the session carries the job, this
/// worker, its rank and the membership epoch. ERROR level, so that no log filter that lets any
/// line through drops the span and its fields.
pub fn session_span(a: &Assignment, worker: &str, worker_name: &str) -> tracing::Span {
    tracing::error_span!(
        "session",
        job_id = %a.job_id,
        worker = %worker,
        worker_name = %worker_name,
        rank = a.rank,
        world_size = a.world_size,
        membership_epoch = a.membership_epoch,
    )
}

enum Command {
    /// The next assignment and the span its session runs in ([`session_span`]).
    Assign(Box<Assignment>, tracing::Span),
    /// Let go of the replica and end the thread.
    Drop,
}

/// The agent's handle of a job's thread.
pub struct JobHandle {
    pub shared: Arc<JobShared>,
    /// Highest membership epoch handed to the thread.
    pub latest_epoch: i64,
    commands: Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl JobHandle {
    /// Starts the thread of `first`'s job; it first waits for `previous` (the retired job's
    /// thread) to end.
    pub fn spawn(
        first: Assignment,
        span: tracing::Span,
        previous: Option<JoinHandle<()>>,
        ctx: SessionContext,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(JobShared::new(&first));
        let (tx, rx) = channel();
        let latest_epoch = first.membership_epoch;
        // Made here, right after the agent started the job's metrics, not once the previous
        // thread is gone: the runner resolves its `/metrics` series for this job change.
        let runner = JobRunner::new(ctx, shared.clone());
        let thread = std::thread::Builder::new()
            .name(format!("protodino-job-{}", first.job_id))
            .spawn(move || {
                if let Some(p) = previous {
                    let _ = p.join();
                }
                job_thread((first, span), rx, runner);
            })?;
        Ok(Self {
            shared,
            latest_epoch,
            commands: tx,
            thread: Some(thread),
        })
    }

    /// Hands a newer assignment of the same job over: the running session (if any) stops at
    /// its next step boundary and the thread takes this one next. False when the thread is
    /// gone.
    pub fn reassign(&mut self, a: Assignment, span: tracing::Span) -> bool {
        self.shared.stop(self.latest_epoch);
        self.latest_epoch = a.membership_epoch;
        self.shared.update_status(|s| {
            s.phase = WorkerPhase::Training;
            s.membership_epoch = a.membership_epoch;
            s.state_hash.clear();
        });
        self.commands
            .send(Command::Assign(Box::new(a), span))
            .is_ok()
    }

    /// Retires the job: its session stops at the next step boundary, the replica is dropped;
    /// returns the thread to wait for before another job binds the listener.
    pub fn retire(mut self) -> Option<JoinHandle<()>> {
        self.shared.retire();
        let _ = self.commands.send(Command::Drop);
        self.thread.take()
    }
}

fn job_thread(
    first: (Assignment, tracing::Span),
    commands: Receiver<Command>,
    mut runner: JobRunner,
) {
    let mut next = Some(first);
    loop {
        let (mut a, mut span) = match next.take() {
            Some(first) => first,
            None => match commands.recv() {
                Ok(Command::Assign(a, span)) => (*a, span),
                Ok(Command::Drop) | Err(_) => return,
            },
        };
        // Only the newest of the assignments already waiting matters.
        while let Ok(cmd) = commands.try_recv() {
            match cmd {
                Command::Assign(b, s) => (a, span) = (*b, s),
                Command::Drop => return,
            }
        }
        if runner.shared().is_retired() {
            return;
        }
        // Every line of the session, on this thread, carries the span's fields.
        let _session = span.enter();
        runner.run(&a);
    }
}
