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
//! bucket of a small table holding the number of midpoints below the bucket, and one comparison
//! with the next midpoint finishes it (no bucket holds two midpoints: a test checks every one).
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
    /// Per bucket (see [`bucket`]): how many midpoints lie below the bucket's smallest value.
    lower: Vec<u8>,
}

/// The bucket of a scaled value `y` in [−1, 1]: its sign, and its magnitude's exponent and top 7
/// mantissa bits (magnitudes below 2^-24 go to the sign's first bucket).
#[inline(always)]
fn bucket(y: f32) -> usize {
    let bits = y.to_bits();
    let magnitude = bits & 0x7fff_ffff;
    let binade = (magnitude >> 23).saturating_sub(E_MIN - 1);
    let fraction = if binade == 0 { 0 } else { (magnitude >> 16) & 127 };
    (bits >> 31) as usize * BUCKETS_PER_SIGN + (binade as usize) * 128 + fraction as usize
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
        let lower = (0..2 * BUCKETS_PER_SIGN).map(|b| mids.iter().filter(|&&m| m < bucket_range(b).0).count() as u8).collect();
        QuantMap { values, mids, lower }
    }

    /// The code of `y` (a value scaled into [−1, 1]; larger magnitudes and NaN are clamped): the
    /// index of its nearest value, the lower one on a tie.
    #[inline(always)]
    pub fn code(&self, y: f32) -> u8 {
        let y = y.max(-1.0).min(1.0);
        let lower = self.lower[bucket(y)];
        lower + u8::from(self.mids[lower as usize] < y)
    }

    /// Quantize one block: its absmax (NaN when it holds a NaN), and `codes[i]` for `vals[i]`.
    #[inline(always)]
    pub fn quantize(&self, vals: &[f32], codes: &mut [u8]) -> f32 {
        // The largest magnitude as bits: integers order finite magnitudes, infinity and NaN alike.
        let absmax = f32::from_bits(vals.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff)));
        let inv = 1.0 / absmax.max(1e-38);
        for (c, &x) in codes.iter_mut().zip(vals) {
            *c = self.code(x * inv);
        }
        absmax
    }

    /// Dequantize one block with scale `absmax` into `vals`.
    #[inline(always)]
    pub fn dequantize(&self, codes: &[u8], absmax: f32, vals: &mut [f32]) {
        for (v, &c) in vals.iter_mut().zip(codes) {
            *v = self.values[c as usize] * absmax;
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
        let y = y.max(-1.0).min(1.0);
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
            for y in probes {
                assert_eq!(map.code(y), brute_code(map, y), "{y:e}");
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
