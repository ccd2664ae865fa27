//! Run-time CPU dispatch for the hot pixel loops.
//!
//! The crate is compiled for the baseline x86-64 target (SSE2), where the integer and float
//! loops of the resampler, the blur and the colour ops vectorise poorly (SSE2 has no 32-bit
//! integer multiply). [`avx2_dispatch!`] compiles a function body twice — once as is, once
//! with AVX2 enabled — and picks the AVX2 copy when the CPU has it. The arithmetic is the same
//! in both copies (Rust never contracts `a * b + c` into an FMA), so results are bit-identical
//! on every machine; only the speed differs.

/// Whether the running CPU supports AVX2 (cached by the standard library).
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Define `fn name(args) -> ret { body }` with an AVX2-compiled copy chosen at run time.
macro_rules! avx2_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if $crate::simd::has_avx2() {
                    // SAFETY: the CPU supports AVX2, checked at run time just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use avx2_dispatch;
