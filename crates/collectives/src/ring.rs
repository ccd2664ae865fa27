//! [`RingGroup`]: the CPU backend. Forms the ring once (authenticated, persistent connections to
//! the successor and from the predecessor) and runs all-reduce, all-gather and barrier on it.
//! Broadcast lives in `broadcast.rs`, flat buckets in `bucket.rs`.
//!
//! A world of one needs no sockets: every operation is local (average divides by 1, all-gather
//! copies), so the worker uses the same type whatever the world size.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::auth;
use crate::element::{DType, Element, ReduceOp};
use crate::engine::{self, Links};
use crate::error::{CollectiveError, Result};
use crate::frame::{Header, Kind, op_code};
use crate::link;
use crate::options::{GroupOptions, GroupSpec};
use crate::shm;

/// Longest a single handshake may take, so a stranger that connects and stays silent delays the
/// formation of the group by at most this much per connection.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a group's all-reduce moves data (fixed when the group forms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A world of one: nothing moves.
    Solo,
    /// The TCP ring.
    Tcp,
    /// A shared-memory segment (every rank on this host); the other collectives use the ring.
    SharedMemory,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Solo => "solo",
            Self::Tcp => "tcp",
            Self::SharedMemory => "shm",
        }
    }
}

/// A fixed group of `world` processes joined in a TCP ring (and, when they share a host, a
/// shared-memory segment for all-reduce). Not `Clone`; one per process and group.
pub struct RingGroup {
    pub(crate) rank: usize,
    pub(crate) world: usize,
    options: GroupOptions,
    /// `None` for a world of one, and after the group was poisoned.
    pub(crate) links: Option<Links>,
    /// The shared-memory segment, when the whole group shares this host.
    local: Option<shm::Segment>,
    seq: u64,
    poisoned: bool,
}

impl std::fmt::Debug for RingGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingGroup")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("seq", &self.seq)
            .field("poisoned", &self.poisoned)
            .field("transport", &self.transport())
            .finish()
    }
}

/// Binds the listener a rank announces in the rendezvous, with the socket buffers of `options`
/// (use port 0 and report `local_addr()` to let the OS choose).
pub fn bind_listener(addr: &str, options: &GroupOptions) -> std::io::Result<TcpListener> {
    link::bind_listener(addr, options.socket_buffer_bytes)
}

impl RingGroup {
    /// Forms the group: connects to the successor and accepts the predecessor on `listener`
    /// (concurrently), each side proving the group secret. Connections from anyone else on the
    /// listener are refused and dropped; the listener is closed once the ring is formed, so later
    /// connection attempts are refused by the kernel.
    pub fn connect(spec: &GroupSpec, listener: TcpListener, options: GroupOptions) -> Result<Self> {
        let GroupSpec { rank, world, .. } = *spec;
        if world == 0 || rank >= world || spec.peers.len() != world {
            return Err(CollectiveError::InvalidArgument(format!(
                "rank {rank} of world {world} with {} peer addresses",
                spec.peers.len()
            )));
        }
        if spec.secret.is_empty() {
            return Err(CollectiveError::InvalidArgument(
                "empty group secret".into(),
            ));
        }
        if options.chunk_bytes == 0 || options.bucket_bytes == 0 {
            return Err(CollectiveError::InvalidArgument(
                "chunk_bytes and bucket_bytes must be > 0".into(),
            ));
        }
        let mut group = Self {
            rank,
            world,
            options,
            links: None,
            local: None,
            seq: 0,
            poisoned: false,
        };
        if world == 1 {
            return Ok(group);
        }
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let next_addr = link::resolve(&spec.peers[next_rank])
            .map_err(|e| CollectiveError::Connect(format!("peer {next_rank} address: {e}")))?;
        let deadline = Instant::now() + group.options.connect_timeout;
        let opts = &group.options;
        let (next, prev) = thread::scope(|scope| {
            let dialer = scope.spawn(|| dial(next_addr, spec, next_rank, opts, deadline));
            let prev = accept_predecessor(&listener, spec, prev_rank, deadline);
            let next = dialer
                .join()
                .unwrap_or_else(|_| Err(CollectiveError::Connect("dialer thread panicked".into())));
            (next, prev)
        });
        drop(listener);
        let (next, prev) = (next?, prev?);
        for s in [&next, &prev] {
            link::tune(s, group.options.socket_buffer_bytes)
                .map_err(|e| CollectiveError::Connect(format!("socket options: {e}")))?;
        }
        let mut links = Links {
            next,
            next_rank,
            prev,
            prev_rank,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        group.local = shm::negotiate(
            &mut links,
            rank,
            world,
            group.options.shared_memory,
            group.options.shm_chunk_bytes,
            left.max(Duration::from_millis(1)),
        )
        .map_err(|e| CollectiveError::Connect(e.to_string()))?;
        group.links = Some(links);
        Ok(group)
    }

    /// The trivial group of one (no sockets, no listener): every operation is local.
    pub fn solo(options: GroupOptions) -> Self {
        Self {
            rank: 0,
            world: 1,
            options,
            links: None,
            local: None,
            seq: 0,
            poisoned: false,
        }
    }

    /// How all-reduce moves data in this group.
    pub fn transport(&self) -> Transport {
        match (self.world, &self.local) {
            (1, _) => Transport::Solo,
            (_, Some(_)) => Transport::SharedMemory,
            _ => Transport::Tcp,
        }
    }

    /// Changes the progress deadline for the following operations, e.g. widened around a phase
    /// where ranks are known to arrive far apart (loading a checkpoint before the broadcast).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.options.timeout = timeout;
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn options(&self) -> &GroupOptions {
        &self.options
    }

    /// True once an operation failed; every later call returns [`CollectiveError::Poisoned`].
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Gives up on the group: closes both connections so the neighbours fail at once (and, by
    /// doing the same, the rest of the ring), and raises the shared segment's abort word so ranks
    /// waiting in a shared-memory all-reduce fail at once too. Used on errors and by a worker told
    /// to regroup.
    pub fn abort(&mut self) {
        if let Some(seg) = &self.local {
            seg.abort();
        }
        self.close();
    }

    /// Leaves the group without raising the abort word: peers that already finished their
    /// operations are not disturbed, and peers still waiting for this rank see its connections
    /// close.
    fn close(&mut self) {
        self.poisoned = true;
        self.local = None;
        if let Some(links) = self.links.take() {
            let _ = links.next.shutdown(Shutdown::Both);
            let _ = links.prev.shutdown(Shutdown::Both);
        }
    }

    pub(crate) fn usable(&self) -> Result<()> {
        if self.poisoned {
            Err(CollectiveError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Poisons the group on a communication error and returns it.
    pub(crate) fn fail(&mut self, err: CollectiveError) -> CollectiveError {
        if !matches!(err, CollectiveError::InvalidArgument(_)) {
            self.abort();
        }
        err
    }

    pub(crate) fn next_header(
        &mut self,
        kind: Kind,
        dtype: DType,
        op: u8,
        root: usize,
        count: u64,
    ) -> Header {
        self.seq += 1;
        Header {
            seq: self.seq,
            kind,
            dtype,
            op,
            root: root as u32,
            count,
        }
    }

    /// In-place all-reduce. Every rank ends with the same bits: segment `j` of the buffer is
    /// summed in the fixed ring order starting at rank `j` (see [`crate::reference::ring_sum`]);
    /// [`ReduceOp::Average`] then divides the final sum by the world size. On error the buffer
    /// content is unspecified and the group is poisoned.
    pub fn all_reduce<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.usable()?;
        if self.world == 1 {
            return Ok(());
        }
        let header = self.next_header(Kind::AllReduce, T::DTYPE, op_code(op), 0, buf.len() as u64);
        if let (Some(seg), Some(links)) = (self.local.as_mut(), self.links.as_mut()) {
            let divisor = (op == ReduceOp::Average).then_some(self.world);
            let timeout = self.options.timeout;
            let result = seg.all_reduce(links, &header, buf, divisor, timeout);
            return result.map_err(|e| self.fail(e));
        }
        let bounds = engine::segment_bounds(buf.len(), self.world);
        let steps = engine::all_reduce_steps(self.rank, self.world);
        self.run(&header, buf, &bounds, &steps, "all_reduce")?;
        if op == ReduceOp::Average {
            T::divide(buf, self.world);
        }
        Ok(())
    }

    /// All-gather: `recv` (length `world * send.len()`) receives rank `i`'s `send` at
    /// `i * send.len()`. Every rank must pass the same `send.len()`.
    pub fn all_gather<T: Element>(&mut self, send: &[T], recv: &mut [T]) -> Result<()> {
        self.usable()?;
        let n = send.len();
        if recv.len() != n * self.world {
            return Err(CollectiveError::InvalidArgument(format!(
                "all_gather: recv has {} elements, expected {} x {n}",
                recv.len(),
                self.world
            )));
        }
        recv[self.rank * n..(self.rank + 1) * n].copy_from_slice(send);
        if self.world == 1 {
            return Ok(());
        }
        let header = self.next_header(Kind::AllGather, T::DTYPE, 0, 0, n as u64);
        let bounds: Vec<usize> = (0..=self.world).map(|j| j * n).collect();
        let steps = engine::all_gather_steps(self.rank, self.world);
        self.run(&header, recv, &bounds, &steps, "all_gather")
    }

    /// Returns only after every rank has entered the barrier: an all-reduce of one element per
    /// rank, whose every segment must pass through all ranks.
    pub fn barrier(&mut self) -> Result<()> {
        self.usable()?;
        if self.world == 1 {
            return Ok(());
        }
        let mut ones = vec![1.0f32; self.world];
        let header = self.next_header(
            Kind::Barrier,
            DType::F32,
            op_code(ReduceOp::Sum),
            0,
            self.world as u64,
        );
        let bounds = engine::segment_bounds(self.world, self.world);
        let steps = engine::all_reduce_steps(self.rank, self.world);
        self.run(&header, &mut ones, &bounds, &steps, "barrier")?;
        if ones.iter().any(|&v| v != self.world as f32) {
            let err = CollectiveError::Protocol {
                rank: self.rank,
                detail: format!("barrier sums {ones:?}"),
            };
            return Err(self.fail(err));
        }
        Ok(())
    }

    fn run<T: Element>(
        &mut self,
        header: &Header,
        buf: &mut [T],
        bounds: &[usize],
        steps: &[engine::Step],
        during: &'static str,
    ) -> Result<()> {
        let result = match self.links.as_mut() {
            Some(links) => engine::run(links, header, buf, bounds, steps, &self.options, during),
            None => Err(CollectiveError::Poisoned),
        };
        result.map_err(|e| self.fail(e))
    }
}

impl Drop for RingGroup {
    fn drop(&mut self) {
        // Close promptly so peers still inside an operation fail instead of waiting for a
        // timeout (a rank only drops its group between its own operations, so peers that are
        // behind still get every result they need from it).
        self.close();
    }
}

/// Connects to the successor, retrying while it is not yet listening, then authenticates.
fn dial(
    addr: std::net::SocketAddr,
    spec: &GroupSpec,
    next_rank: usize,
    opts: &GroupOptions,
    deadline: Instant,
) -> Result<TcpStream> {
    let mut last = String::from("deadline passed before the first attempt");
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        match link::connect_once(
            addr,
            opts.socket_buffer_bytes,
            left.min(Duration::from_secs(1)),
        ) {
            Ok(mut stream) => {
                let hs = left.min(HANDSHAKE_TIMEOUT.max(opts.timeout));
                auth::connect(
                    &mut stream,
                    &spec.secret,
                    spec.rank,
                    spec.world,
                    next_rank,
                    hs,
                )?;
                return Ok(stream);
            }
            Err(e) => {
                last = e.to_string();
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
    Err(CollectiveError::Connect(format!(
        "rank {next_rank} at {addr} not reachable: {last}"
    )))
}

/// Accepts connections until one proves to be the predecessor; strangers are dropped.
fn accept_predecessor(
    listener: &TcpListener,
    spec: &GroupSpec,
    prev_rank: usize,
    deadline: Instant,
) -> Result<TcpStream> {
    listener
        .set_nonblocking(true)
        .map_err(|e| CollectiveError::Connect(format!("listener: {e}")))?;
    let mut refused = 0usize;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(CollectiveError::Connect(format!(
                "rank {prev_rank} did not connect in time ({refused} connections refused)"
            )));
        }
        match listener.accept() {
            Ok((mut stream, _)) => {
                let accepted = stream
                    .set_nonblocking(false)
                    .map_err(|e| CollectiveError::Connect(e.to_string()));
                let hs = left.min(HANDSHAKE_TIMEOUT);
                let proven = accepted.and_then(|()| {
                    auth::accept(
                        &mut stream,
                        &spec.secret,
                        spec.rank,
                        spec.world,
                        prev_rank,
                        hs,
                    )
                });
                match proven {
                    Ok(()) => return Ok(stream),
                    Err(_) => {
                        // Refusal is closing without an answer: the stranger learns nothing.
                        refused += 1;
                        let _ = stream.shutdown(Shutdown::Both);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut fds = [libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(listener),
                    events: libc::POLLIN,
                    revents: 0,
                }];
                let _ = link::poll(&mut fds, left.min(Duration::from_millis(200)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(CollectiveError::Connect(format!("accept: {e}"))),
        }
    }
}
