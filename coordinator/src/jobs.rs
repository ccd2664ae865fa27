//! `JobService`: thin handlers over the validation module and the store. Status codes:
//! INVALID_ARGUMENT for a bad spec or request, NOT_FOUND for an unknown id, ALREADY_EXISTS is
//! never needed (a repeated idempotency key returns the first job), FAILED_PRECONDITION for
//! cancelling a finished job, INTERNAL only for a broken store.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use protodino_proto::v1::job_service_server::JobService;
use protodino_proto::v1::{
    CancelJobRequest, GetJobRequest, Job, JobEvent, JobState, ListJobsRequest, ListJobsResponse,
    Progress, SubmitJobRequest, SubmitJobResponse, WatchJobRequest,
};
use tokio::sync::broadcast;
use tokio_stream::{Stream, StreamExt, wrappers::BroadcastStream};
use tonic::{Request, Response, Status};

use crate::store::{Store, StoreError};
use crate::validation::validate_spec;

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        Status::internal(e.to_string())
    }
}

pub struct Jobs {
    store: Arc<Store>,
    configs_dir: PathBuf,
    max_workers: i32,
    updates: broadcast::Sender<Job>,
}

fn now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now())
}

fn is_final(state: i32) -> bool {
    [JobState::Succeeded, JobState::Failed, JobState::Cancelled]
        .iter()
        .any(|s| *s as i32 == state)
}

impl Jobs {
    pub fn new(store: Arc<Store>, configs_dir: PathBuf, max_workers: i32) -> Self {
        let (updates, _) = broadcast::channel(1024);
        Self {
            store,
            configs_dir,
            max_workers,
            updates,
        }
    }

    fn lookup(&self, id: &str) -> Result<Job, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument(
                "invalid `job_id`: must not be empty",
            ));
        }
        self.store
            .get(id)?
            .ok_or_else(|| Status::not_found(format!("no job {id:?}")))
    }

    fn save(&self, job: &Job, key: Option<&str>) -> Result<(), Status> {
        self.store.put(job, key)?;
        let _ = self.updates.send(job.clone());
        Ok(())
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

type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for Jobs {
    async fn submit_job(
        &self,
        req: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        let spec = req
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("invalid `spec`: missing"))?;
        validate_spec(&spec, &self.configs_dir, self.max_workers)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let key = (!spec.idempotency_key.is_empty()).then(|| spec.idempotency_key.clone());
        if let Some(k) = &key
            && let Some(id) = self.store.by_idempotency_key(k)?
        {
            let job = self.lookup(&id)?;
            return Ok(Response::new(SubmitJobResponse { job: Some(job) }));
        }
        let t = now();
        let job = Job {
            job_id: new_job_id(),
            spec: Some(spec),
            state: JobState::Queued as i32,
            progress: Some(Progress::default()),
            message: "queued: waiting for workers".into(),
            created_at: Some(t),
            updated_at: Some(t),
            checkpoints: vec![],
        };
        self.save(&job, key.as_deref())?;
        tracing::info!(job_id = %job.job_id, "job submitted");
        Ok(Response::new(SubmitJobResponse { job: Some(job) }))
    }

    async fn get_job(&self, req: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        Ok(Response::new(self.lookup(&req.into_inner().job_id)?))
    }

    async fn list_jobs(
        &self,
        req: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let r = req.into_inner();
        if !(0..=1000).contains(&r.page_size) {
            return Err(Status::invalid_argument(format!(
                "invalid `page_size`: {} is outside [0, 1000]",
                r.page_size
            )));
        }
        let size = if r.page_size == 0 {
            100
        } else {
            r.page_size as usize
        };
        let mut jobs: Vec<Job> = self
            .store
            .list()?
            .into_iter()
            .filter(|j| r.state == 0 || j.state == r.state)
            .filter(|j| r.page_token.is_empty() || j.job_id.as_str() > r.page_token.as_str())
            .collect();
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
        let mut job = self.lookup(&req.into_inner().job_id)?;
        if is_final(job.state) {
            return Err(Status::failed_precondition(format!(
                "job {} is already {:?}",
                job.job_id,
                JobState::try_from(job.state).unwrap_or(JobState::Unspecified)
            )));
        }
        job.state = JobState::Cancelled as i32;
        job.message = "cancelled by the user".into();
        job.updated_at = Some(now());
        self.save(&job, None)?;
        Ok(Response::new(job))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        req: Request<WatchJobRequest>,
    ) -> Result<Response<EventStream>, Status> {
        // Subscribe before reading the current state so no change in between is missed.
        let rx = self.updates.subscribe();
        let current = self.lookup(&req.into_inner().job_id)?;
        let id = current.job_id.clone();
        let done = is_final(current.state);
        let first = tokio_stream::once(Ok(JobEvent {
            job: Some(current),
            at: Some(now()),
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
            .take_while_inclusive(|r| r.as_ref().is_ok_and(|j| !is_final(j.state)))
            .map(|r| {
                r.map(|job| JobEvent {
                    job: Some(job),
                    at: Some(now()),
                })
            });
        Ok(Response::new(Box::pin(first.chain(updates))))
    }
}

/// `take_while` that also yields the first item failing the predicate (the final state).
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

pub struct InclusiveTakeWhile<S, F> {
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
