//! Blockwise 8-bit state: a state tensor stored as one byte per element plus one float32 scale
//! per block of [`BLOCK`] elements, as bitsandbytes' 8-bit optimizers store their moments.
//!
//! Element `i` holds the code `c` whose value is `map[c] · absmax`, where `absmax` is the largest
//! magnitude in its block (`i / BLOCK`) and `map` one of two fixed 256-entry tables of values in
//! [−1, 1] (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022): the
//! *dynamic* map, a sign, a decimal exponent in unary and a linear fraction (so values from
//! 1e-7 to 1 keep about 2 significant digits), for state of either sign; and its unsigned variant,
//! twice as fine, for state that is never negative (second moments; a rule lists those slots in
//! its `RuleInfo::nonnegative_slots`). Both include 0, so a non-negative value never rounds to a
//! negative one.
//!
//! A step dequantizes a block, updates it in f32, takes the block's new absmax and rounds every
//! element of `value / absmax` to the nearest map entry (ties toward the lower one), all inside the
//! one pass. The nearest entry is found in constant time: the scaled value's top 16 bits select a
//! bucket of a small table holding the number of midpoints below the bucket and the low 16 bits of
//! the midpoint inside it, if any (no bucket holds two: a test checks every one); comparing the
//! value's low 16 bits with those finishes it, one table lookup per element.
//! The CUDA twin is `kernels/common.cuh`'s `EfQuantMap`.

use std::sync::OnceLock;

/// Elements per quantization block (one scale each), as bitsandbytes' blockwise optimizers.
pub const BLOCK: usize = 256;

/// The name of the scales of state slot `slot` is `slot` followed by this (`exp_avg_absmax`).
pub const ABSMAX_SUFFIX: &str = "_absmax";

/// Number of scales of a tensor of `numel` elements.
pub fn blocks(numel: usize) -> usize {
    numel.div_ceil(BLOCK)
}

/// The f32 exponent field of the smallest magnitude with a bucket of its own: smaller ones
/// (below 2^-24) share the buckets of zero, no midpoint lying below 2^-22.
const E_MIN: u32 = 127 - 24;
/// Buckets per sign: the zero bucket and 24 binades up to 1.0 (exponent fields `E_MIN..=127`),
/// each cut into 128 by the 7 mantissa bits below the exponent.
const BUCKETS_PER_SIGN: usize = (128 - E_MIN as usize + 1) * 128;

/// One quantization map with its lookup tables.
pub struct QuantMap {
    /// The 256 values in [−1, 1], ascending.
    pub values: [f32; 256],
    /// `mids[c]`: the midpoint between `values[c]` and `values[c + 1]`, computed in f32; `mids[255]`
    /// is +∞.
    pub mids: [f32; 256],
    /// Per bucket (see [`bucket`]): `lower << 16 | split`, where `lower` is how many midpoints lie
    /// below the bucket's smallest value and a value of the bucket lies above the midpoint inside
    /// it exactly when its [`low_key`] exceeds `split` (0xffff: no midpoint inside). 32-bit words:
    /// the vectorised lookups gather them.
    table: Box<[u32; 2 * BUCKETS_PER_SIGN]>,
}

/// The bucket of a scaled value `y` in [−1, 1]: its sign, and its magnitude's exponent and top 7
/// mantissa bits (magnitudes below 2^-24 go to the sign's first bucket).
#[inline(always)]
fn bucket(y: f32) -> usize {
    let bits = y.to_bits();
    let magnitude = bits & 0x7fff_ffff;
    let binade = (magnitude >> 23).max(E_MIN - 1) - (E_MIN - 1);
    let fraction = if binade == 0 { 0 } else { (magnitude >> 16) & 127 };
    // (32-bit arithmetic, so that the lookups gather with 32-bit indices)
    ((bits >> 31) * BUCKETS_PER_SIGN as u32 + binade * 128 + fraction) as usize
}

/// The low 16 bits of `y`'s magnitude, ordered as `y` within its bucket (complemented for a
/// negative `y`, whose larger magnitudes are smaller values).
#[inline(always)]
fn low_key(y: f32) -> u32 {
    let bits = y.to_bits();
    (bits & 0xffff) ^ ((bits >> 31) * 0xffff)
}

/// The smallest and largest value of bucket `b` (the inverse of [`bucket`]'s cut).
fn bucket_range(b: usize) -> (f32, f32) {
    let (negative, rest) = (b >= BUCKETS_PER_SIGN, b % BUCKETS_PER_SIGN);
    let (binade, fraction) = ((rest / 128) as u32, (rest % 128) as u32);
    let (low, high) = if binade == 0 {
        (0, (E_MIN << 23) - 1)
    } else {
        let low = ((binade + E_MIN - 1) << 23) | (fraction << 16);
        (low, low | 0xffff)
    };
    let (low, high) = (f32::from_bits(low), f32::from_bits(high));
    if negative {
        (-high, -low)
    } else {
        (low, high)
    }
}

impl QuantMap {
    fn new(values: [f32; 256]) -> QuantMap {
        let mut mids = [f32::INFINITY; 256];
        for c in 0..255 {
            mids[c] = (values[c] + values[c + 1]) / 2.0;
        }
        let mut table = Box::new([0u32; 2 * BUCKETS_PER_SIGN]);
        for (b, entry) in table.iter_mut().enumerate() {
            let (low, high) = bucket_range(b);
            let lower = mids.iter().filter(|&&m| m < low).count() as u32;
            // (the zero buckets span several binades and hold no midpoint)
            let inside = mids[lower as usize];
            let split = if inside <= high && b % BUCKETS_PER_SIGN >= 128 { low_key(inside) } else { 0xffff };
            *entry = lower << 16 | split;
        }
        QuantMap { values, mids, table }
    }

    /// The code of `y` (a value scaled into [−1, 1]; larger magnitudes and NaN are clamped): the
    /// index of its nearest value, the lower one on a tie.
    #[inline(always)]
    #[allow(clippy::manual_clamp)] // (clamp keeps NaN; this sends it to −1)
    pub fn code(&self, y: f32) -> u8 {
        let y = y.max(-1.0).min(1.0);
        // SAFETY: the bucket of a value in [−1, 1] (exponent field <= 127) is below
        // 2 · BUCKETS_PER_SIGN.
        let entry = unsafe { *self.table.get_unchecked(bucket(y)) };
        ((entry >> 16) + u32::from(low_key(y) > (entry & 0xffff))) as u8
    }

    /// Quantize one block: its absmax (NaN when it holds a NaN), and `codes[i]` for `vals[i]`.
    /// With AVX-512 the lookups run 16 at a time (the same bits as [`QuantMap::quantize_portable`]).
    #[inline(always)]
    pub fn quantize(&self, vals: &[f32], codes: &mut [u8]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::level() == 2 {
            // SAFETY: the CPU has AVX-512F (checked at run time); the slices bound every access.
            return unsafe { avx512::quantize(self, vals, codes) };
        }
        self.quantize_portable(vals, codes)
    }

    /// Dequantize one block with scale `absmax` into `vals` (16 at a time with AVX-512).
    #[inline(always)]
    pub fn dequantize(&self, codes: &[u8], absmax: f32, vals: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::level() == 2 {
            // SAFETY: as in `quantize`.
            return unsafe { avx512::dequantize(self, codes, absmax, vals) };
        }
        self.dequantize_portable(codes, absmax, vals)
    }

    /// [`QuantMap::quantize`] in portable code.
    #[inline(always)]
    pub fn quantize_portable(&self, vals: &[f32], codes: &mut [u8]) -> f32 {
        // The largest magnitude as bits: integers order finite magnitudes, infinity and NaN alike.
        let absmax = f32::from_bits(vals.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff)));
        let inv = 1.0 / absmax.max(1e-38);
        for (c, &x) in codes.iter_mut().zip(vals) {
            *c = self.code(x * inv);
        }
        absmax
    }

    /// [`QuantMap::dequantize`] in portable code.
    #[inline(always)]
    pub fn dequantize_portable(&self, codes: &[u8], absmax: f32, vals: &mut [f32]) {
        for (v, &c) in vals.iter_mut().zip(codes) {
            *v = self.values[c as usize] * absmax;
        }
    }
}

/// The block codecs with AVX-512F intrinsics: the compiler does not vectorise the table lookups
/// inside the update kernels, and gathers 16 lookups at a time here. Each step is the portable
/// code's operation on 16 lanes (the same bits).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{QuantMap, BUCKETS_PER_SIGN, E_MIN};
    use std::arch::x86_64::*;

    /// The lanes of a block of `n` elements from `i`: 16, or the tail.
    #[inline(always)]
    fn lanes(n: usize, i: usize) -> __mmask16 {
        if n - i >= 16 {
            0xffff
        } else {
            ((1u32 << (n - i)) - 1) as __mmask16
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn quantize(map: &QuantMap, vals: &[f32], codes: &mut [u8]) -> f32 {
        let n = vals.len().min(codes.len());
        let magnitude = _mm512_set1_epi32(0x7fff_ffff);
        let mut largest = _mm512_setzero_si512();
        for i in (0..n).step_by(16) {
            // SAFETY: the masked lanes lie inside `vals`.
            let v = unsafe { _mm512_maskz_loadu_ps(lanes(n, i), vals.as_ptr().add(i)) };
            largest = _mm512_max_epu32(largest, _mm512_and_si512(_mm512_castps_si512(v), magnitude));
        }
        let absmax = f32::from_bits(_mm512_reduce_max_epu32(largest));
        let inv = _mm512_set1_ps(1.0 / absmax.max(1e-38));
        let (low, high) = (_mm512_set1_ps(-1.0), _mm512_set1_ps(1.0));
        let below = _mm512_set1_epi32((E_MIN - 1) as i32);
        let per_sign = _mm512_set1_epi32(BUCKETS_PER_SIGN as i32);
        for i in (0..n).step_by(16) {
            let k = lanes(n, i);
            // SAFETY: the masked lanes lie inside `vals` and `codes`; every bucket index is inside
            // `map.table` (see `QuantMap::code`).
            unsafe {
                let v = _mm512_maskz_loadu_ps(k, vals.as_ptr().add(i));
                // (max with −1 first: a NaN lane becomes −1, as f32::max)
                let y = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, inv), low), high);
                let bits = _mm512_castps_si512(y);
                let mag = _mm512_and_si512(bits, magnitude);
                let binade = _mm512_sub_epi32(_mm512_max_epu32(_mm512_srli_epi32::<23>(mag), below), below);
                let fraction = _mm512_maskz_and_epi32(_mm512_test_epi32_mask(binade, binade), _mm512_srli_epi32::<16>(mag), _mm512_set1_epi32(127));
                let sign = _mm512_mullo_epi32(_mm512_srli_epi32::<31>(bits), per_sign);
                let bucket = _mm512_add_epi32(_mm512_add_epi32(sign, _mm512_slli_epi32::<7>(binade)), fraction);
                let entry = _mm512_mask_i32gather_epi32::<4>(_mm512_setzero_si512(), k, bucket, map.table.as_ptr() as *const i32);
                let ones = _mm512_set1_epi32(0xffff);
                let key = _mm512_xor_si512(_mm512_and_si512(bits, ones), _mm512_mullo_epi32(_mm512_srli_epi32::<31>(bits), ones));
                let up = _mm512_cmpgt_epu32_mask(key, _mm512_and_si512(entry, ones));
                let lower = _mm512_srli_epi32::<16>(entry);
                let code = _mm512_mask_add_epi32(lower, up, lower, _mm512_set1_epi32(1));
                _mm512_mask_cvtepi32_storeu_epi8(codes.as_mut_ptr().add(i) as *mut i8, k, code);
            }
        }
        absmax
    }

    /// Decoding looks the 256 values up in registers (two-source permutes of 32 entries, then
    /// blends on the code's top three bits), not with gathers, which are slow on some CPUs.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dequantize(map: &QuantMap, codes: &[u8], absmax: f32, vals: &mut [f32]) {
        let n = vals.len().min(codes.len());
        // SAFETY: `map.values` holds 256 floats, 16 per register.
        let table: [__m512; 16] = std::array::from_fn(|r| unsafe { _mm512_loadu_ps(map.values.as_ptr().add(16 * r)) });
        let scale = _mm512_set1_ps(absmax);
        for i in (0..n).step_by(16) {
            let k = lanes(n, i);
            let mut bytes = [0u8; 16];
            bytes[..(n - i).min(16)].copy_from_slice(&codes[i..(i + 16).min(n)]);
            // SAFETY: `bytes` holds 16 codes; the masked lanes lie inside `vals`.
            unsafe {
                let c = _mm512_cvtepu8_epi32(_mm_loadu_si128(bytes.as_ptr() as *const __m128i));
                let quarter: [__m512; 8] = std::array::from_fn(|q| _mm512_permutex2var_ps(table[2 * q], c, table[2 * q + 1]));
                let bit = |b: i32| _mm512_test_epi32_mask(c, _mm512_set1_epi32(b));
                let (b5, b6, b7) = (bit(32), bit(64), bit(128));
                let half: [__m512; 4] = std::array::from_fn(|h| _mm512_mask_blend_ps(b5, quarter[2 * h], quarter[2 * h + 1]));
                let lower = _mm512_mask_blend_ps(b6, half[0], half[1]);
                let upper = _mm512_mask_blend_ps(b6, half[2], half[3]);
                let v = _mm512_mask_blend_ps(b7, lower, upper);
                _mm512_mask_storeu_ps(vals.as_mut_ptr().add(i), k, _mm512_mul_ps(v, scale));
            }
        }
    }
}

/// `steps` evenly spaced f32 values from `start` to `end`, computed as `torch.linspace` does for
/// float32 on the CPU (an f32 step; the first half up from `start`, the second half down from
/// `end`, each point one fused multiply-add).
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    (0..steps).map(|i| if i < steps / 2 { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - 1 - i) as f32, end) }).collect()
}

/// The dynamic map (signed) or its unsigned variant: for each decimal exponent `k` of
/// 10^-6 .. 10^0, the midpoints of `2^k + 1` (unsigned: `2^(k+1) + 1`) points evenly spaced over
/// [0.1, 1], times 10^k · 10^-6 (and their negatives when signed); then 0 and 1. All in f32, each
/// operation rounded as bitsandbytes' `create_dynamic_map` rounds it (torch float32 tensor ops).
fn dynamic_values(signed: bool) -> [f32; 256] {
    const DECADES: [f32; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for (k, scale) in DECADES.iter().enumerate() {
        let points = linspace(0.1, 1.0, if signed { (1 << k) + 1 } else { (1 << (k + 1)) + 1 });
        for w in points.windows(2) {
            let value = scale * ((w[0] + w[1]) / 2.0);
            data.push(value);
            if signed {
                data.push(-value);
            }
        }
    }
    data.extend([0.0, 1.0]);
    data.sort_by(f32::total_cmp);
    data.try_into().expect("the dynamic maps have 256 values")
}

/// The signed dynamic map (bitsandbytes' `create_dynamic_map(signed=True)`).
pub fn signed() -> &'static QuantMap {
    static MAP: OnceLock<QuantMap> = OnceLock::new();
    MAP.get_or_init(|| QuantMap::new(dynamic_values(true)))
}

/// The unsigned dynamic map (`create_dynamic_map(signed=False)`), for non-negative state.
pub fn unsigned() -> &'static QuantMap {
    static MAP: OnceLock<QuantMap> = OnceLock::new();
    MAP.get_or_init(|| QuantMap::new(dynamic_values(false)))
}

/// The map of state that is never negative (`nonnegative`) or may be.
pub fn map_for(nonnegative: bool) -> &'static QuantMap {
    if nonnegative {
        unsigned()
    } else {
        signed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nearest value's index by scanning every midpoint (ties to the lower value).
    fn brute_code(map: &QuantMap, y: f32) -> u8 {
        let y = if y.is_nan() { -1.0 } else { y.clamp(-1.0, 1.0) };
        map.mids[..255].iter().filter(|&&m| m < y).count() as u8
    }

    #[test]
    fn maps_are_sorted_and_hold_zero_and_one() {
        for (map, lowest_positive_code) in [(signed(), 128), (unsigned(), 1)] {
            assert!(map.values.windows(2).all(|w| w[0] < w[1]));
            assert_eq!(map.values[255], 1.0);
            assert_eq!(map.values[lowest_positive_code - 1], 0.0);
            assert!(map.values[0] >= -1.0);
        }
        assert_eq!(unsigned().values[0], 0.0);
        assert!((signed().values[0] + 0.99297).abs() < 1e-4, "{}", signed().values[0]);
    }

    /// Every bucket holds at most one midpoint, so that the table's answer is exact for every
    /// value in it.
    #[test]
    fn no_bucket_holds_two_midpoints() {
        for map in [signed(), unsigned()] {
            // (the zero bucket of each sign is the first of its 128 slots; the other 127 are unused)
            for b in (0..2 * BUCKETS_PER_SIGN).filter(|b| b % BUCKETS_PER_SIGN == 0 || b % BUCKETS_PER_SIGN >= 128) {
                let (low, high) = bucket_range(b);
                assert_eq!((bucket(low), bucket(high)), (b, b), "bucket {b} [{low:e}, {high:e}]");
                let inside = map.mids.iter().filter(|&&m| m >= low && m < high).count();
                assert!(inside <= 1, "bucket {b} [{low:e}, {high:e}] holds {inside} midpoints");
            }
        }
    }

    #[test]
    fn codes_equal_the_nearest_value() {
        let mut x = 0x2545_f491u32;
        for map in [signed(), unsigned()] {
            let mut probes: Vec<f32> =
                map.mids.iter().take(255).flat_map(|&m| [m, f32::from_bits(m.to_bits() + 1), f32::from_bits(m.to_bits() - 1), -m]).collect();
            probes.extend(map.values.iter().flat_map(|&v| [v, -v]));
            probes.extend([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 2.0, -7.0, f32::INFINITY, f32::NEG_INFINITY]);
            for _ in 0..200_000 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                // magnitudes from about 2^-40 to 1, both signs
                let e = 87 + (x >> 8) % 41;
                probes.push(f32::from_bits(((x & 1) << 31) | (e.min(127) << 23) | (x >> 9 & 0x7f_ffff)));
            }
            for y in &probes {
                assert_eq!(map.code(*y), brute_code(map, *y), "{y:e}");
            }
            // The vectorised codec gives the portable one's bits (blocks of every length up to 256).
            for (b, block) in probes.chunks(173).enumerate() {
                let block = &block[..block.len() - b % 17];
                let (mut fast, mut slow) = (vec![0u8; block.len()], vec![0u8; block.len()]);
                let (a, b) = (map.quantize(block, &mut fast), map.quantize_portable(block, &mut slow));
                assert!(a.to_bits() == b.to_bits() && fast == slow);
                let (mut fast_v, mut slow_v) = (vec![0f32; block.len()], vec![0f32; block.len()]);
                map.dequantize(&fast, 0.37, &mut fast_v);
                map.dequantize_portable(&slow, 0.37, &mut slow_v);
                assert_eq!(fast_v, slow_v);
            }
        }
    }

    #[test]
    fn blocks_round_trip_within_half_a_step_of_the_map() {
        let mut x = 0x1234_5678u32;
        let mut vals = [0f32; BLOCK];
        for v in vals.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *v = (x as f32 / u32::MAX as f32 - 0.5) * 3e-3;
        }
        let mut codes = [0u8; BLOCK];
        let absmax = signed().quantize(&vals, &mut codes);
        assert_eq!(absmax, vals.iter().fold(0f32, |m, v| m.max(v.abs())));
        let mut back = [0f32; BLOCK];
        signed().dequantize(&codes, absmax, &mut back);
        for (v, b) in vals.iter().zip(back) {
            // the gap between neighbouring values of the map is at most 0.9/64 of the absmax
            assert!((v - b).abs() <= absmax * 0.9 / 128.0 * 1.0001, "{v} {b}");
        }
        // A block of zeros stays zeros, and a NaN spoils its block's scale.
        assert_eq!(signed().quantize(&[0.0; 4], &mut codes[..4]), 0.0);
        assert!(codes[..4].iter().all(|&c| signed().values[c as usize] == 0.0));
        assert!(signed().quantize(&[1.0, f32::NAN], &mut codes[..2]).is_nan());
    }
}
