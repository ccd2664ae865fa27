//! The single owner of the coordinator's mutable state: the pure [`Core`] behind one lock, the
//! tick loop, and persistence.
//!
//! Every operation runs through [`Scheduler::apply`]: take the lock, decide (the operation,
//! then a scheduling pass unless the operation ended with one), write every durable change of that decision in one redb write
//! transaction on a blocking thread, broadcast the changed jobs to watchers, release the lock.
//! Holding the lock across the write is what keeps the store in the order the changes were
//! decided: a cancel and a commit racing each other are two decisions, one after the other,
//! each written before the next is made, so none overwrites the other with stale state.
//! Liveness-only changes (heartbeat times, a delivered assignment) write nothing.
//!
//! A failed write leaves memory ahead of the store. Nothing can repair that in place, so the
//! scheduler refuses every later operation (`INTERNAL`) and reports the failure to the server,
//! which stops: a restart rebuilds the state from the store, the path the design already
//! covers (workers re-attach).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use protodino_proto::v1::Job;
use tokio::sync::{Mutex, broadcast, watch};

use crate::core::{Changes, Core, CoreConfig, RETAIN_FINISHED, Secrets, Snapshot, job_fsm};
use crate::error::Error;
use crate::store::{Batch, LedgerRecord, Store};

/// How often silent workers are expired and the queue is looked at even when nothing calls.
pub const TICK: Duration = Duration::from_millis(200);

pub struct Scheduler {
    core: Mutex<Core>,
    store: Arc<Store>,
    updates: broadcast::Sender<Job>,
    failed: watch::Sender<Option<String>>,
    /// What the API layer counts for `/metrics` (outside the core's lock).
    api_counts: crate::metrics::ApiCounts,
}

/// A group secret from the operating system's generator.
fn os_secret() -> Result<[u8; 32], String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| e.to_string())?;
    Ok(b)
}

/// Logs a decision with its subject as a structured field: `job_id` for a job, `worker` (and
/// `worker_name`, plus the `job_id` and `membership_epoch` of the session it now belongs to)
/// for a worker.
fn log_note(core: &Core, n: &crate::core::Note) {
    if core.job(&n.subject).is_some() {
        tracing::info!(job_id = %n.subject, "{}", n.text);
    } else if let Some(w) = core.pool().get(&n.subject) {
        let session = w.state.session();
        tracing::info!(
            worker = %n.subject,
            worker_name = %w.name,
            job_id = session.map(|(job, _)| job),
            membership_epoch = session.map(|(_, epoch)| epoch),
            "{}",
            n.text
        );
    } else {
        tracing::info!(subject = %n.subject, "{}", n.text);
    }
}

pub fn timestamp_now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now())
}

impl Scheduler {
    /// Load the store and rebuild the state (memberships of running jobs are kept, so their
    /// members can re-attach).
    pub async fn open(store: Arc<Store>, cfg: CoreConfig) -> Result<Arc<Self>, Error> {
        let s = store.clone();
        let loaded = tokio::task::spawn_blocking(move || s.load(RETAIN_FINISHED))
            .await
            .map_err(|e| Error::Internal(format!("loading the store: {e}")))??;
        let mut ch = Changes::default();
        let core = Core::restore(
            cfg,
            Instant::now(),
            loaded.jobs,
            loaded.idempotency,
            loaded.history,
            &mut ch,
        );
        let (updates, _) = broadcast::channel(1024);
        let (failed, _) = watch::channel(None);
        let scheduler = Arc::new(Self {
            core: Mutex::new(core),
            store,
            updates,
            failed,
            api_counts: Default::default(),
        });
        {
            let mut core = scheduler.core.lock().await;
            scheduler.commit(&mut core, ch).await?;
        }
        Ok(scheduler)
    }

    /// Run `op` on the state at the current time, then schedule, then persist what changed.
    /// The durable changes are written even when `op` fails (an operation validates before it
    /// changes anything, but a scheduling pass may still have decided something).
    pub async fn apply<R>(
        &self,
        op: impl FnOnce(&mut Core, Instant, Secrets, &mut Changes) -> Result<R, Error>,
    ) -> Result<R, Error> {
        if let Some(why) = self.failed.borrow().as_ref() {
            return Err(Error::Internal(format!(
                "the store failed ({why}); the coordinator is stopping"
            )));
        }
        let mut core = self.core.lock().await;
        let now = Instant::now();
        let mut ch = Changes::default();
        let mut draw = os_secret;
        let result = op(&mut core, now, &mut draw, &mut ch);
        let scheduled = if ch.scheduled {
            Ok(())
        } else {
            core.schedule(now, &mut draw, &mut ch)
        };
        self.commit(&mut core, ch).await?;
        scheduled?;
        result
    }

    /// Read the state (no write, no scheduling).
    pub async fn read<R>(&self, f: impl FnOnce(&Core) -> R) -> R {
        f(&*self.core.lock().await)
    }

    /// A blocking read of the store, off the runtime's threads.
    async fn read_store<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<R, crate::store::StoreError> + Send + 'static,
    ) -> Result<R, Error> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Error::Internal(format!("reading the store: {e}")))?
            .map_err(|e| Error::Store(e.to_string()))
    }

    /// A job as it is now: from memory, or from the store once it has finished and left
    /// memory (every change is in the store before it is answered, so both agree).
    pub async fn job(&self, id: &str) -> Result<Job, Error> {
        match self
            .read(|core| core.lookup(id).map(|e| e.record.clone()))
            .await
        {
            Err(Error::NotFound(why)) => {
                let key = id.to_string();
                self.read_store(move |s| s.get(&key))
                    .await?
                    .ok_or(Error::NotFound(why))
            }
            other => other,
        }
    }

    /// The job that an earlier submission of `spec` created (see [`Core::resubmitted`]),
    /// looked up in the store too when its job has left memory.
    pub async fn resubmitted(
        &self,
        spec: &protodino_proto::v1::JobSpec,
    ) -> Result<Option<Job>, Error> {
        let in_memory = self
            .read(|core| core.resubmitted(spec).map(|e| e.map(|e| e.record.clone())))
            .await?;
        if in_memory.is_some() || spec.idempotency_key.is_empty() {
            return Ok(in_memory);
        }
        let key = spec.idempotency_key.clone();
        let Some(first) = self.read_store(move |s| s.job_of_key(&key)).await? else {
            return Ok(None);
        };
        crate::core::same_submission(&first, spec)?;
        Ok(Some(first))
    }

    /// A page of jobs in id order, from the store (which holds every job, finished or not).
    pub async fn list(&self, state: i32, after: &str, limit: usize) -> Result<Vec<Job>, Error> {
        let after = after.to_string();
        self.read_store(move |s| s.list(state, &after, limit)).await
    }

    /// The current job and a receiver of every later change. Both are taken under the lock
    /// that every broadcast happens under, so no change falls between them. A job that left
    /// memory is final: it comes from the store, and no change follows.
    pub async fn watch(&self, id: &str) -> Result<(Job, broadcast::Receiver<Job>), Error> {
        {
            let core = self.core.lock().await;
            let rx = self.updates.subscribe();
            match core.lookup(id) {
                Ok(e) => return Ok((e.record.clone(), rx)),
                Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let job = self.job(id).await?;
        if !job_fsm::is_final(job_fsm::state_of(&job)) {
            return Err(Error::Internal(format!(
                "job {id} is not final but not in memory"
            )));
        }
        Ok((job, self.updates.subscribe()))
    }

    pub async fn snapshot(&self) -> Snapshot {
        self.core.lock().await.snapshot()
    }

    /// The API layer's counters (submissions by result, refused tokens).
    pub fn api_counts(&self) -> &crate::metrics::ApiCounts {
        &self.api_counts
    }

    /// Resolves with the reason once a store write failed.
    pub fn failure(&self) -> watch::Receiver<Option<String>> {
        self.failed.subscribe()
    }

    /// Expire and schedule every [`TICK`] until the store fails.
    pub async fn run_ticks(self: Arc<Self>) {
        let mut every = tokio::time::interval(TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let res = self
                .apply(|core, now, secrets, ch| core.tick(now, secrets, ch))
                .await;
            if let Err(e) = res {
                tracing::error!("scheduler tick: {e}");
                if self.failed.borrow().is_some() {
                    return;
                }
            }
        }
    }

    /// Log the decisions, write the durable changes in one transaction, then tell watchers.
    async fn commit(&self, core: &mut Core, ch: Changes) -> Result<(), Error> {
        for n in &ch.notes {
            log_note(core, n);
        }
        for (job_id, r) in &ch.recovered {
            tracing::info!(
                job_id = %job_id,
                reason = %r.reason,
                epoch_before = r.epoch_before,
                epoch_after = r.epoch_after,
                members_before = %r.members_before.join(","),
                members_after = %r.members_after.join(","),
                resumed_from = %r.resumed_from,
                resume_step = r.resume_step,
                steps_redone = r.steps_redone,
                seconds = r.seconds,
                "recovered: {} ({} → {} members) in {:.2} s, {} step(s) redone",
                r.reason,
                r.members_before.len(),
                r.members_after.len(),
                r.seconds,
                r.steps_redone
            );
        }
        if !ch.is_durable() {
            return Ok(());
        }
        let stamp = timestamp_now();
        let mut batch = Batch {
            idempotency: ch.idempotency,
            ..Default::default()
        };
        for id in &ch.jobs {
            if let Some(record) = core.record_mut(id) {
                record.updated_at = Some(stamp);
                for r in record
                    .recoveries
                    .iter_mut()
                    .filter(|r| r.detected_at.is_none())
                {
                    r.detected_at = Some(stamp);
                }
                batch.jobs.push(record.clone());
            }
        }
        for id in &ch.ledgers {
            if let Some(e) = core.job(id) {
                batch
                    .ledgers
                    .push((id.clone(), LedgerRecord::from(&e.ledger)));
            }
        }
        let store = self.store.clone();
        let written = tokio::task::spawn_blocking(move || store.write(&batch).map(|()| batch))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match written {
            Ok(batch) => {
                for job in batch.jobs {
                    // No receiver is fine: nobody watches.
                    let _ = self.updates.send(job);
                }
                // Finished jobs beyond the retained ones are now safely in the store.
                core.retire();
                Ok(())
            }
            Err(why) => {
                tracing::error!("store write failed, stopping: {why}");
                self.failed.send_replace(Some(why.clone()));
                Err(Error::Store(why))
            }
        }
    }
}
