//! Element types that can be reduced: `f32` and `bf16`, and the reduction operators.
//!
//! The wire format is the in-memory little-endian representation, so a chunk goes from the
//! caller's slice to the socket with no conversion. `bf16` sums are computed in `f32` and rounded
//! back to `bf16` at every hop (as NCCL does for bf16 ring steps); the fixed hop order makes the
//! rounding itself deterministic.

use half::bf16;

#[cfg(target_endian = "big")]
compile_error!("protodino-collectives sends native bytes on the wire and assumes little-endian");

/// Sum, or sum divided by the world size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum then division by the world size, done once on the final sum so every rank divides the
    /// same bits.
    Average,
}

/// Wire tag of an element type (part of every operation header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DType {
    /// Opaque bytes (broadcast streams).
    Bytes = 0,
    F32 = 1,
    Bf16 = 2,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
}

/// A plain-old-data element that the ring can move and add. Sealed: only `f32` and `bf16`, whose
/// every bit pattern is a valid value (this is what makes the byte views below sound).
pub trait Element: Copy + Send + Sync + Default + 'static + sealed::Sealed {
    /// Wire tag.
    const DTYPE: DType;
    /// `acc[i] = incoming[i] + acc[i]` (the ring's one accumulation step).
    fn add_into(acc: &mut [Self], incoming: &[Self]);
    /// `buf[i] = buf[i] / divisor` (for [`ReduceOp::Average`]).
    fn divide(buf: &mut [Self], divisor: usize);
    /// A value from `f32` (tests, barrier).
    fn from_f32(v: f32) -> Self;
    /// The value as `f32`.
    fn to_f32(self) -> f32;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn add_into(acc: &mut [f32], incoming: &[f32]) {
        for (a, b) in acc.iter_mut().zip(incoming) {
            // IEEE addition is commutative, so `a + b` and `b + a` are the same bits; only the
            // association order (fixed by the ring schedule) matters.
            *a += *b;
        }
    }
    fn divide(buf: &mut [f32], divisor: usize) {
        let d = divisor as f32;
        for a in buf.iter_mut() {
            *a /= d;
        }
    }
    fn from_f32(v: f32) -> f32 {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::Bf16;
    fn add_into(acc: &mut [bf16], incoming: &[bf16]) {
        for (a, b) in acc.iter_mut().zip(incoming) {
            *a = bf16::from_f32(b.to_f32() + a.to_f32());
        }
    }
    fn divide(buf: &mut [bf16], divisor: usize) {
        let d = divisor as f32;
        for a in buf.iter_mut() {
            *a = bf16::from_f32(a.to_f32() / d);
        }
    }
    fn from_f32(v: f32) -> bf16 {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// The bytes of a slice of elements.
pub fn as_bytes<T: Element>(s: &[T]) -> &[u8] {
    // SAFETY: `Element` is sealed to f32 and bf16 (repr(transparent) u16): no padding, and any
    // byte pattern read back is a valid value; u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// The bytes of a mutable slice of elements (see [`as_bytes`] for why this is sound).
pub fn as_bytes_mut<T: Element>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; every byte pattern written through the view is a valid T.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_views_round_trip() {
        let mut v = [1.5f32, -2.0];
        assert_eq!(as_bytes(&v), &[0, 0, 192, 63, 0, 0, 0, 192]);
        as_bytes_mut(&mut v)[3] = 64;
        assert_eq!(v[0], 6.0); // 0x40C0_0000
    }

    #[test]
    fn bf16_add_rounds_once_per_hop() {
        let mut acc = [bf16::from_f32(1.0)];
        // 1 + 2^-9 is not representable in bf16 (8 significant bits): rounds to even, i.e. 1.0.
        bf16::add_into(&mut acc, &[bf16::from_f32(1.0 / 512.0)]);
        assert_eq!(acc[0].to_f32(), 1.0);
        bf16::divide(&mut acc, 4);
        assert_eq!(acc[0].to_f32(), 0.25);
    }
}
