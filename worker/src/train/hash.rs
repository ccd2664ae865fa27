//! The replica hash: a SHA-256 over everything a step changes — every student and teacher
//! variable, the optimiser state, the DINO centre (and KoLeo-proto's cached neighbour indices
//! when it keeps them), all by sorted checkpoint name, plus the step counter. Each tensor
//! contributes its name, element type, shape and raw bytes (a contiguous CPU copy), so two
//! replicas hash equal exactly when they are bit-identical. Members report it every
//! `hash_every_steps` steps and the coordinator compares them (silent divergence of the EMA
//! teacher is the classic failure this catches).

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use tch::Device;

use super::model::Trainer;

/// Version tag hashed first, so a change of the scheme never matches an old hash.
const SCHEME: &[u8] = b"protodino-replica-hash/1";

/// SHA-256 of the replica's whole training state.
pub fn state_hash(trainer: &Trainer) -> Result<[u8; 32]> {
    let mut tensors = trainer.checkpoint_tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    h.update(SCHEME);
    h.update(trainer.step.to_le_bytes());
    let mut buf = Vec::new();
    for (name, t) in &tensors {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        let kind = t
            .f_kind()
            .with_context(|| format!("{name}: element type"))?;
        h.update(format!("{kind:?}").as_bytes());
        let size = t.size();
        h.update((size.len() as u64).to_le_bytes());
        for d in &size {
            h.update(d.to_le_bytes());
        }
        let c = tch::no_grad(|| t.detach().to_device(Device::Cpu).contiguous());
        let numel = c.numel();
        buf.resize(numel * kind.elt_size_in_bytes(), 0);
        c.f_copy_data_u8(&mut buf, numel)
            .with_context(|| format!("{name}: reading its bytes"))?;
        h.update(&buf);
    }
    Ok(h.finalize().into())
}

/// The test-only perturbation hook (`PROTODINO_TEST_PERTURB_AT_STEP`): adds `delta` to the first
/// teacher parameter, in place. It exists so end-to-end tests can make one replica drift and
/// check that the coordinator notices; nothing else calls it.
pub fn perturb_teacher(trainer: &Trainer, delta: f64) {
    let params = protodino_dino::params::named_parameters(&trainer.teacher_vs);
    if let Some((_, p)) = params.first() {
        tch::no_grad(|| {
            let _ = p.shallow_clone().g_add_scalar_(delta);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::model::build_trainer;
    use crate::train::testing::tiny_config;

    #[test]
    fn identical_replicas_hash_equal_and_any_change_shows() {
        let cfg = tiny_config();
        let a = build_trainer(&cfg, 10, 1).unwrap();
        let b = build_trainer(&cfg, 10, 1).unwrap();
        let ha = state_hash(&a).unwrap();
        assert_eq!(ha, state_hash(&b).unwrap(), "same seed, same state");
        assert_eq!(ha, state_hash(&a).unwrap(), "deterministic");

        perturb_teacher(&b, 1e-3);
        assert_ne!(ha, state_hash(&b).unwrap(), "a perturbed teacher");

        let mut c = build_trainer(&cfg, 10, 1).unwrap();
        c.step = 1;
        assert_ne!(ha, state_hash(&c).unwrap(), "the step counter");

        let mut d = build_trainer(&cfg, 10, 1).unwrap();
        tch::no_grad(|| {
            let _ = d.dino_loss.center.g_add_scalar_(1e-6);
        });
        assert_ne!(ha, state_hash(&d).unwrap(), "the centre");
    }
}
