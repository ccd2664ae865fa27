//! [`NcclGroup`]: the GPU backend, NCCL through `cudarc`'s raw `result` layer, loaded at run time.
//!
//! Tensors stay tch's: the worker passes `tensor.data_ptr()` (a device pointer), the element count
//! and the current CUDA stream. The communicator is created *non-blocking* from a 128-byte
//! [`NcclUniqueId`] that rank 0 (or the coordinator) generates and hands to every rank; calls then
//! return at once and this module polls `ncclCommGetAsyncError` together with the stream, so a dead
//! or hung peer ends in [`CollectiveError::Timeout`] or [`CollectiveError::Nccl`] after the
//! deadline instead of NCCL's watchdog minutes. On any error the communicator is aborted
//! (`ncclCommAbort`) and the group is poisoned; recovery is a new group from a *new* unique id.
//!
//! Nothing here touches CUDA until called: on a machine without `libnccl.so` / `libcuda.so`,
//! [`nccl_available`] is false and [`NcclGroup::init`] returns [`CollectiveError::Unavailable`]
//! (cudarc would panic on a missing library, so the check comes first).

use std::ffi::c_void;
use std::time::{Duration, Instant};

use cudarc::driver::sys as cu;
use cudarc::nccl::result as nccl;
use cudarc::nccl::sys as ncclsys;

use crate::element::ReduceOp;
use crate::error::{CollectiveError, Result};

/// Size of an NCCL unique id.
pub const UNIQUE_ID_BYTES: usize = 128;

/// Element types NCCL reduces for us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NcclDType {
    F32,
    /// Needs NCCL >= 2.24 at run time.
    Bf16,
}

impl NcclDType {
    fn raw(self) -> ncclsys::ncclDataType_t {
        match self {
            Self::F32 => ncclsys::ncclDataType_t::ncclFloat32,
            Self::Bf16 => ncclsys::ncclDataType_t::ncclBfloat16,
        }
    }
}

/// Why [`nccl_available`] is false. cudarc looks for `libnccl.so` (and `.so.1`, `.so.9`–`.so.12`,
/// …) but not `libnccl.so.2`, the only name that the `nvidia-nccl-cu*` wheels ship: a
/// `libnccl.so` link next to it (as the Docker image makes) or on the loader path fixes that.
pub const MISSING_LIBRARIES: &str = "libnccl.so or libcuda.so not found on the loader path \
     (a wheel's libnccl.so.2 needs a libnccl.so link beside it)";

/// True when both the NCCL and the CUDA driver libraries can be loaded.
pub fn nccl_available() -> bool {
    // SAFETY: these only try to dlopen the libraries.
    unsafe { ncclsys::is_culib_present() && cu::is_culib_present() }
}

fn nccl_err(what: &str, e: nccl::NcclError) -> CollectiveError {
    CollectiveError::Nccl(format!("{what}: {:?} (code {})", e.0, e.0 as i32))
}

fn cuda_err(what: &str, e: cudarc::driver::DriverError) -> CollectiveError {
    CollectiveError::Nccl(format!(
        "{what}: CUDA driver error {:?} (code {})",
        e.0, e.0 as i32
    ))
}

/// The 128-byte rendezvous token of an NCCL communicator (sent through the coordinator).
#[derive(Clone, PartialEq, Eq)]
pub struct NcclUniqueId(pub [u8; UNIQUE_ID_BYTES]);

impl std::fmt::Debug for NcclUniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclUniqueId({}…)", hex::encode(&self.0[..8]))
    }
}

impl NcclUniqueId {
    /// A fresh id from the local NCCL (the process that creates it must stay reachable until all
    /// ranks have initialised).
    pub fn generate() -> Result<Self> {
        if !nccl_available() {
            return Err(CollectiveError::Unavailable(MISSING_LIBRARIES.into()));
        }
        let raw = nccl::get_uniqueid().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
        let mut id = [0u8; UNIQUE_ID_BYTES];
        for (d, s) in id.iter_mut().zip(raw.internal.iter()) {
            *d = *s as u8;
        }
        Ok(Self(id))
    }

    /// From bytes received from the coordinator.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let id: [u8; UNIQUE_ID_BYTES] = bytes.try_into().map_err(|_| {
            CollectiveError::InvalidArgument(format!(
                "nccl unique id has {} bytes, not 128",
                bytes.len()
            ))
        })?;
        Ok(Self(id))
    }

    fn raw(&self) -> ncclsys::ncclUniqueId {
        let mut internal = [0 as std::ffi::c_char; UNIQUE_ID_BYTES];
        for (d, s) in internal.iter_mut().zip(self.0.iter()) {
            *d = *s as std::ffi::c_char;
        }
        ncclsys::ncclUniqueId { internal }
    }
}

/// A non-blocking NCCL communicator over a fixed group, one GPU per rank.
pub struct NcclGroup {
    comm: ncclsys::ncclComm_t,
    rank: usize,
    world: usize,
    timeout: Duration,
    poisoned: bool,
    /// Runtime NCCL version code (`major * 10000 + minor * 100 + patch`).
    version: i32,
    /// One f32 on the device for [`NcclGroup::barrier`].
    scratch: cu::CUdeviceptr,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls are not concurrent,
// which `&mut self` guarantees.
unsafe impl Send for NcclGroup {}

impl std::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclGroup")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish()
    }
}

impl NcclGroup {
    /// Joins the communicator `id` as `rank` of `world` on CUDA device `device` (made current on
    /// this thread through its primary context, the one libtorch uses). Fails after `timeout` if
    /// the other ranks do not arrive.
    pub fn init(
        id: &NcclUniqueId,
        rank: usize,
        world: usize,
        device: i32,
        timeout: Duration,
    ) -> Result<Self> {
        if rank >= world {
            return Err(CollectiveError::InvalidArgument(format!(
                "rank {rank} >= world {world}"
            )));
        }
        if !nccl_available() {
            return Err(CollectiveError::Unavailable(MISSING_LIBRARIES.into()));
        }
        cudarc::driver::result::init().map_err(|e| cuda_err("cuInit", e))?;
        let dev =
            cudarc::driver::result::device::get(device).map_err(|e| cuda_err("cuDeviceGet", e))?;
        // SAFETY: the primary context of a valid device; retaining it keeps it alive for libtorch too.
        unsafe {
            let ctx = cudarc::driver::result::primary_ctx::retain(dev)
                .map_err(|e| cuda_err("retain", e))?;
            cudarc::driver::result::ctx::set_current(ctx)
                .map_err(|e| cuda_err("set_current", e))?;
        }
        let version = nccl::get_nccl_version().map_err(|e| nccl_err("ncclGetVersion", e))?;
        let mut config = default_config(version);
        config.blocking = 0;
        let mut comm: ncclsys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer and config; the id is 128 bytes.
        unsafe {
            nccl::comm_init_rank_config(&mut comm, world as i32, id.raw(), rank as i32, &mut config)
        }
        .map_err(|e| nccl_err("ncclCommInitRankConfig", e))?;
        let mut group = Self {
            comm,
            rank,
            world,
            timeout,
            poisoned: false,
            version,
            scratch: 0,
        };
        group.wait_comm("ncclCommInitRankConfig")?;
        // SAFETY: a 4-byte device allocation freed in Drop.
        group.scratch = unsafe { cudarc::driver::result::malloc_sync(4) }
            .map_err(|e| cuda_err("cuMemAlloc", e))?;
        Ok(group)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Aborts the communicator: pending and future operations fail; rebuild with a new id.
    pub fn abort(&mut self) {
        if !self.poisoned && !self.comm.is_null() {
            // SAFETY: a communicator created by init and not yet destroyed.
            let _ = unsafe { nccl::comm_abort(self.comm) };
        }
        self.poisoned = true;
    }

    fn fail(&mut self, e: CollectiveError) -> CollectiveError {
        self.abort();
        e
    }

    /// Polls the asynchronous error state until the last call is no longer in progress.
    fn wait_comm(&mut self, what: &'static str) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let mut state = ncclsys::ncclResult_t::ncclSuccess;
            // SAFETY: valid communicator and out-pointer.
            let rc = unsafe { ncclsys::ncclCommGetAsyncError(self.comm, &mut state) };
            if let Err(e) = rc.result() {
                return Err(self.fail(nccl_err("ncclCommGetAsyncError", e)));
            }
            match state.result() {
                Ok(nccl::NcclStatus::InProgress) => {}
                Ok(_) => return Ok(()),
                Err(e) => return Err(self.fail(nccl_err(what, e))),
            }
            if Instant::now() >= deadline {
                return Err(self.fail(CollectiveError::Timeout {
                    timeout: self.timeout,
                    during: what,
                }));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn enqueued(
        &mut self,
        rc: std::result::Result<nccl::NcclStatus, nccl::NcclError>,
        what: &'static str,
    ) -> Result<()> {
        match rc {
            Ok(_) => self.wait_comm(what),
            Err(e) => Err(self.fail(nccl_err(what, e))),
        }
    }

    fn usable(&self) -> Result<()> {
        if self.poisoned {
            Err(CollectiveError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Runtime NCCL version code (e.g. 22703 for 2.27.3).
    pub fn nccl_version(&self) -> i32 {
        self.version
    }

    /// bf16 reductions exist from NCCL 2.24 on.
    fn supports(&self, dtype: NcclDType) -> Result<()> {
        if dtype == NcclDType::Bf16 && self.version < 22400 {
            return Err(CollectiveError::Unavailable(format!(
                "bf16 needs NCCL >= 2.24, found {}",
                self.version
            )));
        }
        Ok(())
    }

    /// Enqueues an in-place all-reduce of `count` elements at device pointer `ptr` on `stream`.
    /// Call [`NcclGroup::synchronize`] (or a later synchronising call) to learn of failures.
    ///
    /// # Safety
    /// `ptr` must point to `count` elements of `dtype` on this rank's device, valid until the
    /// stream has run the operation; `stream` must be a live stream of that device (or null).
    pub unsafe fn all_reduce(
        &mut self,
        ptr: u64,
        count: usize,
        dtype: NcclDType,
        op: ReduceOp,
        stream: *mut c_void,
    ) -> Result<()> {
        self.usable()?;
        self.supports(dtype)?;
        let redop = match op {
            ReduceOp::Sum => ncclsys::ncclRedOp_t::ncclSum,
            ReduceOp::Average => ncclsys::ncclRedOp_t::ncclAvg,
        };
        let p = ptr as *mut c_void;
        // SAFETY: the caller's contract above.
        let rc =
            unsafe { nccl::all_reduce(p, p, count, dtype.raw(), redop, self.comm, stream.cast()) };
        self.enqueued(rc, "ncclAllReduce")
    }

    /// Enqueues an in-place broadcast from `root`.
    ///
    /// # Safety
    /// As for [`NcclGroup::all_reduce`].
    pub unsafe fn broadcast(
        &mut self,
        ptr: u64,
        count: usize,
        dtype: NcclDType,
        root: usize,
        stream: *mut c_void,
    ) -> Result<()> {
        self.usable()?;
        self.supports(dtype)?;
        if root >= self.world {
            return Err(CollectiveError::InvalidArgument(format!(
                "root {root} >= world {}",
                self.world
            )));
        }
        let p = ptr as *mut c_void;
        // SAFETY: the caller's contract.
        let rc = unsafe {
            nccl::broadcast(
                p,
                p,
                count,
                dtype.raw(),
                root as i32,
                self.comm,
                stream.cast(),
            )
        };
        self.enqueued(rc, "ncclBroadcast")
    }

    /// Enqueues an all-gather: `recv` holds `world * count` elements, rank `i`'s at `i * count`.
    ///
    /// # Safety
    /// `send` holds `count` and `recv` `world * count` elements of `dtype` on this device.
    pub unsafe fn all_gather(
        &mut self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: NcclDType,
        stream: *mut c_void,
    ) -> Result<()> {
        self.usable()?;
        self.supports(dtype)?;
        // SAFETY: the caller's contract.
        let rc = unsafe {
            nccl::all_gather(
                send as *const c_void,
                recv as *mut c_void,
                count,
                dtype.raw(),
                self.comm,
                stream.cast(),
            )
        };
        self.enqueued(rc, "ncclAllGather")
    }

    /// Waits until `stream` has finished its work, polling NCCL's asynchronous error meanwhile;
    /// a peer that died or hung makes this fail within the deadline (and aborts the communicator).
    ///
    /// # Safety
    /// `stream` must be a live stream of this rank's device (or null for the legacy stream).
    pub unsafe fn synchronize(&mut self, stream: *mut c_void) -> Result<()> {
        self.usable()?;
        let deadline = Instant::now() + self.timeout;
        loop {
            // SAFETY: the caller's contract.
            let rc = unsafe { cu::cuStreamQuery(stream.cast()) };
            match rc {
                cu::CUresult::CUDA_SUCCESS => return self.wait_comm("stream"),
                cu::CUresult::CUDA_ERROR_NOT_READY => {}
                other => {
                    return Err(self.fail(cuda_err(
                        "cuStreamQuery",
                        cudarc::driver::DriverError(other),
                    )));
                }
            }
            self.wait_comm("stream")?;
            if Instant::now() >= deadline {
                return Err(self.fail(CollectiveError::Timeout {
                    timeout: self.timeout,
                    during: "nccl stream",
                }));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// All ranks meet: a one-element all-reduce on the legacy stream, synchronised.
    pub fn barrier(&mut self) -> Result<()> {
        let stream = std::ptr::null_mut();
        // SAFETY: `scratch` is our own 4-byte device allocation; the null stream is always valid.
        unsafe {
            self.all_reduce(self.scratch, 1, NcclDType::F32, ReduceOp::Sum, stream)?;
            self.synchronize(stream)
        }
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        if self.comm.is_null() {
            return;
        }
        // SAFETY: our own communicator and allocation, released once.
        unsafe {
            if self.poisoned {
                // Already aborted; abort frees the communicator.
            } else {
                let _ = nccl::comm_abort(self.comm);
            }
            if self.scratch != 0 {
                let _ = cudarc::driver::result::free_sync(self.scratch);
            }
        }
    }
}

/// `NCCL_CONFIG_INITIALIZER` for cudarc's `ncclConfig_t`: every field undefined (NCCL's
/// `INT_MIN` / null) except size, magic and version, so NCCL applies its own defaults.
fn default_config(version: i32) -> ncclsys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    ncclsys::ncclConfig_t {
        size: std::mem::size_of::<ncclsys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: version as u32,
        blocking: UNDEF,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs only where NCCL and a GPU exist (docs/gpu.md: a world of one, since NCCL refuses two ranks
    /// on one GPU); elsewhere it checks that the backend reports itself unavailable, not panics.
    #[test]
    fn world_of_one_or_unavailable() {
        if !nccl_available() {
            assert!(matches!(
                NcclUniqueId::generate(),
                Err(CollectiveError::Unavailable(_))
            ));
            let id = NcclUniqueId([0; UNIQUE_ID_BYTES]);
            assert!(matches!(
                NcclGroup::init(&id, 0, 1, 0, Duration::from_secs(1)),
                Err(CollectiveError::Unavailable(_))
            ));
            eprintln!("NCCL not present: skipped the GPU part");
            return;
        }
        let id = NcclUniqueId::generate().unwrap();
        let mut g = NcclGroup::init(&id, 0, 1, 0, Duration::from_secs(30)).unwrap();
        let host = [1.5f32, -2.0, 3.25];
        unsafe {
            let dev = cudarc::driver::result::malloc_sync(12).unwrap();
            cudarc::driver::result::memcpy_htod_sync(dev, &host).unwrap();
            g.all_reduce(dev, 3, NcclDType::F32, ReduceOp::Sum, std::ptr::null_mut())
                .unwrap();
            g.synchronize(std::ptr::null_mut()).unwrap();
            let mut back = [0f32; 3];
            cudarc::driver::result::memcpy_dtoh_sync(&mut back, dev).unwrap();
            assert_eq!(back, host);
            g.broadcast(dev, 3, NcclDType::F32, 0, std::ptr::null_mut())
                .unwrap();
            g.barrier().unwrap();
            g.abort();
            assert!(matches!(g.barrier(), Err(CollectiveError::Poisoned)));
            // Re-initialise from a new id after the abort.
            let id2 = NcclUniqueId::generate().unwrap();
            let mut g2 = NcclGroup::init(&id2, 0, 1, 0, Duration::from_secs(30)).unwrap();
            g2.barrier().unwrap();
            cudarc::driver::result::free_sync(dev).unwrap();
        }
    }
}
