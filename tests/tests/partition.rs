//! A network partition, end to end: the real coordinator and three `protodino worker`
//! processes, each worker in a network namespace of its own (`tests/src/netns.rs`: a bridge in
//! a hub namespace, one veth pair per worker, a private `/dev/shm` per worker so the group's
//! all-reduce goes over the TCP ring, as between hosts). The coordinator runs in the hub on the
//! bridge address; the test's gRPC and `/metrics` clients reach it from a thread that entered
//! the hub. No address, route or sysctl of the host's own namespace is touched.
//!
//! One member that is not rank 0 has its link taken down in the middle of the job: its peers'
//! collective stops moving and fails after `--collective-timeout-ms`, they report it, the
//! coordinator loses the silent member after its stop grace, and the two survivors regroup and
//! finish, ending with the parameters of the undisturbed run and an audit with every sample
//! once. When the link comes back the cut-off worker is told its membership epoch is gone and
//! registers again, and stays a spare (`--join-cooldown-ms` outlasts the job).
//!
//! Where namespaces cannot be made (not root, no iproute2, no veth or bridge support) the test
//! says so on stderr and passes.

use std::cell::RefCell;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use protodino_proto::v1::JobState;
use protodino_tests::cluster::{
    Coordinator, Roots, Worker, audit_exactly_once, job_dir, load_f32, state, submit, wait_for,
};
use protodino_tests::faults::{
    BATCH, STEPS, assert_equal_to_undisturbed, failures, finish, job_spec, print_recoveries,
    process_of,
};
use protodino_tests::netns::Net;
use protodino_tests::scenario::{MINUTES, runtime, step_of, wait_idle};

const WORKERS: usize = 3;
/// Rank of the member cut off (not rank 0, the checkpoint writer and state source).
const VICTIM_RANK: usize = 1;

/// Waits until `worker`'s log satisfies `done` (polled; a panic with the log at the deadline).
async fn wait_for_log(worker: &Worker, what: &str, timeout: Duration, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let log = worker.log_text();
        if done(&log) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "waiting for {what} in {}'s log: timed out\n{log}",
            worker.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn registrations(log: &str) -> usize {
    log.matches("registered as").count()
}

/// Seconds since the Unix epoch.
fn wall_clock(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Shows every process's log when the scenario fails (the temporary directory goes with it).
struct LogsOnPanic<'a>(&'a Roots);

impl Drop for LogsOnPanic<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(&self.0.dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                eprintln!("===== {} =====\n{text}", path.display());
            }
        }
    }
}

#[test]
fn a_member_cut_off_by_a_partition_is_dropped_the_rest_finish_and_it_returns_as_a_spare() {
    // Declared first, dropped last: the processes in the namespaces are killed before the
    // namespaces go, also when the test panics.
    let net = match Net::create(WORKERS) {
        Ok(net) => net,
        Err(why) => {
            eprintln!("skipping: cannot make network namespaces here ({why})");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let roots = Roots::new(dir.path());
    let _logs = LogsOnPanic(&roots);
    let hub = net.hub_prefix();
    let hub: Vec<&str> = hub.iter().map(String::as_str).collect();
    // The woken worker may join only after ten minutes: it stays a spare for the rest of the job.
    let coordinator = Coordinator::start_in(
        &roots,
        &hub,
        &format!("{}:0", net.hub_addr()),
        &["--join-cooldown-ms", "600000"],
    );
    let workers: Vec<Worker> = (0..WORKERS)
        .map(|i| {
            let prefix = net.host_prefix(i);
            let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
            Worker::start_in(
                &roots,
                &prefix,
                &net.host_addr(i),
                &coordinator.url(),
                &format!("worker-{}", (b'a' + i as u8) as char),
                &[],
                &["--collective-timeout-ms", "2000"],
            )
        })
        .collect();
    eprintln!(
        "hub {} (coordinator {}), workers {:?}",
        net.hub(),
        coordinator.addr,
        (0..WORKERS)
            .map(|i| format!("{} in {}", workers[i].collective_addr, net.host(i)))
            .collect::<Vec<_>>()
    );
    net.in_hub(|| scenario(&net, &roots, &coordinator, &workers));
}

/// What is measured around the cut, for the checks after the job.
struct Cut {
    victim: usize,
    victim_id: String,
    /// Ring bytes the victim received per committed step of the first group, and the steps
    /// measured over.
    ring_bytes_per_step: f64,
    ring_steps: i64,
}

fn scenario(net: &Net, roots: &Roots, coordinator: &Coordinator, workers: &[Worker]) {
    wait_idle(coordinator, WORKERS);
    let seen = RefCell::new(Vec::new());
    let (cut, done) = runtime().block_on(async {
        let mut jobs = coordinator.jobs().await;
        let job = submit(&mut jobs, job_spec(2, WORKERS as i32)).await;
        let first = wait_for(&mut jobs, &job.job_id, 3 * MINUTES, "step 1", |j| {
            state(j) == JobState::Running && step_of(j) >= 1
        })
        .await;
        assert_eq!(first.workers.len(), WORKERS, "{first:?}");
        let victim_id = first.workers[VICTIM_RANK].clone();
        let victim = process_of(workers, &victim_id);
        let peers: Vec<String> = (0..WORKERS)
            .filter(|&i| i != victim)
            .map(|i| net.host_addr(i))
            .collect();
        let bytes_before = net.tcp_bytes_received(victim, &peers);
        let running = wait_for(&mut jobs, &job.job_id, 3 * MINUTES, "step 6", |j| {
            state(j) == JobState::Running && step_of(j) >= 6
        })
        .await;
        let bytes_at_cut = net.tcp_bytes_received(victim, &peers);
        assert_eq!(
            running.workers, first.workers,
            "the group changed before the cut"
        );
        assert!(running.recoveries.is_empty(), "{:?}", running.recoveries);
        let ring_steps = step_of(&running) - step_of(&first);

        // The partition: the victim's only link goes down, in the middle of a step.
        let cut_at = (Instant::now(), SystemTime::now());
        net.set_link(victim, false);
        eprintln!(
            "{}: link of rank {VICTIM_RANK} ({victim_id}, {}) down at committed step {}",
            job.job_id,
            net.host(victim),
            step_of(&running)
        );
        let healed = wait_for(&mut jobs, &job.job_id, 3 * MINUTES, "the recovery", |j| {
            let s = state(j);
            if seen.borrow().last() != Some(&s) {
                seen.borrow_mut().push(s);
            }
            failures(j).iter().any(|r| r.seconds >= 0.0)
        })
        .await;
        let healed_after = cut_at.0.elapsed().as_secs_f64();
        let r = failures(&healed)[0];
        let detected = r
            .detected_at
            .as_ref()
            .map(|t| t.seconds as f64 + t.nanos as f64 * 1e-9 - wall_clock(cut_at.1));
        eprintln!(
            "link down → detection {} s, detection → next committed step {:.2} s, link down → \
             next committed step {healed_after:.2} s (world {})",
            detected.map_or("?".into(), |d| format!("{d:.2}")),
            r.seconds,
            healed.workers.len()
        );
        assert_eq!(healed.workers.len(), WORKERS - 1, "{healed:?}");
        assert!(!healed.workers.contains(&victim_id), "{healed:?}");
        assert_eq!(r.members_before.len(), WORKERS);
        assert!(!r.members_after.contains(&victim_id), "{r:?}");
        assert_eq!(r.resumed_from, "replica", "{r:?}");
        assert!(r.steps_redone <= 1, "{r:?}");

        // The link comes back while the survivors train on: the cut-off worker learns that
        // its epoch is gone and registers again, as a spare.
        let registered = registrations(&workers[victim].log_text());
        let restored_at = Instant::now();
        net.set_link(victim, true);
        wait_for_log(
            &workers[victim],
            "a second registration",
            2 * MINUTES,
            |log| registrations(log) > registered,
        )
        .await;
        eprintln!(
            "link up → registered again: {:.2} s",
            restored_at.elapsed().as_secs_f64()
        );
        let done = finish(&mut jobs, &job.job_id, &seen).await;
        let cut = Cut {
            victim,
            victim_id,
            ring_bytes_per_step: (bytes_at_cut - bytes_before) as f64 / ring_steps as f64,
            ring_steps,
        };
        (cut, done)
    });
    print_recoveries(&done);
    eprintln!("states: {:?}", seen.borrow());
    assert!(
        seen.borrow().contains(&JobState::Recovering),
        "{:?}",
        seen.borrow()
    );
    let p = done.progress.unwrap();
    assert_eq!((p.step, p.world_size), (STEPS, 2), "{p:?}");
    assert!(!done.workers.contains(&cut.victim_id), "{done:?}");
    assert_eq!(failures(&done).len(), 1, "{:?}", done.recoveries);
    assert!(
        done.recoveries.iter().all(|r| r.reason != "joined"),
        "the cut-off worker joined again: {:?}",
        done.recoveries
    );
    assert_eq!(p.replica_mismatches, 0, "{p:?}");
    assert_eq!(
        audit_exactly_once(&job_dir(roots, &done).join("steps.jsonl"), BATCH as usize),
        STEPS as usize
    );

    // The group's all-reduce went over the TCP ring: each step's reduce-scatter alone brings
    // (W − 1) / W of the gradient into every rank (the all-gather as much again), while through
    // shared memory the ring carries only the small collectives (a few hundred bytes a step).
    let last = load_f32(&job_dir(roots, &done).join(format!("checkpoint-{STEPS:08}.safetensors")));
    let student: usize = last
        .iter()
        .filter(|(k, _)| k.starts_with("student."))
        .map(|(_, v)| v.len())
        .sum();
    let gradient_bytes = 4.0 * student as f64;
    let floor = 0.5 * (WORKERS - 1) as f64 / WORKERS as f64 * gradient_bytes;
    eprintln!(
        "TCP ring into rank {VICTIM_RANK}: {:.2} MB per step over {} steps (f32 gradient {:.2} MB, \
         floor {:.2} MB)",
        cut.ring_bytes_per_step / 1e6,
        cut.ring_steps,
        gradient_bytes / 1e6,
        floor / 1e6
    );
    assert!(
        cut.ring_bytes_per_step > floor,
        "the ring carried {} bytes a step: the all-reduce did not go over TCP",
        cut.ring_bytes_per_step
    );
    assert_equal_to_undisturbed(roots, &done);

    // With the two survivors idle again, the returned worker is the third idle worker.
    wait_idle(coordinator, WORKERS);
    let log = workers[cut.victim].log_text();
    assert!(
        registrations(&log) >= 2,
        "the cut-off worker did not register again:\n{log}"
    );
    assert!(
        log.contains("no longer exists") || log.contains("is stale"),
        "the cut-off worker was never told its epoch is stale:\n{log}"
    );
    for l in log.lines().filter(|l| {
        l.contains("WARN")
            || l.contains("registered")
            || l.contains("no longer exists")
            || l.contains("stale")
    }) {
        eprintln!("cut-off worker: {l}");
    }
}
