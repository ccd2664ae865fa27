//! Official DINO / iBOT checkpoints converted by `scripts/convert_official.py` (tiny fixtures
//! written by `scripts/make_official_fixtures.py`): the converted names, and the collapse figures
//! of every head and prototype layer against the values the fixture script computed
//! independently in numpy.

use std::path::PathBuf;

use protodino_analysis::prototypes::{Layer, LayerSelection};
use protodino_analysis::report::prototype_reports;
use protodino_analysis::{AnalysisError, Head, PrototypeReport, UniqueOptions};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixture("official_expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn eps(expected: &Value) -> Vec<f64> {
    expected["eps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_f64().unwrap())
        .collect()
}

fn close(got: f64, want: &Value, what: &str) {
    let want = want.as_f64().unwrap_or_else(|| panic!("{what}: no number"));
    assert!(
        (got - want).abs() <= 1e-9 * want.abs().max(1.0),
        "{what}: {got} vs {want}"
    );
}

/// One report against the fixture's figures for that layer.
fn check(r: &PrototypeReport, want: &Value, what: &str) {
    assert_eq!(
        r.source.weight_v,
        want["weight_v"].as_str().unwrap(),
        "{what}"
    );
    assert_eq!(
        r.source.weight_g.as_deref(),
        want["weight_g"].as_str(),
        "{what}"
    );
    assert_eq!(r.source.k, want["k"].as_i64().unwrap(), "{what}");
    assert_eq!(r.source.dim, want["dim"].as_i64().unwrap(), "{what}");
    let counts = want["counts"].as_array().unwrap();
    assert_eq!(r.unique.counts.len(), counts.len(), "{what}");
    for (c, w) in r.unique.counts.iter().zip(counts) {
        assert_eq!(c.eps, w["eps"].as_f64().unwrap(), "{what}");
        assert_eq!(
            c.greedy as u64,
            w["greedy"].as_u64().unwrap(),
            "{what} ε = {}",
            c.eps
        );
        assert_eq!(
            c.connected_components as u64,
            w["connected_components"].as_u64().unwrap(),
            "{what} ε = {}",
            c.eps
        );
    }
    let nn = &r.unique.nn;
    for (got, key) in [
        (nn.mean, "mean"),
        (nn.min, "min"),
        (nn.max, "max"),
        (nn.koleo_proto, "koleo_proto"),
    ] {
        close(got, &want["nn"][key], &format!("{what} nn.{key}"));
    }
    let n = &r.norms;
    for (got, key) in [
        (n.min, "min"),
        (n.p05, "p05"),
        (n.median, "median"),
        (n.mean, "mean"),
        (n.p95, "p95"),
        (n.max, "max"),
    ] {
        close(got, &want["norms"][key], &format!("{what} norms.{key}"));
    }
    assert_eq!(n.unit, want["norms"]["unit"].as_bool().unwrap(), "{what}");
}

#[test]
fn every_head_and_layer_gives_the_independent_figures() {
    let expected = expected();
    let opts = UniqueOptions {
        eps: eps(&expected),
        ..UniqueOptions::default()
    };
    let mut checked = 0;
    for (fixture_name, f) in expected["fixtures"].as_object().unwrap() {
        let path = fixture(f["file"].as_str().unwrap());
        for (head_name, layers) in f["heads"].as_object().unwrap() {
            let head: Head = head_name.parse().unwrap();
            // Default selection: every layer present, in order.
            let all = prototype_reports(&path, head, LayerSelection::All, &opts).unwrap();
            let want: Vec<String> = layers.as_object().unwrap().keys().cloned().collect();
            let got: Vec<String> = all.iter().map(|r| r.source.layer.to_string()).collect();
            assert_eq!(got, want, "{fixture_name} {head_name}");
            for r in &all {
                let layer = r.source.layer.to_string();
                let what = format!("{fixture_name} {head_name} {layer}");
                check(r, &layers[&layer], &what);
                assert_eq!(r.source.head, *head_name);
                assert!(
                    r.source.same_as.is_none(),
                    "{what}: the fixture's heads are not shared"
                );
                // The single-layer selection gives the same report.
                let one =
                    prototype_reports(&path, head, LayerSelection::Only(r.source.layer), &opts)
                        .unwrap();
                assert_eq!(one.len(), 1);
                assert_eq!(one[0].unique.counts, r.unique.counts);
                checked += 1;
            }
        }
    }
    // DINO: 2 heads; iBOT: 2 heads × 2 layers; the teacher release: 1.
    assert_eq!(checked, 7);
}

#[test]
fn converted_names_are_protodinos() {
    for (file, layout) in [
        ("official_dino.safetensors", "dino"),
        ("official_ibot.safetensors", "ibot"),
        ("official_dino_teacher_release.safetensors", "state_dict"),
    ] {
        let (tensors, metadata) = protodino_models::weights::load(&fixture(file)).unwrap();
        let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        for n in &names {
            assert!(
                ["student.", "teacher.", "dino_loss.", "ibot_loss."]
                    .iter()
                    .any(|p| n.starts_with(p)),
                "{file}: {n}"
            );
            assert!(!n.contains("module."), "{file}: {n}");
        }
        let meta: Value = serde_json::from_str(&metadata["official"]).unwrap();
        assert_eq!(meta["layout"], layout, "{file}");
        let has = |n: &str| names.contains(&n);
        match layout {
            "dino" => {
                assert!(has("dino_loss.center") && !has("ibot_loss.center2"));
                assert_eq!(meta["args"]["out_dim"], 48);
                assert_eq!(meta["epoch"], 100);
                assert_eq!(
                    meta["dropped"],
                    serde_json::json!(["fp16_scaler", "optimizer"])
                );
            }
            "ibot" => {
                assert!(has("dino_loss.center") && has("ibot_loss.center2"));
                assert_eq!(meta["args"]["patch_out_dim"], 24);
                assert!(has("teacher.head.last_layer2.weight_g"));
            }
            _ => {
                assert!(names.iter().all(|n| n.starts_with("teacher.")));
                assert_eq!(meta["prefix"], "teacher");
            }
        }
    }
}

#[test]
fn missing_layers_and_heads_name_the_tensor_and_the_file() {
    let opts = UniqueOptions::default();
    let dino = fixture("official_dino.safetensors");
    let err = prototype_reports(
        &dino,
        Head::Teacher,
        LayerSelection::Only(Layer::LastLayer2),
        &opts,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`teacher.head.last_layer2.weight_v`")
            && err.contains("student.head.last_layer.weight_v, teacher.head.last_layer.weight_v")
            && err.contains("53 tensors")
            && err.contains("dino_loss.center")
            && err.contains("teacher.backbone.* ("),
        "{err}"
    );
    let release = fixture("official_dino_teacher_release.safetensors");
    match prototype_reports(&release, Head::Student, LayerSelection::All, &opts) {
        Err(e @ AnalysisError::NoPrototypeLayer { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("student.[module.]head.last_layer.weight_v")
                    && msg.contains("teacher.head.last_layer.weight_v")
                    && msg.contains("26 tensors"),
                "{msg}"
            );
        }
        other => panic!("expected NoPrototypeLayer, got {other:?}"),
    }
}
