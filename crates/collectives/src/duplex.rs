//! The two-thread ring engine for large buffers: a sender thread writes to the successor while
//! the calling thread reads from the predecessor and reduces, so the two kernel copies of every
//! hop (out of our buffer, into our buffer) run on two cores at once.
//!
//! Same steps, same order of additions and same wire bytes as the one-thread loop in
//! `engine.rs`; only the scheduling differs. The threads share the caller's buffer through a raw
//! pointer and two progress counters:
//! - the receiver publishes `recv_pos` (bytes of its step stream finished, `Release`) and the
//!   sender may send bytes of step `s` only up to what step `s - 1` has finished (`Acquire`);
//! - before overwriting a range that an *earlier* step sent (all-gather overwrites the segment
//!   this rank sent in reduce-scatter), the receiver waits until `send_pos` shows those bytes
//!   left. With honest peers this never waits (the data cannot come back before it left), but
//!   it makes a misbehaving peer unable to cause a read/write race on the buffer.
//!
//! Either thread failing sets `abort`; the other notices within `SLICE` and returns.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::element::Element;
use crate::engine::{Links, Step};
use crate::error::{CollectiveError, Result};
use crate::frame::{HEADER_BYTES, Header};
use crate::link;

/// Longest a thread blocks before re-checking `abort` (and, for the sender, its successor).
const SLICE: Duration = Duration::from_millis(20);

/// The caller's buffer as raw bytes, shared by the two threads under the rules above.
#[derive(Clone, Copy)]
struct Shared {
    base: *mut u8,
    len: usize,
}

// SAFETY: the two threads touch disjoint byte ranges at any time (ordering by the progress
// counters, see the module doc); the buffer outlives both (scoped threads).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// # Safety
    /// `range` within the buffer and not being written by the other thread.
    unsafe fn bytes(&self, start: usize, end: usize) -> &[u8] {
        debug_assert!(start <= end && end <= self.len);
        unsafe { std::slice::from_raw_parts(self.base.add(start), end - start) }
    }

    /// # Safety
    /// `range` within the buffer and not being read or written by the other thread.
    #[allow(clippy::mut_from_ref)]
    unsafe fn bytes_mut(&self, start: usize, end: usize) -> &mut [u8] {
        debug_assert!(start <= end && end <= self.len);
        unsafe { std::slice::from_raw_parts_mut(self.base.add(start), end - start) }
    }
}

struct Progress {
    recv_pos: AtomicUsize,
    send_pos: AtomicUsize,
    abort: AtomicBool,
}

/// Byte geometry of the steps: segment ranges and stream offsets of every step.
struct Geometry {
    send: Vec<std::ops::Range<usize>>,
    recv: Vec<std::ops::Range<usize>>,
    send_prefix: Vec<usize>,
    recv_prefix: Vec<usize>,
    /// For receive step `t`: the latest send step `s <= t` of the same segment, if any.
    guard: Vec<Option<usize>>,
}

impl Geometry {
    fn new(bounds: &[usize], steps: &[Step], elem: usize) -> Self {
        let range = |seg: usize| bounds[seg] * elem..bounds[seg + 1] * elem;
        let send: Vec<_> = steps.iter().map(|s| range(s.send_seg)).collect();
        let recv: Vec<_> = steps.iter().map(|s| range(s.recv_seg)).collect();
        let prefix = |v: &Vec<std::ops::Range<usize>>| {
            let mut p = vec![0];
            for r in v {
                p.push(p[p.len() - 1] + r.len());
            }
            p
        };
        let guard = (0..steps.len())
            .map(|t| {
                (0..=t)
                    .rev()
                    .find(|&s| steps[s].send_seg == steps[t].recv_seg)
            })
            .collect();
        Self {
            send_prefix: prefix(&send),
            recv_prefix: prefix(&recv),
            send,
            recv,
            guard,
        }
    }
}

/// Runs `steps` like `engine::run`, with a sender thread. Returns the first error of either side.
#[allow(clippy::too_many_arguments)]
pub fn run<T: Element>(
    links: &mut Links,
    header: &Header,
    buf: &mut [T],
    bounds: &[usize],
    steps: &[Step],
    chunk_bytes: usize,
    timeout: Duration,
    during: &'static str,
) -> Result<()> {
    let elem = std::mem::size_of::<T>();
    let chunk_elems = (chunk_bytes / elem).max(1);
    let geometry = Geometry::new(bounds, steps, elem);
    let shared = Shared {
        base: buf.as_mut_ptr().cast::<u8>(),
        len: std::mem::size_of_val(buf),
    };
    let progress = Progress {
        recv_pos: AtomicUsize::new(0),
        send_pos: AtomicUsize::new(0),
        abort: AtomicBool::new(false),
    };
    let Links {
        next,
        next_rank,
        prev,
        prev_rank,
    } = links;
    let (next_rank, prev_rank) = (*next_rank, *prev_rank);
    let header_bytes = header.encode();

    thread::scope(|scope| {
        let sender = scope.spawn(|| {
            let r = send_side(
                next,
                next_rank,
                &header_bytes,
                &geometry,
                shared,
                &progress,
                timeout,
                during,
            );
            if r.is_err() {
                progress.abort.store(true, Ordering::Release);
            }
            r
        });
        let sender_thread = sender.thread().clone();
        let received = recv_side::<T>(
            prev,
            prev_rank,
            header,
            steps,
            &geometry,
            shared,
            chunk_elems,
            &progress,
            &sender_thread,
            timeout,
            during,
        );
        if received.is_err() {
            progress.abort.store(true, Ordering::Release);
            sender_thread.unpark();
        }
        let sent = sender.join().unwrap_or_else(|_| {
            Err(CollectiveError::Protocol {
                rank: next_rank,
                detail: "sender thread panicked".into(),
            })
        });
        // The root cause first: an abort seen by one side is a consequence of the other's error.
        match (received, sent) {
            (Err(CollectiveError::Poisoned), Err(e)) | (Err(e), _) | (Ok(()), Err(e)) => Err(e),
            (Ok(()), Ok(())) => Ok(()),
        }
    })
}

fn aborted(progress: &Progress) -> Result<()> {
    if progress.abort.load(Ordering::Acquire) {
        Err(CollectiveError::Poisoned)
    } else {
        Ok(())
    }
}

/// Blocks until `stream` is ready for `events`, in slices so an abort is noticed; the progress
/// deadline counts from `since`.
fn wait_ready(
    stream: &TcpStream,
    events: libc::c_short,
    progress: &Progress,
    since: Instant,
    timeout: Duration,
    rank: usize,
    during: &'static str,
) -> Result<libc::c_short> {
    loop {
        aborted(progress)?;
        let left = timeout.saturating_sub(since.elapsed());
        if left.is_zero() {
            return Err(CollectiveError::Timeout { timeout, during });
        }
        let mut fds = [link::pollfd(stream, events)];
        if link::poll(&mut fds, left.min(SLICE)).map_err(|e| link::io_error(e, rank, during))? > 0 {
            return Ok(fds[0].revents);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn send_side(
    next: &mut TcpStream,
    rank: usize,
    header: &[u8; HEADER_BYTES],
    g: &Geometry,
    shared: Shared,
    progress: &Progress,
    timeout: Duration,
    during: &'static str,
) -> Result<()> {
    let mut last_move = Instant::now();
    let out = |next: &mut TcpStream, bytes: &[u8], last_move: &mut Instant| -> Result<usize> {
        loop {
            match next.write(bytes) {
                Ok(0) => return Err(CollectiveError::PeerLost { rank, during }),
                Ok(n) => {
                    *last_move = Instant::now();
                    return Ok(n);
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    let ev = wait_ready(
                        next,
                        libc::POLLOUT,
                        progress,
                        *last_move,
                        timeout,
                        rank,
                        during,
                    )?;
                    if ev & libc::POLLOUT == 0 {
                        check_closed(next, rank, during)?;
                    }
                }
                Err(e) => return Err(link::io_error(e, rank, during)),
            }
        }
    };
    let mut sent = 0;
    while sent < HEADER_BYTES {
        sent += out(next, &header[sent..], &mut last_move)?;
    }
    for s in 0..g.send.len() {
        let seg = g.send[s].clone();
        let mut done = 0;
        while done < seg.len() {
            let ready = if s == 0 {
                seg.len()
            } else {
                let finished = progress.recv_pos.load(Ordering::Acquire);
                finished.saturating_sub(g.recv_prefix[s - 1]).min(seg.len())
            };
            if ready <= done {
                // Waiting for our predecessor's data: the receiver owns that deadline. Meanwhile
                // notice a successor that went away, and aborts.
                aborted(progress)?;
                check_closed(next, rank, during)?;
                thread::park_timeout(SLICE);
                continue;
            }
            // SAFETY: bytes of step s up to `ready` are final (recv_pos, Acquire) and nobody
            // writes them until they have left (the receiver's guard on send_pos).
            let bytes = unsafe { shared.bytes(seg.start + done, seg.start + ready) };
            done += out(next, bytes, &mut last_move)?;
            progress
                .send_pos
                .store(g.send_prefix[s] + done, Ordering::Release);
        }
    }
    Ok(())
}

/// The successor never writes to us: readable means it closed.
fn check_closed(next: &mut TcpStream, rank: usize, during: &'static str) -> Result<()> {
    let mut byte = [0u8; 1];
    match next.read(&mut byte) {
        Ok(0) => Err(CollectiveError::PeerLost { rank, during }),
        Ok(_) => Err(CollectiveError::Protocol {
            rank,
            detail: "unexpected data from successor".into(),
        }),
        Err(e)
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted =>
        {
            Ok(())
        }
        Err(e) => Err(link::io_error(e, rank, during)),
    }
}

#[allow(clippy::too_many_arguments)]
fn recv_side<T: Element>(
    prev: &mut TcpStream,
    rank: usize,
    header: &Header,
    steps: &[Step],
    g: &Geometry,
    shared: Shared,
    chunk_elems: usize,
    progress: &Progress,
    sender: &thread::Thread,
    timeout: Duration,
    during: &'static str,
) -> Result<()> {
    let elem = std::mem::size_of::<T>();
    let mut last_move = Instant::now();
    let fill =
        |prev: &mut TcpStream, target: &mut [u8], last_move: &mut Instant| -> Result<usize> {
            loop {
                match prev.read(target) {
                    Ok(0) => return Err(CollectiveError::PeerLost { rank, during }),
                    Ok(n) => {
                        *last_move = Instant::now();
                        return Ok(n);
                    }
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::Interrupted =>
                    {
                        wait_ready(
                            prev,
                            libc::POLLIN,
                            progress,
                            *last_move,
                            timeout,
                            rank,
                            during,
                        )?;
                    }
                    Err(e) => return Err(link::io_error(e, rank, during)),
                }
            }
        };
    let mut raw = [0u8; HEADER_BYTES];
    let mut got = 0;
    while got < HEADER_BYTES {
        got += fill(prev, &mut raw[got..], &mut last_move)?;
    }
    header.check(&raw, rank, true)?;

    let mut scratch: Vec<T> = vec![T::default(); chunk_elems];
    for (t, step) in steps.iter().enumerate() {
        let seg = g.recv[t].clone();
        let mut done = 0;
        while done < seg.len() {
            let end = if step.reduce {
                (done + chunk_elems * elem).min(seg.len())
            } else {
                seg.len()
            };
            let end = match g.guard[t] {
                Some(s) => loop {
                    // Only overwrite what has already left through the sender.
                    let left = progress
                        .send_pos
                        .load(Ordering::Acquire)
                        .saturating_sub(g.send_prefix[s]);
                    let allowed = left.min(end);
                    if allowed > done {
                        break allowed;
                    }
                    aborted(progress)?;
                    if last_move.elapsed() >= timeout {
                        return Err(CollectiveError::Timeout { timeout, during });
                    }
                    thread::sleep(Duration::from_micros(50));
                },
                None => end,
            };
            if step.reduce {
                let want = end - done;
                let target = &mut crate::element::as_bytes_mut(&mut scratch)[..want];
                let mut filled = 0;
                while filled < want {
                    filled += fill(prev, &mut target[filled..], &mut last_move)?;
                }
                // SAFETY: this segment range is not read by the sender until recv_pos says so,
                // and (guard) not sent by an earlier step still in flight; alignment: the buffer
                // is a `[T]` and the offset is a multiple of `size_of::<T>()`.
                let acc = unsafe {
                    let bytes = shared.bytes_mut(seg.start + done, seg.start + end);
                    std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<T>(), want / elem)
                };
                T::add_into(acc, &scratch[..want / elem]);
                done = end;
            } else {
                // SAFETY: as above; bytes become visible to the sender only through recv_pos.
                let target = unsafe { shared.bytes_mut(seg.start + done, seg.start + end) };
                done += fill(prev, target, &mut last_move)?;
            }
            progress
                .recv_pos
                .store(g.recv_prefix[t] + done, Ordering::Release);
            sender.unpark();
        }
    }
    Ok(())
}
