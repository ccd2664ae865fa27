//! Usage statistics on hand-computable inputs, streamed over batches.

use protodino_analysis::usage::{Assignment, Grouping, UsageAccumulator};
use tch::Tensor;

fn rows(v: &[[f64; 4]]) -> Tensor {
    Tensor::from_slice(&v.concat()).reshape([-1, 4])
}

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-6, "{a} vs {b}");
}

#[test]
fn probabilities_by_hand() {
    let ln2 = 2f64.ln();
    let mut acc = UsageAccumulator::new(4, Assignment::Probabilities).unwrap();
    // Two batches: the result must not depend on the split.
    acc.update(&rows(&[[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]))
        .unwrap();
    acc.update(&rows(&[[0.0, 0.0, 0.0, 1.0], [0.25, 0.25, 0.25, 0.25]]))
        .unwrap();
    let groups = [0i64, 0, 1, 2];
    let r = acc
        .finish(Some(Grouping {
            eps: 0.025,
            groups: &groups,
        }))
        .unwrap();
    assert_eq!(r.n_samples, 4);
    let pi = [0.4375, 0.1875, 0.0625, 0.3125];
    for (a, b) in r.soft.iter().zip(pi) {
        close(*a, b);
    }
    let h: f64 = -pi.iter().map(|p| p * p.ln()).sum::<f64>();
    close(r.mlcd.entropy, h);
    close(r.mlcd.effective_number, h.exp());
    close(r.mlcd.max_mass, 0.4375);
    assert_eq!(r.mlcd.support, 4);
    // argmax: 0, 0 (tie → first), 3, 0 (tie → first).
    assert_eq!(r.hard, vec![0.75, 0.0, 0.0, 0.25]);
    assert_eq!(r.used_clusters, 2);
    close(
        r.hard_mlcd.entropy,
        -(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln()),
    );
    close(r.mean_sample_entropy, 3.0 * ln2 / 4.0);
    let g = r.grouped.unwrap();
    assert_eq!(g.groups, 3);
    for (a, b) in g.mass.iter().zip([0.625, 0.0625, 0.3125]) {
        close(*a, b);
    }
    assert_eq!(g.used_groups, 2);
    close(
        g.hard_mlcd.entropy,
        -(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln()),
    );
}

#[test]
fn teacher_centering_and_sharpening() {
    // z = c + τ·ln q  ⇒  softmax((z − c)/τ) = q.
    let c = [1.0, 2.0, 3.0, 4.0];
    let tau = 0.5;
    let q = [[0.5, 0.25, 0.125, 0.125], [0.125, 0.125, 0.25, 0.5]];
    let z: Vec<[f64; 4]> = q
        .iter()
        .map(|row| {
            let mut out = [0.0; 4];
            for i in 0..4 {
                out[i] = c[i] + tau * f64::ln(row[i]);
            }
            out
        })
        .collect();
    let mut acc = UsageAccumulator::new(
        4,
        Assignment::TeacherCentered {
            center: Tensor::from_slice(&c).reshape([1, 4]),
            teacher_temp: tau,
        },
    )
    .unwrap();
    acc.update(&rows(&z)).unwrap();
    let r = acc.finish(None).unwrap();
    for (a, b) in r.soft.iter().zip([0.3125, 0.1875, 0.1875, 0.3125]) {
        close(*a, b);
    }
    assert_eq!(r.hard, vec![0.5, 0.0, 0.0, 0.5]);
    close(r.mean_sample_entropy, 1.75 * 2f64.ln());
    assert!(r.assignment.contains("center"));
    assert!(r.grouped.is_none());

    // Without the centre the same logits give a different (plain softmax) assignment.
    let mut plain = UsageAccumulator::new(4, Assignment::Softmax { temperature: tau }).unwrap();
    plain.update(&rows(&z)).unwrap();
    let p = plain.finish(None).unwrap();
    assert!((p.soft[3] - 0.3125).abs() > 0.1);
}

#[test]
fn rejects_bad_shapes() {
    let mut acc = UsageAccumulator::new(4, Assignment::Probabilities).unwrap();
    assert!(acc.finish(None).is_err(), "empty accumulator");
    assert!(
        acc.update(&Tensor::zeros([2, 3], tch::kind::FLOAT_CPU))
            .is_err()
    );
    assert!(
        UsageAccumulator::new(
            4,
            Assignment::TeacherCentered {
                center: Tensor::zeros([3], tch::kind::FLOAT_CPU),
                teacher_temp: 0.04
            }
        )
        .is_err()
    );
    let nan = Tensor::full([2, 4], f64::NAN, tch::kind::FLOAT_CPU);
    assert!(acc.update(&nan).is_err());
    acc.update(&Tensor::full([2, 4], 0.25, tch::kind::FLOAT_CPU))
        .unwrap();
    assert_eq!(acc.n_samples(), 2);
    let short = [0i64, 1];
    assert!(
        acc.finish(Some(Grouping {
            eps: 0.1,
            groups: &short
        }))
        .is_err()
    );
}
