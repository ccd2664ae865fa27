//! The Kubernetes deployment, checked with the real validators (`cargo xtask test` provisions
//! them and names them in `PROTODINO_VALIDATORS_BIN` / `PROTODINO_VALIDATORS_NODE_MODULES`):
//! the Helm chart linted (`--strict`) and rendered by Helm's Go SDK with the default, GPU and CPU
//! values; every rendered object through `kubernetes-validate --strict`; the ServiceMonitors
//! through the prometheus-operator CRD schemas; every file of `deploy/checks/bad/` refused by
//! the chart's values schema; `hadolint` on the Dockerfile; `yamllint` on the chart's YAML. Each
//! validator is also shown a broken input, so a validator that accepts anything fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use protodino_tests::{binary, repo_root};
use serde_json::Value;

/// The Kubernetes version the manifests are linted and validated for.
const KUBE_VERSION: &str = "1.34.0";

const BIN_ENV: &str = "PROTODINO_VALIDATORS_BIN";
const NODE_MODULES_ENV: &str = "PROTODINO_VALIDATORS_NODE_MODULES";

/// A directory named by `var`, which `cargo xtask test` sets.
fn provisioned(var: &str) -> PathBuf {
    let Some(dir) = std::env::var_os(var) else {
        panic!(
            "{var} is not set: the deployment checks run the real validators (Helm SDK, \
             kubernetes-validate, hadolint, yamllint, the prometheus-operator CRD models), which \
             `cargo xtask test` provisions and names in the environment. Run `cargo xtask test` \
             (or `cargo xtask validators` and export the variables it prints)."
        )
    };
    let dir = PathBuf::from(dir);
    assert!(
        dir.is_dir(),
        "{var}={} is not a directory: run `cargo xtask test` again",
        dir.display()
    );
    dir
}

/// An executable of the validators' virtualenv.
fn tool(name: &str) -> PathBuf {
    let exe = provisioned(BIN_ENV).join(name);
    assert!(
        exe.exists(),
        "{} is missing: run `cargo xtask test`",
        exe.display()
    );
    exe
}

fn output(cmd: &mut Command) -> (bool, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    (status.success(), text)
}

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

/// One `deploy/checks/render_chart.py` run: lint, schema check and render.
struct Render {
    dir: tempfile::TempDir,
    objects: Vec<Value>,
    log: String,
}

impl Render {
    fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests.yaml")
    }

    fn monitors(&self) -> PathBuf {
        self.dir.path().join("monitors.yaml")
    }

    fn notes(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("NOTES.txt")).unwrap()
    }

    fn kinds(&self) -> BTreeMap<String, usize> {
        let mut kinds = BTreeMap::new();
        for o in &self.objects {
            *kinds.entry(str_at(o, "/kind").to_string()).or_default() += 1;
        }
        kinds
    }

    fn one(&self, kind: &str, name: &str) -> &Value {
        let found: Vec<&Value> = self
            .objects
            .iter()
            .filter(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .collect();
        assert_eq!(found.len(), 1, "{kind}/{name} in {:?}", self.kinds());
        found[0]
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }
}

/// Renders the chart with these values files (in order, as `helm -f`); the error is the
/// script's output.
fn try_render(values: &[&Path]) -> Result<Render, String> {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(tool("python"));
    cmd.arg(deploy_dir().join("checks/render_chart.py"))
        .arg("--out-dir")
        .arg(dir.path())
        .args(["--kube-version", KUBE_VERSION]);
    for v in values {
        cmd.arg("--values").arg(v);
    }
    let (ok, log) = output(&mut cmd);
    if !ok {
        return Err(log);
    }
    let json = std::fs::read_to_string(dir.path().join("manifests.json")).unwrap();
    let objects: Vec<Value> = serde_json::from_str(&json).unwrap();
    Ok(Render { dir, objects, log })
}

fn render(values: &[&Path]) -> Render {
    try_render(values).unwrap_or_else(|log| panic!("rendering with {values:?} failed:\n{log}"))
}

/// `kubernetes-validate --strict` for [`KUBE_VERSION`]: (passed, output).
fn kubernetes_validate(file: &Path) -> (bool, String) {
    output(
        Command::new(tool("kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", KUBE_VERSION])
            .arg(file),
    )
}

fn assert_kubernetes_valid(r: &Render) {
    let (ok, out) = kubernetes_validate(&r.manifests());
    assert!(ok, "kubernetes-validate --strict failed:\n{out}");
    let passed = out.matches(" passed for resource ").count();
    let core = r
        .objects
        .iter()
        .filter(|o| !str_at(o, "/apiVersion").starts_with("monitoring.coreos.com/"))
        .count();
    assert_eq!(passed, core, "every object is validated:\n{out}");
}

/// `validate_monitors.mjs` on a YAML file: (passed, output).
fn validate_monitors(file: &Path) -> (bool, String) {
    output(
        Command::new("node")
            .arg(deploy_dir().join("checks/validate_monitors.mjs"))
            .arg(provisioned(NODE_MODULES_ENV))
            .arg(file),
    )
}

fn at<'a>(v: &'a Value, pointer: &str) -> &'a Value {
    v.pointer(pointer)
        .unwrap_or_else(|| panic!("no {pointer} in {v:#}"))
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    at(v, pointer)
        .as_str()
        .unwrap_or_else(|| panic!("{pointer} is not a string in {v:#}"))
}

fn array<'a>(v: &'a Value, pointer: &str) -> &'a Vec<Value> {
    at(v, pointer)
        .as_array()
        .unwrap_or_else(|| panic!("{pointer} is not a list in {v:#}"))
}

/// The item of a list of named things (containers, ports, volumes, env) with this name.
fn named<'a>(list: &'a [Value], name: &str) -> &'a Value {
    list.iter()
        .find(|x| x["name"] == name)
        .unwrap_or_else(|| panic!("nothing named {name} in {list:#?}"))
}

fn strings(v: &Value, pointer: &str) -> Vec<String> {
    array(v, pointer)
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

/// The value of `--flag=value` in an argument list.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let prefix = format!("{name}=");
    args.iter().find_map(|a| a.strip_prefix(prefix.as_str()))
}

fn assert_restrictive(pod: &Value, container: &Value) {
    let what = str_at(container, "/name");
    let p = at(pod, "/securityContext");
    assert_eq!(p["runAsNonRoot"], true, "{what}: {p:#}");
    assert!(p["runAsUser"].as_i64().unwrap() > 0, "{what}: {p:#}");
    assert_eq!(p["seccompProfile"]["type"], "RuntimeDefault", "{what}");
    let c = at(container, "/securityContext");
    assert_eq!(c["runAsNonRoot"], true, "{what}: {c:#}");
    assert_eq!(c["readOnlyRootFilesystem"], true, "{what}: {c:#}");
    assert_eq!(c["allowPrivilegeEscalation"], false, "{what}: {c:#}");
    assert_eq!(
        c["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{what}"
    );
    assert_eq!(c["seccompProfile"]["type"], "RuntimeDefault", "{what}");
    assert_eq!(pod["automountServiceAccountToken"], false, "{what}");
    assert!(
        at(container, "/resources").get("limits").is_some(),
        "{what} has limits"
    );
}

/// What every values file must render: the coordinator, the workers and the wiring between them.
fn assert_chart_shape(r: &Render) {
    // Coordinator: one Deployment (Recreate: one writer of the store) with its PVC.
    let deploy = r.one("Deployment", "pd-protodino-coordinator");
    assert_eq!(at(deploy, "/spec/replicas"), 1);
    assert_eq!(str_at(deploy, "/spec/strategy/type"), "Recreate");
    let pod = at(deploy, "/spec/template/spec");
    let coord = named(array(pod, "/containers"), "coordinator");
    assert_eq!(
        strings(coord, "/command"),
        ["/usr/local/bin/protodino-coordinator"]
    );
    let args = strings(coord, "/args");
    let ports = array(coord, "/ports");
    let grpc_port = at(named(ports, "grpc"), "/containerPort").as_i64().unwrap();
    let metrics_port = at(named(ports, "metrics"), "/containerPort")
        .as_i64()
        .unwrap();
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        assert_eq!(
            at(coord, &format!("/{probe}/grpc/port")).as_i64(),
            Some(grpc_port),
            "{probe} is a native gRPC probe on the health service"
        );
    }
    assert_restrictive(pod, coord);
    let volumes = array(pod, "/volumes");
    let mounts = array(coord, "/volumeMounts");
    let mount_of = |volume: &str| str_at(named(mounts, volume), "/mountPath").to_string();
    // The store lives on the claim.
    let store = flag(&args, "--store").expect("--store");
    assert!(store.starts_with(&(mount_of("store") + "/")), "{store}");
    let claim = str_at(named(volumes, "store"), "/persistentVolumeClaim/claimName");
    r.one("PersistentVolumeClaim", claim);
    // The presets come from the ConfigMap, mounted at --configs-dir.
    assert_eq!(
        flag(&args, "--configs-dir"),
        Some(mount_of("configs").as_str())
    );
    let cm = r.one(
        "ConfigMap",
        str_at(named(volumes, "configs"), "/configMap/name"),
    );
    let keys: BTreeSet<&str> = at(cm, "/data")
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, preset_files().keys().map(String::as_str).collect());
    // Both tokens from their Secrets, each mounted where its flag points.
    for (volume, flag_name) in [
        ("job-token", "--job-token-file"),
        ("join-token", "--join-token-file"),
    ] {
        let file = flag(&args, flag_name).unwrap_or_else(|| panic!("{flag_name}"));
        assert_eq!(file, format!("{}/token", mount_of(volume)));
        let secret = r.one(
            "Secret",
            str_at(named(volumes, volume), "/secret/secretName"),
        );
        let key = str_at(named(volumes, volume), "/secret/items/0/key");
        let token = str_at(secret, &format!("/data/{key}"));
        assert!(token.len() >= 24, "{volume}: an empty or short token");
    }
    assert_eq!(
        flag(&args, "--listen"),
        Some(format!("0.0.0.0:{grpc_port}").as_str())
    );
    assert_eq!(
        flag(&args, "--metrics-listen"),
        Some(format!("0.0.0.0:{metrics_port}").as_str())
    );
    let annotations = at(deploy, "/spec/template/metadata/annotations");
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], metrics_port.to_string());

    // Its Service: grpc and metrics ports, selecting the coordinator pod.
    let svc = r.one("Service", "pd-protodino-coordinator");
    let svc_ports = array(svc, "/spec/ports");
    assert_eq!(
        at(named(svc_ports, "grpc"), "/port").as_i64(),
        Some(grpc_port)
    );
    assert_eq!(
        at(named(svc_ports, "metrics"), "/port").as_i64(),
        Some(metrics_port)
    );
    assert_selects(
        at(svc, "/spec/selector"),
        at(deploy, "/spec/template/metadata/labels"),
    );

    // Workers: a Parallel StatefulSet behind a headless Service that publishes unready pods.
    let sts = r.one("StatefulSet", "pd-protodino-worker");
    assert_eq!(str_at(sts, "/spec/podManagementPolicy"), "Parallel");
    let headless = r.one("Service", str_at(sts, "/spec/serviceName"));
    assert_eq!(str_at(headless, "/spec/clusterIP"), "None");
    assert_eq!(at(headless, "/spec/publishNotReadyAddresses"), true);
    assert_selects(
        at(headless, "/spec/selector"),
        at(sts, "/spec/template/metadata/labels"),
    );
    assert_selects(
        at(sts, "/spec/selector/matchLabels"),
        at(sts, "/spec/template/metadata/labels"),
    );
    let wpod = at(sts, "/spec/template/spec");
    let worker = named(array(wpod, "/containers"), "worker");
    assert_eq!(
        str_at(worker, "/image"),
        str_at(coord, "/image"),
        "one image"
    );
    assert_eq!(
        strings(worker, "/command"),
        ["/usr/local/bin/protodino", "worker"]
    );
    let wargs = strings(worker, "/args");
    assert_eq!(
        flag(&wargs, "--coordinator"),
        Some(format!("http://pd-protodino-coordinator:{grpc_port}").as_str())
    );
    assert_eq!(flag(&wargs, "--name"), Some("$(POD_NAME)"));
    assert_eq!(flag(&wargs, "--advertise-host"), Some("$(POD_IP)"));
    let env = array(worker, "/env");
    for (var, path) in [
        ("POD_NAME", "metadata.name"),
        ("POD_IP", "status.podIP"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        assert_eq!(
            str_at(named(env, var), "/valueFrom/fieldRef/fieldPath"),
            path,
            "downward API {var}"
        );
    }
    assert_restrictive(wpod, worker);
    let wvolumes = array(wpod, "/volumes");
    let wmounts = array(worker, "/volumeMounts");
    let wmount = |volume: &str| str_at(named(wmounts, volume), "/mountPath").to_string();
    // /dev/shm is memory.
    let shm = wmounts
        .iter()
        .find(|m| m["mountPath"] == "/dev/shm")
        .expect("a /dev/shm mount");
    let shm_volume = named(wvolumes, str_at(shm, "/name"));
    assert_eq!(str_at(shm_volume, "/emptyDir/medium"), "Memory");
    assert!(shm_volume["emptyDir"]["sizeLimit"].is_string());
    // The worker has the join token and never the job token.
    let secrets: Vec<&str> = wvolumes
        .iter()
        .filter_map(|v| v.pointer("/secret/secretName").and_then(Value::as_str))
        .collect();
    assert_eq!(
        secrets,
        [str_at(named(volumes, "join-token"), "/secret/secretName")]
    );
    assert_eq!(
        flag(&wargs, "--join-token-file"),
        Some(format!("{}/token", wmount("join-token")).as_str())
    );
    // Data and checkpoints: the same volumes, at the roots the flags name, in both pods.
    for (volume, flag_name) in [
        ("data", "--data-root"),
        ("checkpoints", "--checkpoint-root"),
    ] {
        assert_eq!(flag(&wargs, flag_name), Some(wmount(volume).as_str()));
        assert_eq!(flag(&args, flag_name), Some(mount_of(volume).as_str()));
        assert_eq!(named(wvolumes, volume), named(volumes, volume), "{volume}");
    }
    // Metrics: a port, --metrics-listen on it, and scrape annotations.
    let wports = array(worker, "/ports");
    let wmetrics = at(named(wports, "metrics"), "/containerPort")
        .as_i64()
        .unwrap();
    let collective = at(named(wports, "collective"), "/containerPort")
        .as_i64()
        .unwrap();
    assert_eq!(
        flag(&wargs, "--metrics-listen"),
        Some(format!("0.0.0.0:{wmetrics}").as_str())
    );
    assert_eq!(
        flag(&wargs, "--collective-listen"),
        Some(format!("0.0.0.0:{collective}").as_str())
    );
    let wann = at(sts, "/spec/template/metadata/annotations");
    assert_eq!(wann["prometheus.io/scrape"], "true");
    assert_eq!(wann["prometheus.io/port"], wmetrics.to_string());
    assert_eq!(wann["prometheus.io/path"], "/metrics");

    // app.kubernetes.io labels on everything.
    for o in &r.objects {
        let labels = at(o, "/metadata/labels");
        for key in [
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
        ] {
            assert!(
                labels[key].is_string(),
                "{key} on {}",
                o["metadata"]["name"]
            );
        }
    }
}

/// Every label of `selector` is on `labels`.
fn assert_selects(selector: &Value, labels: &Value) {
    let selector = selector.as_object().unwrap();
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(&labels[k], v, "selector {k} in {labels:#}");
    }
}

fn worker_container(r: &Render) -> &Value {
    let sts = r.one("StatefulSet", "pd-protodino-worker");
    named(array(sts, "/spec/template/spec/containers"), "worker")
}

fn env_value(container: &Value, var: &str) -> Option<String> {
    array(container, "/env")
        .iter()
        .find(|e| e["name"] == var)
        .map(|e| str_at(e, "/value").to_string())
}

/// The repository's presets, `configs/*.toml`, by file name.
fn preset_files() -> BTreeMap<String, Vec<u8>> {
    toml_files(&repo_root().join("configs"))
}

fn toml_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "toml"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

fn summary(r: &Render) -> String {
    r.kinds()
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn the_charts_copy_of_the_presets_equals_configs() {
    let repo = preset_files();
    assert!(repo.contains_key("default.toml") && repo.contains_key("cpu-demo.toml"));
    let chart = toml_files(&deploy_dir().join("protodino/files/configs"));
    assert_eq!(
        repo.keys().collect::<Vec<_>>(),
        chart.keys().collect::<Vec<_>>(),
        "deploy/protodino/files/configs/ must hold exactly configs/*.toml"
    );
    for (name, bytes) in &repo {
        assert!(
            &chart[name] == bytes,
            "deploy/protodino/files/configs/{name} differs from configs/{name}: copy it again"
        );
    }
}

#[test]
fn default_values_lint_render_and_validate_strictly() {
    let r = render(&[]);
    assert!(r.log.contains("lint:"), "the lint ran: {}", r.log);
    assert_kubernetes_valid(&r);
    assert_chart_shape(&r);
    let kinds = r.kinds();
    let expected: BTreeMap<String, usize> = [
        ("ConfigMap", 1),
        ("Deployment", 1),
        ("PersistentVolumeClaim", 1),
        ("Secret", 2),
        ("Service", 2),
        ("ServiceAccount", 1),
        ("StatefulSet", 1),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_string(), n))
    .collect();
    assert_eq!(kinds, expected, "no ServiceMonitor unless asked for");
    assert_eq!(std::fs::read_to_string(r.monitors()).unwrap(), "");
    // Two different generated tokens.
    let tokens: BTreeSet<&str> = r
        .all("Secret")
        .iter()
        .map(|s| str_at(s, "/data/token"))
        .collect();
    assert_eq!(tokens.len(), 2, "the job and join tokens differ");
    // CPU workers by default: no GPU anywhere.
    let worker = worker_container(&r);
    assert!(!at(worker, "/resources").to_string().contains("gpu"));
    assert_eq!(env_value(worker, "NCCL_DEBUG").as_deref(), Some("WARN"));
    let sts = r.one("StatefulSet", "pd-protodino-worker");
    assert!(sts["spec"]["template"]["spec"]["runtimeClassName"].is_null());
    // The notes show the grpcurl session and the CLI.
    let notes = r.notes();
    for line in [
        "grpcurl -plaintext localhost:50051 list",
        "grpcurl -plaintext localhost:50051 grpc.health.v1.Health/Check",
        "-H \"$T\"",
        "T=\"authorization: Bearer $(cat job-token)\"",
        "protodino.v1.JobService/SubmitJob",
        "protodino.v1.JobService/WatchJob",
        "kubectl -n ml port-forward svc/pd-protodino-coordinator 50051:50051",
        "get secret pd-protodino-job-token",
        "protodino submit configs/cpu-demo.toml",
        "protodino watch JOB_ID",
    ] {
        assert!(notes.contains(line), "NOTES.txt lacks {line:?}:\n{notes}");
    }
}

#[test]
fn gpu_values_render_eight_gpu_workers_with_nccl_settings() {
    let r = render(&[&deploy_dir().join("values-gpu.yaml")]);
    assert_kubernetes_valid(&r);
    assert_chart_shape(&r);
    println!("values-gpu.yaml renders: {}", summary(&r));
    let sts = r.one("StatefulSet", "pd-protodino-worker");
    assert_eq!(at(sts, "/spec/replicas"), 8);
    let pod = at(sts, "/spec/template/spec");
    assert_eq!(str_at(pod, "/runtimeClassName"), "nvidia");
    assert!(
        array(pod, "/tolerations")
            .iter()
            .any(|t| t["key"] == "nvidia.com/gpu" && t["operator"] == "Exists"),
        "tolerates the GPU taint"
    );
    assert!(pod["nodeSelector"].is_object());
    let worker = worker_container(&r);
    assert_eq!(at(worker, "/resources/limits/nvidia.com~1gpu"), 1);
    assert!(at(worker, "/resources/limits/memory").is_string());
    assert_eq!(env_value(worker, "NCCL_DEBUG").as_deref(), Some("WARN"));
    assert_eq!(
        env_value(worker, "NCCL_SOCKET_IFNAME").as_deref(),
        Some("eth0")
    );
    assert_eq!(env_value(worker, "NCCL_IB_DISABLE").as_deref(), Some("1"));
    let args = strings(worker, "/args");
    assert_eq!(flag(&args, "--threads"), Some("8"));
    let shm = named(array(pod, "/volumes"), "dshm");
    assert_eq!(str_at(shm, "/emptyDir/sizeLimit"), "16Gi");
    assert_eq!(
        str_at(
            named(array(pod, "/volumes"), "checkpoints"),
            "/persistentVolumeClaim/claimName"
        ),
        "protodino-checkpoints"
    );
    let notes = r.notes();
    assert!(
        notes.contains("8 replicas, 1 nvidia.com/gpu each"),
        "{notes}"
    );
    assert!(!notes.contains("WARNING"), "claims are set: {notes}");
}

#[test]
fn cpu_values_render_workers_without_gpus() {
    let r = render(&[&deploy_dir().join("values-cpu.yaml")]);
    assert_kubernetes_valid(&r);
    assert_chart_shape(&r);
    let sts = r.one("StatefulSet", "pd-protodino-worker");
    assert_eq!(at(sts, "/spec/replicas"), 3);
    assert!(sts["spec"]["template"]["spec"]["runtimeClassName"].is_null());
    let worker = worker_container(&r);
    let resources = at(worker, "/resources").to_string();
    assert!(!resources.contains("gpu"), "{resources}");
    assert_eq!(env_value(worker, "NCCL_DEBUG"), None, "debug unset on CPUs");
    assert_eq!(flag(&strings(worker, "/args"), "--threads"), Some("2"));
}

#[test]
fn service_monitors_validate_against_the_prometheus_operator_crd_schema() {
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("monitors.yaml");
    std::fs::write(
        &values,
        "metrics:\n  serviceMonitor:\n    enabled: true\n    interval: 15s\n    labels:\n      release: prometheus\n",
    )
    .unwrap();
    let r = render(&[&values]);
    assert_kubernetes_valid(&r);
    let monitors = r.all("ServiceMonitor");
    assert_eq!(monitors.len(), 2, "{:?}", r.kinds());
    let (ok, out) = validate_monitors(&r.monitors());
    assert!(ok, "{out}");
    for name in ["pd-protodino-coordinator", "pd-protodino-worker"] {
        assert!(
            out.contains(&format!(
                "valid monitoring.coreos.com/v1 ServiceMonitor/{name}"
            )),
            "{out}"
        );
    }
    // Each one selects a rendered Service that has the port it scrapes.
    for m in monitors {
        assert_eq!(at(m, "/metadata/labels/release"), "prometheus");
        let port = str_at(m, "/spec/endpoints/0/port");
        assert_eq!(str_at(m, "/spec/endpoints/0/interval"), "15s");
        let selector = at(m, "/spec/selector/matchLabels").as_object().unwrap();
        let services: Vec<&Value> = r
            .all("Service")
            .into_iter()
            .filter(|s| {
                selector
                    .iter()
                    .all(|(k, v)| &s["metadata"]["labels"][k] == v)
            })
            .collect();
        assert_eq!(services.len(), 1, "{}", m["metadata"]["name"]);
        named(array(services[0], "/spec/ports"), port);
    }
    // The schema is really applied: a numeric port name and a unit-less interval are refused.
    let text = std::fs::read_to_string(r.monitors()).unwrap();
    let broken = dir.path().join("broken.yaml");
    std::fs::write(&broken, text.replace("port: metrics", "port: 9090")).unwrap();
    let (ok, out) = validate_monitors(&broken);
    assert!(!ok, "{out}");
    assert!(out.contains("endpoints/0/port must be string"), "{out}");
    std::fs::write(&broken, text.replace("interval: 15s", "interval: 15 s")).unwrap();
    let (ok, out) = validate_monitors(&broken);
    assert!(!ok && out.contains("interval must match pattern"), "{out}");
}

#[test]
fn every_bad_values_file_is_rejected_by_the_schema() {
    let dir = deploy_dir().join("checks/bad");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "{files:?}");
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect: ` line", file.display()));
        match try_render(&[file]) {
            Ok(r) => panic!("{} was accepted: {}", file.display(), summary(&r)),
            Err(log) => {
                assert!(
                    log.contains(expect),
                    "{} was refused, but not for {expect:?}:\n{log}",
                    file.display()
                );
                // Refused both by `helm lint --strict` and by the install-time schema check.
                assert!(log.contains("helm lint --strict failed"), "{log}");
            }
        }
    }
}

#[test]
fn the_chart_refuses_what_the_schema_cannot_express() {
    let dir = tempfile::tempdir().unwrap();
    for (values, expect) in [
        (
            "auth:\n  jobToken:\n    value: same-token-0123456789\n  joinToken:\n    value: same-token-0123456789\n",
            "must differ",
        ),
        (
            "coordinator:\n  grpcPort: 9090\n  metricsPort: 9090\n",
            "coordinator.grpcPort and coordinator.metricsPort must differ",
        ),
        (
            "workers:\n  collectivePort: 9091\n",
            "workers.collectivePort and workers.metricsPort must differ",
        ),
    ] {
        let file = dir.path().join("values.yaml");
        std::fs::write(&file, values).unwrap();
        let log = try_render(&[&file])
            .err()
            .unwrap_or_else(|| panic!("accepted:\n{values}"));
        assert!(log.contains(expect), "{values}\n{log}");
    }
    // Given tokens are used as they are.
    std::fs::write(
        dir.path().join("values.yaml"),
        "auth:\n  jobToken:\n    value: job-token-0123456789\n",
    )
    .unwrap();
    let r = render(&[&dir.path().join("values.yaml")]);
    let secret = r.one("Secret", "pd-protodino-job-token");
    // base64 of "job-token-0123456789"
    assert_eq!(
        str_at(secret, "/data/token"),
        "am9iLXRva2VuLTAxMjM0NTY3ODk="
    );
}

#[test]
fn kubernetes_validate_refuses_unknown_fields_and_wrong_types() {
    let r = render(&[]);
    let dir = tempfile::tempdir().unwrap();
    let sts = r.one("StatefulSet", "pd-protodino-worker").clone();
    let mut unknown = sts.clone();
    unknown["spec"]["podManagmentPolicy"] = "Parallel".into();
    let mut wrong_type = sts;
    wrong_type["spec"]["replicas"] = "two".into();
    for (what, object) in [("unknown", unknown), ("wrong type", wrong_type)] {
        let file = dir.path().join("broken.yaml");
        std::fs::write(&file, serde_json::to_string(&object).unwrap()).unwrap();
        let (ok, out) = kubernetes_validate(&file);
        assert!(!ok, "{what} accepted:\n{out}");
        assert!(!out.contains(" passed for resource "), "{out}");
    }
}

#[test]
fn the_chart_passes_only_flags_that_the_binaries_have() {
    let r = render(&[&deploy_dir().join("values-gpu.yaml")]);
    let coordinator = {
        let d = r.one("Deployment", "pd-protodino-coordinator");
        named(array(d, "/spec/template/spec/containers"), "coordinator").clone()
    };
    let worker = worker_container(&r).clone();
    let help = |exe: PathBuf, sub: &[&str]| -> BTreeSet<String> {
        let (ok, out) = output(Command::new(&exe).args(sub).arg("--help"));
        assert!(ok, "{} --help: {out}", exe.display());
        out.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
            .filter(|w| w.starts_with("--"))
            .map(str::to_string)
            .collect()
    };
    let cases = [
        (
            coordinator,
            help(
                binary("protodino-coordinator", "protodino-coordinator"),
                &[],
            ),
        ),
        (
            worker,
            help(binary("protodino-worker", "protodino"), &["worker"]),
        ),
    ];
    for (container, known) in cases {
        let args = strings(&container, "/args");
        assert!(args.len() >= 8, "{args:?}");
        for a in &args {
            let name = a.split('=').next().unwrap();
            assert!(
                known.contains(name),
                "{} passes {name}, which its binary lacks: {known:?}",
                container["name"]
            );
        }
    }
}

#[test]
fn the_dockerfile_is_hadolint_clean() {
    let dockerfile = repo_root().join("Dockerfile");
    let (ok, out) = output(Command::new(tool("hadolint")).arg(&dockerfile));
    assert!(ok && out.trim().is_empty(), "hadolint Dockerfile:\n{out}");
    // The image holds both binaries where the chart runs them.
    let text = std::fs::read_to_string(&dockerfile).unwrap();
    assert!(text.contains("-p protodino-coordinator -p protodino-worker"));
    assert!(text.contains("/usr/local/bin/"));
    // hadolint does report a bad instruction.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("Dockerfile");
    std::fs::write(&broken, format!("{text}RUN cd /src && make\n")).unwrap();
    let (ok, out) = output(Command::new(tool("hadolint")).arg(&broken));
    assert!(!ok && out.contains("DL3003"), "{out}");
}

#[test]
fn the_charts_yaml_passes_yamllint() {
    let config = deploy_dir().join(".yamllint");
    let lint = |args: &[&Path]| {
        let mut cmd = Command::new(tool("yamllint"));
        cmd.current_dir(repo_root())
            .arg("-c")
            .arg(&config)
            .args(["--strict", "-f", "parsable"])
            .args(args);
        output(&mut cmd)
    };
    let (ok, out) = lint(&[Path::new("deploy")]);
    assert!(ok && out.trim().is_empty(), "yamllint:\n{out}");
    // It looked at the values files, and not at the templates.
    let (ok, listed) = output(
        Command::new(tool("yamllint"))
            .current_dir(repo_root())
            .arg("-c")
            .arg(&config)
            .args(["--list-files", "deploy"]),
    );
    assert!(ok, "{listed}");
    for file in [
        "deploy/protodino/values.yaml",
        "deploy/protodino/Chart.yaml",
        "deploy/values-gpu.yaml",
        "deploy/values-cpu.yaml",
        "deploy/checks/bad/negative-replicas.yaml",
    ] {
        assert!(
            listed.lines().any(|l| l == file),
            "{file} not linted:\n{listed}"
        );
    }
    assert!(!listed.contains("templates/"), "{listed}");
    // And it does report bad YAML.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "workers:\n  replicas: 2   \n  enabled: yes\n").unwrap();
    let (ok, out) = lint(&[&bad]);
    assert!(
        !ok && out.contains("trailing-spaces") && out.contains("truthy"),
        "{out}"
    );
}
