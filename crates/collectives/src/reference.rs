//! Single-process references for tests and the benchmark: the exact ring summation order, and a
//! cheap deterministic test pattern that every process can regenerate from `(seed, rank)`.

use crate::element::Element;
use crate::engine::segment_bounds;

/// The all-reduce result the ring produces from `inputs[rank]`, computed in one process with the
/// same association order: element `i` in segment `j` is
/// `((x_j[i] + x_{j+1}[i]) + …) + x_{j-1}[i]` (ranks mod world), rounded per addition as
/// [`Element::add_into`] does.
pub fn ring_sum<T: Element>(inputs: &[Vec<T>]) -> Vec<T> {
    let world = inputs.len();
    let n = inputs.first().map_or(0, Vec::len);
    let bounds = segment_bounds(n, world);
    let mut out = vec![T::default(); n];
    for j in 0..world {
        let range = bounds[j]..bounds[j + 1];
        let acc = &mut out[range.clone()];
        acc.copy_from_slice(&inputs[j][range.clone()]);
        for k in 1..world {
            let mut local = inputs[(j + k) % world][range.clone()].to_vec();
            T::add_into(&mut local, acc);
            acc.copy_from_slice(&local);
        }
    }
    out
}

/// `len` values in [-1, 1) from a SplitMix64 stream seeded by `(seed, rank)`; cheap enough to
/// regenerate 100 MB in well under a second.
pub fn test_pattern<T: Element>(seed: u64, rank: usize, len: usize) -> Vec<T> {
    let mut state =
        seed ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            T::from_f32(((z >> 40) as f32) / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sum_is_the_sum_for_exact_values() {
        let inputs: Vec<Vec<f32>> = (0..3)
            .map(|r| (0..7).map(|i| (i * 10 + r) as f32).collect())
            .collect();
        let s = ring_sum(&inputs);
        let expect: Vec<f32> = (0..7).map(|i| (30 * i + 3) as f32).collect();
        assert_eq!(s, expect);
        let p: Vec<f32> = test_pattern(1, 0, 1000);
        assert!(p.iter().all(|v| (-1.0..1.0).contains(v)));
        assert_ne!(p, test_pattern::<f32>(1, 1, 1000));
    }
}
