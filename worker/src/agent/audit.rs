//! `<job dir>/steps.jsonl`, the exactly-once audit: one JSON line per committed step — `step`
//! (completed steps, 1-based, as `StepReport.step`), `epoch`, `sample_ids` (the global batch),
//! `membership_epoch`, `world_size` — in step order, so anyone can check that every sample of an
//! epoch is in exactly one committed step.
//!
//! Rank 0 writes it. A step's line is written once the coordinator's watermark (from
//! `StepAck.committed_step`) covers it; lines of steps done but not yet committed wait in memory
//! (and move to the next session of the same job when this one ends first). A session continues
//! after the last line already in the file, so nothing is ever written twice; a gap (steps
//! committed while another worker was rank 0 and could not write them) is filled from the data
//! plan, which is pure, with `membership_epoch` and `world_size` unknown (`null`). A line torn by
//! a crash (no final newline) is cut off when the file is opened.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use protodino_data::DataPlan;
use serde::{Deserialize, Serialize};

/// One committed step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditLine {
    pub step: i64,
    pub epoch: i64,
    pub sample_ids: Vec<u64>,
    /// None for a line filled in from the plan.
    pub membership_epoch: Option<i64>,
    pub world_size: Option<i64>,
}

impl AuditLine {
    /// The line of the step that completes `step` steps, its ids from the plan.
    pub fn from_plan(plan: &DataPlan, step: i64) -> Self {
        let index = (step - 1).max(0) as u64;
        Self {
            step,
            epoch: plan.epoch_of(index) as i64,
            sample_ids: plan.global_ids(index),
            membership_epoch: None,
            world_size: None,
        }
    }
}

/// The audit file of a job, open for appending.
pub struct AuditLog {
    path: PathBuf,
    file: File,
    /// Step of the last line in the file (0: empty).
    last: i64,
    /// Lines of completed steps waiting for their commit, in step order.
    pending: VecDeque<AuditLine>,
}

impl AuditLog {
    /// Opens (or creates) the file and finds its last line.
    pub fn open(path: &Path) -> Result<Self> {
        let what = || format!("audit file {}", path.display());
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .with_context(what)?;
        let mut text = String::new();
        file.read_to_string(&mut text).with_context(what)?;
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            // A torn last line: cut it off (append-mode writes still go to the new end).
            file.set_len(complete as u64).with_context(what)?;
            file.seek(SeekFrom::End(0)).with_context(what)?;
        }
        let mut last = 0;
        for (i, line) in text[..complete].lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let l: AuditLine = serde_json::from_str(line)
                .with_context(|| format!("{}: line {}", what(), i + 1))?;
            last = last.max(l.step);
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            last,
            pending: VecDeque::new(),
        })
    }

    /// Step of the last line written.
    pub fn last_step(&self) -> i64 {
        self.last
    }

    /// A completed step; written once committed.
    pub fn push(&mut self, line: AuditLine) {
        if line.step > self.last && self.pending.back().is_none_or(|b| b.step < line.step) {
            self.pending.push_back(line);
        }
    }

    /// Lines carried over from an earlier session of the job (their order is kept).
    pub fn adopt(&mut self, lines: Vec<AuditLine>) {
        for l in lines {
            self.push(l);
        }
    }

    /// Writes every line up to the watermark `committed` (completed steps): pending ones as
    /// they are, missing ones from the plan. Returns how many lines were written.
    pub fn write_committed(&mut self, committed: i64, plan: &DataPlan) -> Result<usize> {
        let mut written = 0;
        while self.last < committed {
            let next = self.last + 1;
            while self.pending.front().is_some_and(|l| l.step < next) {
                self.pending.pop_front();
            }
            let pending = self.pending.front().is_some_and(|l| l.step == next);
            let line = pending
                .then(|| self.pending.pop_front())
                .flatten()
                .unwrap_or_else(|| AuditLine::from_plan(plan, next));
            let mut text = serde_json::to_string(&line)?;
            text.push('\n');
            self.file
                .write_all(text.as_bytes())
                .with_context(|| format!("writing {}", self.path.display()))?;
            self.last = next;
            written += 1;
        }
        if written > 0 {
            self.file.flush()?;
        }
        Ok(written)
    }

    /// Makes the written lines durable and hands back the ones still waiting for a commit.
    pub fn close(mut self) -> Result<Vec<AuditLine>> {
        self.file
            .sync_data()
            .with_context(|| format!("syncing {}", self.path.display()))?;
        Ok(self.pending.drain(..).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: DataPlan = DataPlan {
        seed: 7,
        dataset_size: 40,
        global_batch: 4,
    };

    fn line(step: i64) -> AuditLine {
        AuditLine {
            membership_epoch: Some(3),
            world_size: Some(2),
            ..AuditLine::from_plan(&PLAN, step)
        }
    }

    fn steps(path: &Path) -> Vec<(i64, Option<i64>)> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                let l: AuditLine = serde_json::from_str(l).unwrap();
                (l.step, l.membership_epoch)
            })
            .collect()
    }

    #[test]
    fn writes_committed_steps_only_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("steps.jsonl");
        let mut log = AuditLog::open(&path).unwrap();
        for s in 1..=3 {
            log.push(line(s));
        }
        assert_eq!(log.write_committed(2, &PLAN).unwrap(), 2);
        assert_eq!(log.write_committed(2, &PLAN).unwrap(), 0, "nothing twice");
        let carried = log.close().unwrap();
        assert_eq!(carried, vec![line(3)], "the uncommitted step waits");
        assert_eq!(steps(&path), vec![(1, Some(3)), (2, Some(3))]);
        // The ids are the plan's global batches.
        let first: AuditLine = serde_json::from_str(
            std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .next()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(first.sample_ids, PLAN.global_ids(0));
    }

    #[test]
    fn a_new_session_continues_after_the_last_line_without_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("steps.jsonl");
        let mut log = AuditLog::open(&path).unwrap();
        for s in 1..=4 {
            log.push(line(s));
        }
        log.write_committed(3, &PLAN).unwrap();
        let carried = log.close().unwrap();

        // The next session re-runs from the watermark: steps 1..3 again must not be written.
        let mut log = AuditLog::open(&path).unwrap();
        assert_eq!(log.last_step(), 3);
        log.adopt(carried);
        for s in 2..=6 {
            log.push(line(s));
        }
        log.write_committed(6, &PLAN).unwrap();
        log.close().unwrap();
        let got: Vec<i64> = steps(&path).iter().map(|s| s.0).collect();
        assert_eq!(got, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn gaps_are_filled_from_the_plan_and_torn_lines_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("steps.jsonl");
        let mut log = AuditLog::open(&path).unwrap();
        log.push(line(1));
        log.write_committed(1, &PLAN).unwrap();
        log.close().unwrap();
        // A crash in the middle of a line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"step\":2,\"ep").unwrap();
        drop(f);

        let mut log = AuditLog::open(&path).unwrap();
        assert_eq!(log.last_step(), 1);
        // Steps 2..=3 were committed under another rank 0; this session resumes at 3.
        log.push(line(4));
        log.write_committed(4, &PLAN).unwrap();
        log.close().unwrap();
        assert_eq!(
            steps(&path),
            vec![(1, Some(3)), (2, None), (3, None), (4, Some(3))]
        );
    }
}
