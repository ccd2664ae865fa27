//! Structured logs: a coordinator started with `--log-json` and a worker agent with
//! `PROTODINO_LOG_JSON=1` run one short job. Every line either writes is one JSON object; every
//! line of the training session carries the job, the worker, its rank and the membership epoch
//! (in `span`, the session's span); the coordinator's lines about the job or the worker carry
//! `job_id` or `worker` as fields of their own, not only in the message.

use std::path::Path;
use std::time::{Duration, Instant};

use protodino_proto::v1::JobState;
use protodino_tests::cluster::{Coordinator, Roots, Worker, spec, state, submit, wait_for};
use protodino_tests::scenario::{BASE, MINUTES, runtime};
use serde_json::Value;

/// SIGTERM, then wait (up to a minute) for the process to exit, so its log is complete.
fn stop(child: &mut std::process::Child, what: &str) {
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0, "SIGTERM to {what}");
    let deadline = Instant::now() + MINUTES;
    while child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "{what} did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every line of a log as a JSON object (a panic naming the line otherwise).
fn json_log(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {l}", path.display()));
            assert!(v.is_object(), "{}: not an object: {l}", path.display());
            assert!(
                v["message"].is_string() && v["level"].is_string() && v["timestamp"].is_string(),
                "{}: no message, level or timestamp: {l}",
                path.display()
            );
            v
        })
        .collect();
    assert!(!lines.is_empty(), "{} is empty", path.display());
    lines
}

fn message(line: &Value) -> &str {
    line["message"].as_str().unwrap_or_default()
}

#[test]
fn json_logs_carry_job_worker_rank_and_membership_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let roots = Roots::new(dir.path());
    let mut coordinator = Coordinator::start(&roots, "127.0.0.1:0", &["--log-json"]);
    let mut worker = Worker::start(
        &roots,
        &coordinator.url(),
        "worker-a",
        &[("PROTODINO_LOG_JSON", "1")],
    );
    let worker_id = worker.worker_id();
    let job_id = runtime().block_on(async {
        let mut jobs = coordinator.jobs().await;
        let job = submit(&mut jobs, spec(BASE, 1, 16, 3)).await;
        wait_for(&mut jobs, &job.job_id, 5 * MINUTES, "success", |j| {
            state(j) == JobState::Succeeded
        })
        .await;
        job.job_id
    });
    stop(&mut worker.child, "the worker");
    stop(&mut coordinator.child, "the coordinator");

    // The worker: the session's lines, on the agent and on the training thread.
    let lines = json_log(&worker.log);
    let session: Vec<&Value> = lines
        .iter()
        .filter(|l| l["span"]["name"] == "session")
        .collect();
    for l in &session {
        let s = &l["span"];
        assert_eq!(s["job_id"], job_id.as_str(), "{l}");
        assert_eq!(s["worker"], worker_id.as_str(), "{l}");
        assert_eq!(s["worker_name"], "worker-a", "{l}");
        assert_eq!(s["rank"], 0, "{l}");
        assert!(
            s["membership_epoch"].as_i64().is_some_and(|e| e >= 1),
            "{l}"
        );
    }
    for wanted in [
        "assigned job",     // the agent, as the assignment arrives
        "step 1/3",         // the step loop, on the training thread
        "Finished at step", // the session's end
    ] {
        assert!(
            session.iter().any(|l| message(l).contains(wanted)),
            "no session line says {wanted:?}:\n{lines:#?}"
        );
    }
    // Every worker line that names the job carries its id as a field, in the line or its span.
    for l in &lines {
        if message(l).contains(&job_id) {
            let field = l["job_id"].as_str().or(l["span"]["job_id"].as_str());
            assert_eq!(field, Some(job_id.as_str()), "{l}");
        }
    }

    // The coordinator: lines about the job or the worker say so in fields.
    let lines = json_log(&dir.path().join("coordinator.log"));
    for l in &lines {
        let m = message(l);
        if m.contains(&job_id) || m.contains(&worker_id) {
            assert!(
                l["job_id"].is_string() || l["worker"].is_string(),
                "a line about the job or the worker without job_id/worker: {l}"
            );
        }
    }
    assert!(
        lines.iter().any(|l| l["job_id"] == job_id.as_str()),
        "no coordinator line has job_id {job_id}:\n{lines:#?}"
    );
    let about_worker: Vec<&Value> = lines
        .iter()
        .filter(|l| l["worker"] == worker_id.as_str())
        .collect();
    assert!(
        about_worker.iter().any(|l| l["worker_name"] == "worker-a"),
        "no coordinator line has worker {worker_id}:\n{lines:#?}"
    );
}
