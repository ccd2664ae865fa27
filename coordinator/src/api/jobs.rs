//! `JobService` (users, job token): submit, get, list, cancel, watch.
//!
//! Submission does the slow part — reading the preset, opening the training set to fix the
//! plan's dataset size — on a blocking thread before it takes the scheduler's lock, so a large
//! data set never holds up workers' heartbeats. Reads are served from memory.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use protodino_proto::v1::job_service_server::JobService;
use protodino_proto::v1::{
    CancelJobRequest, GetJobRequest, Job, JobEvent, ListJobsRequest, ListJobsResponse,
    SubmitJobRequest, SubmitJobResponse, WatchJobRequest,
};
use tokio_stream::{Stream, StreamExt, wrappers::BroadcastStream};
use tonic::{Request, Response, Status};

use crate::core::{Ledger, NewJob, Plan, job_fsm};
use crate::error::Error;
use crate::metrics::Submission;
use crate::scheduler::{Scheduler, timestamp_now};
use crate::validation::{dataset_size, validate_spec};

pub struct JobsApi {
    scheduler: Arc<Scheduler>,
    configs_dir: PathBuf,
    data_root: PathBuf,
    max_workers: i32,
}

impl JobsApi {
    pub fn new(
        scheduler: Arc<Scheduler>,
        configs_dir: PathBuf,
        data_root: PathBuf,
        max_workers: i32,
    ) -> Self {
        Self {
            scheduler,
            configs_dir,
            data_root,
            max_workers,
        }
    }
}

impl JobsApi {
    /// The job as stored now: an operation's answer is read after its scheduling pass and its
    /// write, so it equals what `GetJob` returns next.
    async fn current(&self, id: &str) -> Result<Job, Error> {
        self.scheduler.job(id).await
    }

    /// A submission: the job it created (or, for a repeated idempotency key with the same spec,
    /// the first job), and how it is counted.
    async fn submit(&self, req: SubmitJobRequest) -> Result<(Job, Submission), Error> {
        let spec = req.spec.ok_or_else(|| Error::invalid("spec", "missing"))?;
        // A repeated key is answered without re-opening the data set.
        if let Some(first) = self.scheduler.resubmitted(&spec).await? {
            let job = self.current(&first.job_id).await?;
            return Ok((job, Submission::Duplicate));
        }
        let (configs, data_root, max) = (
            self.configs_dir.clone(),
            self.data_root.clone(),
            self.max_workers,
        );
        let checked = spec.clone();
        let (valid, images) = tokio::task::spawn_blocking(move || -> Result<_, Error> {
            let valid = validate_spec(&checked, &configs, max)?;
            let images = dataset_size(&valid.config, valid.global_batch, &data_root)?;
            Ok((valid, images))
        })
        .await
        .map_err(|e| Error::Internal(format!("validating a spec: {e}")))??;

        let cfg = &valid.config;
        let plan = Plan::new(
            cfg.train.seed,
            images,
            valid.global_batch.max(0) as u64,
            cfg.train.epochs,
            cfg.train.max_steps,
        )?;
        let job_id = new_job_id();
        let checkpoint_dir = format!("{}/{job_id}", cfg.train.output_dir.trim_end_matches('/'));
        let mut ledger = Ledger::new(
            plan,
            valid.min_world_size,
            valid.max_world_size,
            checkpoint_dir,
        );
        ledger.checkpoint_keep = cfg.train.checkpoint_keep.max(1) as usize;
        let resolved = serde_json::to_string(cfg)
            .map_err(|e| Error::Internal(format!("serialising the configuration: {e}")))?;
        let new_id = job_id.clone();
        let new = NewJob::new(job_id, spec, resolved, ledger, timestamp_now());
        let id = self
            .scheduler
            .apply(move |core, _, _, ch| core.submit(new, ch).map(|j| j.job_id))
            .await?;
        // Two submissions racing with one key: the second is answered with the first job.
        let result = if id == new_id {
            Submission::Accepted
        } else {
            Submission::Duplicate
        };
        Ok((self.current(&id).await?, result))
    }
}

/// Ids sort by creation time: milliseconds since the epoch, then random bits.
fn new_job_id() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!(
        "job-{ms:013x}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

fn is_final(job: &Job) -> bool {
    job_fsm::is_final(job_fsm::state_of(job))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for JobsApi {
    /// Every submission that passed authentication is counted by its result.
    async fn submit_job(
        &self,
        req: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        let answer = self.submit(req.into_inner()).await;
        let counts = self.scheduler.api_counts();
        match answer {
            Ok((job, result)) => {
                counts.submission(result);
                Ok(Response::new(SubmitJobResponse { job: Some(job) }))
            }
            Err(e) => {
                counts.submission(Submission::of_error(&e));
                Err(e.into())
            }
        }
    }

    async fn get_job(&self, req: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        Ok(Response::new(self.current(&req.into_inner().job_id).await?))
    }

    async fn list_jobs(
        &self,
        req: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let r = req.into_inner();
        if !(0..=1000).contains(&r.page_size) {
            return Err(Error::invalid(
                "page_size",
                format!("{} is outside [0, 1000]", r.page_size),
            )
            .into());
        }
        let size = if r.page_size == 0 {
            100
        } else {
            r.page_size as usize
        };
        let mut jobs = self
            .scheduler
            .list(r.state, &r.page_token, size + 1)
            .await?;
        let next = if jobs.len() > size {
            jobs[size - 1].job_id.clone()
        } else {
            String::new()
        };
        jobs.truncate(size);
        Ok(Response::new(ListJobsResponse {
            jobs,
            next_page_token: next,
        }))
    }

    async fn cancel_job(&self, req: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        let r = req.into_inner();
        let id = self
            .scheduler
            .apply(move |core, _, _, ch| core.cancel(&r.job_id, &r.reason, ch).map(|j| j.job_id))
            .await?;
        Ok(Response::new(self.current(&id).await?))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        req: Request<WatchJobRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let (current, rx) = self.scheduler.watch(&req.into_inner().job_id).await?;
        let id = current.job_id.clone();
        let done = is_final(&current);
        let first = tokio_stream::once(Ok(JobEvent {
            job: Some(current),
            at: Some(timestamp_now()),
        }));
        if done {
            return Ok(Response::new(Box::pin(first)));
        }
        let updates = BroadcastStream::new(rx)
            .filter_map(move |u| match u {
                Ok(job) if job.job_id == id => Some(Ok(job)),
                Ok(_) => None,
                Err(e) => Some(Err(Status::unavailable(format!(
                    "watch fell behind: {e}; watch again"
                )))),
            })
            .take_while_inclusive(|r| r.as_ref().is_ok_and(|j| !is_final(j)))
            .map(|r| {
                r.map(|job| JobEvent {
                    job: Some(job),
                    at: Some(timestamp_now()),
                })
            });
        Ok(Response::new(Box::pin(first.chain(updates))))
    }
}

/// `take_while` that also yields the first item failing the predicate (the final state), so a
/// watch ends right after showing how the job ended.
trait TakeWhileInclusive: Stream + Sized {
    fn take_while_inclusive<F: FnMut(&Self::Item) -> bool>(
        self,
        f: F,
    ) -> InclusiveTakeWhile<Self, F> {
        InclusiveTakeWhile {
            inner: self,
            f,
            done: false,
        }
    }
}
impl<S: Stream> TakeWhileInclusive for S {}

struct InclusiveTakeWhile<S, F> {
    inner: S,
    f: F,
    done: bool,
}

impl<S: Stream + Unpin, F: FnMut(&S::Item) -> bool + Unpin> Stream for InclusiveTakeWhile<S, F> {
    type Item = S::Item;
    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        if self.done {
            return std::task::Poll::Ready(None);
        }
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_next(cx) {
            std::task::Poll::Ready(Some(item)) => {
                if !(this.f)(&item) {
                    this.done = true;
                }
                std::task::Poll::Ready(Some(item))
            }
            other => other,
        }
    }
}
