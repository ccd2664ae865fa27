//! The job driver: jobs submitted, scheduled and cancelled through `JobService`, then the
//! check that none was lost.
//!
//! Each job is a task: `SubmitJob` (the cpu-demo preset, world `world`, global batch
//! `8 × world`, an idempotency key, so a submission retried after a timeout cannot make a
//! second job), then one job in ten is cancelled at once while it is still queued; the others
//! are polled with `GetJob` every second until their group formed (`RENDEZVOUS` or `RUNNING`
//! with members), left running for `lifetime` ±50 % (polled every 2 s), and cancelled. When
//! the load ends every task cancels its job at once. The check then lists every job
//! (`ListJobs`, all pages): each submitted one must be there and `CANCELLED`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Result;
use protodino_proto::v1::job_service_client::JobServiceClient;
use protodino_proto::v1::{
    CancelJobRequest, GetJobRequest, Job, JobSpec, JobState, ListJobsRequest, SubmitJobRequest,
};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::stats::Rpc;
use super::{Bearer, Recorder};

type Client = JobServiceClient<InterceptedService<Channel, Bearer>>;

/// Polling cadence while a job waits for its group, and while it runs.
const POLL_WAITING: Duration = Duration::from_secs(1);
const POLL_RUNNING: Duration = Duration::from_secs(2);
/// A job still queued after this is cancelled anyway.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Driver {
    pub channels: Vec<Channel>,
    pub auth: Bearer,
    pub rec: Arc<Recorder>,
    pub world: i32,
    pub max_active: usize,
    pub submit_every: Duration,
    pub lifetime: Duration,
    /// Makes this run's idempotency keys unique.
    pub run_tag: String,
}

/// What happened to one job.
#[derive(Debug, Clone, Default)]
pub struct JobLife {
    pub id: Option<String>,
    /// Submitted to be cancelled while queued.
    pub quick: bool,
    /// Seconds from submission until its group was seen formed.
    pub scheduled_after_s: Option<f64>,
    pub seen_running: bool,
    /// The state last seen before the cancel.
    pub state_before_cancel: i32,
    /// `CancelJob` succeeded.
    pub cancelled: bool,
    /// `CancelJob` found the job already final.
    pub already_final: bool,
}

/// The driver's result: every job's life and the final check.
#[derive(Debug, Default)]
pub struct JobsResult {
    pub lives: Vec<JobLife>,
    /// Jobs the coordinator lists at the end, by id: (state, idempotency key).
    pub listed: BTreeMap<String, (i32, String)>,
    pub lost: Vec<String>,
    pub inconsistent: Vec<String>,
    /// Jobs listed that no submission reported (a submission that timed out after the
    /// coordinator accepted it: found by its idempotency key).
    pub unreported: usize,
    /// Jobs still not final at the end that the check cancelled.
    pub cleanup_cancels: usize,
}

/// A well-mixed 64-bit function of `x` (splitmix64's finaliser): reproducible jitter.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A number in [0, 1) from `x`.
fn unit(x: u64) -> f64 {
    (mix(x) >> 11) as f64 / (1u64 << 53) as f64
}

fn is_final(state: i32) -> bool {
    [JobState::Succeeded, JobState::Failed, JobState::Cancelled]
        .iter()
        .any(|s| *s as i32 == state)
}

fn formed(job: &Job) -> bool {
    (job.state == JobState::Rendezvous as i32 || job.state == JobState::Running as i32)
        && !job.workers.is_empty()
}

/// Sleeps `d`; false when the load ended first.
async fn nap(d: Duration, end: &mut watch::Receiver<bool>) -> bool {
    if *end.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = end.changed() => false,
    }
}

/// Whether a failed call is worth repeating as it was.
fn transient(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::ResourceExhausted
    )
}

impl Driver {
    fn client(&self, n: usize) -> Client {
        JobServiceClient::with_interceptor(
            self.channels[n % self.channels.len()].clone(),
            self.auth.clone(),
        )
    }

    fn spec(&self, key: &str) -> JobSpec {
        JobSpec {
            preset: "cpu-demo".into(),
            min_world_size: Some(self.world),
            max_world_size: Some(self.world),
            global_batch_size: Some(8 * self.world),
            idempotency_key: key.into(),
            ..Default::default()
        }
    }

    /// Submits jobs until `until`, then cancels what is left and checks the coordinator's list.
    pub async fn run(self, until: Instant) -> Result<JobsResult> {
        let this = Arc::new(self);
        let (end_tx, end_rx) = watch::channel(false);
        let active = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        let mut every = tokio::time::interval(this.submit_every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n = 0usize;
        loop {
            every.tick().await;
            if Instant::now() >= until {
                break;
            }
            if active.load(Ordering::Relaxed) >= this.max_active {
                continue;
            }
            active.fetch_add(1, Ordering::Relaxed);
            n += 1;
            let (d, end, active) = (this.clone(), end_rx.clone(), active.clone());
            tasks.push(tokio::spawn(async move {
                let life = d.life(n, end).await;
                active.fetch_sub(1, Ordering::Relaxed);
                life
            }));
        }
        let _ = end_tx.send(true);
        let mut lives = Vec::with_capacity(tasks.len());
        for t in tasks {
            lives.push(t.await?);
        }
        this.check(lives).await
    }

    /// One job, from submission to cancellation.
    async fn life(&self, n: usize, mut end: watch::Receiver<bool>) -> JobLife {
        let mut c = self.client(n);
        let key = format!("loadgen-{}-{n}", self.run_tag);
        let mut life = JobLife {
            quick: n.is_multiple_of(10),
            ..Default::default()
        };
        let submitted = Instant::now();
        let mut job = None;
        for _ in 0..3 {
            let req = SubmitJobRequest {
                spec: Some(self.spec(&key)),
            };
            match self.rec.call(Rpc::SubmitJob, c.submit_job(req)).await {
                Ok(r) => {
                    job = r.job;
                    break;
                }
                Err(s) if transient(&s) => continue,
                Err(_) => break,
            }
        }
        let Some(mut job) = job else {
            return life;
        };
        self.rec.jobs_submitted.fetch_add(1, Ordering::Relaxed);
        let id = job.job_id.clone();
        life.id = Some(id.clone());

        if life.quick {
            let _ = nap(Duration::from_secs_f64(unit(n as u64)), &mut end).await;
        } else {
            // Wait for the group.
            while !formed(&job) && submitted.elapsed() < QUEUE_TIMEOUT {
                if !nap(POLL_WAITING, &mut end).await {
                    break;
                }
                let req = GetJobRequest { job_id: id.clone() };
                if let Ok(j) = self.rec.call(Rpc::GetJob, c.get_job(req)).await {
                    job = j;
                }
            }
            if formed(&job) {
                life.scheduled_after_s = Some(submitted.elapsed().as_secs_f64());
                let hold = self.lifetime.mul_f64(0.5 + unit(n as u64 ^ 0xabcd));
                let held = Instant::now();
                while held.elapsed() < hold && !is_final(job.state) {
                    if !nap(POLL_RUNNING.min(hold), &mut end).await {
                        break;
                    }
                    let req = GetJobRequest { job_id: id.clone() };
                    if let Ok(j) = self.rec.call(Rpc::GetJob, c.get_job(req)).await {
                        job = j;
                    }
                    life.seen_running |= job.state == JobState::Running as i32;
                }
            }
        }
        life.state_before_cancel = job.state;
        for _ in 0..3 {
            let req = CancelJobRequest {
                job_id: id.clone(),
                reason: "loadgen".into(),
            };
            match self.rec.call(Rpc::CancelJob, c.cancel_job(req)).await {
                Ok(_) => {
                    life.cancelled = true;
                    break;
                }
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                    life.already_final = true;
                    break;
                }
                Err(s) if transient(&s) => continue,
                Err(_) => break,
            }
        }
        life
    }

    /// Every job the coordinator knows, by id: (state, idempotency key).
    async fn list_all(&self) -> Result<BTreeMap<String, (i32, String)>> {
        let mut c = self.client(0);
        let mut out = BTreeMap::new();
        let mut token = String::new();
        loop {
            let req = ListJobsRequest {
                state: 0,
                page_size: 1000,
                page_token: token.clone(),
            };
            let page = self.rec.call(Rpc::ListJobs, c.list_jobs(req)).await?;
            for j in page.jobs {
                let key = j
                    .spec
                    .as_ref()
                    .map(|s| s.idempotency_key.clone())
                    .unwrap_or_default();
                out.insert(j.job_id, (j.state, key));
            }
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            token = page.next_page_token;
        }
    }

    /// Cancels what is not final, then checks that every submitted job is listed and
    /// cancelled.
    async fn check(&self, lives: Vec<JobLife>) -> Result<JobsResult> {
        let mut res = JobsResult::default();
        let mut c = self.client(1);
        for (id, (state, _)) in self.list_all().await? {
            if !is_final(state) {
                res.cleanup_cancels += 1;
                let req = CancelJobRequest {
                    job_id: id,
                    reason: "loadgen: the load ended".into(),
                };
                let _ = self.rec.call(Rpc::CancelJob, c.cancel_job(req)).await;
            }
        }
        res.listed = self.list_all().await?;
        let reported: std::collections::BTreeSet<&str> =
            lives.iter().filter_map(|l| l.id.as_deref()).collect();
        res.unreported = res
            .listed
            .keys()
            .filter(|id| !reported.contains(id.as_str()))
            .count();
        for l in &lives {
            let Some(id) = &l.id else { continue };
            match res.listed.get(id) {
                None => {
                    // Not listed: ask for it directly before calling it lost.
                    let req = GetJobRequest { job_id: id.clone() };
                    match tokio::time::timeout(super::CALL_TIMEOUT, c.get_job(req)).await {
                        Ok(Ok(j)) => {
                            let j = j.into_inner();
                            res.inconsistent
                                .push(format!("{id} (missing from ListJobs, state {})", j.state));
                        }
                        _ => res.lost.push(id.clone()),
                    }
                }
                Some((state, _))
                    if *state != JobState::Cancelled as i32
                        && !(l.already_final && is_final(*state)) =>
                {
                    res.inconsistent
                        .push(format!("{id} (state {state} after cancelling)"))
                }
                Some(_) => {}
            }
        }
        res.lives = lives;
        Ok(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_is_spread_and_reproducible() {
        let xs: Vec<f64> = (0..1000).map(unit).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.05, "{mean}");
        assert_eq!(unit(42), unit(42));
    }

    #[test]
    fn final_states() {
        assert!(is_final(JobState::Cancelled as i32));
        assert!(!is_final(JobState::Rendezvous as i32));
        let mut j = Job {
            state: JobState::Rendezvous as i32,
            ..Default::default()
        };
        assert!(!formed(&j));
        j.workers.push("w-1".into());
        assert!(formed(&j));
    }
}
