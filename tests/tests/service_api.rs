//! The service's front doors, no training: the real grpcurl session the README shows (list,
//! describe, health, submit a JSON spec, watch, cancel, exit codes), authentication of both
//! APIs, and malformed specs rejected with INVALID_ARGUMENT naming the field.

use std::process::{Command, Stdio};

use protodino_proto::v1::worker_service_client::WorkerServiceClient;
use protodino_proto::v1::{
    Capabilities, CropsSpec, HeadSpec, JobSpec, ModelSpec, OptimSpec, RegisterRequest,
    SubmitJobRequest,
};
use protodino_tests::cluster::{
    Bearer, Coordinator, JOB_TOKEN, JOIN_TOKEN, Roots, Worker, channel, grpcurl, job_client,
};
use tonic::Code;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `grpcurl -plaintext [-H auth] ARGS`: (exit code, stdout, stderr).
fn grpcurl_run(args: &[&str], token: Option<&str>) -> (i32, String, String) {
    let mut cmd = Command::new(grpcurl());
    cmd.arg("-plaintext");
    if let Some(t) = token {
        cmd.args(["-H", &format!("authorization: Bearer {t}")]);
    }
    let out = cmd.args(args).output().expect("run grpcurl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_readme_grpcurl_session_works_against_the_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let roots = Roots::new(dir.path());
    let c = Coordinator::start(&roots, "127.0.0.1:0", &[]);
    let addr = c.addr.as_str();

    let (code, out, err) = grpcurl_run(&[addr, "list"], None);
    assert_eq!(code, 0, "{err}");
    for service in [
        "protodino.v1.JobService",
        "protodino.v1.WorkerService",
        "grpc.health.v1.Health",
    ] {
        assert!(out.contains(service), "list lacks {service}: {out}");
    }
    let (code, out, err) = grpcurl_run(&[addr, "describe", "protodino.v1.JobSpec"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("koleo_weight"), "{out}");
    let (code, out, err) = grpcurl_run(&[addr, "grpc.health.v1.Health/Check"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("SERVING"), "{out}");

    // Submit a JSON spec (no workers: it stays queued).
    let spec = r#"{"spec": {"preset": "cpu-demo", "koleoWeight": 0, "maxSteps": "5", "idempotencyKey": "readme-1"}}"#;
    let (code, out, err) = grpcurl_run(
        &["-d", spec, addr, "protodino.v1.JobService/SubmitJob"],
        Some(JOB_TOKEN),
    );
    assert_eq!(code, 0, "{err}");
    let submitted: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = submitted["job"]["jobId"].as_str().unwrap().to_string();
    assert_eq!(submitted["job"]["state"], "JOB_STATE_QUEUED", "{out}");
    let resolved: serde_json::Value =
        serde_json::from_str(submitted["job"]["resolvedConfig"].as_str().unwrap()).unwrap();
    assert_eq!(resolved["koleo"]["weight"], 0.0);
    // The same idempotency key returns the same job.
    let (_, again, _) = grpcurl_run(
        &["-d", spec, addr, "protodino.v1.JobService/SubmitJob"],
        Some(JOB_TOKEN),
    );
    assert!(again.contains(&id), "{again}");

    // Watch in the background, cancel, and the watch ends with the cancelled state.
    let watch = Command::new(grpcurl())
        .args([
            "-plaintext",
            "-H",
            &format!("authorization: Bearer {JOB_TOKEN}"),
        ])
        .args(["-d", &format!(r#"{{"jobId": "{id}"}}"#)])
        .args([addr, "protodino.v1.JobService/WatchJob"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (code, out, err) = grpcurl_run(
        &[
            "-d",
            &format!(r#"{{"jobId": "{id}"}}"#),
            addr,
            "protodino.v1.JobService/CancelJob",
        ],
        Some(JOB_TOKEN),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("JOB_STATE_CANCELLED"), "{out}");
    let watched = watch.wait_with_output().unwrap();
    let watched_out = String::from_utf8_lossy(&watched.stdout);
    assert!(watched.status.success(), "{watched:?}");
    assert!(watched_out.contains("JOB_STATE_CANCELLED"), "{watched_out}");

    // Exit code = 64 + the gRPC code.
    let (code, _, err) = grpcurl_run(
        &[
            "-d",
            r#"{"jobId": "job-nope"}"#,
            addr,
            "protodino.v1.JobService/GetJob",
        ],
        Some(JOB_TOKEN),
    );
    assert_eq!(code, 64 + Code::NotFound as i32, "{err}");
    let (code, _, _) = grpcurl_run(
        &["-d", "{}", addr, "protodino.v1.JobService/ListJobs"],
        None,
    );
    assert_eq!(code, 64 + Code::Unauthenticated as i32);
    let (code, _, _) = grpcurl_run(
        &[
            "-d",
            &format!(r#"{{"jobId": "{id}"}}"#),
            addr,
            "protodino.v1.JobService/CancelJob",
        ],
        Some(JOB_TOKEN),
    );
    assert_eq!(code, 64 + Code::FailedPrecondition as i32);
}

#[test]
fn both_apis_authenticate_with_their_own_token() {
    let dir = tempfile::tempdir().unwrap();
    let roots = Roots::new(dir.path());
    let c = Coordinator::start(&roots, "127.0.0.1:0", &[]);
    runtime().block_on(async {
        let submit = |mut client: protodino_tests::cluster::JobClient| async move {
            client
                .submit_job(SubmitJobRequest {
                    spec: Some(JobSpec {
                        preset: "cpu-demo".into(),
                        ..Default::default()
                    }),
                })
                .await
                .map(|_| ())
        };
        // No token, a wrong one, the join token: all UNAUTHENTICATED on the job API.
        let mut bare =
            protodino_proto::v1::job_service_client::JobServiceClient::new(channel(&c.addr).await);
        let e = bare
            .list_jobs(protodino_proto::v1::ListJobsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        for token in ["wrong", JOIN_TOKEN] {
            let e = submit(job_client(&c.addr, token).await).await.unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "token {token}");
        }
        assert!(submit(job_client(&c.addr, JOB_TOKEN).await).await.is_ok());

        // The worker API takes the join token only.
        for (token, ok) in [("wrong", false), (JOB_TOKEN, false), (JOIN_TOKEN, true)] {
            let header = format!("Bearer {token}").parse().unwrap();
            let mut w =
                WorkerServiceClient::with_interceptor(channel(&c.addr).await, Bearer(header));
            let r = w
                .register(RegisterRequest {
                    worker_name: "probe".into(),
                    capabilities: Some(Capabilities {
                        collective_address: "127.0.0.1:1".into(),
                        cpu_threads: 1,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await;
            match r {
                Ok(_) => assert!(ok, "token {token} registered"),
                Err(e) => {
                    assert!(!ok, "token {token}: {e:?}");
                    assert_eq!(e.code(), Code::Unauthenticated, "token {token}");
                }
            }
        }
    });
    // A worker process with a wrong join token stops with a clear error instead of retrying.
    let bad = dir.path().join("bad-join-token");
    std::fs::write(&bad, "not-the-join-token").unwrap();
    std::fs::copy(&bad, dir.path().join("join-token")).unwrap();
    let mut w = Worker::start(&roots, &c.url(), "intruder", &[]);
    let status = w.child.wait().unwrap();
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.path().join("intruder.log")).unwrap();
    assert!(
        log.contains("nauthenticated") || log.contains("UNAUTHENTICATED"),
        "{log}"
    );
}

/// A valid base spec; each case changes one thing.
fn base() -> JobSpec {
    JobSpec {
        preset: "cpu-demo".into(),
        ..Default::default()
    }
}

#[test]
fn malformed_specs_are_invalid_argument_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let roots = Roots::new(dir.path());
    let c = Coordinator::start(&roots, "127.0.0.1:0", &[]);
    let model = |m: ModelSpec| JobSpec {
        model: Some(m),
        ..base()
    };
    let head = |h: HeadSpec| JobSpec {
        head: Some(h),
        ..base()
    };
    let crops = |k: CropsSpec| JobSpec {
        crops: Some(k),
        ..base()
    };
    let optim = |o: OptimSpec| JobSpec {
        optim: Some(o),
        ..base()
    };
    let cases: Vec<(&str, JobSpec)> = vec![
        (
            "spec.preset",
            JobSpec {
                preset: "../etc".into(),
                ..base()
            },
        ),
        (
            "spec.preset",
            JobSpec {
                preset: "no-such-preset".into(),
                ..base()
            },
        ),
        (
            "spec.preset",
            JobSpec {
                preset: "p".repeat(65),
                ..base()
            },
        ),
        (
            "spec.idempotency_key",
            JobSpec {
                idempotency_key: "k".repeat(20_000),
                ..base()
            },
        ),
        (
            "spec.idempotency_key",
            JobSpec {
                idempotency_key: "a\u{7}b".into(),
                ..base()
            },
        ),
        (
            "spec.model.arch",
            model(ModelSpec {
                arch: "vit_huge".into(),
                ..Default::default()
            }),
        ),
        (
            "spec.model.drop_path_rate",
            model(ModelSpec {
                drop_path_rate: Some(1.5),
                ..Default::default()
            }),
        ),
        (
            "spec.model.patch_size",
            model(ModelSpec {
                patch_size: Some(-8),
                ..Default::default()
            }),
        ),
        (
            "spec.head.out_dim",
            head(HeadSpec {
                out_dim: Some(0),
                ..Default::default()
            }),
        ),
        (
            "spec.head.bottleneck_dim",
            head(HeadSpec {
                bottleneck_dim: Some(-1),
                ..Default::default()
            }),
        ),
        (
            "spec.koleo_weight",
            JobSpec {
                koleo_weight: Some(-0.1),
                ..base()
            },
        ),
        (
            "spec.koleo_weight",
            JobSpec {
                koleo_weight: Some(f64::NAN),
                ..base()
            },
        ),
        (
            "spec.crops.local_crops_number",
            crops(CropsSpec {
                local_crops_number: Some(-1),
                ..Default::default()
            }),
        ),
        (
            "spec.crops.global_scale_min",
            crops(CropsSpec {
                global_scale_min: Some(1.5),
                ..Default::default()
            }),
        ),
        (
            "spec.optim.optimizer",
            optim(OptimSpec {
                optimizer: "adam".into(),
                ..Default::default()
            }),
        ),
        (
            "spec.optim.lr",
            optim(OptimSpec {
                lr: Some(-1.0),
                ..Default::default()
            }),
        ),
        (
            "spec.optim.lr",
            optim(OptimSpec {
                lr: Some(f64::INFINITY),
                ..Default::default()
            }),
        ),
        (
            "spec.optim.momentum_teacher",
            optim(OptimSpec {
                momentum_teacher: Some(1.5),
                ..Default::default()
            }),
        ),
        (
            "spec.optim.teacher_temp",
            optim(OptimSpec {
                teacher_temp: Some(0.0),
                ..Default::default()
            }),
        ),
        (
            "spec.optim.weight_decay",
            optim(OptimSpec {
                weight_decay: Some(f64::NAN),
                ..Default::default()
            }),
        ),
        (
            "spec.optim.clip_grad",
            optim(OptimSpec {
                clip_grad: Some(-3.0),
                ..Default::default()
            }),
        ),
        (
            "spec.optim.freeze_last_layer",
            optim(OptimSpec {
                freeze_last_layer: Some(-1),
                ..Default::default()
            }),
        ),
        (
            "spec.batch_size_per_worker",
            JobSpec {
                batch_size_per_worker: Some(0),
                ..base()
            },
        ),
        (
            "spec.epochs",
            JobSpec {
                epochs: Some(-2),
                ..base()
            },
        ),
        (
            "spec.max_steps",
            JobSpec {
                max_steps: Some(-1),
                ..base()
            },
        ),
        (
            "spec.data_limit",
            JobSpec {
                data_limit: Some(-5),
                ..base()
            },
        ),
        (
            "spec.threads_per_worker",
            JobSpec {
                threads_per_worker: Some(-1),
                ..base()
            },
        ),
        (
            "spec.min_world_size",
            JobSpec {
                min_world_size: Some(0),
                ..base()
            },
        ),
        (
            "spec.max_world_size",
            JobSpec {
                min_world_size: Some(2),
                max_world_size: Some(1),
                ..base()
            },
        ),
        (
            "spec.max_world_size",
            JobSpec {
                max_world_size: Some(100_000),
                ..base()
            },
        ),
        (
            "spec.global_batch_size",
            JobSpec {
                global_batch_size: Some(0),
                ..base()
            },
        ),
        (
            "spec.global_batch_size",
            JobSpec {
                min_world_size: Some(3),
                max_world_size: Some(3),
                global_batch_size: Some(2),
                ..base()
            },
        ),
        (
            "spec.dataset",
            JobSpec {
                dataset: "/etc/passwd".into(),
                ..base()
            },
        ),
        (
            "spec.dataset",
            JobSpec {
                dataset: "a/../../b".into(),
                ..base()
            },
        ),
        (
            "spec.dataset",
            JobSpec {
                dataset: "no/such/set".into(),
                dataset_format: "image_folder".into(),
                ..base()
            },
        ),
        (
            "spec.dataset_format",
            JobSpec {
                dataset_format: "tfrecord".into(),
                ..base()
            },
        ),
        (
            "spec.checkpoint_dir",
            JobSpec {
                checkpoint_dir: "../outside".into(),
                ..base()
            },
        ),
        (
            "spec.config_toml",
            JobSpec {
                config_toml: "[optim]\nlr = \"fast\"\n".into(),
                ..base()
            },
        ),
        (
            "spec.config_toml",
            JobSpec {
                config_toml: "[nonsense]\nx = 1\n".into(),
                ..base()
            },
        ),
    ];
    assert!(cases.len() >= 30);
    runtime().block_on(async {
        let mut client = job_client(&c.addr, JOB_TOKEN).await;
        for (field, spec) in cases {
            let what = format!("{spec:?}");
            let e = client
                .submit_job(SubmitJobRequest { spec: Some(spec) })
                .await
                .map(|_| ())
                .expect_err(&format!("accepted {what}"));
            assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
            assert!(
                e.message().contains(&format!("`{field}")),
                "expected the message to name `{field}`, got {:?}",
                e.message()
            );
        }
        // Nothing was stored.
        let listed = client
            .list_jobs(protodino_proto::v1::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(listed.jobs.is_empty(), "{:?}", listed.jobs);
    });
}
