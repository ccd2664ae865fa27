//! Socket plumbing: listeners and connections with large buffers and `TCP_NODELAY`, and reads and
//! writes bounded by a progress deadline (`poll(2)` on non-blocking sockets, so no call can block
//! past the deadline).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::error::{CollectiveError, Result};

/// Binds a listener with the socket buffers set *before* `listen`, so accepted connections
/// negotiate a window scale that matches them.
pub fn bind_listener(addr: &str, socket_buffer_bytes: usize) -> io::Result<TcpListener> {
    let addr = resolve(addr)?;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    set_buffers(&socket, socket_buffer_bytes)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

/// Requests `bytes` for both socket buffers; 0 leaves them to the kernel's autotuning.
fn set_buffers(socket: &Socket, bytes: usize) -> io::Result<()> {
    if bytes > 0 {
        socket.set_recv_buffer_size(bytes)?;
        socket.set_send_buffer_size(bytes)?;
    }
    Ok(())
}

/// First address a `host:port` string resolves to.
pub fn resolve(addr: &str) -> io::Result<SocketAddr> {
    addr.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{addr} resolves to nothing"),
        )
    })
}

/// One connection attempt with buffers set before `connect` and a bounded wait.
pub fn connect_once(
    addr: SocketAddr,
    socket_buffer_bytes: usize,
    wait: Duration,
) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    set_buffers(&socket, socket_buffer_bytes)?;
    socket.connect_timeout(&addr.into(), wait.max(Duration::from_millis(1)))?;
    Ok(socket.into())
}

/// Settings of an established ring connection: no Nagle delay, non-blocking for the poll loops.
pub fn tune(stream: &TcpStream, socket_buffer_bytes: usize) -> io::Result<()> {
    stream.set_nodelay(true)?;
    set_buffers(&socket2::SockRef::from(stream), socket_buffer_bytes)?;
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    stream.set_nonblocking(true)
}

/// `poll(2)` over raw descriptors, retrying on `EINTR`; returns the number of ready descriptors.
pub fn poll(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // Round up so a sub-millisecond remainder does not spin.
        let ms = if ms == 0 && !left.is_zero() { 1 } else { ms };
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of the given length.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// A pollfd for `stream` asking for `events`.
pub fn pollfd(stream: &TcpStream, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd: stream.as_raw_fd(),
        events,
        revents: 0,
    }
}

/// Maps a socket error to the crate's error: resets and broken pipes mean the peer is gone.
pub fn io_error(err: io::Error, rank: usize, during: &'static str) -> CollectiveError {
    match err.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof
        | io::ErrorKind::NotConnected => CollectiveError::PeerLost { rank, during },
        _ => CollectiveError::Io { rank, source: err },
    }
}

/// Fills `buf` from a non-blocking stream; fails if no byte arrives for `timeout`.
pub fn read_exact(
    stream: &mut TcpStream,
    buf: &mut [u8],
    timeout: Duration,
    rank: usize,
    during: &'static str,
) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match stream.read(&mut buf[done..]) {
            Ok(0) => return Err(CollectiveError::PeerLost { rank, during }),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [pollfd(stream, libc::POLLIN)];
                if poll(&mut fds, timeout).map_err(|e| io_error(e, rank, during))? == 0 {
                    return Err(CollectiveError::Timeout { timeout, during });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(e, rank, during)),
        }
    }
    Ok(())
}

/// Writes all of `buf` to a non-blocking stream; fails if no byte leaves for `timeout`.
pub fn write_all(
    stream: &mut TcpStream,
    buf: &[u8],
    timeout: Duration,
    rank: usize,
    during: &'static str,
) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match stream.write(&buf[done..]) {
            Ok(0) => return Err(CollectiveError::PeerLost { rank, during }),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [pollfd(stream, libc::POLLOUT)];
                if poll(&mut fds, timeout).map_err(|e| io_error(e, rank, during))? == 0 {
                    return Err(CollectiveError::Timeout { timeout, during });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(e, rank, during)),
        }
    }
    Ok(())
}
