//! The per-launch tensor table read by the multi-tensor kernel.

use crate::batch::Batch;
use crate::rules::{MAX_SCALARS, MAX_SLOTS};

/// Elements per block (`EF_CHUNK` in multi_tensor.cuh).
pub const CHUNK: i64 = 65536;

/// One tensor of a launch; the layout of `EfTensor` in multi_tensor.cuh.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorEntry {
    pub p: u64,
    pub g: u64,
    pub s: [u64; MAX_SLOTS],
    pub scalars: [u64; MAX_SCALARS],
    /// The parameter's weight corrections (int8), or 0.
    pub corr: u64,
    /// With 8-bit state: each slot's block scales (float32, see `crate::quant`), else 0.
    pub absmax: [u64; MAX_SLOTS],
    /// The position of its first element in the whole tensor (stochastic rounding's index).
    pub offset: i64,
    pub numel: i64,
    pub first_block: i64,
}

/// Blocks a tensor takes (an empty tensor still takes one, to advance its scalar state).
pub fn blocks_of(numel: i64) -> i64 {
    if numel <= 0 {
        1
    } else {
        (numel + CHUNK - 1) / CHUNK
    }
}

/// The table of a batch, and the number of blocks of its launch.
pub fn build(batch: &Batch) -> (Vec<TensorEntry>, i64) {
    let mut next = 0i64;
    let table = (0..batch.params.len())
        .map(|i| {
            let mut s = [0u64; MAX_SLOTS];
            for (k, x) in s.iter_mut().enumerate().take(batch.slots()) {
                *x = batch.states[i * batch.slots() + k].ptr() as u64;
            }
            let mut absmax = [0u64; MAX_SLOTS];
            if !batch.scales.is_empty() {
                for (k, x) in absmax.iter_mut().enumerate().take(batch.slots()) {
                    *x = batch.scales[i * batch.slots() + k].ptr() as u64;
                }
            }
            let mut scalars = [0u64; MAX_SCALARS];
            for (k, x) in scalars.iter_mut().enumerate().take(batch.n_scalars()) {
                *x = batch.scalars[i * batch.n_scalars() + k].ptr() as u64;
            }
            let numel = batch.params[i].numel() as i64;
            let e = TensorEntry {
                p: batch.params[i].ptr() as u64,
                g: batch.grads.get(i).map_or(0, |g| g.ptr() as u64),
                s,
                scalars,
                corr: batch.corrections.get(i).map_or(0, |c| c.ptr() as u64),
                absmax,
                offset: batch.offsets[i] as i64,
                numel,
                first_block: next,
            };
            next += blocks_of(numel);
            e
        })
        .collect();
    (table, next)
}

impl TensorEntry {
    /// The entry's 8-byte fields in declaration order (the layout of `EfTensor`).
    fn words(&self) -> impl Iterator<Item = u64> + '_ {
        let counts = [self.offset as u64, self.numel as u64, self.first_block as u64];
        [self.p, self.g].into_iter().chain(self.s).chain(self.scalars).chain([self.corr]).chain(self.absmax).chain(counts)
    }
}

/// The table as bytes, for upload.
pub fn to_bytes(table: &[TensorEntry]) -> Vec<u8> {
    table.iter().flat_map(TensorEntry::words).flat_map(u64::to_ne_bytes).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_layout_matches_the_kernel() {
        // void* p, g; void* s[4]; float* scalars[4]; signed char* corr; float* absmax[4];
        // long long offset, numel, first_block
        assert_eq!(std::mem::size_of::<TensorEntry>(), 8 * (2 + 2 * MAX_SLOTS + MAX_SCALARS + 4));
        let e = TensorEntry { p: 1, g: 2, s: [3, 4, 5, 6], scalars: [7, 8, 9, 10], corr: 11, absmax: [12, 13, 14, 15], offset: 16, numel: 17, first_block: -1 };
        let words: Vec<u64> = to_bytes(&[e]).chunks(8).map(|c| u64::from_ne_bytes(c.try_into().unwrap())).collect();
        assert_eq!(words, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, u64::MAX]);
        assert_eq!(blocks_of(0), 1);
        assert_eq!(blocks_of(CHUNK), 1);
        assert_eq!(blocks_of(CHUNK + 1), 2);
    }
}
