//! Unique-prototype counts with planted duplicates at known distances, against a brute-force
//! implementation, and blockwise == unblocked.

// The brute-force reference spells the definition out with indices on purpose.
#![allow(clippy::needless_range_loop)]

mod support;

use protodino_analysis::unique::{UniqueOptions, analyze_unique};
use support::*;

fn counts(rows: &[Vec<f64>], eps: &[f64], block_rows: i64) -> Vec<(usize, usize)> {
    let opts = UniqueOptions {
        eps: eps.to_vec(),
        block_rows,
    };
    let a = analyze_unique(&to_tensor(rows), &opts).unwrap();
    a.report
        .counts
        .iter()
        .map(|c| (c.greedy, c.connected_components))
        .collect()
}

/// The definition, literally: full distance matrix in f64, greedy scan, BFS components.
fn brute_force(rows: &[Vec<f64>], eps: f64) -> (Vec<i64>, Vec<i64>) {
    let k = rows.len();
    let close = |i: usize, j: usize| dist(&rows[i], &rows[j]) < eps;
    let mut group = vec![-1i64; k];
    let mut g = 0;
    for i in 0..k {
        if group[i] < 0 {
            group[i] = g;
            for j in 0..k {
                if group[j] < 0 && close(i, j) {
                    group[j] = g;
                }
            }
            g += 1;
        }
    }
    let mut comp = vec![-1i64; k];
    let mut c = 0;
    for s in 0..k {
        if comp[s] >= 0 {
            continue;
        }
        comp[s] = c;
        let mut stack = vec![s];
        while let Some(i) = stack.pop() {
            for j in 0..k {
                if comp[j] < 0 && close(i, j) {
                    comp[j] = c;
                    stack.push(j);
                }
            }
        }
        c += 1;
    }
    (group, comp)
}

const EPS: [f64; 6] = [0.001, 0.01, 0.025, 0.05, 0.1, 0.2];

#[test]
fn planted_duplicates_at_known_distances() {
    let k = 300;
    let mut rows = unit_rows(k, 64, 1);
    let b = rows[10].clone();
    let u = orthogonal_unit(&b, 99);
    rows[11] = b.clone(); // D = 0
    rows[12] = on_great_circle(&b, &u, angle_for_distance(0.02)); // D(10,12) = D(11,12) = 0.02
    rows[13] = on_great_circle(&b, &u, -angle_for_distance(0.07)); // 0.07 from 10, ≈0.09 from 12
    // A second cluster: five exact copies.
    for i in 50..55 {
        rows[i] = rows[49].clone();
    }
    let got = counts(&rows, &EPS, 64);
    let k0 = k;
    // ε: 0.001 0.01 → {10,11}, {49..54}; 0.025 0.05 → + 12; 0.1 0.2 → + 13 (D(12,13) ≈ 0.09).
    let expect = [
        k0 - 1 - 5,
        k0 - 1 - 5,
        k0 - 2 - 5,
        k0 - 2 - 5,
        k0 - 3 - 5,
        k0 - 3 - 5,
    ];
    for (i, (&(g, c), e)) in got.iter().zip(expect).enumerate() {
        assert_eq!(g, e, "greedy at ε = {}", EPS[i]);
        assert_eq!(c, e, "components at ε = {}", EPS[i]);
    }
}

#[test]
fn chain_separates_greedy_from_components() {
    // a — b — c on a great circle, 0.03 apart, a and c ≈ 0.06 apart.
    let k = 200;
    let mut rows = unit_rows(k, 64, 2);
    let b = rows[5].clone();
    let u = orthogonal_unit(&b, 7);
    let t = angle_for_distance(0.03);
    rows[6] = on_great_circle(&b, &u, t);
    rows[7] = on_great_circle(&b, &u, 2.0 * t);
    // Leader is the end of the chain (row 5): greedy takes only 6; 7 opens its own group.
    let got = counts(&rows, &[0.04, 0.07], 32);
    assert_eq!(
        got[0],
        (k - 1, k - 2),
        "ε = 0.04: greedy {{5,6}},{{7}}; CC {{5,6,7}}"
    );
    assert_eq!(got[1], (k - 2, k - 2), "ε = 0.07: one group either way");
    // With the middle of the chain first, greedy finds the single group too.
    rows.swap(5, 6);
    let got = counts(&rows, &[0.04], 32);
    assert_eq!(got[0], (k - 2, k - 2));
}

#[test]
fn threshold_is_decided_exactly_below_f32_resolution() {
    // D = 0.000999 and 0.001001 at ε = 0.001: f32 similarities cannot tell them apart.
    let k = 100;
    let mut rows = unit_rows(k, 256, 3);
    let b = rows[0].clone();
    let u = orthogonal_unit(&b, 5);
    rows[1] = on_great_circle(&b, &u, angle_for_distance(0.000999));
    let b2 = rows[2].clone();
    let u2 = orthogonal_unit(&b2, 6);
    rows[3] = on_great_circle(&b2, &u2, angle_for_distance(0.001001));
    let got = counts(&rows, &[0.001], 16);
    assert_eq!(got[0], (k - 1, k - 1));
}

#[test]
fn random_init_is_all_unique_and_matches_spec_magnitudes() {
    // DINO's last layer init: Kaiming-uniform, U(−1/16, 1/16) in 256-d; K = 4096.
    let k = 4096;
    let mut r = protodino_analysis::rng::SplitMix64::new(11);
    let rows: Vec<Vec<f64>> = (0..k)
        .map(|_| {
            (0..256)
                .map(|_| (r.next_f64() * 2.0 - 1.0) / 16.0)
                .collect()
        })
        .collect();
    let a = analyze_unique(&to_tensor_f32(&rows), &UniqueOptions::default()).unwrap();
    for c in &a.report.counts {
        assert_eq!(c.greedy, k, "ε = {}", c.eps);
        assert_eq!(c.connected_components, k, "ε = {}", c.eps);
    }
    // docs/algorithm.md §2.3 (random unit vectors, K = 4096): mean NN distance 1.245, L_KP −0.219.
    let g = analyze_unique(
        &to_tensor(&unit_rows(k, 256, 12)),
        &UniqueOptions::default(),
    )
    .unwrap();
    assert!((g.report.nn.mean - 1.245).abs() < 0.01, "{:?}", g.report.nn);
    assert!(
        (g.report.nn.koleo_proto + 0.219).abs() < 0.01,
        "{:?}",
        g.report.nn
    );
    assert!(g.report.nn.min > 0.9);
}

#[test]
fn duplicating_a_row_drops_the_count_by_one() {
    let k = 500;
    let mut rows = unit_rows(k, 128, 4);
    let before = counts(&rows, &EPS, 100);
    rows[400] = rows[17].clone();
    let after = counts(&rows, &EPS, 100);
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(*b, (k, k));
        assert_eq!(*a, (k - 1, k - 1));
    }
}

/// Clusters with spreads that straddle every ε, so both algorithms have work to do.
fn clustered(k: usize, d: usize, seed: u64) -> Vec<Vec<f64>> {
    let centres = unit_rows(12, d, seed);
    let noise = gaussian(k, d, seed + 1);
    let mut r = protodino_analysis::rng::SplitMix64::new(seed + 2);
    let spreads = [0.0, 0.0005, 0.004, 0.01, 0.02, 0.04, 0.08];
    (0..k)
        .map(|i| {
            if i % 5 == 4 {
                return normalize(&noise[i]); // some isolated prototypes
            }
            let c = &centres[r.below(12) as usize];
            let s = spreads[r.below(spreads.len() as u64) as usize] / (d as f64).sqrt();
            normalize(
                &c.iter()
                    .zip(&noise[i])
                    .map(|(x, n)| x + s * n)
                    .collect::<Vec<_>>(),
            )
        })
        .collect()
}

#[test]
fn blockwise_equals_unblocked_and_brute_force() {
    let rows = clustered(240, 32, 21);
    let t = to_tensor(&rows);
    let opts = |b| UniqueOptions {
        eps: EPS.to_vec(),
        block_rows: b,
    };
    let full = analyze_unique(&t, &opts(240)).unwrap();
    for b in [1, 7, 64] {
        let blk = analyze_unique(&t, &opts(b)).unwrap();
        assert_eq!(blk.report.counts, full.report.counts, "block_rows = {b}");
        assert_eq!(blk.greedy_groups, full.greedy_groups, "block_rows = {b}");
        assert_eq!(blk.components, full.components, "block_rows = {b}");
        // Near-duplicates tie in f32, so the neighbour found may differ (see below).
        assert!((blk.report.nn.mean - full.report.nn.mean).abs() < 1e-3);
    }
    let mut differs = false;
    for (e, &eps) in EPS.iter().enumerate() {
        let (g, c) = brute_force(&rows, eps);
        assert_eq!(full.greedy_groups[e], g, "greedy groups at ε = {eps}");
        assert_eq!(full.components[e], c, "components at ε = {eps}");
        let c0 = &full.report.counts[e];
        assert!(c0.connected_components <= c0.greedy);
        differs |= c0.connected_components < c0.greedy;
    }
    assert!(
        differs,
        "the fixture should make greedy and CC differ somewhere"
    );
    // Nearest neighbours: found by the f32 search, so exact up to its resolution
    // (`d_found² ≤ d_true² + 6.2e-5`), and exact where the neighbour is not a near-tie.
    for (i, &j) in full.nn_index.iter().enumerate() {
        let best = (0..rows.len())
            .filter(|&m| m != i)
            .map(|m| dist(&rows[i], &rows[m]))
            .fold(f64::INFINITY, f64::min);
        let found = dist(&rows[i], &rows[j as usize]);
        assert!(j as usize != i);
        assert!(
            found * found <= best * best + 6.2e-5,
            "row {i}: {found} vs {best}"
        );
        if best > 0.1 {
            assert!((found - best).abs() < 1e-9, "row {i}: {found} vs {best}");
        }
    }
}

#[test]
fn rejects_non_finite_and_degenerate_input() {
    let mut rows = unit_rows(10, 8, 5);
    let opts = UniqueOptions::default();
    assert!(
        analyze_unique(&to_tensor(&rows[..1]), &opts).is_err(),
        "K = 1"
    );
    rows[3][2] = f64::NAN;
    assert!(analyze_unique(&to_tensor(&rows), &opts).is_err());
    let bad_eps = UniqueOptions {
        eps: vec![0.0],
        ..Default::default()
    };
    assert!(analyze_unique(&to_tensor(&unit_rows(10, 8, 5)), &bad_eps).is_err());
}
