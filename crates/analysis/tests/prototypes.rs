//! Reading prototype layers from real safetensors files with the naming variants of
//! docs/algorithm.md §3.3, and the effective-prototype formula.

use protodino_analysis::knn::KnnOptions;
use protodino_analysis::unique::{UniqueOptions, analyze_unique};
use protodino_analysis::{
    AnalysisError, Head, PrototypeReport, Prototypes, prototype_report, prototype_report_from_named,
};
use protodino_config::TrainConfig;
use tch::{Kind, Tensor};

fn write(dir: &tempfile::TempDir, name: &str, tensors: &[(&str, &Tensor)]) -> std::path::PathBuf {
    let path = dir.path().join(name);
    Tensor::write_safetensors(tensors, &path).unwrap();
    path
}

fn v_matrix() -> Tensor {
    Tensor::from_slice(&[3.0f32, 4.0, 0.0, 0.0, 2.0, 0.0, 1.0, 1.0, 1.0]).reshape([3, 3])
}

#[test]
fn full_checkpoint_teacher_by_default_student_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let v = v_matrix();
    let g_teacher = Tensor::from_slice(&[2.0f32, -1.0, 0.5]).reshape([3, 1]);
    let v_student = v.flip([0]);
    let g_student = Tensor::ones([3, 1], tch::kind::FLOAT_CPU);
    let center = Tensor::zeros([1, 3], tch::kind::FLOAT_CPU);
    let path = write(
        &dir,
        "ckpt.safetensors",
        &[
            ("teacher.head.last_layer.weight_v", &v),
            ("teacher.head.last_layer.weight_g", &g_teacher),
            ("student.module.head.last_layer.weight_v", &v_student),
            ("student.module.head.last_layer.weight_g", &g_student),
            ("teacher.head.last_layer2.weight_v", &v_student),
            ("dino_loss.center", &center),
        ],
    );
    let t = Prototypes::load(&path, Head::default()).unwrap();
    assert_eq!(t.source.head, "teacher");
    assert_eq!(t.source.weight_v, "teacher.head.last_layer.weight_v");
    assert_eq!(
        t.source.weight_g.as_deref(),
        Some("teacher.head.last_layer.weight_g")
    );
    assert_eq!((t.source.k, t.source.dim), (3, 3));
    // Effective rows g·v/‖v‖, normalised: the negative g flips row 1.
    let expect = Tensor::from_slice(&[
        0.6f64,
        0.8,
        0.0,
        0.0,
        -1.0,
        0.0,
        1.0 / 3f64.sqrt(),
        1.0 / 3f64.sqrt(),
        1.0 / 3f64.sqrt(),
    ])
    .reshape([3, 3]);
    let err = (&t.normalized - &expect).abs().max().double_value(&[]);
    assert!(err < 1e-7, "{err}");
    assert_eq!(t.normalized.kind(), Kind::Double);

    let s = Prototypes::load(&path, Head::Student).unwrap();
    assert_eq!(s.source.weight_v, "student.module.head.last_layer.weight_v");
    let row0 = Vec::<f64>::try_from(s.normalized.get(0)).unwrap();
    let inv = 1.0 / 3f64.sqrt();
    assert!(row0.iter().all(|x| (x - inv).abs() < 1e-7));
}

#[test]
fn bare_head_half_precision_without_g() {
    let dir = tempfile::tempdir().unwrap();
    let v = v_matrix().to_kind(Kind::Half);
    let path = write(
        &dir,
        "head.safetensors",
        &[("head.last_layer.weight_v", &v)],
    );
    let p = Prototypes::load(&path, Head::Teacher).unwrap();
    assert_eq!(p.source.head, "bare");
    assert!(p.source.weight_g.is_none());
    let norms = p
        .normalized
        .norm_scalaropt_dim(2.0, [1i64].as_slice(), false);
    let err = (norms - 1.0).abs().max().double_value(&[]);
    assert!(err < 1e-12);
    // And it feeds the unique analysis directly.
    let a = analyze_unique(&p.normalized, &UniqueOptions::default()).unwrap();
    assert_eq!(a.report.counts[0].greedy, 3);
}

#[test]
fn missing_head_and_unreadable_file_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let v = v_matrix();
    let path = write(
        &dir,
        "student_only.safetensors",
        &[("student.head.last_layer.weight_v", &v)],
    );
    match Prototypes::load(&path, Head::Teacher) {
        Err(AnalysisError::NoPrototypeLayer { available, .. }) => {
            assert!(available.contains("student.head.last_layer.weight_v"))
        }
        other => panic!("expected NoPrototypeLayer, got {other:?}"),
    }
    assert!(Prototypes::load(&path, Head::Student).is_ok());
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    assert!(matches!(
        Prototypes::load(&junk, Head::Teacher),
        Err(AnalysisError::ReadWeights { .. })
    ));
    let bad_g = Tensor::ones([2, 1], tch::kind::FLOAT_CPU);
    let path = write(
        &dir,
        "bad_g.safetensors",
        &[
            ("teacher.head.last_layer.weight_v", &v),
            ("teacher.head.last_layer.weight_g", &bad_g),
        ],
    );
    assert!(matches!(
        Prototypes::load(&path, Head::Teacher),
        Err(AnalysisError::Shape(_))
    ));
}

#[test]
fn cli_report_json_and_text() {
    let dir = tempfile::tempdir().unwrap();
    // Four prototypes, two of them identical: 3 unique at every ε.
    let v = Tensor::from_slice(&[
        1.0f32, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 2.0, 0.0,
    ])
    .reshape([4, 3]);
    let path = write(
        &dir,
        "ckpt.safetensors",
        &[("module.teacher.head.last_layer.weight_v", &v)],
    );
    let cfg = TrainConfig::defaults().unwrap();
    let opts = UniqueOptions::from_config(&cfg);
    assert_eq!(opts.eps, cfg.eval.unique_eps);
    assert_eq!(opts.block_rows, cfg.koleo.block_rows);
    let r = prototype_report(&path, Head::Teacher, &opts).unwrap();
    assert!(
        r.unique
            .counts
            .iter()
            .all(|c| c.greedy == 3 && c.connected_components == 3)
    );
    let json = serde_json::to_string(&r).unwrap();
    let back: PrototypeReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back, r);
    let text = r.to_string();
    assert!(text.contains("teacher head"), "{text}");
    assert!(text.contains("KoLeo-proto"), "{text}");
    assert_eq!(r.unique.nn.min, 0.0);
    let named = vec![("teacher.head.last_layer.weight_v".to_string(), v)];
    let in_memory = prototype_report_from_named(&named, Head::Teacher, &opts).unwrap();
    assert_eq!(in_memory.unique.counts, r.unique.counts);

    let knn = KnnOptions::from_config(&cfg);
    assert_eq!(knn.ks, vec![20, 10, 100, 200]);
    assert_eq!(knn.temperature, 0.07);
    assert_eq!(knn.clone().clamped_to(50).ks, vec![20, 10]);
    assert_eq!(knn.clamped_to(5).ks, vec![5]);
}

#[test]
fn vmf_heads_count_directions_and_report_norms() {
    // A DINO-vMF head: the official weight-norm names with a trained gain, so the effective
    // rows have norms |g_k| (the concentrations times τ); rows 0 and 2 share a direction.
    let dir = tempfile::tempdir().unwrap();
    let v = Tensor::from_slice(&[3.0f32, 4.0, 0.0, 0.0, 2.0, 0.0, 6.0, 8.0, 0.0]).reshape([3, 3]);
    let g = Tensor::from_slice(&[0.5f32, 4.0, 12.0]).reshape([3, 1]);
    let path = write(
        &dir,
        "vmf.safetensors",
        &[
            ("teacher.head.last_layer.weight_v", &v),
            ("teacher.head.last_layer.weight_g", &g),
        ],
    );
    let p = Prototypes::load(&path, Head::Teacher).unwrap();
    let norms = Vec::<f64>::try_from(&p.norms).unwrap();
    for (n, want) in norms.iter().zip([0.5, 4.0, 12.0]) {
        assert!((n - want).abs() < 1e-12, "{norms:?}");
    }
    let row2 = Vec::<f64>::try_from(p.normalized.get(2)).unwrap();
    assert!((row2[0] - 0.6).abs() < 1e-12 && (row2[1] - 0.8).abs() < 1e-12);
    let r = prototype_report(&path, Head::Teacher, &UniqueOptions::default()).unwrap();
    assert!(r.unique.counts.iter().all(|c| c.greedy == 2), "{r}");
    assert!(
        (r.norms.min - 0.5).abs() + (r.norms.median - 4.0).abs() + (r.norms.max - 12.0).abs()
            < 1e-12
    );
    assert!(!r.norms.unit);
    let text = r.to_string();
    assert!(
        text.contains("κ_k = |w_k|/τ") && text.contains("max 12.0000"),
        "{text}"
    );
    // A normalised head says so.
    let named = vec![("teacher.head.last_layer.weight_v".to_string(), v)];
    let unit = prototype_report_from_named(&named, Head::Teacher, &UniqueOptions::default());
    assert!(unit.unwrap().norms.unit);
}
