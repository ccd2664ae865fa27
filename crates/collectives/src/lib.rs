//! Collectives for protodino: all-reduce, broadcast, all-gather and barrier over a fixed group.
//!
//! Two backends behind the same vocabulary ([`ReduceOp`], [`CollectiveError`], rank/world):
//! - [`RingGroup`] — CPU tensors as host slices (`f32`, `bf16`): a TCP ring formed once per group
//!   (authenticated, persistent, `TCP_NODELAY`), with a pipelined reduce-scatter + all-gather whose
//!   results are bit-identical on every rank; also the trivial world of one. When every rank
//!   turns out to share the host (checked as the group forms), all-reduce goes through a
//!   shared-memory segment instead ([`Transport::SharedMemory`]): the same sums in the same order,
//!   so the same bits, at 3–4× the TCP ring's bandwidth on one host.
//! - [`NcclGroup`] — CUDA tensors as device pointers + stream: NCCL via `cudarc`, loaded at run
//!   time, non-blocking communicators polled against a deadline.
//!
//! Failure semantics (both backends): every operation has a deadline; a dead, hung or
//! disconnected peer makes every surviving rank return an error ([`CollectiveError::is_peer_failure`])
//! within seconds; the group is then poisoned and must be rebuilt (new ports, new membership, or a
//! new NCCL unique id), in-process.
//!
//! Use from the worker (CPU):
//! ```no_run
//! # use protodino_collectives::*;
//! # fn main() -> Result<()> {
//! // Rendezvous: bind first, report the address to the coordinator, receive peers + secret.
//! let options = GroupOptions::default();
//! let listener = bind_listener("0.0.0.0:0", &options).map_err(|e| CollectiveError::Connect(e.to_string()))?;
//! let spec = GroupSpec { rank: 0, world: 2, peers: vec!["10.0.0.1:7001".into(), "10.0.0.2:7001".into()], secret: b"from-coordinator".to_vec() };
//! let mut group = RingGroup::connect(&spec, listener, options)?;
//! let (mut w, mut b) = (vec![0.5f32; 10], vec![1.0f32; 3]);
//! group.all_reduce_many(&mut [&mut w[..], &mut b[..]], ReduceOp::Average)?; // gradients
//! # Ok(()) }
//! ```
//! On the GPU, `NcclGroup::init(&id, rank, world, device, timeout)` and the `unsafe`
//! `all_reduce(tensor.data_ptr() as u64, numel, NcclDType::F32, op, stream)` followed by
//! `synchronize(stream)`; a null stream is CUDA's legacy default stream, which libtorch uses unless
//! told otherwise.
//!
//! Module map (start with `ring.rs`):
//! - `options`   — [`GroupSpec`] (rank, world, peers, secret) and [`GroupOptions`] (deadlines, sizes)
//! - `ring`      — [`RingGroup`]: forming the ring, all-reduce, all-gather, barrier, abort
//! - `engine`    — the pipelined ring schedule and its one-thread, poll-driven loop
//! - `shm`       — the shared-memory all-reduce of a group on one host (forming, rounds, waits)
//! - `duplex`    — the two-thread variant for large buffers (sender thread + receiving thread)
//! - `broadcast` — streamed broadcast from any rank (`Read` at the root, `Write` elsewhere)
//! - `bucket`    — many tensors at once through flat buckets (DDP-style, 25 MiB default)
//! - `auth`      — HMAC-SHA256 challenge–response handshake proving the group secret
//! - `frame`     — the per-operation header that catches mismatched calls
//! - `link`      — sockets: buffers, `TCP_NODELAY`, deadline-bounded reads and writes
//! - `element`   — `f32` / `bf16` element trait and byte views
//! - `nccl`      — [`NcclGroup`], the GPU backend
//! - `reference` — single-process ring-order sum and test patterns (tests, benchmark)
//! - `error`     — [`CollectiveError`]

pub mod auth;
mod broadcast;
mod bucket;
mod duplex;
pub mod element;
mod engine;
pub mod error;
mod frame;
mod link;
pub mod nccl;
pub mod options;
pub mod reference;
pub mod ring;
mod shm;

pub use element::{DType, Element, ReduceOp};
pub use error::{CollectiveError, Result};
pub use nccl::{NcclDType, NcclGroup, NcclUniqueId, nccl_available};
pub use options::{GroupOptions, GroupSpec};
pub use ring::{RingGroup, Transport, bind_listener};
