//! The DINO + KoLeo-proto training step of protodino, exact to the official DINO code
//! (`docs/algorithm.md` §1, §2 and the pitfalls of §7), and iBOT's masked-patch objective
//! (`loss.objective = "ibot"`, §5), exact to the official iBOT code. No networking: the distributed
//! parts are reached through the [`Reducer`] hook.
//!
//! Module map (read in this order):
//! * [`schedule`] — lr / weight-decay / EMA-momentum cosines and the per-epoch teacher temperature;
//! * [`loss`] — the DINO loss over the 2V−2 crop pairs and the centre (update through the hook);
//! * [`sinkhorn`] — DINOv2's Sinkhorn-Knopp centring of the teacher (`loss.centering`);
//! * [`vmf`] — DINO-vMF: the vMF log-normaliser `log C_d(κ)` and the logit correction
//!   (`head.prototypes`);
//! * [`variants`] — the DINO loss under the configured centring and prototype reading;
//! * [`masking`] — iBOT's block / random masks of the global crops, drawn per
//!   (seed, epoch, sample id, crop);
//! * [`ibot`] — iBOT's masked-patch loss, the patch centre `center2`, the patch temperature;
//! * [`koleo`] — KoLeo-proto on the student prototypes, blockwise nearest-neighbour search;
//! * [`params`] — official names, parameter groups, buffers, the `last_layer` rule;
//! * [`grads`] — per-parameter gradient clipping and gradient norms;
//! * [`optim`] — AdamW / SGD / LARS with state we own (exportable);
//! * [`ema`] — the EMA teacher;
//! * [`reducer`] — the all-reduce hook and the world of one;
//! * [`network`] — what the step needs from a network, devices, bf16;
//! * [`multicrop`] — the models crate's `MultiCrop` as that network, `from_config`, `replay_multicrop`;
//! * [`step`] — [`DinoTrainer`]: one iteration in the official order, metrics, failure files;
//! * [`checkpoint`] — safetensors checkpoints with official names, resume, official imports;
//! * [`replay`] — recompute (and optionally apply) one step from a checkpoint and a batch file;
//! * [`io`] — atomic safetensors reading and writing;
//! * [`error`] — [`DinoError`].

pub mod checkpoint;
pub mod ema;
pub mod error;
pub mod grads;
pub mod ibot;
pub mod io;
pub mod koleo;
pub mod loss;
pub mod masking;
pub mod multicrop;
pub mod network;
pub mod optim;
pub mod params;
pub mod reducer;
pub mod replay;
pub mod schedule;
pub mod sinkhorn;
pub mod step;
pub mod variants;
pub mod vmf;

pub use checkpoint::{CheckpointMeta, LoadedCheckpoint};
pub use error::{DinoError, NonFiniteLoss, Result};
pub use ibot::{IbotLoss, PatchLossOutput};
pub use koleo::{KoleoOutput, KoleoProto, koleo_proto};
pub use loss::{DinoLoss, DinoLossOutput};
pub use masking::{MaskSpec, ibot_masks};
pub use multicrop::{build_network, replay_multicrop};
pub use network::DinoNetwork;
pub use optim::Optimizer;
pub use reducer::{LocalReducer, Reducer};
pub use replay::{ReplayOverrides, ReplayReport, read_batch, replay, write_batch};
pub use schedule::{ScheduleValues, Schedules};
pub use sinkhorn::{SINKHORN_ITERATIONS, SinkhornOutput, sinkhorn_knopp_teacher};
pub use step::{Batch, DinoTrainer, StepMetrics, StepTimings};
