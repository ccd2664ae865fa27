//! The 32-byte header that opens every operation on every hop.
//!
//! Each rank sends it to its successor and checks the one from its predecessor before any data,
//! so ranks that entered different collectives (or the same one with different lengths, types or
//! roots) fail with [`CollectiveError::Mismatch`] instead of reducing garbage. It rides in front of
//! the data in the same stream, so it costs no extra round trip.

use crate::element::{DType, ReduceOp};
use crate::error::{CollectiveError, Result};

/// Size of an encoded header.
pub const HEADER_BYTES: usize = 32;
const MAGIC: u32 = 0x3143_4450; // "PDC1"

/// Which collective a header opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    AllReduce = 1,
    AllGather = 2,
    Broadcast = 3,
    Barrier = 4,
}

/// One operation as every rank must agree on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Operation counter of the group (equal on all ranks for the same call).
    pub seq: u64,
    pub kind: Kind,
    pub dtype: DType,
    /// Reduce operator (0 where it does not apply).
    pub op: u8,
    /// Root rank of a broadcast (0 otherwise).
    pub root: u32,
    /// Elements per rank (all-reduce, all-gather) or total bytes (broadcast).
    pub count: u64,
}

/// Wire code of a reduce operator.
pub fn op_code(op: ReduceOp) -> u8 {
    match op {
        ReduceOp::Sum => 1,
        ReduceOp::Average => 2,
    }
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..12].copy_from_slice(&self.seq.to_le_bytes());
        b[12] = self.kind as u8;
        b[13] = self.dtype as u8;
        b[14] = self.op;
        b[16..20].copy_from_slice(&self.root.to_le_bytes());
        b[20..28].copy_from_slice(&self.count.to_le_bytes());
        b
    }

    /// Checks a received header against this (the expected) one. `check_count` is false for a
    /// broadcast receiver, which learns the length from the header.
    pub fn check(
        &self,
        got: &[u8; HEADER_BYTES],
        from_rank: usize,
        check_count: bool,
    ) -> Result<u64> {
        let magic = u32::from_le_bytes([got[0], got[1], got[2], got[3]]);
        if magic != MAGIC {
            return Err(CollectiveError::Protocol {
                rank: from_rank,
                detail: format!("bad header magic {magic:#x}"),
            });
        }
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&got[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let seq = u64_at(4);
        let count = u64_at(20);
        let root = u32::from_le_bytes([got[16], got[17], got[18], got[19]]);
        let same = seq == self.seq
            && got[12] == self.kind as u8
            && got[13] == self.dtype as u8
            && got[14] == self.op
            && root == self.root
            && (!check_count || count == self.count);
        if !same {
            return Err(CollectiveError::Mismatch {
                rank: from_rank,
                expected: format!(
                    "op #{} kind {} dtype {} reduce {} root {} count {}",
                    self.seq, self.kind as u8, self.dtype as u8, self.op, self.root, self.count
                ),
                got: format!(
                    "op #{seq} kind {} dtype {} reduce {} root {root} count {count}",
                    got[12], got[13], got[14]
                ),
            });
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_mismatch() {
        let h = Header {
            seq: 7,
            kind: Kind::AllReduce,
            dtype: DType::F32,
            op: 1,
            root: 0,
            count: 10,
        };
        assert_eq!(h.check(&h.encode(), 1, true).unwrap(), 10);
        let other = Header { count: 11, ..h };
        assert!(matches!(
            h.check(&other.encode(), 1, true),
            Err(CollectiveError::Mismatch { .. })
        ));
        assert_eq!(h.check(&other.encode(), 1, false).unwrap(), 11);
        let mut bad = h.encode();
        bad[0] = 0;
        assert!(matches!(
            h.check(&bad, 1, true),
            Err(CollectiveError::Protocol { .. })
        ));
    }
}
