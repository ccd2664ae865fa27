//! `cargo xtask study [--quick]`: the partial-prototype-collapse study (issue: reproduce
//! arXiv 2410.14060's finding on real data).
//!
//! Each run is the product's own `protodino train` on Fashion-MNIST (configs/cpu-demo.toml +
//! configs/study/*.toml + a KoLeo-proto weight overlay), followed by `protodino fewshot` on its
//! final checkpoint. Runs live in `<cache>/study/<full|quick>/<name>/`; a finished run (its
//! `result.json`) is reused, an interrupted one resumes from its newest checkpoint. Every run's
//! record (config, per-analysis series, final figures, wall time) goes to `results.json`, the
//! plots to PNG files and the tables to `results.md` in the output directory (`docs/` for the
//! full study, the run directory's `report/` for `--quick`).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::{cache_root, repo_root, run, target_dir};

/// Classes 0–2 of the long-tailed split are the head (6000–2154 images), 7–9 the tail
/// (215–60 images); the labels are in decreasing order of frequency by construction.
const HEAD_CLASSES: std::ops::Range<usize> = 0..3;
const TAIL_CLASSES: std::ops::Range<usize> = 7..10;

/// One training run of the study.
#[derive(Debug, Clone)]
struct RunSpec {
    dataset: &'static str,
    k: i64,
    lambda: f64,
}

impl RunSpec {
    fn name(&self) -> String {
        format!("{}-k{}-lambda{}", self.dataset, self.k, self.lambda)
    }
}

fn plan(quick: bool) -> Vec<RunSpec> {
    let r = |dataset, k, lambda| RunSpec { dataset, k, lambda };
    if quick {
        return vec![
            r("balanced", 1024, 0.0),
            r("balanced", 1024, 0.1),
            r("lt100", 1024, 0.0),
            r("lt100", 1024, 0.1),
        ];
    }
    // The headline pairs first, so a partial study is already informative.
    let mut v = vec![
        r("balanced", 1024, 0.0),
        r("balanced", 1024, 0.1),
        r("lt100", 1024, 0.0),
        r("lt100", 1024, 0.1),
        r("balanced", 4096, 0.0),
        r("balanced", 4096, 0.1),
    ];
    for (k, lambda) in [(1024, 0.01), (1024, 1.0), (4096, 0.01), (4096, 1.0)] {
        v.push(r("balanced", k, lambda));
    }
    v
}

pub struct StudyArgs {
    pub quick: bool,
    pub out: Option<PathBuf>,
}

pub fn study(args: StudyArgs) -> Result<()> {
    crate::libtorch::ensure()?;
    crate::data::ensure()?;
    let font = ensure_font()?;
    crate::cluster::build_release()?;
    let bin = target_dir().join("release/protodino");
    ensure!(bin.exists(), "{} was not built", bin.display());

    let mode = if args.quick { "quick" } else { "full" };
    let runs_dir = cache_root().join("study").join(mode);
    let out = match args.out {
        Some(o) => o,
        None if args.quick => runs_dir.join("report"),
        None => repo_root().join("docs"),
    };
    fs::create_dir_all(&out)?;
    let started = Instant::now();
    let mut records = Vec::new();
    let plan = plan(args.quick);
    for (i, spec) in plan.iter().enumerate() {
        eprintln!(
            "xtask study: run {}/{}: {} (elapsed {:.1} min)",
            i + 1,
            plan.len(),
            spec.name(),
            started.elapsed().as_secs_f64() / 60.0
        );
        records.push(run_one(
            &bin,
            &runs_dir.join(spec.name()),
            spec,
            args.quick,
        )?);
    }
    let total = started.elapsed().as_secs_f64();
    let hardware = hardware();
    let command = format!(
        "cargo xtask study{}",
        if args.quick { " --quick" } else { "" }
    );
    let doc = json!({
        "command": command,
        "hardware": hardware,
        "wall_seconds_this_invocation": total,
        "wall_seconds_sum_of_runs": records.iter().map(|r| r["wall_seconds"].as_f64().unwrap_or(0.0)).sum::<f64>(),
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
    let figures = crate::plots::all(&doc, &out)?;
    let md = markdown(&doc, &figures);
    fs::write(out.join("results.md"), md)?;
    println!("{}", out.join("results.md").display());
    Ok(())
}

/// Evaluation subsets (evenly spaced, so class proportions are kept): memory-bank / few-shot
/// pool images and test images.
fn eval_limits(quick: bool) -> (&'static str, &'static str) {
    if quick {
        ("5000", "2000")
    } else {
        ("10000", "0")
    }
}

/// Train (or resume, or reuse) one run and evaluate it; returns its record.
fn run_one(bin: &Path, dir: &Path, spec: &RunSpec, quick: bool) -> Result<Value> {
    let result = dir.join("result.json");
    if let Ok(text) = fs::read_to_string(&result) {
        eprintln!("xtask study: reusing {}", result.display());
        return Ok(serde_json::from_str(&text)?);
    }
    fs::create_dir_all(dir)?;
    let overlay = dir.join("lambda.toml");
    fs::write(&overlay, format!("[koleo]\nweight = {:?}\n", spec.lambda))?;
    let root = repo_root();
    let mut configs: Vec<PathBuf> = vec![
        root.join("configs/cpu-demo.toml"),
        root.join("configs/study/base.toml"),
    ];
    if quick {
        configs.push(root.join("configs/study/quick.toml"));
    }
    configs.push(root.join(format!("configs/study/k{}.toml", spec.k)));
    if spec.dataset == "lt100" {
        configs.push(root.join("configs/study/lt100.toml"));
    }
    configs.push(overlay);

    let started = Instant::now();
    let log = dir.join("train.jsonl");
    let mut train = Command::new(bin);
    train.arg("train");
    for c in &configs {
        train.arg("--config").arg(c);
    }
    train
        .arg("--output-dir")
        .arg(dir.join("train"))
        .args(["--json", "--knn-train-limit", eval_limits(quick).0])
        .args(["--knn-test-limit", eval_limits(quick).1])
        .stdout(Stdio::from(
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)?,
        ));
    run(train)?;
    let lines = read_json_lines(&log)?;
    let fin = lines
        .iter()
        .rev()
        .find(|r| r["kind"] == "final")
        .context("the training log has no final report")?
        .clone();
    let ckpt = fin["checkpoint"]
        .as_str()
        .context("final report without checkpoint")?;
    let fewshot_out = Command::new(bin)
        .args([
            "fewshot",
            ckpt,
            "--json",
            "--train-limit",
            eval_limits(quick).0,
        ])
        .args(["--test-limit", eval_limits(quick).1])
        .output()
        .context("starting protodino fewshot")?;
    ensure!(
        fewshot_out.status.success(),
        "protodino fewshot failed: {}",
        String::from_utf8_lossy(&fewshot_out.stderr)
    );
    let fewshot: Value = serde_json::from_slice(&fewshot_out.stdout)?;
    let wall = started.elapsed().as_secs_f64();

    // Series: step losses and every analysis.
    let steps: Vec<Value> = lines
        .iter()
        .filter(|r| r["kind"] == "step")
        .map(|r| {
            json!({
                "step": r["step"], "dino_loss": r["dino_loss"], "koleo_proto": r["koleo_proto"],
                "total": r["total"], "lr": r["lr"],
            })
        })
        .collect();
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
        "dataset": spec.dataset,
        "k": spec.k,
        "lambda": spec.lambda,
        "config_files": configs.iter().map(|c| c.strip_prefix(&root).unwrap_or(c).display().to_string()).collect::<Vec<_>>(),
        "config": config,
        "wall_seconds": wall,
        "steps": fin["step"],
        "train_images_per_second": fin["images_per_second"],
        "series": { "steps": steps, "analyses": analyses },
        "final": {
            "last_step": fin["last_step"],
            "collapse": analysis_summary(&fin["collapse"], fin["step"].clone()),
            "grouped_mass_sorted": fin["collapse"]["usage"]["grouped"]["mass_sorted"],
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

/// The figures of one collapse record (periodic or final) that the study tracks.
fn analysis_summary(r: &Value, step: Value) -> Value {
    let counts = r["report"]["counts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let unique: serde_json::Map<String, Value> = counts
        .iter()
        .map(|c| (format!("{}", c["eps"]), c["greedy"].clone()))
        .collect();
    let components: serde_json::Map<String, Value> = counts
        .iter()
        .map(|c| (format!("{}", c["eps"]), c["connected_components"].clone()))
        .collect();
    let u = &r["usage"];
    json!({
        "step": step,
        "unique_greedy": unique,
        "unique_components": components,
        "koleo_proto_teacher": r["report"]["nn"]["koleo_proto"],
        "nn_mean": r["report"]["nn"]["mean"],
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

fn f(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "–".into(),
    }
}

fn markdown(doc: &Value, figures: &[(String, String)]) -> String {
    let runs = doc["runs"].as_array().cloned().unwrap_or_default();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Partial prototype collapse and KoLeo-proto on Fashion-MNIST\n"
    );
    let _ = writeln!(
        s,
        "Generated by `{}` from `results.json` (one record per run: configuration, per-analysis \
         series and final figures). Hardware: {} ({} logical CPUs, {:.0} GiB), no GPU, {}. \
         Wall time: {:.1} min for this invocation (finished runs are reused, not retrained), \
         {:.1} min of training and evaluation summed over the runs' own records.\n",
        doc["command"].as_str().unwrap_or(""),
        doc["hardware"]["cpu"].as_str().unwrap_or("?"),
        doc["hardware"]["logical_cpus"],
        doc["hardware"]["memory_gib"].as_f64().unwrap_or(0.0),
        doc["hardware"]["libtorch"].as_str().unwrap_or(""),
        doc["wall_seconds_this_invocation"].as_f64().unwrap_or(0.0) / 60.0,
        doc["wall_seconds_sum_of_runs"].as_f64().unwrap_or(0.0) / 60.0,
    );
    let _ = writeln!(
        s,
        "Unique prototypes are counted on the teacher head by greedy grouping at each ε (the \
         connected-component count is in `results.json`); usage is the teacher's training target \
         `softmax((z − c)/τ_t)` over 1000 evenly spaced training images (500 with `--quick`); \
         k-NN is weighted, k = 20, T = 0.07, on teacher CLS features with the run's labelled \
         training split as memory bank (10 000 evenly spaced images; 5000 with `--quick`) and the balanced 10 000-image test split (2000 with `--quick`); few-shot is \
         logistic regression on 1/2/5 labelled images per class, mean over 3 seeds. On the \
         long-tailed split the head classes are {:?} and the tail classes {:?}.\n",
        HEAD_CLASSES, TAIL_CLASSES
    );
    let _ = writeln!(s, "## Main table\n");
    let _ = writeln!(
        s,
        "| data | K | λ | unique ε=0.01 | ε=0.025 | ε=0.05 | ε=0.1 | KoLeo-proto (teacher) | clusters used | usage eff. clusters | k-NN top-1 | head | tail | 1-shot | 5-shot | steps | min |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in &runs {
        let c = &r["final"]["collapse"];
        let u = |e: &str| f(&c["unique_greedy"][e], 0);
        let knn = &r["final"]["knn"];
        let shot = |n: u64| {
            r["final"]["fewshot"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["shots"] == n))
                .map(|x| f(&x["top1_mean"], 1))
                .unwrap_or_else(|| "–".into())
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} |",
            r["dataset"].as_str().unwrap_or(""),
            r["k"],
            r["lambda"],
            u("0.01"),
            u("0.025"),
            u("0.05"),
            u("0.1"),
            f(&c["koleo_proto_teacher"], 4),
            c["clusters_used"],
            f(&c["usage_effective"], 1),
            f(&knn["top1"], 2),
            f(&knn["head_top1"], 1),
            f(&knn["tail_top1"], 1),
            shot(1),
            shot(5),
            r["steps"],
            r["wall_seconds"].as_f64().unwrap_or(0.0) / 60.0
        );
    }
    let _ = writeln!(s, "\n## Figures\n");
    for (file, caption) in figures {
        let _ = writeln!(s, "![{caption}]({file})\n\n*{caption}*\n");
    }
    let discussion = repo_root().join("docs/discussion.md");
    if let Ok(text) = fs::read_to_string(discussion) {
        let _ = writeln!(s, "{text}");
    }
    s
}
