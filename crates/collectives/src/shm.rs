//! The shared-memory all-reduce for a group whose ranks all run on one host: the same sums in the
//! same order as the TCP ring, with about half the memory traffic and no kernel copies.
//!
//! Why: on one host the TCP ring moves every byte through the kernel twice per hop (out of the
//! sender's buffer, into the receiver's), `2 (W − 1) / W` of the buffer per rank in each
//! direction. Here each rank copies its chunk into a shared segment once, sums its own share of
//! every chunk straight out of the segment, and copies the finished chunk back: per rank about
//! `2 (W − 1) / W + 1` buffer lengths of plain `memcpy`-speed traffic, most of it through the
//! cache (the segment is a few MiB and is reused chunk after chunk). NCCL's and Open MPI's
//! shared-memory transports rest on the same observation.
//!
//! **Forming.** After the ring is formed, rank 0 creates `/dev/shm/protodino-<random>` (mode
//! 0600, `O_EXCL`, its space reserved with `posix_fallocate` so a full tmpfs is an error here and
//! not a `SIGBUS` later), writes a random token into it and sends path and token around the
//! authenticated ring. Each rank opens and maps the file and checks the token; the verdict travels
//! back to rank 0, which unlinks the file (it lives on only as the ranks' mappings, so no crash
//! can leak it afterwards) and sends the decision around the ring. Ranks on different hosts, in
//! different containers, or with the option off all answer "no", and the group keeps the TCP ring.
//!
//! **Segment.** A header (magic, token, world, chunk, the abort word), one control line per rank
//! (its stage counter and a waiter count, on cache lines of their own), two operation headers per
//! rank, and two sets (alternating rounds, so a fast rank fills round `g + 1` while slow ones still
//! read round `g`) of `world` input slots plus one result slot, each one chunk long.
//!
//! **A round** (one chunk of the caller's buffer; an operation is as many rounds as it has chunks)
//! is three published stages per rank: 1 = my chunk is in my slot, 2 = my share of the chunk is
//! summed into the result slot, 3 = I copied the result out (my slots may be reused). Stage `s` of
//! round `g` publishes the counter value `3 g + s`. Rank `r` sums share `r` of every chunk (the
//! chunk cut in `world` near-equal parts), and each element in the fixed ring order of the TCP
//! ring (element `i` in ring segment `j`: `((x_j + x_{j+1}) + …) + x_{j-1}`), so results are
//! bit-identical on every rank *and* to the TCP ring's. Average divides the finished sum once, in
//! the same place. Rank `r` never copies share `r` through the segment (it reads its own input
//! from its buffer and writes its result there directly). Buffers of at most [`ONE_SHOT_BYTES`]
//! take one round in which every rank sums the whole chunk itself (one wait instead of two).
//!
//! **Waiting** is on the peers' counters with `futex(2)` (never a busy loop: ranks may share
//! cores), in slices of [`SLICE`], between which the ring sockets are polled: they carry nothing
//! during a shared-memory operation, so a neighbour's connection that closed while its counter is
//! short of this operation's end means it died ([`CollectiveError::PeerLost`]). A rank that fails
//! sets the abort word and wakes everyone, so all ranks fail within about a slice; a peer that
//! stops moving its counter for the progress deadline is a [`CollectiveError::Timeout`]. Each
//! rank's operation header sits in the segment and is checked by all at the first stage, so
//! mismatched calls fail with [`CollectiveError::Mismatch`].
//!
//! Safety model: the segment is shared only with authenticated members of the group, and every
//! region is written by one rank at a time by the protocol above (the counters order the writes
//! and reads with release/acquire); a peer that breaks the protocol can corrupt results, as a
//! peer on the TCP ring could, but not this process's memory outside the mapping.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::element::Element;
use crate::engine::{Links, segment_bounds};
use crate::error::{CollectiveError, Result};
use crate::frame::{HEADER_BYTES, Header};
use crate::link;

const MAGIC: u64 = u64::from_le_bytes(*b"PDCSHM01");
const DIR: &str = "/dev/shm";
const TOKEN: usize = 32;
/// Bytes of one rank's control line (two 64-byte lines: the adjacent-line prefetcher of x86
/// would otherwise couple neighbouring ranks' counters).
const LINE: usize = 128;
/// Longest uninterrupted sleep on a peer's counter: the ring sockets and the deadline are checked
/// at least this often, which bounds how late a dead neighbour is noticed.
pub const SLICE: Duration = Duration::from_millis(20);
/// Largest buffer reduced in one round by every rank at once (the latency path).
pub const ONE_SHOT_BYTES: usize = 32 << 10;
/// Elements summed per block: the running sum of a block stays in L1 while the inputs stream by.
const BLOCK: usize = 2048;
/// Fixed size of the forming messages (flag, path length, path, token).
const OFFER_BYTES: usize = 128;
const PATH_MAX: usize = OFFER_BYTES - 2 - TOKEN;

/// Offsets of the segment's parts for a world and chunk size.
#[derive(Debug, Clone, Copy)]
struct Layout {
    world: usize,
    chunk: usize,
    ranks: usize,
    headers: usize,
    data: usize,
    len: usize,
}

// Header fields (offsets in the first 128 bytes).
const AT_MAGIC: usize = 0;
const AT_WORLD: usize = 8;
const AT_CHUNK: usize = 16;
const AT_TOKEN: usize = 32;
const AT_ABORT: usize = 64;
const AT_ABORT_BY: usize = 68;

impl Layout {
    fn new(world: usize, chunk: usize) -> Self {
        let ranks = LINE;
        let headers = ranks + world * LINE;
        let data = (headers + world * 2 * HEADER_BYTES).next_multiple_of(4096);
        let len = data + 2 * (world + 1) * chunk;
        Self {
            world,
            chunk,
            ranks,
            headers,
            data,
            len,
        }
    }

    /// Input slot of rank `q` (`q == world`: the result slot) in the slot set `parity`.
    fn slot(&self, parity: usize, q: usize) -> usize {
        self.data + (parity * (self.world + 1) + q) * self.chunk
    }
}

/// Rounds the requested chunk to whole pages (at least one).
pub fn chunk_size(requested: usize) -> usize {
    requested.max(1).next_multiple_of(4096)
}

/// One rank's mapping of the group's segment.
pub struct Segment {
    base: *mut u8,
    layout: Layout,
    rank: usize,
    /// Next round number (every rank runs the same rounds, so this is equal on all ranks).
    round: u64,
    /// Operations run so far (selects the operation-header slot).
    ops: u64,
}

// SAFETY: the mapping is owned by this value (unmapped in Drop) and only accessed through it.
unsafe impl Send for Segment {}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: base/len come from a successful mmap and are unmapped exactly once.
        unsafe {
            libc::munmap(self.base.cast(), self.layout.len);
        }
    }
}

fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}

fn map(file: &std::fs::File, len: usize) -> io::Result<*mut u8> {
    // SAFETY: a fresh shared mapping of a file we hold open; checked for MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p.cast())
    }
}

impl Segment {
    /// Rank 0: creates, sizes, reserves and maps a new segment; returns it with its path and token.
    fn create(world: usize, chunk: usize) -> io::Result<(Self, String, [u8; TOKEN])> {
        let layout = Layout::new(world, chunk);
        let token: [u8; TOKEN] = random_bytes()?;
        let name: [u8; 16] = random_bytes()?;
        let path = format!("{DIR}/protodino-{}", hex::encode(name));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)?;
        let setup = (|| {
            file.set_len(layout.len as u64)?;
            // SAFETY: plain syscall on our descriptor.
            let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, layout.len as i64) };
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            map(&file, layout.len)
        })();
        let base = match setup {
            Ok(base) => base,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let seg = Self {
            base,
            layout,
            rank: 0,
            round: 0,
            ops: 0,
        };
        // SAFETY: the header region is inside the mapping and nobody else has it yet.
        unsafe {
            let b = seg.base;
            b.add(AT_WORLD).cast::<u64>().write(world as u64);
            b.add(AT_CHUNK).cast::<u64>().write(chunk as u64);
            std::ptr::copy_nonoverlapping(token.as_ptr(), b.add(AT_TOKEN), TOKEN);
            b.add(AT_MAGIC).cast::<u64>().write(MAGIC);
        }
        Ok((seg, path, token))
    }

    /// Other ranks: opens and maps rank 0's segment and checks that it is the announced one.
    fn attach(path: &str, token: &[u8; TOKEN], rank: usize, world: usize) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        let len = file.metadata()?.len() as usize;
        if len < Layout::new(world, 4096).len {
            return Err(io::Error::other("segment too small"));
        }
        let base = map(&file, len)?;
        // SAFETY: the header lies in the first page of a mapping of at least that size.
        let (magic, w, chunk, got) = unsafe {
            let mut got = [0u8; TOKEN];
            std::ptr::copy_nonoverlapping(base.add(AT_TOKEN), got.as_mut_ptr(), TOKEN);
            (
                base.add(AT_MAGIC).cast::<u64>().read(),
                base.add(AT_WORLD).cast::<u64>().read() as usize,
                base.add(AT_CHUNK).cast::<u64>().read() as usize,
                got,
            )
        };
        let layout = Layout::new(world, chunk);
        let seg = Self {
            base,
            layout: Layout { len, ..layout },
            rank,
            round: 0,
            ops: 0,
        };
        if magic != MAGIC || w != world || got != *token || layout.len != len || chunk % 4096 != 0 {
            return Err(io::Error::other("not the announced segment"));
        }
        Ok(seg)
    }

    fn word(&self, at: usize) -> &AtomicU32 {
        // SAFETY: `at` is a 4-aligned offset inside the mapping (header or control lines); the
        // mapping outlives `&self`, and AtomicU32 has u32's layout.
        unsafe { &*self.base.add(at).cast::<AtomicU32>() }
    }

    fn stage(&self, q: usize) -> &AtomicU32 {
        self.word(self.layout.ranks + q * LINE)
    }

    fn waiters(&self, q: usize) -> &AtomicU32 {
        self.word(self.layout.ranks + q * LINE + 4)
    }

    /// Marks the group failed and wakes every sleeper so they see it (first caller wins).
    pub fn abort(&self) {
        let _ = self.word(AT_ABORT_BY).compare_exchange(
            0,
            self.rank as u32 + 1,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        self.word(AT_ABORT).store(1, Ordering::SeqCst);
        for q in 0..self.layout.world {
            futex_wake(self.stage(q));
        }
    }

    fn aborted(&self) -> Result<()> {
        if self.word(AT_ABORT).load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let by = self.word(AT_ABORT_BY).load(Ordering::Acquire) as usize;
        Err(CollectiveError::PeerLost {
            rank: by.saturating_sub(1),
            during: "all_reduce",
        })
    }

    fn publish(&self, value: u32) {
        let s = self.stage(self.rank);
        s.store(value, Ordering::SeqCst);
        if self.waiters(self.rank).load(Ordering::SeqCst) > 0 {
            futex_wake(s);
        }
    }

    /// `len` elements of slot `q` of the set `parity` (`q == world`: the result slot).
    ///
    /// # Safety
    /// The caller must hold that region by the protocol (nobody writes it meanwhile, or, for a
    /// mutable use, nobody else touches it), and `len * size_of::<T>() <= chunk`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slot<T: Element>(&self, parity: usize, q: usize, len: usize) -> &mut [T] {
        debug_assert!(len * std::mem::size_of::<T>() <= self.layout.chunk);
        // SAFETY: inside the mapping (slot offsets + chunk <= len), aligned (page-aligned slots).
        unsafe {
            std::slice::from_raw_parts_mut(
                self.base.add(self.layout.slot(parity, q)).cast::<T>(),
                len,
            )
        }
    }

    fn header_at(&self, q: usize, parity: usize) -> *mut u8 {
        // SAFETY: inside the header area of the mapping.
        unsafe {
            self.base
                .add(self.layout.headers + (q * 2 + parity) * HEADER_BYTES)
        }
    }

    /// In-place all-reduce of `buf` through the segment; `divisor` makes it an average.
    pub fn all_reduce<T: Element>(
        &mut self,
        links: &mut Links,
        header: &Header,
        buf: &mut [T],
        divisor: Option<usize>,
        timeout: Duration,
    ) -> Result<()> {
        let world = self.layout.world;
        let elem = std::mem::size_of::<T>();
        let n = buf.len();
        let one_shot = std::mem::size_of_val(buf) <= ONE_SHOT_BYTES.min(self.layout.chunk);
        let per_round = if one_shot {
            n.max(1)
        } else {
            self.layout.chunk / elem
        };
        let rounds = n.div_ceil(per_round).max(1) as u64;
        let ring = segment_bounds(n, world);
        let first = self.round;
        let end = stage_value(first + rounds - 1, 3);
        let mut watch = Watch {
            links,
            last_move: Instant::now(),
            timeout,
            end,
            left: [false; 2],
        };
        let hparity = (self.ops & 1) as usize;
        let mut scratch = vec![T::default(); BLOCK.min(per_round)];
        for k in 0..rounds as usize {
            let g = self.round;
            let p = (g & 1) as usize;
            let start = k * per_round;
            let m = per_round.min(n - start);
            let mine = &mut buf[start..start + m];
            // Shares of this chunk; one-shot: every rank sums the whole chunk.
            let cut = segment_bounds(m, world);
            let (lo, hi) = if one_shot {
                (0, 0)
            } else {
                (cut[self.rank], cut[self.rank + 1])
            };
            if g >= 2 {
                // Our slots of this set were last read in round g - 2.
                self.wait_all(stage_value(g - 2, 3), &mut watch)?;
            }
            if k == 0 {
                let h = header.encode();
                // SAFETY: our own header slot of this parity; its readers finished two ops ago
                // (they had to, to let us pass the wait above or start this group).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        h.as_ptr(),
                        self.header_at(self.rank, hparity),
                        HEADER_BYTES,
                    )
                };
            }
            // SAFETY: our input slot of set p, free since round g - 2 (waited above).
            let slot: &mut [T] = unsafe { self.slot(p, self.rank, m) };
            slot[..lo].copy_from_slice(&mine[..lo]);
            slot[hi..].copy_from_slice(&mine[hi..]);
            self.publish(stage_value(g, 1));
            self.wait_all(stage_value(g, 1), &mut watch)?;
            if k == 0 {
                self.check_headers(header, hparity)?;
            }
            if one_shot {
                self.sum_share(p, start, 0, m, &ring, mine, &mut scratch, divisor, false);
                self.publish(stage_value(g, 3));
            } else {
                self.sum_share(p, start, lo, hi, &ring, mine, &mut scratch, divisor, true);
                self.publish(stage_value(g, 2));
                self.wait_all(stage_value(g, 2), &mut watch)?;
                // SAFETY: the result slot of set p is final (every rank published stage 2) and
                // is not written again before everyone published stage 3 of this round.
                let result: &[T] = unsafe { self.slot(p, world, m) };
                mine[..lo].copy_from_slice(&result[..lo]);
                mine[hi..].copy_from_slice(&result[hi..]);
                self.publish(stage_value(g, 3));
            }
            self.round += 1;
        }
        self.ops += 1;
        Ok(())
    }

    /// Sums elements `lo..hi` of the chunk that starts at element `start` of the caller's buffer,
    /// each in the ring order of its ring segment, into `mine` (and the result slot, if `share`).
    #[allow(clippy::too_many_arguments)]
    fn sum_share<T: Element>(
        &self,
        p: usize,
        start: usize,
        lo: usize,
        hi: usize,
        ring: &[usize],
        mine: &mut [T],
        scratch: &mut [T],
        divisor: Option<usize>,
        share: bool,
    ) {
        let world = self.layout.world;
        let m = mine.len();
        let mut a = lo;
        while a < hi {
            // Ring segment of element `start + a`, and where it (or this share) ends.
            let j = ring.partition_point(|&b| b <= start + a) - 1;
            let b_end = (ring[j + 1] - start).min(hi);
            let mut x = a;
            while x < b_end {
                let y = (x + BLOCK).min(b_end);
                let acc = &mut scratch[..y - x];
                for t in 0..world {
                    let q = (j + t) % world;
                    // SAFETY: every rank published stage 1 of this round: slot q of set p is
                    // final and only read until stage 3.
                    let src: &[T] = if q == self.rank {
                        &mine[x..y]
                    } else {
                        unsafe { &self.slot::<T>(p, q, m)[x..y] }
                    };
                    if t == 0 {
                        acc.copy_from_slice(src);
                    } else {
                        T::add_into(acc, src);
                    }
                }
                if let Some(d) = divisor {
                    T::divide(acc, d);
                }
                if share {
                    // SAFETY: elements lo..hi of the result slot belong to this rank until
                    // stage 2 is published.
                    unsafe { self.slot::<T>(p, world, m)[x..y].copy_from_slice(acc) };
                }
                mine[x..y].copy_from_slice(acc);
                x = y;
            }
            a = b_end;
        }
    }

    fn check_headers(&self, header: &Header, parity: usize) -> Result<()> {
        for q in (0..self.layout.world).filter(|&q| q != self.rank) {
            let mut got = [0u8; HEADER_BYTES];
            // SAFETY: rank q wrote its header before publishing the stage we waited for.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.header_at(q, parity),
                    got.as_mut_ptr(),
                    HEADER_BYTES,
                )
            };
            header.check(&got, q, true)?;
        }
        Ok(())
    }

    fn wait_all(&self, target: u32, watch: &mut Watch<'_>) -> Result<()> {
        for q in (0..self.layout.world).filter(|&q| q != self.rank) {
            self.wait_rank(q, target, watch)?;
        }
        Ok(())
    }

    /// Sleeps on rank `q`'s counter until it reaches `target`, in slices between which the abort
    /// word, the sockets and the progress deadline are checked.
    fn wait_rank(&self, q: usize, target: u32, watch: &mut Watch<'_>) -> Result<()> {
        let stage = self.stage(q);
        let mut seen = stage.load(Ordering::Acquire);
        loop {
            if reached(seen, target) {
                return Ok(());
            }
            self.aborted()?;
            let waiters = self.waiters(q);
            waiters.fetch_add(1, Ordering::SeqCst);
            if stage.load(Ordering::SeqCst) == seen
                && self.word(AT_ABORT).load(Ordering::SeqCst) == 0
            {
                futex_wait(stage, seen, SLICE);
            }
            waiters.fetch_sub(1, Ordering::SeqCst);
            let now = stage.load(Ordering::Acquire);
            if now != seen {
                seen = now;
                watch.last_move = Instant::now();
                continue;
            }
            self.aborted()?;
            watch.check(self)?;
        }
    }

    /// Stage counter of rank `q` (for the socket check).
    fn stage_of(&self, q: usize) -> u32 {
        self.stage(q).load(Ordering::Acquire)
    }
}

/// Counter value of stage `s` (1..=3) of round `g`, wrapping like the counters do.
fn stage_value(g: u64, s: u32) -> u32 {
    (g as u32).wrapping_mul(3).wrapping_add(s)
}

/// `value` is at or past `target` on the wrapping counter (they are never 2^31 apart).
fn reached(value: u32, target: u32) -> bool {
    (value.wrapping_sub(target) as i32) >= 0
}

/// What a wait checks between slices.
struct Watch<'a> {
    links: &'a mut Links,
    last_move: Instant,
    timeout: Duration,
    /// The counter value every rank reaches at the end of this operation.
    end: u32,
    /// Neighbours (prev, next) that closed after finishing this operation: not watched again.
    left: [bool; 2],
}

impl Watch<'_> {
    fn check(&mut self, seg: &Segment) -> Result<()> {
        if self.last_move.elapsed() >= self.timeout {
            return Err(CollectiveError::Timeout {
                timeout: self.timeout,
                during: "all_reduce",
            });
        }
        let ranks = [self.links.prev_rank, self.links.next_rank];
        let mut fds = [
            link::pollfd(&self.links.prev, libc::POLLIN),
            link::pollfd(&self.links.next, libc::POLLIN),
        ];
        link::poll(&mut fds, Duration::ZERO)
            .map_err(|e| link::io_error(e, ranks[0], "all_reduce"))?;
        for (i, fd) in fds.iter().enumerate() {
            if self.left[i] || fd.revents == 0 {
                continue;
            }
            let rank = ranks[i];
            let done = reached(seg.stage_of(rank), self.end);
            let mut byte = [0u8; 1];
            // SAFETY: peeking one byte into a local buffer from our own socket.
            let rc = unsafe {
                libc::recv(
                    fd.fd,
                    byte.as_mut_ptr().cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            match rc {
                // Closed: fine once that rank finished this operation, else it died.
                0 if done => self.left[i] = true,
                0 => {
                    return Err(CollectiveError::PeerLost {
                        rank,
                        during: "all_reduce",
                    });
                }
                // Data: a neighbour that finished this operation may already be in the next
                // (socket) collective; one that did not is in a different collective.
                n if n > 0 && done => self.left[i] = true,
                n if n > 0 => {
                    return Err(CollectiveError::Protocol {
                        rank,
                        detail: "sent socket data during a shared-memory all-reduce \
                                 (mismatched collectives)"
                            .into(),
                    });
                }
                _ => {
                    let e = io::Error::last_os_error();
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) {
                        return Err(link::io_error(e, rank, "all_reduce"));
                    }
                }
            }
        }
        Ok(())
    }
}

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: a shared (non-private) futex wait on a live, aligned u32 of the mapping; the
    // result (woken, timed out, value changed, interrupted) is re-checked by the caller.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: waking sleepers of a live, aligned u32 of the mapping.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Decides, once the ring is formed, whether the whole group shares a host, and maps the segment
/// if so (see the module text). Every rank must call it, `enabled` or not; all get the same answer.
pub fn negotiate(
    links: &mut Links,
    rank: usize,
    world: usize,
    enabled: bool,
    chunk: usize,
    timeout: Duration,
) -> Result<Option<Segment>> {
    let (next, prev) = (links.next_rank, links.prev_rank);
    let during = "forming the shared-memory segment";
    let send = |links: &mut Links, msg: &[u8]| {
        link::write_all(&mut links.next, msg, timeout, next, during)
    };
    let recv = |links: &mut Links, msg: &mut [u8]| {
        link::read_exact(&mut links.prev, msg, timeout, prev, during)
    };
    let mut offer = [0u8; OFFER_BYTES];
    let mut seg = None;
    if rank == 0 {
        let mut path = String::new();
        let created = (enabled && Path::new(DIR).is_dir())
            .then(|| Segment::create(world, chunk_size(chunk)).ok())
            .flatten();
        if let Some((s, p, token)) = created {
            offer = encode_offer(&p, &token);
            path = p;
            seg = Some(s);
        }
        send(links, &offer)?;
        let mut back = [0u8; OFFER_BYTES];
        recv(links, &mut back)?;
        if !path.is_empty() {
            let _ = std::fs::remove_file(&path);
        }
        let decision = [back[0]];
        send(links, &decision)?;
        let mut echo = [0u8; 1];
        recv(links, &mut echo)?;
        Ok(seg.filter(|_| decision[0] == 1))
    } else {
        recv(links, &mut offer)?;
        if offer[0] == 1 {
            let len = offer[1] as usize;
            let attached = std::str::from_utf8(&offer[2..2 + len.min(PATH_MAX)])
                .ok()
                .filter(|p| enabled && p.starts_with(DIR) && !p.contains(".."))
                .and_then(|p| {
                    let mut token = [0u8; TOKEN];
                    token.copy_from_slice(&offer[2 + PATH_MAX..]);
                    Segment::attach(p, &token, rank, world).ok()
                });
            if attached.is_none() {
                offer[0] = 0;
            }
            seg = attached;
        }
        send(links, &offer)?;
        let mut decision = [0u8; 1];
        recv(links, &mut decision)?;
        send(links, &decision)?;
        Ok(seg.filter(|_| decision[0] == 1))
    }
}

fn encode_offer(path: &str, token: &[u8; TOKEN]) -> [u8; OFFER_BYTES] {
    let mut offer = [0u8; OFFER_BYTES];
    let p = path.as_bytes();
    debug_assert!(p.len() <= PATH_MAX);
    offer[0] = 1;
    offer[1] = p.len() as u8;
    offer[2..2 + p.len()].copy_from_slice(p);
    offer[2 + PATH_MAX..].copy_from_slice(token);
    offer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_wrap_and_layout_is_aligned() {
        assert!(reached(5, 5) && reached(6, 5) && !reached(4, 5));
        assert!(reached(2, u32::MAX - 1));
        assert_eq!(stage_value(0, 1), 1);
        let l = Layout::new(4, chunk_size(1 << 20));
        assert_eq!(l.data % 4096, 0);
        assert_eq!(l.slot(1, 4) + l.chunk, l.len);
        assert_eq!(chunk_size(5000), 8192);
    }
}
