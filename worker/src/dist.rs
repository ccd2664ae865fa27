//! Data-parallel training over `protodino-collectives`: the [`Reducer`] the DINO step calls
//! (gradients averaged, centre statistics summed), and the few group operations the training
//! loop needs around it (state broadcast from the source rank, metric averaging with the stop
//! vote, a barrier with a long deadline around rank-0-only work, small byte broadcasts).
//!
//! `protodino train` forms its group with `--world W --rank R --peers a:p,b:q,…` (every rank's
//! address, in rank order; this rank listens on its own entry, or on `--listen`) and the group
//! secret in the `PROTODINO_GROUP_SECRET` environment variable (never on the command line, where
//! `ps` shows it); the agent forms it from an assignment ([`Dist::from_group`]). When all ranks
//! share a host the group's all-reduce goes through shared memory, otherwise through the TCP
//! ring; the sums are the same bits either way. CUDA tensors go through NCCL instead
//! ([`tensor_reducer`], `nccl.rs`); the ring still carries the small collectives.
//!
//! Data parallelism follows official DINO (`DistributedSampler` + DDP): the global batch of a step
//! is `G` consecutive entries of the epoch permutation, rank `R` taking every `W`-th of them
//! starting at `R` (`protodino_data::plan`); each rank computes the loss of its share, and the
//! gradients are averaged, so `W` ranks follow the single-process run with the global batch (up
//! to the order of floating-point sums; tested).

use std::cell::RefCell;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use half::bf16;
use protodino_collectives::{
    CollectiveError, GroupOptions, GroupSpec, ReduceOp, RingGroup, bind_listener,
};
use protodino_dino::{DinoError, Reducer};
use tch::{Device, Kind, Tensor};

use crate::nccl::NcclReducer;

/// Environment variable holding the group secret of a multi-rank run.
pub const SECRET_ENV: &str = "PROTODINO_GROUP_SECRET";

/// Progress deadline of `protodino train` while it waits out rank-0-only work (the state
/// broadcast, checkpoints).
const LONG_WAIT: Duration = Duration::from_secs(1800);

/// Where this process sits in a data-parallel run.
#[derive(Debug, Clone)]
pub struct DistArgs {
    pub world: usize,
    pub rank: usize,
    /// Every rank's address (`host:port`), in rank order.
    pub peers: Vec<String>,
    /// Address to listen on instead of `peers[rank]` (e.g. `0.0.0.0:port` in a container).
    pub listen: Option<String>,
}

impl DistArgs {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.world >= 1, "--world must be at least 1");
        ensure!(
            self.rank < self.world,
            "--rank {} is not below --world {}",
            self.rank,
            self.world
        );
        ensure!(
            self.world == 1 || self.peers.len() == self.world,
            "--peers lists {} addresses for --world {}",
            self.peers.len(),
            self.world
        );
        Ok(())
    }
}

/// Why a state sync failed: the group (a peer, the stream) or this replica's own state files.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("the state broadcast: {0}")]
    Collective(CollectiveError),
    #[error("the replica's state file: {0}")]
    State(DinoError),
}

/// A data-parallel group as the training loop uses it.
pub struct Dist {
    pub rank: usize,
    pub world: usize,
    group: RefCell<RingGroup>,
    /// Progress deadline of the phases where ranks arrive far apart (see [`Dist::patiently`]).
    long_wait: Duration,
}

impl Dist {
    /// The world of one (no sockets).
    pub fn solo() -> Self {
        Self {
            rank: 0,
            world: 1,
            group: RefCell::new(RingGroup::solo(GroupOptions::default())),
            long_wait: LONG_WAIT,
        }
    }

    /// A formed group (from an assignment) whose rank-0-only phases (the state broadcast, the
    /// barrier around checkpoints) may take up to `long_wait` without progress.
    pub fn from_group(group: RingGroup, long_wait: Duration) -> Self {
        Self {
            rank: group.rank(),
            world: group.world(),
            group: RefCell::new(group),
            long_wait,
        }
    }

    /// Joins the group described by `args` (blocks until every rank is there, or the connect
    /// deadline passes).
    pub fn join(args: &DistArgs) -> Result<Self> {
        args.validate()?;
        if args.world == 1 {
            return Ok(Self::solo());
        }
        let secret = std::env::var(SECRET_ENV)
            .ok()
            .filter(|s| !s.is_empty())
            .with_context(|| {
                format!("a run with --world > 1 needs the group secret in {SECRET_ENV}")
            })?;
        let options = GroupOptions {
            connect_timeout: Duration::from_secs(120),
            ..GroupOptions::default()
        };
        let addr = args.listen.as_deref().unwrap_or(&args.peers[args.rank]);
        let listener =
            bind_listener(addr, &options).with_context(|| format!("listening on {addr}"))?;
        let spec = GroupSpec {
            rank: args.rank,
            world: args.world,
            peers: args.peers.clone(),
            secret: secret.into_bytes(),
        };
        let group = RingGroup::connect(&spec, listener, options).with_context(|| {
            format!("forming the group as rank {} of {}", args.rank, args.world)
        })?;
        Ok(Self {
            rank: args.rank,
            world: args.world,
            group: RefCell::new(group),
            long_wait: LONG_WAIT,
        })
    }

    /// `solo`, `tcp` or `shm`.
    pub fn transport(&self) -> &'static str {
        self.group.borrow().transport().as_str()
    }

    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }

    /// Runs `op` on the group with the progress deadline widened to `long_wait`, then puts
    /// the group's own deadline back.
    fn patiently<R>(
        &self,
        op: impl FnOnce(&mut RingGroup) -> protodino_collectives::Result<R>,
    ) -> protodino_collectives::Result<R> {
        let mut g = self.group.borrow_mut();
        let normal = g.options().timeout;
        g.set_timeout(self.long_wait);
        let result = op(&mut g);
        g.set_timeout(normal);
        result
    }

    /// Makes `path` on every rank a copy of rank `root`'s file, streamed through the group (the
    /// file is never held whole in memory).
    pub fn broadcast_file(&self, path: &Path, root: usize) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        if self.rank == root {
            let mut file = File::open(path).map_err(CollectiveError::Stream)?;
            let len = file.metadata().map_err(CollectiveError::Stream)?.len();
            self.patiently(|g| g.broadcast_send(&mut file, len))
        } else {
            let mut file = BufWriter::new(File::create(path).map_err(CollectiveError::Stream)?);
            let got = self.patiently(|g| g.broadcast_recv(root, &mut file).map(|_| ()));
            got.and_then(|()| file.flush().map_err(CollectiveError::Stream))
        }
    }

    /// Makes every member's replica a copy of rank `source`'s whole state (student, teacher,
    /// optimiser moments, centre, schedule and data position): one checkpoint file streamed
    /// through `scratch`, which is removed afterwards on every rank, whatever happened.
    pub fn sync_state(
        &self,
        trainer: &mut crate::train::Trainer,
        scratch: &Path,
        source: usize,
    ) -> Result<(), SyncError> {
        if self.world == 1 {
            return Ok(());
        }
        let synced = (|| {
            if self.rank == source {
                trainer.save_checkpoint(scratch).map_err(SyncError::State)?;
            }
            self.broadcast_file(scratch, source)
                .map_err(SyncError::Collective)?;
            if self.rank != source {
                trainer.load_checkpoint(scratch).map_err(SyncError::State)?;
            }
            Ok(())
        })();
        let _ = std::fs::remove_file(scratch);
        synced
    }

    /// Makes `buf` on every rank a copy of rank `root`'s bytes (small buffers: an NCCL id).
    pub fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        let mut g = self.group.borrow_mut();
        if self.rank == root {
            g.broadcast_send(&mut buf.as_slice(), buf.len() as u64)
        } else {
            buf.clear();
            g.broadcast_recv(root, buf).map(|_| ())
        }
    }

    /// Waits for every rank with a long deadline: called by all ranks after work that only rank
    /// 0 does, so the others' next all-reduce does not count that time against its deadline.
    pub fn wait_for_leader(&self) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        self.patiently(RingGroup::barrier)
    }

    /// The group's mean of `values` (the logged losses of the global batch), each rank's
    /// weighted by its `share` of the step's samples (the weights sum to one), and the stop
    /// vote: returns true when any rank voted `stop`. The vote rides in the same all-reduce as
    /// one more value (1 for stop), so every rank learns the same answer after the same step.
    pub fn mean_and_vote(
        &self,
        values: &mut [f64],
        share: f64,
        stop: bool,
    ) -> Result<bool, CollectiveError> {
        if self.world == 1 {
            return Ok(stop);
        }
        let mut v: Vec<f32> = values.iter().map(|&x| (x * share) as f32).collect();
        v.push(if stop { 1.0 } else { 0.0 });
        self.group.borrow_mut().all_reduce(&mut v, ReduceOp::Sum)?;
        let vote = v.pop().unwrap_or(0.0);
        for (x, y) in values.iter_mut().zip(v) {
            *x = y as f64;
        }
        Ok(vote > 0.0)
    }

    fn reduce(&self, tensors: &mut [Tensor], op: ReduceOp) -> Result<(), DinoError> {
        if self.world == 1 {
            return Ok(());
        }
        let bad = |what: String| DinoError::Collective(CollectiveError::InvalidArgument(what));
        // Contiguous tensors are reduced in place; others through a contiguous copy.
        let mut work = Vec::with_capacity(tensors.len());
        for t in tensors.iter() {
            if t.device() != Device::Cpu {
                return Err(bad(format!(
                    "the CPU collectives reduce CPU tensors; got one on {:?}",
                    t.device()
                )));
            }
            work.push(if t.is_contiguous() {
                t.shallow_clone()
            } else {
                t.contiguous()
            });
        }
        let mut f32s: Vec<&mut [f32]> = Vec::new();
        let mut bf16s: Vec<&mut [bf16]> = Vec::new();
        for t in work.iter_mut() {
            match t.kind() {
                // SAFETY: contiguous CPU tensors of the matched element type, borrowed mutably
                // for the slices' lifetime; a reduction's tensors (a step's gradients, or its
                // centre statistics) never share storage.
                Kind::Float => f32s.push(unsafe { elements(t) }),
                Kind::BFloat16 => bf16s.push(unsafe { elements(t) }),
                k => {
                    return Err(bad(format!(
                        "the CPU collectives reduce f32 and bf16 tensors; got {k:?}"
                    )));
                }
            }
        }
        let mut g = self.group.borrow_mut();
        if !f32s.is_empty() {
            g.all_reduce_many(&mut f32s, op)?;
        }
        if !bf16s.is_empty() {
            g.all_reduce_many(&mut bf16s, op)?;
        }
        for (t, w) in tensors.iter_mut().zip(&work) {
            if !t.is_contiguous() {
                tch::no_grad(|| t.copy_(w));
            }
        }
        Ok(())
    }
}

/// The elements of a contiguous CPU tensor.
///
/// # Safety
/// `t` must be contiguous, on the CPU, of element type `T`, and not share storage with another
/// tensor viewed at the same time.
unsafe fn elements<T>(t: &mut Tensor) -> &mut [T] {
    let n = t.numel();
    // SAFETY: by the caller's guarantees, `n` elements of T start at the data pointer.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr().cast::<T>(), n) }
}

impl Reducer for Dist {
    fn world_size(&self) -> usize {
        self.world
    }

    fn transport(&self) -> &'static str {
        Dist::transport(self)
    }

    fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<(), DinoError> {
        self.reduce(tensors, ReduceOp::Sum)
    }

    /// The average is taken inside the collective (each element divided once, on its final sum),
    /// not by a second pass over the gradients.
    fn all_reduce_mean(&self, tensors: &mut [Tensor]) -> Result<(), DinoError> {
        self.reduce(tensors, ReduceOp::Average)
    }
}

/// The reducer of a step's tensors: the ring itself for CPU tensors (and any world of one), NCCL
/// for CUDA tensors in a group.
pub enum TensorReducer<'a> {
    Ring(&'a Dist),
    Nccl(NcclReducer),
}

impl TensorReducer<'_> {
    pub fn as_reducer(&self) -> &dyn Reducer {
        match self {
            Self::Ring(d) => *d,
            Self::Nccl(n) => n,
        }
    }

    /// `ring` or `nccl`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ring(_) => "ring",
            Self::Nccl(_) => "nccl",
        }
    }
}

/// The reducer for tensors on `device`: NCCL when they live on a CUDA device and the group has
/// more than one member (its unique id is `nccl_id` when the coordinator sent one, else rank 0
/// generates one and broadcasts it over the ring), the ring otherwise. Errors clearly when CUDA
/// is asked for on a machine without NCCL.
pub fn tensor_reducer<'a>(
    dist: &'a Dist,
    device: Device,
    nccl_id: &[u8],
) -> Result<TensorReducer<'a>> {
    match device {
        Device::Cuda(index) if dist.world > 1 => {
            let reducer = NcclReducer::join(dist, index, nccl_id)?;
            Ok(TensorReducer::Nccl(reducer))
        }
        _ => Ok(TensorReducer::Ring(dist)),
    }
}
