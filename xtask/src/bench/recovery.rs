//! The recovery rows of `cargo xtask bench`: how long a 3-worker CPU job takes, after one of its
//! workers is killed with SIGKILL, to commit its next step with the 2 survivors, and how many
//! steps it redoes, next to `torchrun` elastic doing the same with checkpoint-and-restart.
//!
//! | side | what runs | killed |
//! |---|---|---|
//! | protodino | a local coordinator + 3 agents, `configs/cpu-demo.toml` submitted with min world 2, max world 3 | the agent process of the victim rank |
//! | torchrun | `scripts/bench/recovery_torch.py`: 3 agents (`--nnodes 2:3`, c10d, gloo, `--max-restarts 3`; settings in its docstring) running train_torch.py's DINO loop | the victim node: its agent and every process below it |
//!
//! Both sides: the same model and data (cpu-demo: ViT-Ti/8 × 4 blocks, Fashion-MNIST, 2×32 +
//! 6×16 crops), global batch 48 at every world size, 1 libtorch thread per worker (3 workers on
//! this machine's cores), a checkpoint every 10 steps, the kill once step 15 is complete. The
//! victim is rank 1, then (without `--quick`) rank 0.
//!
//! - protodino: the recovery time is from the kill to the first `WatchJob` event of a newer
//!   membership epoch whose committed step is past the last step committed before the kill; the
//!   steps lost are that last step minus the step the new group resumed from (the coordinator's
//!   message forming it: "from replica of step N", "checkpoint of step N" or "the seed").
//! - torchrun: from the kill to the first step that every rank of the restarted group completed;
//!   the steps lost are the last step completed before the kill minus the checkpoint step the
//!   restart resumed from (the step in flight at the kill is counted on neither side).
//!
//! The rows: seconds (protodino / torchrun, goal ≤ 0.1× and protodino ≤ 5 s) and steps lost (goal
//! 0 for protodino); without `--quick`, torchrun once more tuned for recovery (a 2 s rendezvous
//! last call instead of 30 s, a dead node dropped after 3 missed 1 s keep-alives instead of 5 s:
//! the new round waits for both) against the rank-1 protodino run. `bench.json` keeps each
//! run's timeline under `recovery`; the logs stay in the cache's `bench/scratch/recovery-*`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::{Ctx, Pair, last_json, measure, python};
use crate::cluster::LocalService;
use crate::data;

/// Workers at the start, and the smallest group the job may shrink to.
const WORKERS: usize = 3;
const MIN_WORKERS: usize = 2;
/// Divisible by every world size in `[MIN_WORKERS, WORKERS]`.
const GLOBAL_BATCH: usize = 48;
const CHECKPOINT_EVERY: u64 = 10;
/// The kill comes once this step is complete: halfway between two checkpoints, the average
/// case of checkpoint-and-restart.
const KILL_AT: i64 = 15;
/// Steps of the whole job (the runs stop once recovered).
const STEPS: i64 = KILL_AT + 15;
/// libtorch threads per worker.
const THREADS: usize = 1;
/// Longest wait for the job to reach `KILL_AT`, and then for the recovery.
const START_WAIT: Duration = Duration::from_secs(600);
const RECOVERY_WAIT: Duration = Duration::from_secs(300);
/// The rendezvous options of the tuned torchrun run: a 2 s last call for a third node (default
/// 30 s) and a dead node dropped from the rendezvous after 3 missed 1 s keep-alives (default 3 ×
/// 5 s); the new round waits for both.
const TUNED_RDZV: &str = "last_call_timeout=2,keep_alive_interval=1";
const TUNED_WHO: &str = "torchrun tuned (last call 2 s, keep-alive 1 s × 3)";

/// The job over the coordinator's `cpu-demo` preset: configs/bench/e2e-fmnist.toml (periodic
/// analysis off) with checkpoints every `CHECKPOINT_EVERY` steps, as on the torchrun side.
fn job_toml() -> String {
    format!(
        "# The recovery benchmark's job (cargo xtask bench --only recovery), over the cpu-demo preset.\n\
         [train]\ncheckpoint_every_steps = {CHECKPOINT_EVERY}\nlog_every_steps = 10\n\n\
         [eval]\nanalysis_every_steps = 0\nusage_images = 0\n"
    )
}

/// One side's measurement.
struct Recovery {
    /// Kill → next committed step; `None`: not within `RECOVERY_WAIT`.
    seconds: Option<f64>,
    steps_lost: Option<i64>,
    detail: Value,
}

impl Recovery {
    /// The figure for the table: the time, or the wait that ran out (a lower bound).
    fn figure(&self) -> f64 {
        self.seconds.unwrap_or(RECOVERY_WAIT.as_secs_f64())
    }
}

/// `text` without its ANSI escape sequences (`ESC [ … letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The worker id an agent registered as (the last `registered as ID` of its log).
fn registered_id(log: &Path) -> Option<String> {
    let text = strip_ansi(&std::fs::read_to_string(log).ok()?);
    let (i, m) = text.rmatch_indices("registered as ").next()?;
    let id: String = text[i + m.len()..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    (!id.is_empty()).then_some(id)
}

/// The step a new group resumed from, from the coordinator's rendezvous message.
fn resume_step(message: &str) -> Option<i64> {
    if message.contains("the seed") {
        return Some(0);
    }
    let tail = ["checkpoint of step ", "replica of step "]
        .iter()
        .find_map(|k| message.rfind(k).map(|i| &message[i + k.len()..]))?;
    tail.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Whether `text` is the coordinator's message forming group `epoch` (`rendezvous: epoch N, …
/// from …`, `recovering: epoch N, … from …`).
fn forms_epoch(text: &str, epoch: i64) -> bool {
    text.contains(&format!(": epoch {epoch}, "))
        && text.contains(" workers (")
        && text.contains(" from ")
}

/// The coordinator log's message forming group `epoch`, when the watch stream skipped it.
fn forming_in_log(log: &Path, epoch: i64) -> Option<String> {
    let text = strip_ansi(&std::fs::read_to_string(log).ok()?);
    let line = text.lines().find(|l| forms_epoch(l, epoch))?;
    let key = format!(": epoch {epoch}, ");
    let start = line.find(&key)?;
    // From the word before ": epoch" (the phase) on.
    let from = line[..start].rfind(' ').map_or(0, |i| i + 1);
    Some(line[from..].to_string())
}

fn protodino(ctx: &Ctx, victim_rank: usize) -> Result<Recovery> {
    let dir = ctx
        .scratch
        .join(format!("recovery-protodino-rank{victim_rank}"));
    let service = LocalService::start(&ctx.release, &dir, WORKERS, THREADS)?;
    let config = ctx.scratch.join("recovery-job.toml");
    std::fs::write(&config, job_toml())?;
    let job = service.submit_elastic(
        "cpu-demo",
        &config.to_string_lossy(),
        MIN_WORKERS..=WORKERS,
        GLOBAL_BATCH,
        &["--max-steps".into(), STEPS.to_string()],
    )?;
    eprintln!("bench[recovery protodino]: job {job}, victim rank {victim_rank}");
    let mut watch = service
        .client("watch")
        .arg(&job)
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting protodino watch")?;
    let (tx, rx) = mpsc::channel::<(Instant, Value)>();
    let out = watch.stdout.take().context("watch stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && tx.send((Instant::now(), v)).is_err()
            {
                return;
            }
        }
    });
    let result = follow(&service, &rx, victim_rank);
    let _ = watch.kill();
    let _ = watch.wait();
    let _ = service.client("cancel").arg(&job).output();
    service.stop();
    let mut r = result?;
    r.detail["logs"] = json!(dir.display().to_string());
    Ok(r)
}

/// Follows the job's events: kills the victim at `KILL_AT`, then waits for the recovery.
fn follow(
    service: &LocalService,
    rx: &mpsc::Receiver<(Instant, Value)>,
    victim_rank: usize,
) -> Result<Recovery> {
    let started = Instant::now();
    // (kill instant, its wall-clock time, the epoch killed, the last step committed before).
    let mut killed: Option<(Instant, f64, i64, i64)> = None;
    let mut timeline: Vec<Value> = Vec::new();
    let mut last_seen = (String::new(), 0i64);
    let mut victim = String::new();
    let mut new_epoch: Option<(i64, f64, String)> = None;
    loop {
        let wait = match killed {
            None => START_WAIT.saturating_sub(started.elapsed()),
            Some((t0, ..)) => RECOVERY_WAIT.saturating_sub(t0.elapsed()),
        };
        let (at, v) = match rx.recv_timeout(wait) {
            Ok(event) => event,
            Err(mpsc::RecvTimeoutError::Timeout) => break,
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!(
                "protodino watch ended before the recovery; timeline {timeline:?}; logs in {}",
                service.dir.display()
            ),
        };
        let p = &v["progress"];
        let (step, epoch) = (
            p["step"].as_i64().unwrap_or(0),
            p["membership_epoch"].as_i64().unwrap_or(0),
        );
        let state = v["state"].as_str().unwrap_or("");
        let message = v["message"].as_str().unwrap_or("").to_string();
        if ["succeeded", "failed", "cancelled"].contains(&state) {
            bail!(
                "the job ended {state} ({message}) before the recovery; timeline {timeline:?}; logs in {}",
                service.dir.display()
            );
        }
        let Some((t0, wall0, old_epoch, before)) = &mut killed else {
            if state != "running" || step < KILL_AT {
                continue;
            }
            let workers: Vec<&str> = v["workers"]
                .as_array()
                .map(|w| w.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let id = *workers
                .get(victim_rank)
                .with_context(|| format!("the group {workers:?} has no rank {victim_rank}"))?;
            let pid = service
                .agent_pids()
                .into_iter()
                .find(|(name, _)| {
                    registered_id(&service.dir.join(format!("{name}.log"))).as_deref() == Some(id)
                })
                .map(|(name, pid)| {
                    victim = format!("{name} ({id})");
                    pid
                })
                .with_context(|| format!("no agent log says it registered as {id}"))?;
            let wall = unix_now();
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            killed = Some((Instant::now(), wall, epoch, step));
            eprintln!(
                "bench[recovery protodino]: killed {victim}, rank {victim_rank}, pid {pid}, at step {step} of epoch {epoch}"
            );
            continue;
        };
        let t = at.saturating_duration_since(*t0).as_secs_f64();
        if (message.as_str(), epoch) != (last_seen.0.as_str(), last_seen.1) {
            timeline.push(
                json!({"t_s": t, "state": state, "step": step, "epoch": epoch, "message": message}),
            );
            last_seen = (message.clone(), epoch);
        }
        if epoch == *old_epoch {
            *before = (*before).max(step);
            continue;
        }
        if epoch < *old_epoch {
            continue;
        }
        // The newest group's rendezvous (a group that fails again is followed by another).
        if new_epoch.as_ref().is_none_or(|(e, ..)| *e != epoch) {
            let m = if forms_epoch(&message, epoch) {
                message.clone()
            } else {
                forming_in_log(&service.dir.join("coordinator.log"), epoch).unwrap_or_default()
            };
            new_epoch = Some((epoch, t, m));
        }
        if step <= *before {
            continue;
        }
        let (epoch, rendezvous_s, m) = new_epoch.clone().unwrap_or_default();
        let resumed = resume_step(&m);
        let lost = resumed.map(|r| (*before - r).max(0));
        return Ok(Recovery {
            seconds: Some(t),
            steps_lost: lost,
            detail: json!({
                "impl": "protodino", "victim": victim, "victim_rank": victim_rank,
                "killed_at_unix_s": *wall0, "steps_before_kill": *before, "new_epoch": epoch,
                "world_after": p["world_size"], "rendezvous_s": rendezvous_s,
                "rendezvous": m, "resumed_from": resumed, "steps_lost": lost,
                "recovery_s": t, "first_step": step, "timeline": timeline,
            }),
        });
    }
    let Some((_, wall0, _, before)) = killed else {
        bail!(
            "the job did not reach step {KILL_AT} within {START_WAIT:?}; logs in {}",
            service.dir.display()
        );
    };
    eprintln!(
        "bench[recovery protodino]: no recovery within {RECOVERY_WAIT:?}; timeline {timeline:?}"
    );
    Ok(Recovery {
        seconds: None,
        steps_lost: None,
        detail: json!({
            "impl": "protodino", "victim": victim, "victim_rank": victim_rank,
            "killed_at_unix_s": wall0, "steps_before_kill": before, "recovered": false,
            "waited_s": RECOVERY_WAIT.as_secs_f64(), "timeline": timeline,
        }),
    })
}

/// The torchrun side; `rdzv_conf`: extra rendezvous options (None: torchrun's defaults).
fn torchrun(ctx: &Ctx, victim_rank: usize, rdzv_conf: Option<&str>) -> Result<Recovery> {
    let work = ctx.scratch.join(match rdzv_conf {
        None => format!("recovery-torchrun-rank{victim_rank}"),
        Some(_) => format!("recovery-torchrun-rank{victim_rank}-tuned"),
    });
    let fm = data::data_root().join("fashion-mnist");
    let mut c = python(ctx, "scripts/bench/recovery_torch.py");
    c.arg("orchestrate")
        .args(["--config", "configs/default.toml"])
        .args(["--config", "configs/cpu-demo.toml"])
        .args(["--config", "configs/bench/e2e-fmnist.toml"])
        .arg("--fmnist-raw")
        .arg(fm.join("raw"))
        .arg("--work")
        .arg(&work)
        .args(["--global-batch", &GLOBAL_BATCH.to_string()])
        .args(["--steps", &STEPS.to_string()])
        .args(["--checkpoint-every", &CHECKPOINT_EVERY.to_string()])
        .args(["--threads", &THREADS.to_string()])
        .args(["--nodes", &WORKERS.to_string()])
        .args(["--min-nodes", &MIN_WORKERS.to_string()])
        .args(["--kill-at", &KILL_AT.to_string()])
        .args(["--victim-rank", &victim_rank.to_string()])
        .args(["--timeout", &RECOVERY_WAIT.as_secs().to_string()]);
    if let Some(conf) = rdzv_conf {
        c.args(["--rdzv-conf", conf]);
    }
    let m = measure(&format!("recovery torchrun, victim rank {victim_rank}"), c)?;
    let mut detail = last_json(&m)?;
    detail["logs"] = json!(work.display().to_string());
    let recovered = detail["recovered"].as_bool() == Some(true);
    Ok(Recovery {
        seconds: recovered.then(|| detail["recovery_s"].as_f64()).flatten(),
        steps_lost: recovered.then(|| detail["steps_lost"].as_i64()).flatten(),
        detail,
    })
}

/// `12.3 s`, or `> 300 s` for a run that did not recover.
fn shown(r: &Recovery) -> String {
    match r.seconds {
        Some(s) => format!("{s:.1} s"),
        None => format!("> {:.0} s (no recovery)", RECOVERY_WAIT.as_secs_f64()),
    }
}

/// The two rows (seconds, steps lost) and the note line of one protodino / torchrun pair.
fn rows(
    pairs: &mut Vec<Pair>,
    note: &mut String,
    rank: usize,
    ours: &Recovery,
    theirs: &Recovery,
    who: &str,
) {
    let speedup = theirs.figure() / ours.figure();
    let tl = |key: &str| theirs.detail["timeline"][key].as_f64().unwrap_or(f64::NAN);
    note.push_str(&format!(
        "- victim rank {rank}: protodino {} ({} steps lost; new group formed at {:.1} s), {who} {} ({} steps \
         lost; survivors failed at {:.1} s, processes restarted at {:.1} s, process group at {:.1} s), \
         {who} / protodino = {speedup:.1}×\n",
        shown(ours),
        lost(ours),
        ours.detail["rendezvous_s"].as_f64().unwrap_or(f64::NAN),
        shown(theirs),
        lost(theirs),
        tl("survivors_failed_s"),
        tl("restarted_processes_started_s"),
        tl("process_group_formed_s"),
    ));
    pairs.push(Pair {
        section: "recovery",
        what: format!(
            "kill -9 of rank {rank} of {WORKERS} CPU workers → next committed step ({WORKERS} → {MIN_WORKERS}), \
             protodino {} vs {who} {}: {who} {speedup:.1}× slower",
            shown(ours),
            shown(theirs)
        ),
        unit: "s",
        ours: ours.figure(),
        theirs: theirs.figure(),
        mem: None,
    });
    pairs.push(Pair {
        section: "recovery (steps lost)",
        what: format!(
            "completed steps redone after the kill of rank {rank}, protodino vs {who} (checkpoints every \
             {CHECKPOINT_EVERY} steps, kill after step {KILL_AT}; the step in flight not counted)"
        ),
        unit: "steps",
        ours: ours.steps_lost.map_or(f64::NAN, |s| s as f64),
        theirs: theirs.steps_lost.map_or(f64::NAN, |s| s as f64),
        mem: None,
    });
}

fn lost(r: &Recovery) -> String {
    r.steps_lost.map_or("?".into(), |s| s.to_string())
}

/// Adds the rows; returns every run's details (for `bench.json`) and a note for `bench.md`.
pub(super) fn recovery(ctx: &Ctx, pairs: &mut Vec<Pair>) -> Result<(Value, String)> {
    let victims: &[usize] = if ctx.quick { &[1] } else { &[1, 0] };
    let mut runs = Vec::new();
    let mut note = format!(
        "\nRecovery: {WORKERS} CPU workers ({THREADS} libtorch thread each) train cpu-demo (global batch {GLOBAL_BATCH}, \
         checkpoints every {CHECKPOINT_EVERY} steps); once step {KILL_AT} is complete one worker gets SIGKILL and the \
         {MIN_WORKERS} survivors go on. protodino: coordinator + agents, min world {MIN_WORKERS}, max world {WORKERS}; time to \
         the first step committed past the last one before the kill. torchrun: `--nnodes {MIN_WORKERS}:{WORKERS} \
         --nproc-per-node 1 --rdzv-backend c10d --rdzv-conf is_host=false --max-restarts 3` against a rendezvous \
         store outside the nodes, `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` (with the shared store a restart reads the \
         previous attempt's gloo addresses, pytorch/pytorch#135712), gloo, otherwise torchrun's defaults (last call \
         30 s, keep-alive 5 s × 3, monitor interval 0.1 s, gloo timeout 30 min); the victim node's agent and its \
         processes are killed; time to the first step completed by the restarted group (resumed from the newest \
         checkpoint). Steps lost: completed steps redone (the step in flight not counted).\n\n"
    );
    let mut rank1 = None;
    for &rank in victims {
        let ours = protodino(ctx, rank)?;
        let theirs = torchrun(ctx, rank, None)?;
        rows(pairs, &mut note, rank, &ours, &theirs, "torchrun");
        runs.push(
            json!({"victim_rank": rank, "protodino": ours.detail.clone(), "torchrun": theirs.detail}),
        );
        if rank == 1 {
            rank1 = Some(ours);
        }
    }
    // torchrun tuned for recovery, against the same protodino run.
    if let (false, Some(ours)) = (ctx.quick, rank1) {
        let theirs = torchrun(ctx, 1, Some(TUNED_RDZV))?;
        rows(pairs, &mut note, 1, &ours, &theirs, TUNED_WHO);
        runs.push(json!({"victim_rank": 1, "rdzv_conf": TUNED_RDZV, "torchrun": theirs.detail}));
    }
    Ok((Value::Array(runs), note))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resume_step_comes_from_the_rendezvous_message() {
        assert_eq!(
            resume_step("rendezvous: epoch 2, 2 workers (w-a, w-b), from replica of step 15"),
            Some(15)
        );
        assert_eq!(
            resume_step(
                "rendezvous: epoch 3, 2 workers (w-a, w-b), from no replica of step 15 survives: checkpoint of step 10"
            ),
            Some(10)
        );
        assert_eq!(
            resume_step(
                "rendezvous: epoch 2, 2 workers (w-a, w-b), from no replica of step 7 and no checkpoint: the seed"
            ),
            Some(0)
        );
        assert_eq!(resume_step("running"), None);
    }

    #[test]
    fn the_forming_message_is_found_in_the_stream_or_the_log() {
        let m = "recovering: epoch 2, 2 workers (w-a, w-b), from no replica of step 15 survives: checkpoint of step 10";
        assert!(forms_epoch(m, 2));
        assert!(!forms_epoch(m, 1));
        assert!(!forms_epoch("running: epoch 2, 2 workers, step 16/30", 2));
        let dir = std::env::temp_dir().join(format!("xtask-recovery-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("coordinator.log");
        std::fs::write(
            &log,
            format!(
                "\x1b[2m2026-12-01T12:58:47Z\x1b[0m INFO scheduler: rendezvous: epoch 1, 3 workers (w-a, w-b, w-c), from the seed subject=job\n\
                 \x1b[2m2026-12-01T12:59:08Z\x1b[0m INFO scheduler: {m} \x1b[3msubject\x1b[0m=job\n"
            ),
        )
        .unwrap();
        let found = forming_in_log(&log, 2).unwrap();
        assert!(found.starts_with("recovering: epoch 2, "), "{found}");
        assert_eq!(resume_step(&found), Some(10));
        assert_eq!(resume_step(&forming_in_log(&log, 1).unwrap()), Some(0));
        assert_eq!(forming_in_log(&log, 3), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_worker_id_is_the_last_registration_in_its_log() {
        let dir = std::env::temp_dir().join(format!("xtask-recovery-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("worker-1.log");
        std::fs::write(
            &log,
            "2026-01-01T00:00:00Z  INFO protodino::agent: registered as w-0123456789ab\n\
             2026-01-01T00:00:09Z  INFO protodino::agent: registered as \x1b[1mw-ba9876543210\x1b[0m\n",
        )
        .unwrap();
        assert_eq!(registered_id(&log).as_deref(), Some("w-ba9876543210"));
        assert_eq!(registered_id(&dir.join("absent.log")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
