//! The study's frozen-feature runs (the paper's Section 4 argument): `protodino-mechanism`
//! trains only the product's DINO head (loss, centring, KoLeo-proto, optimiser, EMA) on frozen
//! features — synthetic clustered ones, or the CLS features of Fashion-MNIST crops through the
//! study's own λ = 0 encoder, standardised — and records both heads' figures at every analysis.
//! Two runs go at a time, one libtorch thread each, the most expensive first; each record is turned into the shape of an
//! end-to-end run's ([`super::analysis_summary`]), so the tables and figures treat both alike.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use super::{RunSpec, SERIES_POINTS, analysis_summary, schedule_sums, step_summary, thin};

/// Where a mechanism run's frozen features come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// 16 balanced clusters on the unit sphere of R^128, 4096 samples, two noisy views.
    Synthetic,
    /// Two augmented global crops of 3200 Fashion-MNIST training images through the teacher
    /// backbone of the study's λ = 0 end-to-end checkpoint, standardised.
    Real,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Synthetic => "synthetic",
            Source::Real => "real-frozen",
        }
    }
}

/// Images encoded for the real frozen features.
const REAL_IMAGES: usize = 3200;

/// The release binary's name (built with the service's, [`crate::cluster::build_release_bins`]).
pub const BIN: (&str, &str) = ("protodino-mechanism", "protodino-mechanism");

/// The arguments of one run (the head recipe of docs/mechanism.md: batch 256, base lr 2e-3,
/// teacher momentum 0.99 → 1, τ_t 0.04 on synthetic features and 0.02 on real ones, every step
/// logged, ten analyses).
fn args(spec: &RunSpec, dir: &Path, encoder: &Path) -> Result<Vec<String>> {
    let m = spec.mechanism.context("not a mechanism run")?;
    let mut a: Vec<String> = match m.source {
        Source::Synthetic => vec!["synthetic".into()],
        Source::Real => {
            ensure!(
                encoder.exists(),
                "the real frozen features need {} (the study's end-to-end run comes first)",
                encoder.display()
            );
            vec![
                "real".into(),
                "--checkpoint".into(),
                encoder.display().to_string(),
                "--images".into(),
                REAL_IMAGES.to_string(),
                "--standardize".into(),
                // The end-to-end recipe's sharper targets: at 0.04 they stayed nearly flat on
                // these features (docs/mechanism.md).
                "--teacher-temp".into(),
                "0.02".into(),
            ]
        }
    };
    let options = [
        ("--k", spec.k.to_string()),
        ("--lambda", spec.lambda.to_string()),
        ("--steps", m.steps.to_string()),
        ("--seed", spec.seed.to_string()),
        ("--lr", "2e-3".to_string()),
        ("--log-every", "1".to_string()),
        ("--analysis-every", (m.steps / 10).max(1).to_string()),
        ("--threads", "1".to_string()),
        ("--name", "record".to_string()),
        ("--out", dir.display().to_string()),
    ];
    for (flag, value) in options {
        a.extend([flag.to_string(), value]);
    }
    a.push("--quiet".into());
    Ok(a)
}

/// Runs in flight at once (one libtorch thread each: the machine's two cores).
const SLOTS: usize = 2;

/// A run's relative cost, for the order runs are started in: steps, times K/1024, times 4 with
/// KoLeo-proto (its nearest-neighbour search over K prototypes dominates at large K).
fn cost(spec: &RunSpec) -> i64 {
    let steps = spec.mechanism.map_or(0, |m| m.steps);
    steps * (spec.k / 1024).max(1) * if spec.lambda > 0.0 { 4 } else { 1 }
}

/// Runs (or reuses) the mechanism runs, [`SLOTS`] at a time, the most expensive started first so
/// that the slots finish together; returns their study records in `specs`' order.
pub fn run_all(
    bin: &Path,
    runs_dir: &Path,
    specs: &[&RunSpec],
    encoder: &Path,
    progress: &dyn Fn(&RunSpec),
) -> Result<Vec<Value>> {
    let mut queue: Vec<&RunSpec> = specs.to_vec();
    queue.sort_by_key(|s| std::cmp::Reverse(cost(s)));
    let mut queue = queue.into_iter();
    let mut running: Vec<(&RunSpec, PathBuf, Child, Instant)> = Vec::new();
    loop {
        while running.len() < SLOTS {
            let Some(spec) = queue.next() else { break };
            let dir = runs_dir.join(spec.name());
            if dir.join("result.json").exists() {
                eprintln!("xtask study: reusing {}", dir.join("result.json").display());
                continue;
            }
            progress(spec);
            if dir.exists() {
                fs::remove_dir_all(&dir)?;
            }
            fs::create_dir_all(&dir)?;
            let log = fs::File::create(dir.join("mechanism.log"))?;
            let child = Command::new(bin)
                .args(args(spec, &dir, encoder)?)
                .stdout(log.try_clone()?)
                .stderr(log)
                .stdin(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            running.push((spec, dir, child, Instant::now()));
        }
        if running.is_empty() {
            break;
        }
        // Wait for whichever run ends first (the children are polled, not waited on in turn).
        let done = loop {
            if let Some(i) = running
                .iter_mut()
                .position(|r| matches!(r.2.try_wait(), Ok(Some(_))))
            {
                break i;
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        };
        let (spec, dir, mut child, started) = running.swap_remove(done);
        let status = child.wait()?;
        ensure!(
            status.success(),
            "{} failed ({status}); its output is in {}",
            spec.name(),
            dir.join("mechanism.log").display()
        );
        let rec: Value = serde_json::from_str(&fs::read_to_string(dir.join("record.json"))?)?;
        let record = study_record(spec, &rec, started.elapsed().as_secs_f64());
        fs::write(
            dir.join("result.json"),
            serde_json::to_string_pretty(&record)? + "\n",
        )?;
        eprintln!(
            "xtask study: {} done in {:.1} min",
            spec.name(),
            started.elapsed().as_secs_f64() / 60.0
        );
    }
    specs
        .iter()
        .map(|s| {
            let path = runs_dir.join(s.name()).join("result.json");
            Ok(serde_json::from_str(&fs::read_to_string(&path)?)?)
        })
        .collect()
}

/// One analysis of a mechanism record in the shape of a worker's collapse record (teacher
/// `report` and `displacement`, `student`, `usage`, `sharpness`, `ln_k`).
fn as_collapse(a: &Value, ln_k: &Value) -> Value {
    json!({
        "report": a["teacher"]["report"],
        "displacement": a["teacher"]["displacement"],
        "student": a["student"],
        "usage": a["usage"],
        "sharpness": a["sharpness"],
        "ln_k": ln_k,
    })
}

/// The study's record of a mechanism run.
fn study_record(spec: &RunSpec, rec: &Value, wall: f64) -> Value {
    let ln_k = &rec["ln_k"];
    let analyses: Vec<Value> = rec["analyses"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| analysis_summary(&as_collapse(a, ln_k), a["step"].clone()))
        .collect();
    let steps: Vec<Value> = rec["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(step_summary)
        .collect();
    let fin = &rec["final"];
    json!({
        "name": spec.name(),
        "kind": "mechanism",
        "objective": Value::Null,
        "seed": spec.seed,
        "dataset": spec.dataset,
        "k": spec.k,
        "lambda": spec.lambda,
        "options": rec["options"],
        "features": rec["features"],
        "wall_seconds": wall,
        "steps": rec["steps_run"],
        "schedule": schedule_sums(&steps),
        "series": { "steps": thin(steps, SERIES_POINTS), "analyses": analyses },
        "final": {
            "collapse": analysis_summary(&as_collapse(fin, ln_k), fin["step"].clone()),
            "grouped_mass_sorted": fin["grouped_mass_sorted"],
            "mlcd_mass_sorted": fin["mlcd_mass_sorted"],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::super::{MechanismRun, report};
    use super::*;

    /// A real `protodino-mechanism` record (K = 32, 24 steps, every step logged, analyses at
    /// steps 0, 12 and 24), as the study reads it.
    fn fixture() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/mechanism-record.json"
        );
        serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
    }

    fn spec() -> RunSpec {
        RunSpec {
            dataset: Source::Synthetic.name(),
            k: 32,
            lambda: 0.0,
            objective: None,
            seed: 0,
            mechanism: Some(MechanismRun {
                source: Source::Synthetic,
                steps: 24,
            }),
        }
    }

    #[test]
    fn a_mechanism_record_becomes_a_study_record_with_both_heads() {
        let rec = fixture();
        let r = study_record(&spec(), &rec, 1.5);
        assert_eq!(r["kind"], "mechanism");
        assert_eq!(r["name"], "mechanism-synthetic-k32-lambda0");
        let analyses = r["series"]["analyses"].as_array().unwrap();
        assert_eq!(
            analyses
                .iter()
                .map(|a| a["step"].as_i64().unwrap())
                .collect::<Vec<_>>(),
            [0, 12, 24]
        );
        let c = &r["final"]["collapse"];
        for eps in ["0.01", "0.025", "0.05", "0.1", "0.25", "0.5"] {
            let t = c["unique_greedy"][eps].as_i64().unwrap();
            let s = c["student"]["unique_greedy"][eps].as_i64().unwrap();
            assert!(
                (1..=32).contains(&t) && (1..=32).contains(&s),
                "{eps}: {t} {s}"
            );
        }
        let fin = &rec["final"];
        assert_eq!(c["nn_mean"], fin["teacher"]["report"]["nn"]["mean"]);
        assert_eq!(
            c["displacement_teacher"],
            fin["teacher"]["displacement"]["mean"]
        );
        assert_eq!(
            c["student"]["displacement"],
            fin["student"]["displacement"]["mean"]
        );
        assert_eq!(
            c["teacher_entropy"],
            fin["sharpness"]["mean_sample_entropy"]
        );
        assert_eq!(c["clusters_used"], fin["usage"]["used_clusters"]);
        assert_eq!(c["ln_k"], rec["ln_k"]);
        // Every step was logged: the sums are the schedules' exact sums.
        let steps = rec["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 24);
        let lr: f64 = steps.iter().map(|s| s["lr"].as_f64().unwrap()).sum();
        assert!((r["schedule"]["sum_lr"].as_f64().unwrap() - lr).abs() < 1e-12);
        assert_eq!(r["final"]["mlcd_mass_sorted"].as_array().unwrap().len(), 32);
        let pi: f64 = r["final"]["mlcd_mass_sorted"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .sum();
        assert!((pi - 1.0).abs() < 1e-6, "π sums to {pi}");
    }

    #[test]
    fn the_report_tabulates_mechanism_runs() {
        let r = study_record(&spec(), &fixture(), 90.0);
        let teacher_0025 = r["final"]["collapse"]["unique_greedy"]["0.025"].clone();
        let doc = json!({"plan": "collapse", "command": "cargo xtask study", "runs": [r]});
        let md = report::markdown(&doc, &[]);
        assert!(md.contains("## Mechanism: only the head trains, on frozen features"));
        let row = md
            .lines()
            .find(|l| l.starts_with("| synthetic | 32 | 0.0 |"))
            .unwrap_or_else(|| panic!("no mechanism row in\n{md}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(cells[5], teacher_0025.to_string(), "{row}");
        assert!(
            !md.contains("## End to end"),
            "no end-to-end runs, no table"
        );
    }
}
