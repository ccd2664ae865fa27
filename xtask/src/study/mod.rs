//! `cargo xtask study [--quick] [--plan collapse|objectives]`: the partial-prototype-collapse
//! study (arXiv 2410.14060's finding, end to end and in the frozen-feature mechanism
//! experiment) and the objective sweep.
//!
//! Modules: this file plans and runs the training service's jobs and builds each run's record;
//! [`mechanism`] runs the frozen-feature experiment (`protodino-mechanism`) and turns its records
//! into the same shape; [`report`] writes `results.md` (tables, seed noise, figures).
//!
//! End-to-end runs are jobs of the training service: the study starts its own local coordinator
//! with two worker agents (one libtorch thread each, [`crate::cluster::LocalService`]) and submits
//! each run's configuration (configs/cpu-demo.toml + configs/study/*.toml + a run overlay, merged
//! into one TOML file) through the job API, follows it with `protodino watch`, then reads the
//! job's `metrics.jsonl` (step, collapse and final records) from the checkpoint root and runs
//! `protodino fewshot` on its final checkpoint (kept with the run). Mechanism runs train only the
//! DINO head on frozen features, two at a time (one thread each), after the service is stopped.
//! Runs live in `<cache>/study/<plan>/<name>/`; a finished run (its `result.json`) is reused, an
//! interrupted one starts again. Every run's record (config, per-analysis series, schedule sums,
//! final figures, wall time) goes to `results.json`, the plots to PNG files and the tables to
//! `results.md` in the output directory (`docs/` for the collapse study, `docs/objectives/` for
//! the objective sweep, the plan's `report/` under the cache with `--quick`).
//!
//! Plans:
//! * `collapse` (default): DINO against DINO + KoLeo-proto — end to end on balanced
//!   Fashion-MNIST (K ∈ {1024, 4096}, a second seed at K = 1024) and its long-tailed variant
//!   (K = 1024), and the mechanism experiment on synthetic clustered features (K ∈ {1024, 4096})
//!   and on the frozen features of the study's own λ = 0 encoder (K = 1024); always λ ∈ {0, 0.1}
//!   (`--quick`: the same kinds of run, fewer and shorter);
//! * `objectives`: demo-sized runs of DINO, iBOT, DINO-vMF and iBOT-vMF, each with λ ∈ {0, 0.1}
//!   (configs/study/objectives/*.toml).

mod mechanism;
mod report;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::cache_root;
use crate::cluster::LocalService;
use crate::repo_root;
pub use mechanism::Source;

/// Classes 0–2 of the long-tailed split are the head (6000–2154 images), 7–9 the tail
/// (215–60 images); the labels are in decreasing order of frequency by construction.
const HEAD_CLASSES: std::ops::Range<usize> = 0..3;
const TAIL_CLASSES: std::ops::Range<usize> = 7..10;

/// A frozen-feature run: the source of its features and its step count.
#[derive(Debug, Clone, Copy, PartialEq)]
struct MechanismRun {
    source: Source,
    steps: i64,
}

/// One run of the study.
#[derive(Debug, Clone)]
struct RunSpec {
    /// `balanced`, `lt100` (end to end) or the mechanism's feature source.
    dataset: &'static str,
    k: i64,
    lambda: f64,
    /// The objective overlay (configs/study/objectives/NAME.toml); None: the collapse study's
    /// DINO with its own recipe (configs/study/base.toml).
    objective: Option<&'static str>,
    /// `train.seed` (end to end) or `--seed` (mechanism: the head's initialisation and order).
    seed: u64,
    /// Some: a frozen-feature run of `protodino-mechanism` instead of a service job.
    mechanism: Option<MechanismRun>,
}

impl RunSpec {
    fn name(&self) -> String {
        let seed = if self.seed == 0 {
            String::new()
        } else {
            format!("-seed{}", self.seed)
        };
        match (self.mechanism, self.objective) {
            (Some(m), _) => format!(
                "mechanism-{}-k{}-lambda{}{seed}",
                m.source.name(),
                self.k,
                self.lambda
            ),
            (None, Some(o)) => format!("{o}-lambda{}", self.lambda),
            (None, None) => format!("{}-k{}-lambda{}{seed}", self.dataset, self.k, self.lambda),
        }
    }
}

/// Which runs `cargo xtask study` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Plan {
    /// DINO vs DINO + KoLeo-proto: end to end and on frozen features.
    Collapse,
    /// DINO, iBOT, DINO-vMF and iBOT-vMF on the demo recipe, λ ∈ {0, 0.1}.
    Objectives,
}

impl Plan {
    fn name(self) -> &'static str {
        match self {
            Plan::Collapse => "collapse",
            Plan::Objectives => "objectives",
        }
    }
}

/// The objective sweep: each overlay of configs/study/objectives/ with and without KoLeo-proto.
const OBJECTIVES: [&str; 4] = ["dino", "ibot", "dino-vmf", "ibot-vmf"];

/// The KoLeo-proto weights every comparison is made at.
const LAMBDAS: [f64; 2] = [0.0, 0.1];

/// The end-to-end run whose final encoder gives the mechanism's real frozen features.
const ENCODER_RUN: &str = "balanced-k1024-lambda0";

fn plan(which: Plan, quick: bool) -> Vec<RunSpec> {
    let e2e = |dataset, k, lambda, seed| RunSpec {
        dataset,
        k,
        lambda,
        objective: None,
        seed,
        mechanism: None,
    };
    let mech = |source: Source, k, lambda, steps| RunSpec {
        dataset: source.name(),
        k,
        lambda,
        objective: None,
        seed: 0,
        mechanism: Some(MechanismRun { source, steps }),
    };
    let pairs = |f: &dyn Fn(f64) -> RunSpec| LAMBDAS.map(f).to_vec();
    if which == Plan::Objectives {
        return OBJECTIVES
            .iter()
            .flat_map(|&o| {
                pairs(&|lambda| RunSpec {
                    objective: Some(o),
                    ..e2e("balanced", 1024, lambda, 0)
                })
            })
            .collect();
    }
    // The headline pairs first, so a partial study is already informative; the mechanism's real
    // features need ENCODER_RUN's checkpoint, so the service's runs come before every mechanism
    // run.
    let mut v = Vec::new();
    v.extend(pairs(&|l| e2e("balanced", 1024, l, 0)));
    v.extend(pairs(&|l| e2e("lt100", 1024, l, 0)));
    if !quick {
        v.extend(pairs(&|l| e2e("balanced", 4096, l, 0)));
        v.extend(pairs(&|l| e2e("balanced", 1024, l, 1)));
    }
    let (syn, syn4096, real) = if quick {
        (1200, 0, 300)
    } else {
        (4800, 2400, 1200)
    };
    v.extend(pairs(&|l| mech(Source::Synthetic, 1024, l, syn)));
    if syn4096 > 0 {
        v.extend(pairs(&|l| mech(Source::Synthetic, 4096, l, syn4096)));
    }
    v.extend(pairs(&|l| mech(Source::Real, 1024, l, real)));
    v
}

pub struct StudyArgs {
    pub quick: bool,
    pub plan: Plan,
    pub out: Option<PathBuf>,
}

/// Agents of the study's service, each with one libtorch thread; the global batch is the
/// configuration's `batch_size_per_worker`, split between them.
const WORKERS: usize = 2;

/// The study's local service, started when the first run needs it.
struct StudyService {
    release: PathBuf,
    dir: PathBuf,
    service: Option<LocalService>,
}

impl StudyService {
    fn get(&mut self) -> Result<&LocalService> {
        if self.service.is_none() {
            self.service = Some(LocalService::start(&self.release, &self.dir, WORKERS, 1)?);
        }
        Ok(self.service.as_ref().expect("started above"))
    }
}

pub fn study(args: StudyArgs) -> Result<()> {
    crate::libtorch::ensure()?;
    crate::data::ensure()?;
    let font = ensure_font()?;
    let plan = plan(args.plan, args.quick);
    let with_mechanism = plan.iter().any(|s| s.mechanism.is_some());
    let release = if with_mechanism {
        crate::cluster::build_release_bins(&[mechanism::BIN])?
    } else {
        crate::cluster::build_release()?
    };
    let bin = release.join("protodino");
    ensure!(bin.exists(), "{} was not built", bin.display());
    let mechanism_bin = with_mechanism.then(|| release.join(mechanism::BIN.1));

    let mode = match (args.plan, args.quick) {
        (Plan::Collapse, false) => "full".to_string(),
        (Plan::Collapse, true) => "quick".to_string(),
        (p, quick) => format!("{}{}", p.name(), if quick { "-quick" } else { "" }),
    };
    let runs_dir = cache_root().join("study").join(&mode);
    let out = match (args.out, args.plan) {
        (Some(o), _) => o,
        (None, _) if args.quick => runs_dir.join("report"),
        (None, Plan::Collapse) => repo_root().join("docs"),
        (None, Plan::Objectives) => repo_root().join("docs/objectives"),
    };
    let mut service = StudyService {
        release,
        dir: runs_dir.join("service"),
        service: None,
    };
    fs::create_dir_all(&out)?;
    let started = Instant::now();
    let progress = |i: usize, name: &str| {
        eprintln!(
            "xtask study: run {}/{}: {name} (elapsed {:.1} min)",
            i + 1,
            plan.len(),
            started.elapsed().as_secs_f64() / 60.0
        )
    };
    let mut records = Vec::new();
    for (i, spec) in plan
        .iter()
        .enumerate()
        .filter(|(_, s)| s.mechanism.is_none())
    {
        progress(i, &spec.name());
        records.push(run_one(
            &mut service,
            &bin,
            &runs_dir.join(spec.name()),
            spec,
            args.quick,
        )?);
    }
    if let Some(s) = service.service.take() {
        s.stop();
    }
    // Mechanism runs two at a time (one thread each: the two cores), after the service is gone.
    let mech: Vec<&RunSpec> = plan.iter().filter(|s| s.mechanism.is_some()).collect();
    if let Some(mbin) = &mechanism_bin {
        let encoder = runs_dir.join(ENCODER_RUN).join(FINAL_CHECKPOINT);
        let announce = |s: &RunSpec| {
            let i = plan.iter().position(|p| p.name() == s.name()).unwrap_or(0);
            progress(i, &s.name());
        };
        records.extend(mechanism::run_all(
            mbin, &runs_dir, &mech, &encoder, &announce,
        )?);
    }
    let total = started.elapsed().as_secs_f64();
    let command = format!(
        "cargo xtask study{}{}",
        if args.plan == Plan::Collapse {
            String::new()
        } else {
            format!(" --plan {}", args.plan.name())
        },
        if args.quick { " --quick" } else { "" }
    );
    let doc = json!({
        "command": command,
        "hardware": hardware(),
        "wall_seconds_this_invocation": total,
        "wall_seconds_sum_of_runs": records.iter().map(|r| r["wall_seconds"].as_f64().unwrap_or(0.0)).sum::<f64>(),
        "plan": args.plan.name(),
        "service": { "workers": WORKERS, "threads_per_worker": 1 },
        "head_classes": HEAD_CLASSES.collect::<Vec<_>>(),
        "tail_classes": TAIL_CLASSES.collect::<Vec<_>>(),
        "runs": records,
    });
    let doc = portable(doc);
    fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&doc)? + "\n",
    )?;
    crate::plots::register_font(&font)?;
    // The figures compare λ within a data set and K; the objective sweep is its table alone.
    let figures = match args.plan {
        Plan::Collapse => crate::plots::all(&doc, &out)?,
        Plan::Objectives => Vec::new(),
    };
    let md = report::markdown(&doc, &figures);
    fs::write(out.join("results.md"), md)?;
    println!("{}", out.join("results.md").display());
    Ok(())
}

/// Step records kept per run in results.json (the sums use every logged step).
const SERIES_POINTS: usize = 200;

/// The copy of an end-to-end run's final checkpoint kept in its run directory (the service's
/// own directory is cleared when a study starts again).
const FINAL_CHECKPOINT: &str = "final.safetensors";

/// Σ over the run of `field` (`lr`, `1 − momentum`, …) from its step records, each record
/// standing for the steps since the previous one (exact when every step is logged); `filter`
/// keeps only some records (e.g. those with the last layer trainable).
fn schedule_sum(
    steps: &[Value],
    value: impl Fn(&Value) -> Option<f64>,
    filter: impl Fn(&Value) -> bool,
) -> f64 {
    let mut prev = 0i64;
    let mut sum = 0.0;
    for r in steps {
        let Some(step) = r["step"].as_i64() else {
            continue;
        };
        let n = (step - prev).max(0) as f64;
        prev = step;
        if filter(r)
            && let Some(v) = value(r)
        {
            sum += n * v;
        }
    }
    sum
}

/// The schedule figures of a run: Σ(1 − m) (how much of the student the teacher took in),
/// Σ lr over all steps and over the steps whose last layer trained, and the last momentum.
fn schedule_sums(steps: &[Value]) -> Value {
    let trainable = |r: &Value| r["last_layer_frozen"].as_bool() != Some(true);
    json!({
        "sum_one_minus_momentum": schedule_sum(steps, |r| Some(1.0 - r["momentum"].as_f64()?), |_| true),
        "sum_lr": schedule_sum(steps, |r| r["lr"].as_f64(), |_| true),
        "sum_lr_last_layer_trainable": schedule_sum(steps, |r| r["lr"].as_f64(), trainable),
        "final_momentum": steps.last().map(|r| r["momentum"].clone()),
    })
}

/// The fields of a step record (the worker's or the mechanism's) the study keeps: losses,
/// schedules and target entropy; those a record lacks are left out.
fn step_summary(r: &Value) -> Value {
    const FIELDS: [&str; 9] = [
        "step",
        "dino_loss",
        "koleo_proto",
        "total",
        "lr",
        "momentum",
        "teacher_temp",
        "teacher_entropy",
        "last_layer_frozen",
    ];
    FIELDS
        .iter()
        .filter(|f| !r[**f].is_null())
        .map(|f| (f.to_string(), r[*f].clone()))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// At most `n` evenly spaced entries of `v` (the last one always kept), for the series in
/// results.json.
fn thin(v: Vec<Value>, n: usize) -> Vec<Value> {
    if v.len() <= n || n < 2 {
        return v;
    }
    let last = v.len() - 1;
    (0..n).map(|i| v[i * last / (n - 1)].clone()).collect()
}

/// Evaluation subsets (evenly spaced, so class proportions are kept): memory-bank / few-shot
/// pool images and test images.
fn eval_limits(quick: bool) -> (i64, i64) {
    if quick { (5000, 2000) } else { (10000, 0) }
}

/// The configuration files of a run, in layering order.
fn run_configs(spec: &RunSpec, quick: bool) -> Vec<PathBuf> {
    let root = repo_root();
    let mut configs: Vec<PathBuf> = vec![root.join("configs/cpu-demo.toml")];
    if let Some(o) = spec.objective {
        configs.push(root.join(format!("configs/study/objectives/{o}.toml")));
        if quick {
            configs.push(root.join("configs/study/quick.toml"));
        }
        return configs;
    }
    configs.push(root.join("configs/study/base.toml"));
    if quick {
        configs.push(root.join("configs/study/quick.toml"));
    }
    configs.push(root.join(format!("configs/study/k{}.toml", spec.k)));
    if spec.dataset == "lt100" {
        configs.push(root.join("configs/study/lt100.toml"));
    }
    configs
}

/// The TOML files merged in order (later keys win, tables merge key by key): what one
/// `--config` per layer gives `protodino train`, as the single file a job carries.
fn merge_toml(files: &[PathBuf]) -> Result<toml::Table> {
    let mut out = toml::Table::new();
    for f in files {
        let text = fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let table: toml::Table = text
            .parse()
            .with_context(|| format!("parsing {}", f.display()))?;
        merge_into(&mut out, table);
    }
    Ok(out)
}

/// `from`'s keys into `into`, tables merged key by key.
fn merge_into(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge_into(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Train (or reuse) one run through the service and evaluate it; returns its record.
fn run_one(
    service: &mut StudyService,
    bin: &Path,
    dir: &Path,
    spec: &RunSpec,
    quick: bool,
) -> Result<Value> {
    let result = dir.join("result.json");
    if let Ok(text) = fs::read_to_string(&result) {
        eprintln!("xtask study: reusing {}", result.display());
        return Ok(serde_json::from_str(&text)?);
    }
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::create_dir_all(dir)?;
    let root = repo_root();
    let configs = run_configs(spec, quick);
    let mut merged = merge_toml(&configs)?;
    let (knn_train, knn_test) = eval_limits(quick);
    let run_overlay = format!(
        "[koleo]\nweight = {:?}\n[train]\nseed = {}\n[eval]\nknn_train_images = {knn_train}\nknn_test_images = {knn_test}\n",
        spec.lambda, spec.seed
    );
    merge_into(&mut merged, run_overlay.parse()?);
    let config_file = dir.join("config.toml");
    fs::write(&config_file, toml::to_string(&merged)?)?;
    let global = merged["train"]["batch_size_per_worker"]
        .as_integer()
        .context("the study's configuration sets train.batch_size_per_worker")?
        as usize;

    let started = Instant::now();
    let svc = service.get()?;
    let config_arg = config_file.display().to_string();
    let job = svc.submit(&config_arg, WORKERS, global, &[])?;
    eprintln!("xtask study: job {job}");
    let watch = svc
        .client("watch")
        .arg(&job)
        .arg("--json")
        .stderr(Stdio::inherit())
        .output()
        .context("running protodino watch")?;
    let last: Value = String::from_utf8_lossy(&watch.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .context("protodino watch printed no job")?;
    ensure!(
        watch.status.success() && last["state"] == "succeeded",
        "job {job} did not succeed: {} {}",
        last["state"],
        last["message"]
    );
    let checkpoints = svc.dir.join("checkpoints");
    // `watch --json` prints the job with its result (rank 0's final report) as an object.
    let ckpt_rel = last["result"]["checkpoint"]
        .as_str()
        .context("the job's final report names no checkpoint")?;
    let ckpt = checkpoints.join(ckpt_rel);
    let job_dir = ckpt.parent().context("checkpoint path")?.to_path_buf();
    // The final checkpoint stays with the run: the mechanism's real features and a later
    // study's evaluation read it after the service's directory is gone.
    let kept = dir.join(FINAL_CHECKPOINT);
    fs::copy(&ckpt, &kept)
        .with_context(|| format!("copying {} to {}", ckpt.display(), kept.display()))?;
    let ckpt = kept;
    // Keep the job's own files with the run: its records and resolved configuration.
    let log = dir.join("train.jsonl");
    fs::copy(job_dir.join("metrics.jsonl"), &log)?;
    fs::create_dir_all(dir.join("train"))?;
    fs::copy(job_dir.join("config.json"), dir.join("train/config.json"))?;
    let lines = read_json_lines(&log)?;
    let fin = lines
        .iter()
        .rev()
        .find(|r| r["kind"] == "final")
        .context("the job's metrics.jsonl has no final report")?
        .clone();
    let ckpt = ckpt.display().to_string();
    let ckpt = ckpt.as_str();
    let fewshot_out = Command::new(bin)
        .args([
            "fewshot",
            ckpt,
            "--json",
            "--train-limit",
            &eval_limits(quick).0.to_string(),
        ])
        .args(["--test-limit", &eval_limits(quick).1.to_string()])
        .output()
        .context("starting protodino fewshot")?;
    ensure!(
        fewshot_out.status.success(),
        "protodino fewshot failed: {}",
        String::from_utf8_lossy(&fewshot_out.stderr)
    );
    let fewshot: Value = serde_json::from_slice(&fewshot_out.stdout)?;
    let wall = started.elapsed().as_secs_f64();

    // Series: step losses and schedules, and every analysis.
    let steps: Vec<Value> = lines
        .iter()
        .filter(|r| r["kind"] == "step")
        .map(step_summary)
        .collect();
    let sums = schedule_sums(&steps);
    let analyses: Vec<Value> = lines
        .iter()
        .filter(|r| r["kind"] == "collapse")
        .map(|r| analysis_summary(r, r["step"].clone()))
        .collect();
    let knn = &fin["knn"];
    let knn20 = knn["results"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["k"] == 20))
        .cloned()
        .unwrap_or(Value::Null);
    let per_class: Vec<Option<f64>> = knn20["per_class_top1"]
        .as_array()
        .map(|a| a.iter().map(Value::as_f64).collect())
        .unwrap_or_default();
    let mean_of = |r: std::ops::Range<usize>| -> Option<f64> {
        let v: Vec<f64> = per_class.get(r)?.iter().flatten().copied().collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let balanced = mean_of(0..per_class.len());
    let config: Value = fs::read_to_string(dir.join("train/config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let record = json!({
        "name": spec.name(),
        "kind": "end-to-end",
        "objective": spec.objective,
        "seed": spec.seed,
        "job_id": job,
        "dataset": spec.dataset,
        "k": spec.k,
        "lambda": spec.lambda,
        "config_files": configs.iter().map(|c| c.strip_prefix(&root).unwrap_or(c).display().to_string()).collect::<Vec<_>>(),
        "config": config,
        "wall_seconds": wall,
        "steps": fin["step"],
        "train_images_per_second": fin["images_per_second"],
        "schedule": sums,
        "series": { "steps": thin(steps, SERIES_POINTS), "analyses": analyses },
        "final": {
            "last_step": fin["last_step"],
            "collapse": analysis_summary(&fin["collapse"], fin["step"].clone()),
            "grouped_mass_sorted": fin["collapse"]["usage"]["grouped"]["mass_sorted"],
            "mlcd_mass_sorted": fin["collapse"]["usage"]["mlcd"]["mass_sorted"],
            "knn": {
                "k": 20,
                "top1": knn20["top1"],
                "top5": knn20["top5"],
                "per_class_top1": knn20["per_class_top1"],
                "balanced_top1": balanced,
                "head_top1": mean_of(HEAD_CLASSES),
                "tail_top1": mean_of(TAIL_CLASSES),
                "n_train": knn["n_train"],
                "n_test": knn["n_test"],
            },
            "fewshot": fewshot["results"].as_array().map(|a| a.iter().map(|r| json!({
                "shots": r["shots"], "top1_mean": r["top1"]["mean"], "top1_std": r["top1"]["std"],
            })).collect::<Vec<_>>()),
        },
    });
    fs::write(&result, serde_json::to_string_pretty(&record)? + "\n")?;
    Ok(record)
}

/// The record with this machine's cache and checkout directories written as `$PROTODINO_CACHE`
/// and `.`, so that results.json is the same wherever the study ran.
fn portable(v: Value) -> Value {
    let cache = cache_root().display().to_string();
    let repo = repo_root().display().to_string();
    fn walk(v: Value, cache: &str, repo: &str) -> Value {
        match v {
            Value::String(s) => Value::String(
                s.replace(cache, "$PROTODINO_CACHE")
                    .replace(&format!("{repo}/"), ""),
            ),
            Value::Array(a) => Value::Array(a.into_iter().map(|x| walk(x, cache, repo)).collect()),
            Value::Object(o) => Value::Object(
                o.into_iter()
                    .map(|(k, x)| (k, walk(x, cache, repo)))
                    .collect(),
            ),
            other => other,
        }
    }
    walk(v, &cache, &repo)
}

/// Unique counts by ε (greedy, connected components) of one head's report.
fn unique_by_eps(report: &Value) -> (Value, Value) {
    let counts = report["counts"].as_array().cloned().unwrap_or_default();
    let by = |key: &str| -> Value {
        counts
            .iter()
            .map(|c| (format!("{}", c["eps"]), c[key].clone()))
            .collect::<serde_json::Map<String, Value>>()
            .into()
    };
    (by("greedy"), by("connected_components"))
}

/// The figures of one collapse record (periodic or final) that the study tracks: the teacher
/// head (`report`, `displacement`, `usage`, `sharpness`) and the student head (`student`).
fn analysis_summary(r: &Value, step: Value) -> Value {
    let (unique, components) = unique_by_eps(&r["report"]);
    let (s_unique, s_components) = unique_by_eps(&r["student"]["report"]);
    let u = &r["usage"];
    json!({
        "step": step,
        "unique_greedy": unique,
        "unique_components": components,
        "koleo_proto_teacher": r["report"]["nn"]["koleo_proto"],
        "nn_mean": r["report"]["nn"]["mean"],
        "nn_min": r["report"]["nn"]["min"],
        "displacement_teacher": r["displacement"]["mean"],
        "student": {
            "unique_greedy": s_unique,
            "unique_components": s_components,
            "koleo_proto": r["student"]["report"]["nn"]["koleo_proto"],
            "nn_mean": r["student"]["report"]["nn"]["mean"],
            "nn_min": r["student"]["report"]["nn"]["min"],
            "displacement": r["student"]["displacement"]["mean"],
        },
        "ln_k": if r["ln_k"].is_null() { r["sharpness"]["ln_k"].clone() } else { r["ln_k"].clone() },
        "teacher_entropy": r["sharpness"]["mean_sample_entropy"],
        "teacher_entropy_relative": r["sharpness"]["relative"],
        "usage_entropy": u["mlcd"]["entropy"],
        "usage_effective": u["mlcd"]["effective_number"],
        "clusters_used": u["used_clusters"],
        "grouped_entropy": u["grouped"]["mlcd"]["entropy"],
        "groups_used": u["grouped"]["used_groups"],
    })
}

fn read_json_lines(path: &Path) -> Result<Vec<Value>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

fn hardware() -> Value {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kib| kib / (1024.0 * 1024.0));
    json!({
        "cpu": cpu,
        "logical_cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "memory_gib": mem_gib,
        "gpu": "none",
        "libtorch": "libtorch 2.11.0 (CPU)",
    })
}

/// DejaVu Sans from Debian's `fonts-dejavu-core` (cached), for the plots' text.
fn ensure_font() -> Result<PathBuf> {
    let dir = cache_root().join("fonts");
    let ttf = dir.join("DejaVuSans.ttf");
    if ttf.exists() {
        return Ok(ttf);
    }
    let deb = crate::data::apt_download("fonts-dejavu-core", &cache_root().join("debs"))?;
    let tmp = dir.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&tmp)
        .status()
        .context("running dpkg-deb")?;
    ensure!(status.success(), "dpkg-deb -x {} failed", deb.display());
    let found = walk(&tmp)
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == "DejaVuSans.ttf"))
        .context("fonts-dejavu-core has no DejaVuSans.ttf")?;
    fs::create_dir_all(&dir)?;
    fs::copy(&found, dir.join("DejaVuSans.ttf.part"))?;
    fs::rename(dir.join("DejaVuSans.ttf.part"), &ttf)?;
    let _ = fs::remove_dir_all(&tmp);
    Ok(ttf)
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_layers_win_key_by_key_and_tables_merge() {
        let mut a: toml::Table = "[optim]\nlr = 1.0\nmin_lr = 0.5\n[train]\nepochs = 3\n"
            .parse()
            .unwrap();
        let b: toml::Table = "[optim]\nlr = 2.0\n[koleo]\nweight = 0.1\n"
            .parse()
            .unwrap();
        merge_into(&mut a, b);
        assert_eq!(a["optim"]["lr"].as_float(), Some(2.0));
        assert_eq!(a["optim"]["min_lr"].as_float(), Some(0.5));
        assert_eq!(a["train"]["epochs"].as_integer(), Some(3));
        assert_eq!(a["koleo"]["weight"].as_float(), Some(0.1));
    }

    /// Every run of every plan is a configuration the product accepts, so a study never fails
    /// at submission after hours of earlier runs; and the layers really are layered (the run's
    /// K, data set and objective arrive in the merged file).
    #[test]
    fn every_planned_run_merges_into_a_valid_configuration() {
        for which in [Plan::Collapse, Plan::Objectives] {
            for quick in [false, true] {
                for spec in plan(which, quick)
                    .into_iter()
                    .filter(|s| s.mechanism.is_none())
                {
                    let merged = merge_toml(&run_configs(&spec, quick)).unwrap();
                    let text = toml::to_string(&merged).unwrap();
                    let cfg = protodino_config::TrainConfig::from_toml_str(&text)
                        .unwrap_or_else(|e| panic!("{}: {e}", spec.name()));
                    assert_eq!(cfg.head.out_dim, spec.k, "{}", spec.name());
                    if let Some(o) = spec.objective {
                        assert_eq!(cfg.is_ibot(), o.starts_with("ibot"), "{o}");
                        assert_eq!(
                            cfg.head.prototypes == protodino_config::PrototypeKind::Vmf,
                            o.ends_with("vmf"),
                            "{o}"
                        );
                    }
                    if spec.dataset == "lt100" {
                        assert!(cfg.data.train.contains("lt100"), "{}", spec.name());
                    }
                }
            }
        }
    }

    /// The collapse plan compares λ = 0 with λ = 0.1 everywhere, runs the encoder of the real
    /// frozen features before the mechanism, and names every run uniquely.
    #[test]
    fn the_collapse_plan_pairs_every_run_and_trains_the_encoder_first() {
        for quick in [false, true] {
            let p = plan(Plan::Collapse, quick);
            let names: Vec<String> = p.iter().map(RunSpec::name).collect();
            let mut unique = names.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), names.len(), "{names:?}");
            for s in &p {
                let twin = if s.lambda == 0.0 { 0.1 } else { 0.0 };
                assert!(LAMBDAS.contains(&s.lambda), "{}", s.name());
                assert!(
                    p.iter().any(|o| o.lambda == twin
                        && o.k == s.k
                        && o.dataset == s.dataset
                        && o.seed == s.seed
                        && o.mechanism == s.mechanism),
                    "{} has no λ twin",
                    s.name()
                );
            }
            let encoder = names
                .iter()
                .position(|n| n == ENCODER_RUN)
                .expect("encoder run");
            let first_mech = p
                .iter()
                .position(|s| s.mechanism.is_some())
                .expect("mechanism");
            assert!(encoder < first_mech);
            assert!(p[first_mech..].iter().all(|s| s.mechanism.is_some()));
        }
    }

    #[test]
    fn schedule_sums_weight_each_record_by_the_steps_it_stands_for() {
        // Logged every 2 steps: each record stands for two steps.
        let steps: Vec<Value> = (1..=4)
            .map(|i| json!({"step": 2 * i, "lr": 0.5, "momentum": 0.75, "last_layer_frozen": i == 1}))
            .collect();
        let s = schedule_sums(&steps);
        assert_eq!(s["sum_lr"].as_f64(), Some(4.0));
        assert_eq!(s["sum_one_minus_momentum"].as_f64(), Some(2.0));
        assert_eq!(s["sum_lr_last_layer_trainable"].as_f64(), Some(3.0));
        assert_eq!(s["final_momentum"].as_f64(), Some(0.75));
    }

    #[test]
    fn thinning_keeps_the_ends_and_the_count() {
        let v: Vec<Value> = (0..1000).map(|i| json!(i)).collect();
        let t = thin(v.clone(), 200);
        assert_eq!(t.len(), 200);
        assert_eq!(t[0], json!(0));
        assert_eq!(t[199], json!(999));
        assert_eq!(thin(v[..10].to_vec(), 200).len(), 10);
    }
}
