//! Many tensors in one call through flat buckets (PyTorch DDP's gradient buckets): tensors are
//! packed in order into a buffer of at most `bucket_bytes`, the buffer is all-reduced, and the
//! results are copied back. Fewer, larger operations amortise the per-operation header and the
//! pipeline fill of the ring. A tensor at least as large as a bucket is reduced in place, alone.
//!
//! The result is bit-identical on every rank for the same list of tensors and the same options;
//! it may differ in the last bit from reducing each tensor alone (segment boundaries, hence the
//! rank that starts each element's sum, move with the packing).

use crate::element::{Element, ReduceOp};
use crate::error::Result;
use crate::ring::RingGroup;

impl RingGroup {
    /// All-reduces every tensor in `tensors` in place, packed into flat buckets.
    pub fn all_reduce_many<T: Element>(
        &mut self,
        tensors: &mut [&mut [T]],
        op: ReduceOp,
    ) -> Result<()> {
        self.usable()?;
        let capacity = (self.options().bucket_bytes / std::mem::size_of::<T>()).max(1);
        let total: usize = tensors.iter().map(|t| t.len()).sum();
        let mut flat: Vec<T> = Vec::with_capacity(capacity.min(total));
        let mut members: Vec<usize> = Vec::new();
        for i in 0..tensors.len() {
            let len = tensors[i].len();
            if len >= capacity {
                self.all_reduce(tensors[i], op)?;
                continue;
            }
            if flat.len() + len > capacity {
                self.flush(&mut flat, &mut members, tensors, op)?;
            }
            flat.extend_from_slice(tensors[i]);
            members.push(i);
        }
        self.flush(&mut flat, &mut members, tensors, op)
    }

    fn flush<T: Element>(
        &mut self,
        flat: &mut Vec<T>,
        members: &mut Vec<usize>,
        tensors: &mut [&mut [T]],
        op: ReduceOp,
    ) -> Result<()> {
        if members.is_empty() {
            return Ok(());
        }
        self.all_reduce(flat, op)?;
        let mut at = 0;
        for &i in members.iter() {
            let len = tensors[i].len();
            tensors[i].copy_from_slice(&flat[at..at + len]);
            at += len;
        }
        flat.clear();
        members.clear();
        Ok(())
    }
}
