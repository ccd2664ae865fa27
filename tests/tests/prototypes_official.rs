//! `protodino prototypes` on official DINO / iBOT checkpoints converted by
//! `scripts/convert_official.py` (the tiny committed fixtures of
//! `scripts/make_official_fixtures.py`, with `module.` prefixes and `weight_g` / `weight_v`):
//! the printed figures — as JSON lines and as text — are those the fixture script computed
//! independently, for every head and prototype layer; a missing layer or head is an error that
//! names the tensor and what the file holds.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use protodino_tests::{binary, json_lines, protodino, repo_root};
use serde_json::Value;

fn fixtures() -> PathBuf {
    repo_root().join("crates/analysis/tests/fixtures")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("official_expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn eps_arg(expected: &Value) -> String {
    let eps: Vec<String> = expected["eps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.to_string())
        .collect();
    eps.join(",")
}

fn close(got: &Value, want: &Value, what: &str) {
    let (g, w) = (got.as_f64().unwrap(), want.as_f64().unwrap());
    assert!(
        (g - w).abs() <= 1e-9 * w.abs().max(1.0),
        "{what}: {g} vs {w}"
    );
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `protodino ARGS` expected to fail: its stderr.
fn failing(args: &[&str]) -> String {
    let out: Output = Command::new(binary("protodino-worker", "protodino"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("start protodino");
    assert!(!out.status.success(), "protodino {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn json_figures_of_every_head_and_layer() {
    let expected = expected();
    let eps = eps_arg(&expected);
    for (name, f) in expected["fixtures"].as_object().unwrap() {
        let file = fixtures().join(f["file"].as_str().unwrap());
        for (head, layers) in f["heads"].as_object().unwrap() {
            let lines = json_lines(&protodino(
                &repo_root(),
                &[
                    "prototypes",
                    path_str(&file),
                    "--head",
                    head,
                    "--eps",
                    &eps,
                    "--json",
                ],
            ));
            let layers = layers.as_object().unwrap();
            assert_eq!(
                lines.len(),
                layers.len(),
                "{name} {head}: one line per layer"
            );
            for (line, (layer, want)) in lines.iter().zip(layers) {
                let what = format!("{name} {head} {layer}");
                assert_eq!(line["layer"], layer.as_str(), "{what}");
                assert_eq!(line["source"]["weight_v"], want["weight_v"], "{what}");
                assert_eq!(line["source"]["weight_g"], want["weight_g"], "{what}");
                let r = &line["report"];
                assert_eq!(r["k"], want["k"], "{what}");
                assert_eq!(r["dim"], want["dim"], "{what}");
                let counts = r["counts"].as_array().unwrap();
                let want_counts = want["counts"].as_array().unwrap();
                assert_eq!(counts.len(), want_counts.len(), "{what}");
                for (c, w) in counts.iter().zip(want_counts) {
                    assert_eq!(c["eps"], w["eps"], "{what}");
                    assert_eq!(c["greedy"], w["greedy"], "{what} {}", c["eps"]);
                    assert_eq!(
                        c["connected_components"], w["connected_components"],
                        "{what} {}",
                        c["eps"]
                    );
                }
                for key in ["mean", "min", "max", "koleo_proto"] {
                    close(&r["nn"][key], &want["nn"][key], &format!("{what} nn.{key}"));
                }
                for key in ["min", "p05", "median", "mean", "p95", "max"] {
                    close(
                        &line["norms"][key],
                        &want["norms"][key],
                        &format!("{what} norms.{key}"),
                    );
                }
                assert_eq!(line["norms"]["unit"], want["norms"]["unit"], "{what}");
            }
        }
    }
}

#[test]
fn text_report_of_the_ibot_teacher_shows_both_layers() {
    let expected = expected();
    let f = &expected["fixtures"]["ibot_full"];
    let file = fixtures().join(f["file"].as_str().unwrap());
    // The defaults: the teacher head, every layer.
    let out = protodino(
        &repo_root(),
        &["prototypes", path_str(&file), "--eps", &eps_arg(&expected)],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let sections: Vec<&str> = text.split("\nprototypes: ").skip(1).collect();
    assert_eq!(sections.len(), 2, "{text}");
    for (section, layer) in sections.iter().zip(["last_layer", "last_layer2"]) {
        let want = &f["heads"]["teacher"][layer];
        assert!(
            section.starts_with(&format!("teacher head, {layer} (")),
            "{section}"
        );
        assert!(
            section.contains(&format!("K = {}, d = {}", want["k"], want["dim"])),
            "{section}"
        );
        for w in want["counts"].as_array().unwrap() {
            let eps = w["eps"].as_f64().unwrap();
            let row = section
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|t| t.first().and_then(|e| e.parse::<f64>().ok()) == Some(eps))
                .unwrap_or_else(|| panic!("no row for ε = {eps}: {section}"));
            assert_eq!(row[1], w["greedy"].to_string(), "{layer} ε = {eps}");
            assert_eq!(
                row[3],
                w["connected_components"].to_string(),
                "{layer} ε = {eps}"
            );
        }
        let mean = format!("mean {:.4}", want["nn"]["mean"].as_f64().unwrap());
        assert!(section.contains(&mean), "{mean}: {section}");
        // g = 1 (norm_last_layer): the norms are all 1.
        assert!(section.contains("prototype norms: all 1"), "{section}");
    }
}

#[test]
fn text_report_of_a_trained_gain_shows_the_norms() {
    let expected = expected();
    let f = &expected["fixtures"]["dino_full"];
    let want = &f["heads"]["student"]["last_layer"];
    let file = fixtures().join(f["file"].as_str().unwrap());
    let out = protodino(
        &repo_root(),
        &[
            "prototypes",
            path_str(&file),
            "--head",
            "student",
            "--layer",
            "last_layer",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("student head, last_layer"), "{text}");
    for key in ["min", "median", "max"] {
        let s = format!("{key} {:.4}", want["norms"][key].as_f64().unwrap());
        assert!(text.contains(&s), "{s}: {text}");
    }
    assert!(text.contains("κ_k = |w_k|/τ"), "{text}");
}

#[test]
fn missing_layers_and_heads_are_errors_naming_the_tensor() {
    let dino = fixtures().join("official_dino.safetensors");
    let err = failing(&["prototypes", path_str(&dino), "--layer", "last_layer2"]);
    assert!(
        err.contains("`teacher.head.last_layer2.weight_v`")
            && err.contains("teacher.head.last_layer.weight_v")
            && err.contains("dino_loss.center"),
        "{err}"
    );
    let release = fixtures().join("official_dino_teacher_release.safetensors");
    let err = failing(&["prototypes", path_str(&release), "--head", "student"]);
    assert!(
        err.contains("student.[module.]head.last_layer.weight_v")
            && err.contains("teacher.head.last_layer.weight_v")
            && err.contains("teacher.backbone.* ("),
        "{err}"
    );
    let err = failing(&["prototypes", path_str(&dino), "--layer", "cls"]);
    assert!(err.contains("last_layer2") && err.contains("all"), "{err}");
}
