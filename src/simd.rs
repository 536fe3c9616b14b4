//! The widest vector instruction set of this CPU, detected once, for the code that picks a
//! vectorised variant at run time (`cpu::kernel`, `quant`). `EMAFUSE_NO_SIMD` forces the portable
//! code (the results are the same bits: only the speed differs).

/// 2: AVX-512F, 1: AVX2, 0: neither (or `EMAFUSE_NO_SIMD` is set, or not x86-64).
pub fn level() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static LEVEL: OnceLock<u8> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            if std::env::var_os("EMAFUSE_NO_SIMD").is_some() {
                0
            } else if is_x86_feature_detected!("avx512f") {
                2
            } else if is_x86_feature_detected!("avx2") {
                1
            } else {
                0
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    0
}

/// Define an `unsafe fn` that runs `body` (an `#[inline(always)]` function with the same generic
/// and value parameters) compiled for the widest vector instruction set this CPU has: AVX-512F,
/// AVX2, or the portable baseline. The bodies form no fused multiply-add, so every variant gives
/// the same bits; only the speed differs.
///
/// ```text
/// widest! {
///     /// Docs (with the contract of `body`, which the function keeps).
///     pub unsafe fn update_span<R: Real, P: Elem<R>>(k: &UpdateKernel<R>, len: usize) = update_span_body;
/// }
/// ```
macro_rules! widest {
    (
        $(#[$meta:meta])*
        $vis:vis unsafe fn $name:ident<$($gen:ident: $bound:path),* $(,)?>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:ident;
    ) => {
        $(#[$meta])*
        $vis unsafe fn $name<$($gen: $bound),*>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2")]
                unsafe fn avx512<$($gen: $bound),*>($($arg: $ty),*) $(-> $ret)? {
                    // SAFETY: forwarded from the dispatching function's caller.
                    unsafe { $body::<$($gen),*>($($arg),*) }
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2<$($gen: $bound),*>($($arg: $ty),*) $(-> $ret)? {
                    // SAFETY: forwarded from the dispatching function's caller.
                    unsafe { $body::<$($gen),*>($($arg),*) }
                }
                match $crate::simd::level() {
                    // SAFETY: the CPU has the enabled features (checked at run time); the caller's
                    // guarantees are passed on unchanged.
                    2 => return unsafe { avx512::<$($gen),*>($($arg),*) },
                    // SAFETY: as above.
                    1 => return unsafe { avx2::<$($gen),*>($($arg),*) },
                    _ => {}
                }
            }
            // SAFETY: the caller's guarantees are passed on unchanged.
            unsafe { $body::<$($gen),*>($($arg),*) }
        }
    };
}
pub(crate) use widest;

/// As [`widest!`], but the function defined takes no arguments and returns the variant for this
/// CPU as a function pointer, for callers that call it many times (once per block of a span):
/// they pick the variant once.
///
/// ```text
/// widest_fn! {
///     /// Docs (with the contract of `body`, which the returned function keeps).
///     pub fn update_block<Ru: Rule, R: Real>(c: *const (), p: &mut [R]) = update_block_body;
/// }
/// ```
macro_rules! widest_fn {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident<$($gen:ident: $bound:path),* $(,)?>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:ident;
    ) => {
        $(#[$meta])*
        $vis fn $name<$($gen: $bound),*>() -> unsafe fn($($ty),*) $(-> $ret)? {
            #[allow(clippy::too_many_arguments)]
            unsafe fn portable<$($gen: $bound),*>($($arg: $ty),*) $(-> $ret)? {
                // SAFETY: forwarded from the caller of the returned function.
                unsafe { $body::<$($gen),*>($($arg),*) }
            }
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512<$($gen: $bound),*>($($arg: $ty),*) $(-> $ret)? {
                    // SAFETY: forwarded from the caller of the returned function.
                    unsafe { $body::<$($gen),*>($($arg),*) }
                }
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2<$($gen: $bound),*>($($arg: $ty),*) $(-> $ret)? {
                    // SAFETY: forwarded from the caller of the returned function.
                    unsafe { $body::<$($gen),*>($($arg),*) }
                }
                // (the variants run only where the CPU has their features: checked at run time)
                match $crate::simd::level() {
                    2 => return avx512::<$($gen),*>,
                    1 => return avx2::<$($gen),*>,
                    _ => {}
                }
            }
            portable::<$($gen),*>
        }
    };
}
pub(crate) use widest_fn;
