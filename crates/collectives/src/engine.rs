//! The pipelined ring: one thread, two non-blocking sockets, one `poll(2)` loop.
//!
//! An operation is a list of [`Step`]s. At step `s` this rank sends segment `send_seg` to its
//! successor and receives segment `recv_seg` from its predecessor, either adding it into its own
//! copy (reduce-scatter) or overwriting its copy (all-gather). Segments move in chunks, and the
//! invariant `steps[s].send_seg == steps[s - 1].recv_seg` makes the pipeline: chunk `c` of step
//! `s` may leave as soon as chunk `c` of step `s - 1` has arrived and been reduced, while later
//! chunks are still in flight. No step waits for a whole segment, and no thread is spawned.
//!
//! Failure handling: a read of 0 bytes, a reset, or any readable data on the successor's
//! connection (which never carries data towards us, so readability there means it closed) is
//! [`CollectiveError::PeerLost`]; a `poll` that sees nothing for the progress deadline is
//! [`CollectiveError::Timeout`]. The caller poisons the group on any error.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::element::{Element, as_bytes, as_bytes_mut};
use crate::error::{CollectiveError, Result};
use crate::frame::{HEADER_BYTES, Header};
use crate::link;
use crate::options::GroupOptions;

/// One hop of an operation.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub send_seg: usize,
    pub recv_seg: usize,
    /// Add the received chunk into the local one (else copy it over).
    pub reduce: bool,
}

/// The two ring connections of a rank and who is at their other ends.
pub struct Links {
    /// To the successor (`rank + 1`); we only write on it.
    pub next: TcpStream,
    pub next_rank: usize,
    /// From the predecessor (`rank - 1`); we only read from it.
    pub prev: TcpStream,
    pub prev_rank: usize,
}

/// Position in the step stream of one direction.
#[derive(Debug, Clone, Copy, Default)]
struct Cursor {
    step: usize,
    /// Bytes of the current step's segment that are finished: sent (send side), or received and,
    /// for a reduce step, added in (receive side).
    done: usize,
    /// Receive side of a reduce step: bytes of the next chunk waiting in the scratch buffer.
    pending: usize,
}

/// Byte ranges of the segments.
struct Plan<'a> {
    bounds: &'a [usize],
    steps: &'a [Step],
    elem: usize,
}

impl Plan<'_> {
    fn seg_bytes(&self, seg: usize) -> std::ops::Range<usize> {
        self.bounds[seg] * self.elem..self.bounds[seg + 1] * self.elem
    }

    fn send_len(&self, step: usize) -> usize {
        self.seg_bytes(self.steps[step].send_seg).len()
    }

    fn recv_len(&self, step: usize) -> usize {
        self.seg_bytes(self.steps[step].recv_seg).len()
    }
}

/// What one non-blocking attempt did.
enum Io {
    Moved,
    Blocked,
}

fn attempt<F: FnOnce() -> io::Result<usize>>(
    f: F,
    rank: usize,
    during: &'static str,
) -> Result<(Io, usize)> {
    match f() {
        Ok(0) => Err(CollectiveError::PeerLost { rank, during }),
        Ok(n) => Ok((Io::Moved, n)),
        Err(e)
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted =>
        {
            Ok((Io::Blocked, 0))
        }
        Err(e) => Err(link::io_error(e, rank, during)),
    }
}

/// Runs `steps` over `buf` split at `bounds` (segment `j` is `bounds[j]..bounds[j + 1]`),
/// preceded by the header exchange. On error the buffer holds a partial result.
///
/// Reduce steps are processed in chunks of `chunk_bytes` (received into a scratch buffer, then
/// added); everything else moves in as few system calls as the socket buffers allow: a write sends
/// every byte that is ready, a copy step reads straight into its final place and its bytes are
/// forwarded at once.
pub fn run<T: Element>(
    links: &mut Links,
    header: &Header,
    buf: &mut [T],
    bounds: &[usize],
    steps: &[Step],
    options: &GroupOptions,
    during: &'static str,
) -> Result<()> {
    let (chunk, timeout) = (options.chunk_bytes, options.timeout);
    let threaded = options.sender_thread_min_bytes;
    if threaded.is_some_and(|min| std::mem::size_of_val(buf) >= min) {
        crate::duplex::run(links, header, buf, bounds, steps, chunk, timeout, during)
    } else {
        run_single(
            links,
            header,
            buf,
            bounds,
            steps,
            chunk,
            options.spin,
            timeout,
            during,
        )
    }
}

/// The one-thread engine.
#[allow(clippy::too_many_arguments)]
fn run_single<T: Element>(
    links: &mut Links,
    header: &Header,
    buf: &mut [T],
    bounds: &[usize],
    steps: &[Step],
    chunk_bytes: usize,
    spin: Duration,
    timeout: Duration,
    during: &'static str,
) -> Result<()> {
    let elem = std::mem::size_of::<T>();
    let chunk_elems = (chunk_bytes / elem).max(1);
    let chunk = chunk_elems * elem;
    let plan = Plan {
        bounds,
        steps,
        elem,
    };
    debug_assert!(steps.windows(2).all(|w| w[1].send_seg == w[0].recv_seg));
    let any_reduce = steps.iter().any(|s| s.reduce);
    let mut scratch: Vec<T> = if any_reduce {
        vec![T::default(); chunk_elems.min(buf.len())]
    } else {
        Vec::new()
    };

    let out_header = header.encode();
    let mut in_header = [0u8; HEADER_BYTES];
    let (mut header_sent, mut header_recv) = (0usize, 0usize);
    let mut send = Cursor::default();
    let mut recv = Cursor::default();
    let (next_rank, prev_rank) = (links.next_rank, links.prev_rank);
    let mut idle_since: Option<std::time::Instant> = None;

    loop {
        while send.step < steps.len() && send.done == plan.send_len(send.step) {
            send = Cursor {
                step: send.step + 1,
                ..Cursor::default()
            };
        }
        while recv.step < steps.len() && recv.done == plan.recv_len(recv.step) {
            recv = Cursor {
                step: recv.step + 1,
                ..Cursor::default()
            };
        }
        let owe_successor = header_sent < HEADER_BYTES || send.step < steps.len();
        if !owe_successor && header_recv == HEADER_BYTES && recv.step == steps.len() {
            return Ok(());
        }
        let mut progressed = false;
        let mut send_blocked_on_socket = false;

        // Send: the header, then every byte whose input is final.
        if header_sent < HEADER_BYTES {
            match attempt(
                || links.next.write(&out_header[header_sent..]),
                next_rank,
                during,
            )? {
                (Io::Moved, n) => {
                    header_sent += n;
                    progressed = true;
                }
                (Io::Blocked, _) => send_blocked_on_socket = true,
            }
        } else if send.step < steps.len() {
            let len = plan.send_len(send.step);
            let ready = if send.step == 0 || recv.step > send.step - 1 {
                len
            } else {
                recv.done
            };
            if ready > send.done {
                let seg = plan.seg_bytes(steps[send.step].send_seg);
                let bytes = &as_bytes(buf)[seg.start + send.done..seg.start + ready];
                match attempt(|| links.next.write(bytes), next_rank, during)? {
                    (Io::Moved, n) => {
                        send.done += n;
                        progressed = true;
                    }
                    (Io::Blocked, _) => send_blocked_on_socket = true,
                }
            }
        }

        // Receive: the header, then the current step's segment.
        if header_recv < HEADER_BYTES {
            if let (Io::Moved, n) = attempt(
                || links.prev.read(&mut in_header[header_recv..]),
                prev_rank,
                during,
            )? {
                header_recv += n;
                progressed = true;
                if header_recv == HEADER_BYTES {
                    header.check(&in_header, prev_rank, true)?;
                }
            }
        } else if recv.step < steps.len() {
            let step = steps[recv.step];
            let seg = plan.seg_bytes(step.recv_seg);
            if step.reduce {
                let want = chunk.min(seg.len() - recv.done);
                let target = &mut as_bytes_mut(&mut scratch)[recv.pending..want];
                if let (Io::Moved, n) = attempt(|| links.prev.read(target), prev_rank, during)? {
                    recv.pending += n;
                    progressed = true;
                    if recv.pending == want {
                        let first = (seg.start + recv.done) / elem;
                        let count = want / elem;
                        T::add_into(&mut buf[first..first + count], &scratch[..count]);
                        recv.done += want;
                        recv.pending = 0;
                    }
                }
            } else {
                let target = &mut as_bytes_mut(buf)[seg.start + recv.done..seg.end];
                if let (Io::Moved, n) = attempt(|| links.prev.read(target), prev_rank, during)? {
                    recv.done += n;
                    progressed = true;
                }
            }
        }

        if progressed {
            idle_since = None;
            continue;
        }
        let idle = *idle_since.get_or_insert_with(std::time::Instant::now);
        if idle.elapsed() < spin {
            std::hint::spin_loop();
            continue;
        }
        // Nothing moved: wait for the sockets. While we still owe the successor data, watch its
        // connection for a close too; once our part is sent, its leaving is no longer our error
        // (a rank that finished first may already be tearing its group down).
        let mut out_events = libc::POLLIN;
        if send_blocked_on_socket {
            out_events |= libc::POLLOUT;
        }
        let mut fds = [
            link::pollfd(&links.prev, libc::POLLIN),
            link::pollfd(&links.next, out_events),
        ];
        let watched = if owe_successor { 2 } else { 1 };
        let ready = link::poll(&mut fds[..watched], timeout)
            .map_err(|e| link::io_error(e, prev_rank, during))?;
        if ready == 0 {
            return Err(CollectiveError::Timeout { timeout, during });
        }
        if owe_successor && fds[1].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            check_successor(&mut links.next, next_rank, during)?;
        }
    }
}

/// The successor never writes to us: readable means closed (or a protocol violation).
fn check_successor(next: &mut TcpStream, rank: usize, during: &'static str) -> Result<()> {
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

/// Segment boundaries: `world` near-equal parts of `n` elements (`bounds[j] = n * j / world`).
pub fn segment_bounds(n: usize, world: usize) -> Vec<usize> {
    (0..=world)
        .map(|j| ((n as u128 * j as u128) / world as u128) as usize)
        .collect()
}

/// Reduce-scatter then all-gather, for `rank` of `world` (`2 (world - 1)` steps). Segment `j`
/// is summed along the ring starting at rank `j`:
/// `((x_j + x_{j+1}) + x_{j+2}) + … + x_{j-1}` (ranks mod `world`), ending at rank `j - 1`,
/// which then hands the finished segment on unchanged. See [`crate::reference::ring_sum`].
pub fn all_reduce_steps(rank: usize, world: usize) -> Vec<Step> {
    let m = |x: isize| x.rem_euclid(world as isize) as usize;
    let r = rank as isize;
    let mut steps = Vec::with_capacity(2 * (world - 1));
    for s in 0..world as isize - 1 {
        steps.push(Step {
            send_seg: m(r - s),
            recv_seg: m(r - s - 1),
            reduce: true,
        });
    }
    for t in 0..world as isize - 1 {
        steps.push(Step {
            send_seg: m(r + 1 - t),
            recv_seg: m(r - t),
            reduce: false,
        });
    }
    steps
}

/// All-gather of one block per rank (`world - 1` copy steps).
pub fn all_gather_steps(rank: usize, world: usize) -> Vec<Step> {
    let m = |x: isize| x.rem_euclid(world as isize) as usize;
    let r = rank as isize;
    (0..world as isize - 1)
        .map(|t| Step {
            send_seg: m(r - t),
            recv_seg: m(r - t - 1),
            reduce: false,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_chain_and_bounds_cover() {
        for world in 2..6 {
            for rank in 0..world {
                let s = all_reduce_steps(rank, world);
                assert!(s.windows(2).all(|w| w[1].send_seg == w[0].recv_seg));
                // All-gather starts with the segment this rank finished reducing.
                assert_eq!(s[world - 1].send_seg, (rank + 1) % world);
                let g = all_gather_steps(rank, world);
                assert_eq!(g[0].send_seg, rank);
            }
        }
        assert_eq!(segment_bounds(10, 3), vec![0, 3, 6, 10]);
        assert_eq!(segment_bounds(1, 4), vec![0, 0, 0, 0, 1]);
    }
}
