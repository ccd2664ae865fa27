//! What a step means inside the training service: the [`StepSink`] of an agent session. Every
//! member queues a `ReportStep` (the step count, its epoch, the digest of the global batch, the
//! step time, a replica hash when one is due) and updates its `/metrics` and heartbeat status;
//! rank 0 adds the progress figures, the audit lines of committed steps, `metrics.jsonl` and the
//! checkpoint reports. Nothing here waits for the network.
//!
//! The test-only hook lives here too: with `PROTODINO_TEST_PERTURB_AT_STEP=N` in its environment
//! a worker adds a small constant to one teacher parameter right after completing step `N`, so
//! end-to-end tests can check that replica drift is detected. It is never set in production.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use protodino_data::{DataPlan, sample_digest};
use protodino_proto::v1::{CheckpointRef, CheckpointReport, Progress, StepReport};

use super::audit::{AuditLine, AuditLog};
use super::job::JobShared;
use super::metrics::{JobMetrics, StepFigures};
use super::queue::Report;
use super::session::SessionContext;
use crate::train::hash::perturb_teacher;
use crate::train::reporter::Reporter;
use crate::train::{CollapseRecord, StepEvent, StepSink, Trainer, file_sha256, state_hash};

/// The environment variable of the test-only perturbation hook.
pub const PERTURB_ENV: &str = "PROTODINO_TEST_PERTURB_AT_STEP";

/// What the hook adds to the teacher parameter.
const PERTURBATION: f64 = 1e-3;

/// The step of the test-only perturbation hook, if set.
pub fn perturb_step() -> Option<i64> {
    std::env::var(PERTURB_ENV).ok()?.trim().parse().ok()
}

/// Rank 0's extra outputs.
pub struct Leader {
    pub audit: AuditLog,
    pub reporter: Reporter,
}

pub struct AgentSink<'a> {
    pub ctx: &'a SessionContext,
    pub shared: &'a Arc<JobShared>,
    /// The job's `/metrics` series.
    pub metrics: &'a JobMetrics,
    pub membership_epoch: i64,
    pub world: usize,
    pub total_steps: i64,
    pub plan: DataPlan,
    /// The job's directory relative to the checkpoint root (checkpoint URIs).
    pub job_dir_rel: PathBuf,
    pub leader: Option<Leader>,
    /// The last step report queued (re-sent to learn the final watermark).
    pub last_report: Option<StepReport>,
}

impl AgentSink<'_> {
    fn job_id(&self) -> &str {
        &self.shared.job_id
    }
}

impl StepSink for AgentSink<'_> {
    fn on_step(&mut self, trainer: &mut Trainer, ev: &StepEvent<'_>) -> Result<()> {
        if self.ctx.perturb_at == Some(ev.step) {
            perturb_teacher(trainer, PERTURBATION);
            tracing::warn!(
                "{PERTURB_ENV}: perturbed this replica's teacher after step {} (test hook)",
                ev.step
            );
        }
        let state_hash = if ev.due.hash {
            state_hash(trainer)?.to_vec()
        } else {
            Vec::new()
        };
        let m = ev.metrics;
        let progress = self.leader.is_some().then(|| Progress {
            step: ev.step,
            epoch: ev.epoch,
            dino_loss: m.dino_loss,
            koleo_proto: m.koleo_proto,
            unique_prototypes: ev.unique_prototypes,
            images_per_second: ev.images_per_second,
            world_size: self.world as i32,
            total_steps: self.total_steps,
            membership_epoch: self.membership_epoch,
            teacher_entropy: m.teacher_entropy,
            ..Progress::default()
        });
        let report = StepReport {
            worker_id: String::new(), // filled in when sent
            job_id: self.job_id().to_string(),
            membership_epoch: self.membership_epoch,
            step: ev.step,
            epoch: ev.epoch,
            progress,
            state_hash,
            sample_digest: sample_digest(ev.global_ids).to_vec(),
            step_seconds: ev.step_seconds,
        };
        self.last_report = Some(report.clone());
        self.ctx.reports.send(self.shared, Report::Step(report));
        self.metrics.record_step(&StepFigures {
            step: ev.step,
            epoch: ev.epoch,
            dino_loss: m.dino_loss,
            koleo_proto: m.koleo_proto,
            images_per_second: ev.images_per_second,
            phase_seconds: ev.phase_seconds,
            all_reduce_bytes: &ev.all_reduce_bytes,
        });
        self.shared.update_status(|s| s.completed_step = ev.step);
        let watermark = self.shared.watermark();
        if let Some(leader) = &mut self.leader {
            leader.audit.push(AuditLine {
                step: ev.step,
                epoch: ev.epoch,
                sample_ids: ev.global_ids.to_vec(),
                membership_epoch: Some(self.membership_epoch),
                world_size: Some(self.world as i64),
            });
            leader.audit.write_committed(watermark, &self.plan)?;
            if ev.due.log {
                leader.reporter.record(&ev.record())?;
                tracing::info!(
                    "job {} step {}/{}: loss {:.4} koleo {:.4} {:.1} img/s",
                    self.shared.job_id,
                    ev.step,
                    self.total_steps,
                    m.dino_loss,
                    m.koleo_proto,
                    ev.images_per_second
                );
            }
        }
        Ok(())
    }

    fn on_collapse(&mut self, rec: &CollapseRecord) -> Result<()> {
        self.metrics
            .record_unique(rec.report.counts.iter().map(|c| (c.eps, c.greedy)));
        if let Some(leader) = &mut self.leader {
            leader.reporter.record(&rec.to_json())?;
        }
        tracing::info!("job {}: {}", self.shared.job_id, rec.summary());
        Ok(())
    }

    fn on_checkpoint(&mut self, trainer: &Trainer, path: &Path, write_seconds: f64) -> Result<()> {
        record_checkpoint(self.metrics, path, write_seconds);
        let report = checkpoint_report(
            self.shared,
            self.membership_epoch,
            &self.job_dir_rel,
            trainer,
            path,
        )?;
        self.ctx
            .reports
            .send(self.shared, Report::Checkpoint(report));
        Ok(())
    }

    fn note(&mut self, line: String) {
        tracing::warn!("job {}: {line}", self.shared.job_id);
    }

    fn stop_requested(&self) -> bool {
        self.shared.stop_requested(self.membership_epoch)
    }
}

/// A written checkpoint in `/metrics`: its write time and its size.
pub fn record_checkpoint(metrics: &JobMetrics, path: &Path, write_seconds: f64) {
    match std::fs::metadata(path) {
        Ok(m) => metrics.record_checkpoint(write_seconds, m.len()),
        Err(e) => tracing::warn!("the size of {}: {e}", path.display()),
    }
}

/// The catalogue entry of a checkpoint file: its path relative to the checkpoint root, its
/// SHA-256, the completed steps and the epoch the next step belongs to (as the file's own
/// metadata records it).
pub fn checkpoint_report(
    shared: &JobShared,
    membership_epoch: i64,
    job_dir_rel: &Path,
    trainer: &Trainer,
    path: &Path,
) -> Result<CheckpointReport> {
    let sha = file_sha256(path)?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let uri = job_dir_rel.join(name).display().to_string();
    tracing::info!(
        "job {}: checkpoint {uri} (step {})",
        shared.job_id,
        trainer.step
    );
    Ok(CheckpointReport {
        worker_id: String::new(),
        job_id: shared.job_id.clone(),
        checkpoint: Some(CheckpointRef {
            step: trainer.step,
            epoch: trainer.schedules.epoch_of(trainer.step),
            uri,
            sha256: hex::encode(sha),
        }),
        membership_epoch,
    })
}
