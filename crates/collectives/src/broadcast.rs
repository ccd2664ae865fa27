//! Broadcast from any rank, streamed: the root reads its state from a [`Read`] in chunks and
//! every other rank hands each chunk to a [`Write`] as it arrives, so a multi-gigabyte model and
//! optimiser state is never held whole in one buffer.
//!
//! The data flows along the ring as a chain `root → root+1 → … → root-1`; each middle rank
//! forwards a chunk before passing it to its sink, and the large socket buffers overlap the
//! forwarding with the next read, so the chain is pipelined. The header carries the total length,
//! so receivers need not know it in advance.

use std::io::{Read, Write};

use crate::element::{DType, Element, as_bytes, as_bytes_mut};
use crate::error::{CollectiveError, Result};
use crate::frame::{HEADER_BYTES, Kind};
use crate::link;
use crate::ring::RingGroup;

impl RingGroup {
    /// Root side of a streamed broadcast: sends exactly `len` bytes read from `source`.
    /// Every other rank must call [`RingGroup::broadcast_recv`] with this rank as root.
    pub fn broadcast_send(&mut self, source: &mut dyn Read, len: u64) -> Result<()> {
        self.usable()?;
        if self.world == 1 {
            return Ok(());
        }
        let root = self.rank();
        let header = self.next_header(Kind::Broadcast, DType::Bytes, 0, root, len);
        let result = self.send_stream(&header.encode(), source, len);
        result.map_err(|e| self.fail(e))
    }

    /// Receiving side of a streamed broadcast from `root`: writes every byte to `sink` in order
    /// and returns the total length. On error the sink holds a prefix that must be discarded.
    pub fn broadcast_recv(&mut self, root: usize, sink: &mut dyn Write) -> Result<u64> {
        self.recv_stream(root, sink, None)
    }

    /// In-memory broadcast of a (small) slice: the root sends `buf`, the others overwrite theirs,
    /// which must have the same length.
    pub fn broadcast<T: Element>(&mut self, root: usize, buf: &mut [T]) -> Result<()> {
        if root >= self.world {
            return Err(CollectiveError::InvalidArgument(format!(
                "root {root} >= world {}",
                self.world
            )));
        }
        if root == self.rank {
            let bytes = as_bytes(buf);
            self.broadcast_send(&mut &*bytes, bytes.len() as u64)
        } else {
            let bytes = as_bytes_mut(buf);
            let len = bytes.len() as u64;
            let mut sink = SliceSink {
                buf: bytes,
                filled: 0,
            };
            self.recv_stream(root, &mut sink, Some(len)).map(|_| ())
        }
    }

    fn send_stream(
        &mut self,
        header: &[u8; HEADER_BYTES],
        source: &mut dyn Read,
        len: u64,
    ) -> Result<()> {
        let (timeout, chunk) = (self.options().timeout, self.options().chunk_bytes);
        let links = self.links.as_mut().ok_or(CollectiveError::Poisoned)?;
        let next_rank = links.next_rank;
        link::write_all(&mut links.next, header, timeout, next_rank, "broadcast")?;
        let mut buf = vec![0u8; chunk.min(len as usize).max(1)];
        let mut left = len;
        while left > 0 {
            let n = buf.len().min(left as usize);
            source
                .read_exact(&mut buf[..n])
                .map_err(CollectiveError::Stream)?;
            link::write_all(&mut links.next, &buf[..n], timeout, next_rank, "broadcast")?;
            left -= n as u64;
        }
        Ok(())
    }

    fn recv_stream(
        &mut self,
        root: usize,
        sink: &mut dyn Write,
        expected_len: Option<u64>,
    ) -> Result<u64> {
        self.usable()?;
        if root >= self.world || root == self.rank {
            return Err(CollectiveError::InvalidArgument(format!(
                "broadcast_recv: root {root} (this is rank {} of {})",
                self.rank, self.world
            )));
        }
        let header = self.next_header(
            Kind::Broadcast,
            DType::Bytes,
            0,
            root,
            expected_len.unwrap_or(0),
        );
        let result = self.forward_stream(&header, root, sink, expected_len);
        result.map_err(|e| self.fail(e))
    }

    fn forward_stream(
        &mut self,
        header: &crate::frame::Header,
        root: usize,
        sink: &mut dyn Write,
        expected_len: Option<u64>,
    ) -> Result<u64> {
        let (timeout, chunk) = (self.options().timeout, self.options().chunk_bytes);
        let links = self.links.as_mut().ok_or(CollectiveError::Poisoned)?;
        let (next_rank, prev_rank) = (links.next_rank, links.prev_rank);
        let forward = next_rank != root;
        let mut raw = [0u8; HEADER_BYTES];
        link::read_exact(&mut links.prev, &mut raw, timeout, prev_rank, "broadcast")?;
        let len = header.check(&raw, prev_rank, expected_len.is_some())?;
        if forward {
            link::write_all(&mut links.next, &raw, timeout, next_rank, "broadcast")?;
        }
        let mut buf = vec![0u8; chunk.min(len as usize).max(1)];
        let mut left = len;
        while left > 0 {
            let n = buf.len().min(left as usize);
            link::read_exact(
                &mut links.prev,
                &mut buf[..n],
                timeout,
                prev_rank,
                "broadcast",
            )?;
            if forward {
                link::write_all(&mut links.next, &buf[..n], timeout, next_rank, "broadcast")?;
            }
            sink.write_all(&buf[..n]).map_err(CollectiveError::Stream)?;
            left -= n as u64;
        }
        sink.flush().map_err(CollectiveError::Stream)?;
        Ok(len)
    }
}

/// A `Write` into a fixed slice (the receiving side of [`RingGroup::broadcast`]).
struct SliceSink<'a> {
    buf: &'a mut [u8],
    filled: usize,
}

impl Write for SliceSink<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let end = self.filled + data.len();
        if end > self.buf.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "broadcast longer than the buffer",
            ));
        }
        self.buf[self.filled..end].copy_from_slice(data);
        self.filled = end;
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
