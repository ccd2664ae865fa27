//! Rank 0's end of a finished job: the final checkpoint (reported with its SHA-256), the final
//! report (collapse figures with usage, k-NN), the audit lines of the last steps once they are
//! committed, and then `ReportResult`, which makes the job succeed — so whoever sees
//! `SUCCEEDED` finds `steps.jsonl` complete and every listed checkpoint on disk.

use std::sync::Arc;
use std::time::{Duration, Instant};

use protodino_proto::v1::{Assignment, ResultReport, StepReport};

use super::job::JobShared;
use super::metrics::JobMetrics;
use super::queue::Report;
use super::session::SessionContext;
use super::setup::JobData;
use super::sink::{Leader, checkpoint_report, record_checkpoint};
use crate::train::{FinalInputs, FinalReport, LoopStats, Trainer, save_checkpoint};

/// How long rank 0 waits, once its reports are all out, for the watermark to cover its last
/// step before it sends the result anyway.
const COMMIT_WAIT: Duration = Duration::from_secs(10);
/// The longest it waits at all (the coordinator may be away meanwhile).
const COMMIT_WAIT_MAX: Duration = Duration::from_secs(600);

/// Rank 0 after the last step of the job.
pub struct LeaderEnd<'a> {
    pub ctx: &'a SessionContext,
    pub shared: &'a Arc<JobShared>,
    pub metrics: &'a JobMetrics,
    pub data: &'a JobData,
    pub a: &'a Assignment,
}

impl LeaderEnd<'_> {
    /// Final checkpoint, final report, the audit lines of the last steps, then the result.
    pub fn finish(
        &self,
        trainer: &Trainer,
        leader: &mut Leader,
        last: Option<StepReport>,
        stats: &LoopStats,
        started: Instant,
    ) -> anyhow::Result<()> {
        let (data, a) = (self.data, self.a);
        let keep = data.cfg.train.checkpoint_keep as usize;
        let written = Instant::now();
        let path = save_checkpoint(trainer, &data.job_dir, keep)?;
        record_checkpoint(self.metrics, &path, written.elapsed().as_secs_f64());
        let ckpt = checkpoint_report(
            self.shared,
            a.membership_epoch,
            &data.job_dir_rel,
            trainer,
            &path,
        )?;
        let uri = ckpt
            .checkpoint
            .as_ref()
            .map(|c| c.uri.clone())
            .unwrap_or_default();
        self.ctx.reports.send(self.shared, Report::Checkpoint(ckpt));
        let probe =
            (!data.probe_ids.is_empty()).then_some((&data.loader, data.probe_ids.as_slice()));
        let eval = &data.cfg.eval;
        let inputs = FinalInputs {
            probe,
            data_root: &self.ctx.data_root,
            knn_limits: (
                eval.knn_train_images as usize,
                eval.knn_test_images as usize,
            ),
        };
        let report = FinalReport::evaluate(trainer, &inputs, stats, uri, started)?;
        leader.reporter.record(&serde_json::to_value(&report)?)?;
        let collapse = &report.collapse;
        self.metrics
            .record_unique(collapse.report.counts.iter().map(|c| (c.eps, c.greedy)));
        if let Some(u) = &collapse.usage
            && let (Some(entropy), Some(used)) =
                (u["mlcd"]["entropy"].as_f64(), u["used_clusters"].as_i64())
        {
            self.metrics.record_usage(entropy, used);
        }
        if let Some(last) = last {
            self.await_commit(last);
        }
        leader
            .audit
            .write_committed(self.shared.watermark(), &data.plan)?;
        self.ctx.reports.send(
            self.shared,
            Report::Result(ResultReport {
                worker_id: String::new(),
                job_id: a.job_id.clone(),
                membership_epoch: a.membership_epoch,
                result: serde_json::to_string(&report)?,
            }),
        );
        tracing::info!(
            "job {}: finished at step {}, {} unique prototypes",
            a.job_id,
            report.step,
            report.unique_prototypes()
        );
        Ok(())
    }

    /// Waits for the watermark to cover the last step, so `steps.jsonl` is complete before the
    /// result makes the job succeed. A step commits when every member has reported it, so the
    /// acknowledgement of rank 0's own report may predate the commit: once its reports are all
    /// out, it sends its last step report again (idempotent) to learn the watermark anew.
    fn await_commit(&self, last: StepReport) {
        let step = last.step;
        let begun = Instant::now();
        let mut drained: Option<Instant> = None;
        while self.shared.watermark() < step && !self.shared.is_retired() {
            if begun.elapsed() > COMMIT_WAIT_MAX {
                break;
            }
            if self.ctx.reports.depth() == 0 {
                let since = *drained.get_or_insert_with(Instant::now);
                if since.elapsed() >= COMMIT_WAIT {
                    break;
                }
                self.ctx
                    .reports
                    .send(self.shared, Report::Step(last.clone()));
            }
            self.shared.wait_watermark(step, Duration::from_millis(250));
        }
        let w = self.shared.watermark();
        if w < step {
            tracing::warn!(
                "job {}: step {step} not committed (watermark {w}); its audit lines are left out",
                self.a.job_id
            );
        }
    }
}
