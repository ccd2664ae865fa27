//! The deterministic long-tailed variant of a balanced labelled set (the CIFAR-LT
//! construction): class `c` of `C` (in label order) keeps
//! `floor(n_max · (1/ratio)^(c/(C−1)))` images, i.e. counts decay exponentially from `n_max`
//! to `n_max/ratio`; within a class the lowest sample ids are kept, so the subset is a pure
//! function of the labels and the ratio.

/// Per-class counts of the long-tailed variant.
pub fn long_tailed_counts(n_max: usize, num_classes: usize, imbalance_ratio: f64) -> Vec<usize> {
    (0..num_classes)
        .map(|c| {
            let e = if num_classes > 1 {
                c as f64 / (num_classes - 1) as f64
            } else {
                0.0
            };
            (n_max as f64 * imbalance_ratio.powf(-e)).floor() as usize
        })
        .collect()
}

/// Sample ids (ascending) of the long-tailed subset of a set with `labels` (index = sample id;
/// labels outside `0..num_classes` are left out). `n_max` is the size of the smallest class,
/// so the head class is complete when the set is balanced.
pub fn long_tailed_subset(labels: &[i64], num_classes: usize, imbalance_ratio: f64) -> Vec<u64> {
    let mut per_class = vec![0usize; num_classes];
    for &l in labels {
        if l >= 0 && (l as usize) < num_classes {
            per_class[l as usize] += 1;
        }
    }
    let n_max = per_class.iter().copied().min().unwrap_or(0);
    let want = long_tailed_counts(n_max, num_classes, imbalance_ratio);
    let mut taken = vec![0usize; num_classes];
    let mut ids = Vec::new();
    for (id, &l) in labels.iter().enumerate() {
        if l >= 0 && (l as usize) < num_classes && taken[l as usize] < want[l as usize] {
            taken[l as usize] += 1;
            ids.push(id as u64);
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_decay_from_head_to_tail_by_the_ratio() {
        let c = long_tailed_counts(6000, 10, 100.0);
        assert_eq!(c[0], 6000);
        assert_eq!(c[9], 60);
        assert!(c.windows(2).all(|w| w[0] > w[1]));
        // exponential: constant ratio between neighbours (up to flooring)
        let r = 100f64.powf(1.0 / 9.0);
        assert!((c[3] as f64 / c[4] as f64 - r).abs() < 0.01);
    }

    #[test]
    fn subset_takes_lowest_ids_per_class() {
        let labels: Vec<i64> = (0..1000).map(|i| i % 10).collect();
        let ids = long_tailed_subset(&labels, 10, 100.0);
        let counts = long_tailed_counts(100, 10, 100.0);
        assert_eq!(ids.len(), counts.iter().sum::<usize>());
        assert_eq!(&ids[..10], &(0..10).collect::<Vec<u64>>()[..]);
        let n9 = ids.iter().filter(|&&i| i % 10 == 9).count();
        assert_eq!(n9, 1);
    }
}
