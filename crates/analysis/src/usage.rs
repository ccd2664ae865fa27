//! Prototype usage over a data set (docs/algorithm.md §3.4), accumulated batch by batch so the data
//! set never has to fit in memory at once.
//!
//! Per sample the assignment `p(k|x)` is, by the caller's [`Assignment`] choice, either the
//! teacher's training-time target `softmax((z − c)/τ_t)` (centred and sharpened — the default
//! of the CLI, with the checkpoint's centre and final teacher temperature), a plain
//! `softmax(z/τ)`, or probabilities given directly. Softmax is taken in f32 (pitfall 11), sums
//! are kept in f64. From the sums:
//! * **MLCD** `π_k = mean_x p(k|x)`, **hard MLCD** `n_k = #{x : argmax_k p = k}/N`;
//! * **grouped** versions over the unique-prototype groups of [`crate::unique`]
//!   (`Π_c = Σ_{k∈c} π_k`);
//! * entropy `H` (nats) and effective number of clusters `exp(H)` for each distribution;
//! * used clusters (distinct argmax prototypes) and used groups, and the mean per-sample
//!   entropy `E_x[H(p(·|x))]`.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{AnalysisError, Result};
use crate::stats::{entropy, positive};

/// How `p(k|x)` is formed from what [`UsageAccumulator::update`] receives.
#[derive(Debug)]
pub enum Assignment {
    /// Teacher logits → `softmax((z − center)/teacher_temp)` (DINO's centred, sharpened target).
    TeacherCentered { center: Tensor, teacher_temp: f64 },
    /// Logits → `softmax(z/temperature)` (no centring).
    Softmax { temperature: f64 },
    /// The rows already are probabilities (non-negative, summing to 1).
    Probabilities,
}

impl Assignment {
    /// A short description for reports.
    pub fn describe(&self) -> String {
        match self {
            Assignment::TeacherCentered { teacher_temp, .. } => {
                format!("softmax((z - center) / {teacher_temp})")
            }
            Assignment::Softmax { temperature } => format!("softmax(z / {temperature})"),
            Assignment::Probabilities => "given probabilities".to_string(),
        }
    }
}

/// Summary of one distribution over clusters or groups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistributionSummary {
    /// Shannon entropy in nats.
    pub entropy: f64,
    /// `exp(entropy)`: the effective number of clusters.
    pub effective_number: f64,
    /// Largest single mass.
    pub max_mass: f64,
    /// Number of entries with non-zero mass.
    pub support: usize,
}

impl DistributionSummary {
    fn of(mass: &[f64]) -> Self {
        let h = entropy(mass);
        let total: f64 = mass.iter().sum();
        DistributionSummary {
            entropy: h,
            effective_number: h.exp(),
            max_mass: if total > 0.0 {
                mass.iter().cloned().fold(0.0, f64::max) / total
            } else {
                0.0
            },
            support: mass.iter().filter(|&&m| m > 0.0).count(),
        }
    }
}

/// Usage statistics over the unique-prototype groups at one ε.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupedUsage {
    pub eps: f64,
    /// Number of groups (= unique prototypes at `eps`).
    pub groups: usize,
    /// Grouped MLCD `Π_c = Σ_{k∈c} π_k`.
    pub mlcd: DistributionSummary,
    /// Grouped hard MLCD.
    pub hard_mlcd: DistributionSummary,
    /// Distinct groups among the argmax prototypes.
    pub used_groups: usize,
    /// `Π` itself (length `groups`; not serialised).
    #[serde(skip)]
    pub mass: Vec<f64>,
}

/// The JSON-serialisable usage report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageReport {
    /// How `p(k|x)` was formed ([`Assignment::describe`]).
    pub assignment: String,
    pub n_samples: i64,
    pub k: i64,
    /// Soft MLCD `π`.
    pub mlcd: DistributionSummary,
    /// Hard MLCD (argmax histogram).
    pub hard_mlcd: DistributionSummary,
    /// Distinct argmax prototypes over the set.
    pub used_clusters: usize,
    /// `E_x[H(p(·|x))]` in nats.
    pub mean_sample_entropy: f64,
    pub grouped: Option<GroupedUsage>,
    /// `π` (length K; not serialised).
    #[serde(skip)]
    pub soft: Vec<f64>,
    /// Hard MLCD `n_k` (length K; not serialised).
    #[serde(skip)]
    pub hard: Vec<f64>,
}

/// A prototype grouping to evaluate grouped MLCD with (e.g. `UniqueAnalysis::greedy_groups[i]`
/// and its ε).
#[derive(Debug, Clone, Copy)]
pub struct Grouping<'a> {
    pub eps: f64,
    /// Group id of every prototype, ids in `0..groups`.
    pub groups: &'a [i64],
}

/// Streaming accumulator of [`UsageReport`].
#[derive(Debug)]
pub struct UsageAccumulator {
    k: i64,
    assignment: Assignment,
    soft_sum: Tensor,
    hard_count: Tensor,
    entropy_sum: f64,
    n: i64,
}

impl UsageAccumulator {
    /// An empty accumulator for `k` prototypes.
    pub fn new(k: i64, assignment: Assignment) -> Result<Self> {
        if k < 1 {
            return Err(AnalysisError::invalid("k", "must be ≥ 1"));
        }
        match &assignment {
            Assignment::TeacherCentered {
                center,
                teacher_temp,
            } => {
                if center.numel() as i64 != k {
                    return Err(AnalysisError::Shape(format!(
                        "center has {} elements, K = {k}",
                        center.numel()
                    )));
                }
                if !positive(*teacher_temp) {
                    return Err(AnalysisError::invalid("teacher_temp", "must be > 0"));
                }
            }
            Assignment::Softmax { temperature } if !positive(*temperature) => {
                return Err(AnalysisError::invalid("temperature", "must be > 0"));
            }
            _ => {}
        }
        let opts = (Kind::Double, tch::Device::Cpu);
        Ok(UsageAccumulator {
            k,
            assignment,
            soft_sum: Tensor::f_zeros([k], opts)?,
            hard_count: Tensor::f_zeros([k], opts)?,
            entropy_sum: 0.0,
            n: 0,
        })
    }

    /// Samples seen so far.
    pub fn n_samples(&self) -> i64 {
        self.n
    }

    /// Add a batch `[N, K]` of logits (or probabilities, per the [`Assignment`]).
    pub fn update(&mut self, batch: &Tensor) -> Result<()> {
        let size = batch.size();
        if size.len() != 2 || size[1] != self.k {
            return Err(AnalysisError::Shape(format!(
                "usage batch must be [N, {}], found {size:?}",
                self.k
            )));
        }
        if size[0] == 0 {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        let x = batch
            .f_to_device(tch::Device::Cpu)?
            .f_to_kind(Kind::Float)?;
        if x.f_isfinite()?.f_all()?.f_int64_value(&[])? == 0 {
            return Err(AnalysisError::invalid(
                "batch",
                "contains NaN or infinite logits/probabilities",
            ));
        }
        let (p, sample_entropy) = match &self.assignment {
            Assignment::Probabilities => {
                let h = x.f_special_xlogy(&x)?.f_sum_dim_intlist(
                    [1i64].as_slice(),
                    false,
                    Kind::Double,
                )?;
                (x, h.f_neg()?)
            }
            logit_mode => {
                let z = match logit_mode {
                    Assignment::TeacherCentered {
                        center,
                        teacher_temp,
                    } => x
                        .f_sub(&center.f_to_kind(Kind::Float)?.f_reshape([1, self.k])?)?
                        .f_div_scalar(*teacher_temp)?,
                    Assignment::Softmax { temperature } => x.f_div_scalar(*temperature)?,
                    Assignment::Probabilities => unreachable!("handled above"),
                };
                let logp = z.f_log_softmax(1, Kind::Float)?;
                let p = logp.f_exp()?;
                let h = p
                    .f_mul(&logp)?
                    .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Double)?
                    .f_neg()?;
                (p, h)
            }
        };
        self.soft_sum =
            self.soft_sum
                .f_add(&p.f_sum_dim_intlist([0i64].as_slice(), false, Kind::Double)?)?;
        let argmax = p.f_argmax(1, false)?;
        let ones = Tensor::f_ones([size[0]], (Kind::Double, tch::Device::Cpu))?;
        self.hard_count = self.hard_count.f_scatter_add(0, &argmax, &ones)?;
        self.entropy_sum += sample_entropy.f_sum(Kind::Double)?.f_double_value(&[])?;
        self.n += size[0];
        Ok(())
    }

    /// The statistics so far; with `grouping`, also grouped MLCD and used groups.
    pub fn finish(&self, grouping: Option<Grouping<'_>>) -> Result<UsageReport> {
        if self.n == 0 {
            return Err(AnalysisError::invalid(
                "batches",
                "no sample was accumulated",
            ));
        }
        let n = self.n as f64;
        let soft: Vec<f64> = Vec::<f64>::try_from(&self.soft_sum)?
            .into_iter()
            .map(|s| s / n)
            .collect();
        let hard: Vec<f64> = Vec::<f64>::try_from(&self.hard_count)?
            .into_iter()
            .map(|c| c / n)
            .collect();
        let grouped = match grouping {
            None => None,
            Some(g) => Some(group_usage(&soft, &hard, g)?),
        };
        Ok(UsageReport {
            assignment: self.assignment.describe(),
            n_samples: self.n,
            k: self.k,
            mlcd: DistributionSummary::of(&soft),
            hard_mlcd: DistributionSummary::of(&hard),
            used_clusters: hard.iter().filter(|&&h| h > 0.0).count(),
            mean_sample_entropy: self.entropy_sum / n,
            grouped,
            soft,
            hard,
        })
    }
}

fn group_usage(soft: &[f64], hard: &[f64], g: Grouping<'_>) -> Result<GroupedUsage> {
    if g.groups.len() != soft.len() {
        return Err(AnalysisError::Shape(format!(
            "grouping has {} entries, K = {}",
            g.groups.len(),
            soft.len()
        )));
    }
    let groups = match g.groups.iter().max() {
        Some(&m) if m >= 0 && g.groups.iter().all(|&x| x >= 0) => m as usize + 1,
        _ => return Err(AnalysisError::invalid("groups", "ids must be ≥ 0")),
    };
    let mut mass = vec![0.0; groups];
    let mut hard_mass = vec![0.0; groups];
    for (k, &c) in g.groups.iter().enumerate() {
        mass[c as usize] += soft[k];
        hard_mass[c as usize] += hard[k];
    }
    Ok(GroupedUsage {
        eps: g.eps,
        groups,
        mlcd: DistributionSummary::of(&mass),
        hard_mlcd: DistributionSummary::of(&hard_mass),
        used_groups: hard_mass.iter().filter(|&&h| h > 0.0).count(),
        mass,
    })
}
