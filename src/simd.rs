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
