//! TLS on the coordinator's gRPC listener, with mutual TLS for workers: certificates made at
//! test time (a CA, a server certificate for 127.0.0.1 and localhost, a worker's client
//! certificate, and a second CA that signed none of them), the real coordinator started with
//! `--tls-cert --tls-key --tls-client-ca`, the real grpcurl with `-cacert`, the real CLI and a
//! real worker agent over `https://`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use protodino_proto::v1::job_service_client::JobServiceClient;
use protodino_proto::v1::worker_service_client::WorkerServiceClient;
use protodino_proto::v1::{Capabilities, JobState, ListJobsRequest, RegisterRequest};
use protodino_tests::binary;
use protodino_tests::cluster::{
    Bearer, Coordinator, JOB_TOKEN, JOIN_TOKEN, JobClient, Roots, Worker, grpcurl, wait_for,
};
use protodino_tests::scenario::{BASE, MINUTES, is_state, runtime, step_of, wait_idle};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The PEM files of one test.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    worker_cert: PathBuf,
    worker_key: PathBuf,
    /// A CA that signed nothing the coordinator presents.
    other_ca: PathBuf,
    /// A client certificate signed by the other CA.
    stranger_cert: PathBuf,
    stranger_key: PathBuf,
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    (pem, Issuer::new(params, key))
}

/// A leaf certificate and its key (PEM), signed by `issuer`.
fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    name: &str,
    sans: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let mut params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn new(dir: &Path) -> Self {
        let dir = dir.join("pki");
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, pem: &str| {
            let p = dir.join(name);
            std::fs::write(&p, pem).unwrap();
            p
        };
        let (ca_pem, issuer) = ca("protodino test CA");
        let (server_cert, server_key) = leaf(
            &issuer,
            "protodino coordinator",
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (worker_cert, worker_key) = leaf(
            &issuer,
            "protodino worker",
            &["worker.test"],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let (other_pem, other) = ca("another CA");
        let (stranger_cert, stranger_key) = leaf(
            &other,
            "a stranger",
            &["stranger.test"],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        Pki {
            ca: write("ca.pem", &ca_pem),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server-key.pem", &server_key),
            worker_cert: write("worker.pem", &worker_cert),
            worker_key: write("worker-key.pem", &worker_key),
            other_ca: write("other-ca.pem", &other_pem),
            stranger_cert: write("stranger.pem", &stranger_cert),
            stranger_key: write("stranger-key.pem", &stranger_key),
        }
    }

    /// The coordinator's flags: TLS, and mutual TLS for workers.
    fn server_flags(&self) -> Vec<String> {
        [
            ("--tls-cert", &self.server_cert),
            ("--tls-key", &self.server_key),
            ("--tls-client-ca", &self.ca),
        ]
        .iter()
        .flat_map(|(flag, p)| [flag.to_string(), p.display().to_string()])
        .collect()
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A coordinator with TLS and mutual TLS for workers.
fn tls_coordinator(roots: &Roots, pki: &Pki) -> Coordinator {
    let flags = pki.server_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Coordinator::start(roots, "127.0.0.1:0", &flags)
}

/// A TLS channel trusting `ca`, presenting `identity` (certificate, key) when given.
async fn tls_channel(
    addr: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

fn bearer(token: &str) -> Bearer {
    Bearer(format!("Bearer {token}").parse().unwrap())
}

async fn register(channel: Channel, token: &str) -> Result<(), tonic::Status> {
    WorkerServiceClient::with_interceptor(channel, bearer(token))
        .register(RegisterRequest {
            worker_name: "probe".into(),
            capabilities: Some(Capabilities {
                collective_address: "127.0.0.1:1".into(),
                cpu_threads: 1,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

/// `grpcurl ARGS` (exit code, stdout, stderr).
fn grpcurl_run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(grpcurl())
        .args(["-connect-timeout", "10"])
        .args(args)
        .output()
        .expect("run grpcurl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `protodino ARGS` in `cwd`, whatever its exit status.
fn protodino_output(cwd: &Path, args: &[&str]) -> Output {
    Command::new(binary("protodino-worker", "protodino"))
        .args(args)
        .current_dir(cwd)
        .env_remove("PROTODINO_COORDINATOR")
        .env_remove("PROTODINO_TLS_CA")
        .env_remove("PROTODINO_TLS_CERT")
        .env_remove("PROTODINO_TLS_KEY")
        .output()
        .expect("start protodino")
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits for a child to exit (a minute at most) and returns its status.
fn wait_exit(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + MINUTES;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "{what} did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn half_configured_tls_is_a_startup_error_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let start = |tls: &[&str]| {
        let out = Command::new(binary("protodino-coordinator", "protodino-coordinator"))
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--store", s(&dir.path().join("c.redb"))])
            .args(["--job-token", "job-secret", "--join-token", "join-secret"])
            .args(tls)
            .env_remove("PROTODINO_TLS_CERT")
            .env_remove("PROTODINO_TLS_KEY")
            .env_remove("PROTODINO_TLS_CLIENT_CA")
            .output()
            .unwrap();
        assert!(!out.status.success(), "started with {tls:?}");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("listening"),
            "bound before checking TLS: {tls:?}"
        );
        err
    };
    let err = start(&["--tls-cert", s(&pki.server_cert)]);
    assert!(err.contains("--tls-cert needs --tls-key"), "{err}");
    let err = start(&["--tls-key", s(&pki.server_key)]);
    assert!(err.contains("--tls-key needs --tls-cert"), "{err}");
    let err = start(&["--tls-client-ca", s(&pki.ca)]);
    assert!(err.contains("--tls-client-ca needs --tls-cert"), "{err}");
    // A key that is not the certificate's.
    let err = start(&[
        "--tls-cert",
        s(&pki.server_cert),
        "--tls-key",
        s(&pki.worker_key),
    ]);
    assert!(err.contains("--tls-key"), "{err}");
}

#[test]
fn grpcurl_and_the_cli_speak_tls_and_workers_need_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let roots = Roots::new(dir.path());
    let pki = Pki::new(dir.path());
    let c = tls_coordinator(&roots, &pki);
    let addr = c.addr.as_str();
    let url = format!("https://{addr}");
    let auth = format!("authorization: Bearer {JOB_TOKEN}");

    // grpcurl with the server's CA only: reflection, health, and the job API with its token.
    let (code, out, err) = grpcurl_run(&["-cacert", s(&pki.ca), addr, "list"]);
    assert_eq!(code, 0, "{err}");
    for service in [
        "protodino.v1.JobService",
        "protodino.v1.WorkerService",
        "grpc.health.v1.Health",
    ] {
        assert!(out.contains(service), "list lacks {service}: {out}");
    }
    let (code, out, err) =
        grpcurl_run(&["-cacert", s(&pki.ca), addr, "grpc.health.v1.Health/Check"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("SERVING"), "{out}");
    let (code, out, err) = grpcurl_run(&[
        "-cacert",
        s(&pki.ca),
        "-H",
        &auth,
        "-d",
        "{}",
        addr,
        "protodino.v1.JobService/ListJobs",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.trim_start().starts_with('{'), "{out}");
    // Tokens still apply on top of TLS.
    let (code, _, err) = grpcurl_run(&[
        "-cacert",
        s(&pki.ca),
        "-d",
        "{}",
        addr,
        "protodino.v1.JobService/ListJobs",
    ]);
    assert_eq!(code, 64 + Code::Unauthenticated as i32, "{err}");
    // Plaintext to the TLS port, and a client trusting another CA, are refused.
    let (code, _, err) = grpcurl_run(&["-plaintext", addr, "list"]);
    assert_ne!(code, 0, "plaintext was served: {err}");
    let (code, _, err) = grpcurl_run(&["-cacert", s(&pki.other_ca), addr, "list"]);
    assert_ne!(
        code, 0,
        "a server certificate of another CA was accepted: {err}"
    );

    // The CLI over https with --tls-ca; refused with another CA or a plaintext address.
    let token_file = dir.path().join("job-token");
    let cli = |extra: &[&str]| {
        let mut args = vec!["list", "--json", "--token-file", s(&token_file)];
        args.extend_from_slice(extra);
        protodino_output(dir.path(), &args)
    };
    let out = cli(&["--coordinator", &url, "--tls-ca", s(&pki.ca)]);
    assert!(out.status.success(), "{}", text(&out));
    let out = cli(&["--coordinator", &url, "--tls-ca", s(&pki.other_ca)]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("certificate"), "{}", text(&out));
    let out = cli(&[
        "--coordinator",
        &format!("http://{addr}"),
        "--tls-ca",
        s(&pki.ca),
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("https://"), "{}", text(&out));
    let out = cli(&["--coordinator", &url]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("--tls-ca"), "{}", text(&out));

    runtime().block_on(async {
        // The job API needs no client certificate.
        let mut jobs = JobServiceClient::with_interceptor(
            tls_channel(addr, &pki.ca, None).await.unwrap(),
            bearer(JOB_TOKEN),
        );
        jobs.list_jobs(ListJobsRequest::default()).await.unwrap();

        // The worker API does: without one it is UNAUTHENTICATED, naming the problem.
        let e = register(tls_channel(addr, &pki.ca, None).await.unwrap(), JOIN_TOKEN)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains("client certificate"), "{e:?}");
        // With the worker's certificate the join token is still checked.
        let worker_id = Some((pki.worker_cert.as_path(), pki.worker_key.as_path()));
        let e = register(
            tls_channel(addr, &pki.ca, worker_id).await.unwrap(),
            JOB_TOKEN,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains("join token"), "{e:?}");
        // A client certificate of another CA fails the handshake.
        let stranger = Some((pki.stranger_cert.as_path(), pki.stranger_key.as_path()));
        let refused = match tls_channel(addr, &pki.ca, stranger).await {
            Err(_) => true,
            Ok(ch) => register(ch, JOIN_TOKEN).await.is_err(),
        };
        assert!(refused, "a client certificate of another CA was accepted");
    });

    // A real worker without a client certificate stops with a clear error.
    let mut w = Worker::start_with(&roots, &url, "no-cert", &[], &["--tls-ca", s(&pki.ca)]);
    let status = wait_exit(&mut w.child, "the worker without a client certificate");
    assert!(!status.success());
    let log = w.log_text();
    assert!(
        log.contains("Unauthenticated") && log.contains("client certificate"),
        "{log}"
    );
}

#[test]
fn a_worker_with_a_client_certificate_trains_a_job_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let roots = Roots::new(dir.path());
    let pki = Pki::new(dir.path());
    let c = tls_coordinator(&roots, &pki);
    let url = format!("https://{}", c.addr);
    let _w = Worker::start_with(
        &roots,
        &url,
        "w0",
        &[],
        &[
            "--tls-ca",
            s(&pki.ca),
            "--tls-cert",
            s(&pki.worker_cert),
            "--tls-key",
            s(&pki.worker_key),
        ],
    );
    wait_idle(&c, 1);

    // Submitted with the CLI over TLS.
    let config = dir.path().join("job.toml");
    std::fs::write(&config, BASE).unwrap();
    let out = protodino_output(
        dir.path(),
        &[
            "submit",
            s(&config),
            "--preset",
            "cpu-demo",
            "--min-world",
            "1",
            "--max-world",
            "1",
            "--global-batch",
            "16",
            "--max-steps",
            "3",
            "--coordinator",
            &url,
            "--tls-ca",
            s(&pki.ca),
            "--token-file",
            s(&dir.path().join("job-token")),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!id.is_empty(), "{}", text(&out));

    runtime().block_on(async {
        let mut jobs: JobClient = JobServiceClient::with_interceptor(
            tls_channel(&c.addr, &pki.ca, None).await.unwrap(),
            bearer(JOB_TOKEN),
        );
        let job = wait_for(
            &mut jobs,
            &id,
            5 * MINUTES,
            "the job to succeed",
            is_state(JobState::Succeeded),
        )
        .await;
        assert_eq!(step_of(&job), 3, "{job:?}");
        assert!(!job.result.is_empty(), "{job:?}");
    });
}
