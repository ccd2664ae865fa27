//! What a job's sessions stand on, fixed when its first assignment arrives ([`JobData`]): the
//! resolved configuration (its data paths made to lie below `--data-root`), the training set
//! checked against the plan the coordinator fixed, the loader, and the job's directory below
//! `--checkpoint-root`; and the checks that an assignment is one this worker can follow.
//! Problems of the job itself (a configuration or data set that does not match the plan) fail
//! the job; problems of this worker (a missing mount) fail the worker.

use std::path::{Component, Path, PathBuf};

use protodino_config::TrainConfig;
use protodino_data::{DataPlan, Loader};
use protodino_proto::v1::Assignment;

use super::outcome::Outcome;
use super::session::SessionContext;
use crate::train::analysis::usage_ids;

/// What a job's sessions share: fixed when the job's first assignment arrives.
pub struct JobData {
    pub cfg: TrainConfig,
    pub plan: DataPlan,
    pub loader: Loader,
    pub probe_ids: Vec<u64>,
    pub job_dir: PathBuf,
    /// `job_dir` relative to the checkpoint root.
    pub job_dir_rel: PathBuf,
}

/// `rel` as a path below a root: relative, without `..`.
pub fn below(root: &Path, rel: &str, what: &str) -> Result<PathBuf, String> {
    let p = Path::new(rel);
    let ok = p
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !ok {
        return Err(format!(
            "{what} {rel:?} is not a relative path inside {}",
            root.display()
        ));
    }
    Ok(root.join(p))
}

/// The job's configuration, data and directory (once per job).
pub fn prepare(ctx: &SessionContext, a: &Assignment) -> Result<JobData, Outcome> {
    let bad_config = |e: String| Outcome::job(format!("the job's resolved configuration: {e}"));
    let mut cfg: TrainConfig =
        serde_json::from_str(&a.resolved_config).map_err(|e| bad_config(e.to_string()))?;
    cfg.validate().map_err(|e| bad_config(e.to_string()))?;
    for (what, p) in [
        ("data.train", &mut cfg.data.train),
        ("data.eval_train", &mut cfg.data.eval_train),
        ("data.eval_test", &mut cfg.data.eval_test),
    ] {
        if !p.is_empty() {
            *p = below(&ctx.data_root, p, what)
                .map_err(Outcome::job)?
                .display()
                .to_string();
        }
    }
    if a.checkpoint_dir.is_empty() {
        return Err(Outcome::job("the assignment names no checkpoint_dir"));
    }
    let job_dir_rel = PathBuf::from(&a.checkpoint_dir);
    let job_dir =
        below(&ctx.checkpoint_root, &a.checkpoint_dir, "checkpoint_dir").map_err(Outcome::job)?;
    if let Some(t) = ctx.threads {
        cfg.train.threads = i64::from(t);
    }
    cfg.train.output_dir = job_dir.display().to_string();
    std::fs::create_dir_all(&job_dir)
        .map_err(|e| Outcome::worker(format!("creating {}: {e}", job_dir.display())))?;
    let train_set = protodino_data::open_train(&cfg.data, &ctx.data_root).map_err(|e| {
        Outcome::worker(format!(
            "opening the training set below {}: {e}",
            ctx.data_root.display()
        ))
    })?;
    let n = train_set.len();
    if n as i64 != a.dataset_size {
        return Err(Outcome::job(format!(
            "the training set has {n} images on this worker, the job's plan is over {}",
            a.dataset_size
        )));
    }
    let plan = DataPlan {
        seed: cfg.train.seed,
        dataset_size: n as u64,
        global_batch: a.global_batch.max(0) as u64,
    };
    if plan.steps_per_epoch() == 0 {
        return Err(Outcome::job(format!(
            "{n} training images are fewer than one global batch of {}",
            a.global_batch
        )));
    }
    let loader = Loader::new(train_set, &cfg.crops, &cfg.data, cfg.train.seed)
        .map_err(|e| Outcome::worker(format!("the data loader: {e}")))?;
    let probe_ids = usage_ids(n, cfg.eval.usage_images as usize);
    Ok(JobData {
        cfg,
        plan,
        loader,
        probe_ids,
        job_dir,
        job_dir_rel,
    })
}

/// An assignment this worker can follow.
pub fn check_assignment(a: &Assignment, plan: &DataPlan) -> Result<(), Outcome> {
    let w = a.world_size;
    let bad = |what: String| Err(Outcome::worker(format!("invalid assignment: {what}")));
    if w < 1 || a.rank < 0 || a.rank >= w {
        return bad(format!("rank {} of world {w}", a.rank));
    }
    if w > 1 && a.peers.len() != w as usize {
        return bad(format!("{} peer addresses for world {w}", a.peers.len()));
    }
    if a.state_source_rank < 0 || a.state_source_rank >= w {
        return bad(format!("state source rank {}", a.state_source_rank));
    }
    if a.global_batch as u64 != plan.global_batch {
        return bad(format!(
            "global batch {} after {}",
            a.global_batch, plan.global_batch
        ));
    }
    if a.global_batch < i64::from(w) {
        return Err(Outcome::job(format!(
            "a world of {w} leaves members without samples of the global batch {}",
            a.global_batch
        )));
    }
    if a.resume_step < 0 || a.total_steps < a.resume_step {
        return bad(format!(
            "resume at step {} of {}",
            a.resume_step, a.total_steps
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_below_their_root() {
        let root = Path::new("/data");
        assert_eq!(
            below(root, "fashion-mnist/train", "x").unwrap(),
            Path::new("/data/fashion-mnist/train")
        );
        for bad in ["/etc/passwd", "../outside", "a/../../b"] {
            assert!(below(root, bad, "data.train").is_err(), "{bad}");
        }
    }

    fn assignment() -> Assignment {
        Assignment {
            job_id: "j".into(),
            membership_epoch: 1,
            rank: 1,
            world_size: 2,
            peers: vec!["a:1".into(), "b:2".into()],
            global_batch: 16,
            total_steps: 20,
            ..Assignment::default()
        }
    }

    #[test]
    fn assignments_are_checked_against_the_plan() {
        let plan = DataPlan {
            seed: 0,
            dataset_size: 160,
            global_batch: 16,
        };
        assert!(check_assignment(&assignment(), &plan).is_ok());
        let bad_rank = Assignment {
            rank: 2,
            ..assignment()
        };
        assert!(check_assignment(&bad_rank, &plan).is_err());
        // Uneven shares are fine (6 + 5 + 5); more members than samples are not.
        let uneven = Assignment {
            world_size: 3,
            rank: 0,
            peers: vec!["a:1".into(), "b:2".into(), "c:3".into()],
            ..assignment()
        };
        assert!(check_assignment(&uneven, &plan).is_ok());
        let tiny = DataPlan {
            global_batch: 2,
            ..plan
        };
        let tiny_assignment = Assignment {
            global_batch: 2,
            ..uneven
        };
        assert!(matches!(
            check_assignment(&tiny_assignment, &tiny),
            Err(Outcome::Failed {
                scope: super::super::outcome::FailureScope::Job,
                ..
            })
        ));
        let past_the_end = Assignment {
            resume_step: 21,
            ..assignment()
        };
        assert!(check_assignment(&past_the_end, &plan).is_err());
    }
}
