//! What a group is made of ([`GroupSpec`]: rank, world, peers, secret) and how it behaves
//! ([`GroupOptions`]: deadlines, chunk and bucket sizes, socket buffers).

use std::time::Duration;

/// The rendezvous result for one rank: handed out by the coordinator.
#[derive(Clone)]
pub struct GroupSpec {
    /// This process's rank, `0..world`.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Every rank's listening address (`host:port`), in rank order (this rank's own included).
    pub peers: Vec<String>,
    /// Per-group secret: proves membership in the handshake and never crosses the wire.
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for GroupSpec {
    /// The secret is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupSpec")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("peers", &self.peers)
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .finish()
    }
}

/// Tuning and failure-detection knobs. The defaults suit training on one host or a LAN.
#[derive(Debug, Clone)]
pub struct GroupOptions {
    /// Progress deadline of every operation: it fails with
    /// [`crate::CollectiveError::Timeout`] once no byte has moved for this long. A progress
    /// deadline rather than a whole-operation one, so that a 1 GB state broadcast on a slow link
    /// is not cut off while a stopped peer is still caught within this time. 10 s by default:
    /// long enough to absorb the skew between ranks entering the all-reduce of a training step,
    /// short enough that a hung peer is noticed "within a few seconds". A dead peer is noticed
    /// much faster (its sockets close; failing ranks close theirs, which cascades around the ring).
    pub timeout: Duration,
    /// Deadline for forming the group (all connections and handshakes).
    pub connect_timeout: Duration,
    /// Pipelining unit of reduce steps: a segment is received and added in chunks of this many
    /// bytes, so a hop forwards chunk `c` while chunk `c + 1` is still arriving (sends and copy
    /// steps move byte-granular anyway). 1 MiB measured slightly ahead of 256 KiB on loopback
    /// (world 2 and 4, 16–64 MiB, 4 MiB socket buffers); the machine was too noisy to rank
    /// closer values.
    pub chunk_bytes: usize,
    /// Flat-bucket size for [`crate::RingGroup::all_reduce_many`]; 25 MiB like PyTorch DDP.
    pub bucket_bytes: usize,
    /// `SO_SNDBUF` / `SO_RCVBUF` requested for every connection (the kernel clamps it to
    /// `net.core.wmem_max` / `rmem_max`); 0 leaves the kernel's autotuning on. 4 MiB beat both
    /// 1 MiB and autotuning on loopback (world 4, 64 MiB: 0.39–0.44 vs 0.29–0.35 GB/s).
    pub socket_buffer_bytes: usize,
    /// Buffers of at least this many bytes use a sender thread (`duplex.rs`) so the outgoing and
    /// incoming kernel copies run on two cores; `None` (default) keeps every operation on the
    /// calling thread. Off by default because on the shared 2-core build machine it measured no
    /// faster than the one-thread loop and costs more CPU below ~8 MiB (thread hand-offs); worth
    /// trying on idle many-core hosts (`protodino-collectives-bench --sender-thread-min-bytes`).
    pub sender_thread_min_bytes: Option<usize>,
    /// When neither socket is ready, keep retrying for this long before sleeping in `poll(2)`
    /// (saves a wake-up per chunk when ranks have cores of their own). Off by default: on the
    /// shared 2-core build machine, where ranks share cores, spinning starves the peer on the
    /// same core (world 2, 1 KiB: 45–95 µs without, 210–270 µs with 50 µs of spin) and 64 MiB was
    /// no faster in repeated A/B runs.
    pub spin: Duration,
    /// All-reduce through a shared-memory segment (`shm.rs`) when every rank of the group turns
    /// out to share this host's `/dev/shm` (checked when the group forms; otherwise, or when any
    /// rank has this off, the group uses the TCP ring). Same sums in the same order, so the same
    /// bits, either way; on the 2-core build machine it is several times faster at 64 MiB.
    pub shared_memory: bool,
    /// Chunk of the shared-memory all-reduce: each round moves one chunk per rank through the
    /// segment, which holds `2 (world + 1)` chunks (rounded up to whole pages; 10 MiB at world 4).
    pub shm_chunk_bytes: usize,
}

impl Default for GroupOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(30),
            chunk_bytes: 1 << 20,
            bucket_bytes: 25 << 20,
            socket_buffer_bytes: 4 << 20,
            sender_thread_min_bytes: None,
            spin: Duration::ZERO,
            shared_memory: true,
            shm_chunk_bytes: 1 << 20,
        }
    }
}
