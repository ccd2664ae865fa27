//! The EMA teacher (docs/algorithm.md §1.8 step 8; pitfall 8): for every parameter pair, including a
//! frozen `weight_g`, `θ_t ← m·θ_t + (1 − m)·θ_s`, in the official operation order
//! (`mul_(m)` then `add_((1 − m)·θ_s)`). Buffers are not EMA-ed.

use std::collections::HashMap;

use tch::Tensor;

use crate::error::{DinoError, Result};
use crate::params::strip_root;

/// Pair teacher parameters with student parameters by name below their roots
/// (`teacher.head.x` ↔ `student.head.x`). Every teacher parameter must have a partner; the
/// student may have parameters the teacher lacks (iBOT's mask token `backbone.masked_embed`, a
/// student-only `last_layer2`), which — as iBOT's `names_common` — take no part.
pub fn pair_parameters(
    student: &[(String, Tensor)],
    teacher: &[(String, Tensor)],
) -> Result<Vec<(Tensor, Tensor)>> {
    let by_name: HashMap<&str, &Tensor> = student.iter().map(|(n, t)| (strip_root(n), t)).collect();
    if by_name.len() < teacher.len() {
        return Err(DinoError::Shape(format!(
            "student has {} parameters, teacher {}",
            by_name.len(),
            teacher.len()
        )));
    }
    teacher
        .iter()
        .map(|(n, t)| {
            let s = by_name.get(strip_root(n)).ok_or_else(|| {
                DinoError::Shape(format!("teacher parameter {n} has no student partner"))
            })?;
            if s.size() != t.size() {
                return Err(DinoError::Shape(format!(
                    "{n}: teacher {:?} vs student {:?}",
                    t.size(),
                    s.size()
                )));
            }
            Ok((s.shallow_clone(), t.shallow_clone()))
        })
        .collect()
}

/// One EMA update with momentum `m` over `(student, teacher)` pairs.
pub fn ema_update(pairs: &[(Tensor, Tensor)], momentum: f64) {
    tch::no_grad(|| {
        for (s, t) in pairs {
            let mut t = t.shallow_clone();
            let _ = t.g_mul_scalar_(momentum);
            let _ = t.g_add_(&(s.detach() * (1.0 - momentum)));
        }
    });
}

/// Copy every student variable named `…<from>x` into the teacher's `…<to>x` of the same shape
/// (iBOT's teacher with a shared head takes the student's `last_layer2` as its initial
/// prototypes, see `step`).
pub fn copy_renamed(
    student: &[(String, Tensor)],
    teacher: &[(String, Tensor)],
    from: &str,
    to: &str,
) {
    let by_name: HashMap<String, &Tensor> = teacher
        .iter()
        .map(|(n, t)| (strip_root(n).to_string(), t))
        .collect();
    tch::no_grad(|| {
        for (n, s) in student {
            let name = strip_root(n);
            if let Some(rest) = name.strip_prefix(from)
                && let Some(t) = by_name.get(&format!("{to}{rest}"))
                && t.size() == s.size()
            {
                let mut t = t.shallow_clone();
                t.copy_(s);
            }
        }
    });
}

/// Copy student parameters into the teacher (its initialisation).
pub fn copy_student_to_teacher(pairs: &[(Tensor, Tensor)]) {
    tch::no_grad(|| {
        for (s, t) in pairs {
            let mut t = t.shallow_clone();
            t.copy_(s);
        }
    });
}
