// The one multi-tensor kernel every rule runs through (the CUDA twin of src/cpu/). The program is
// assembled as: a preamble generated from the Rust rule type (src/cuda/program.rs) + common.cuh +
// <rule>.cuh + this file. The preamble defines EF_RULE (the rule's C++ type, flags included, e.g.
// Adam<true, false, false>), its parameters' struct EfHyper and its counts EF_SLOTS,
// EF_WRITTEN_SLOTS (slots past it are only read), EF_SCALARS, EF_SUMS, EF_SUM_PASSES and
// EF_MAX_SUMS_MASK (the read-only passes gathering them, and which are maxima), EF_READS_INPUT and
// EF_SUMS_READ_STATE / EF_SUMS_READ_PARAM (whether the sums passes read the state slots, from pass
// EF_STATE_SUM_PASS on / the parameter), EF_NONNEG_SLOTS (bit k: slot k is never negative,
// decoded from 8 bits with the unsigned map), and 8-bit state's maps EF_Q8_VALUES and EF_Q8_MIDS.
//
// One launch updates every tensor of a (group, device, dtype) batch: block b finds its tensor by
// binary search over the tensors' first block indices, thread 0 computes the tensor's
// coefficients from the rule's host-side formula (in double, from the scalar state read on the
// device, so steps can be captured in a CUDA graph), and the block updates its chunk of
// EF_CHUNK elements, four consecutive elements per thread with vector loads when aligned. The
// scalar state (e.g. `step`) is written back by the last block of each tensor to finish reading
// it (a per-tensor arrival counter), so all blocks see the same pre-step value. With 8-bit state
// (storage type ef_q8) each thread takes one element of a quantization block of 256 at a time, and
// the block finds the block's new absmax together before encoding it.
#pragma once
#include "common.cuh"

#ifndef EF_CHUNK
#define EF_CHUNK 65536
#endif
#define EF_THREADS 256
#define EF_VEC 4

struct EfTensor {  // layout of the Rust `cuda::table::TensorEntry` (#[repr(C)])
    void* p;
    const void* g;
    void* s[EF_MAX_SLOTS];
    float* scalars[EF_MAX_SCALARS];
    signed char* corr;  // the parameter's weight corrections, or null
    float* absmax[EF_MAX_SLOTS];  // 8-bit state: each slot's block scales
    ef_i64 offset;      // its first element's position in the whole tensor (stochastic rounding)
    ef_i64 numel;
    ef_i64 first_block;
};

EF_FN ef_i64 ef_blocks_of(ef_i64 numel) { return numel <= 0 ? 1 : (numel + EF_CHUNK - 1) / EF_CHUNK; }

template <class T>
struct alignas(sizeof(T) * EF_VEC) EfVec {
    T v[EF_VEC];
};

__device__ __forceinline__ int ef_find_tensor(const EfTensor* tensors, int n) {
    int lo = 0, hi = n - 1;
    ef_i64 b = blockIdx.x;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (tensors[mid].first_block <= b) lo = mid; else hi = mid - 1;
    }
    return lo;
}

template <class T>
__device__ __forceinline__ bool ef_aligned(const void* p) {
    return ((unsigned long long)p % (sizeof(T) * EF_VEC)) == 0;
}

template <class Rule, class R, class P, class G, class S>
__device__ __forceinline__ void ef_update_one(const typename Rule::template Coeffs<R>& c, R factor, R unscale, bool store_grad, P* p, G* g,
                                              S* const* st, signed char* corr, bool sr, const ef_u32* streams, ef_i64 offset, ef_i64 i) {
    R s[EF_MAX_SLOTS];
#pragma unroll
    for (int k = 0; k < EF_SLOTS; ++k) s[k] = EfElem<S, R>::load(st[k] + i);
    R gv = R(0);
    if (EF_READS_INPUT) {
        R graw = EfElem<G, R>::load(g + i);
        gv = graw * factor;
        if (store_grad) EfElem<G, R>::store(g + i, graw * unscale);  // AMP: .grad left unscaled, as torch's fused kernels
    }
    R pv = Rule::template update<R>(c, ef_load_param<P, R>(p, corr, i), gv, s);
    ef_store_param<P, R>(p + i, pv, corr, sr, streams[0], i, offset + i);
#pragma unroll
    for (int k = 0; k < EF_WRITTEN_SLOTS; ++k) ef_store<S, R>(st[k] + i, s[k], sr, streams[1 + k], offset + i);
}

// 8-bit state: the map of slot k (1: unsigned) and the decoded value of element i, from `values`
// (the maps: EF_Q8_VALUES, or a copy in shared memory, which serves divergent lookups faster).
__device__ __forceinline__ int ef_q8_map(int k) { return (EF_NONNEG_SLOTS >> k) & 1; }
__device__ __forceinline__ float ef_q8_load(const float (*values)[256], const EfTensor& T, int k, ef_i64 i) {
    return values[ef_q8_map(k)][((const unsigned char*)T.s[k])[i]] * T.absmax[k][i / 256];
}

// The largest of every thread's `bits` (all threads of the block call it; `red` holds a word per warp).
__device__ __forceinline__ ef_u32 ef_block_max(ef_u32 bits, ef_u32* red) {
    for (int o = 16; o > 0; o >>= 1) {
        ef_u32 other = __shfl_xor_sync(0xffffffffu, bits, o);
        bits = other > bits ? other : bits;
    }
    if ((threadIdx.x & 31u) == 0) red[threadIdx.x >> 5] = bits;
    __syncthreads();
    ef_u32 m = red[0];
    for (int w = 1; w < EF_THREADS / 32; ++w) m = red[w] > m ? red[w] : m;
    __syncthreads();  // `red` is reused by the next call
    return m;
}

// The update of elements [start, end) of tensor T with 8-bit state: quantization block by block
// (start is a multiple of 256, and EF_THREADS is 256: one element per thread).
template <class Rule, class R, class P, class G>
__device__ __forceinline__ void ef_step_q8(const EfTensor& T, const typename Rule::template Coeffs<R>& c, R factor, R unscale, bool store_grad,
                                           bool sr, const ef_u32* streams, ef_i64 start, ef_i64 end) {
    __shared__ float values[2][256], mids[2][256];
    __shared__ ef_u32 red[EF_THREADS / 32];
    for (int j = threadIdx.x; j < 2 * 256; j += blockDim.x) {
        values[j / 256][j % 256] = EF_Q8_VALUES[j / 256][j % 256];
        mids[j / 256][j % 256] = EF_Q8_MIDS[j / 256][j % 256];
    }
    __syncthreads();
    P* p = (P*)T.p;
    G* g = (G*)T.g;
    for (ef_i64 block = start; block < end; block += EF_THREADS) {
        const ef_i64 i = block + threadIdx.x;
        const bool live = i < end;
        R s[EF_MAX_SLOTS];
#pragma unroll
        for (int k = 0; k < EF_SLOTS; ++k) s[k] = live ? ef_q8_load(values, T, k, i) : R(0);
        if (live) {
            R gv = R(0);
            if (EF_READS_INPUT) {
                R graw = EfElem<G, R>::load(g + i);
                gv = graw * factor;
                if (store_grad) EfElem<G, R>::store(g + i, graw * unscale);
            }
            R pv = Rule::template update<R>(c, ef_load_param<P, R>(p, T.corr, i), gv, s);
            ef_store_param<P, R>(p + i, pv, T.corr, sr, streams[0], i, T.offset + i);
        }
#pragma unroll
        for (int k = 0; k < EF_WRITTEN_SLOTS; ++k) {
            const float absmax = ef_bits_to_float(ef_block_max(live ? ef_abs_bits(s[k]) : 0u, red));
            if (live) ((unsigned char*)T.s[k])[i] = ef_q8_code(mids[ef_q8_map(k)], s[k] * ef_q8_inverse(absmax));
            if (threadIdx.x == 0) T.absmax[k][block / 256] = absmax;
        }
    }
}

// What tensor t's gradients are multiplied by as loaded: gsign (−1 for maximize, times the group's
// grad_factor) over AMP's grad scale, times the tensor's factor (gfactors: one per tensor of the
// launch, e.g. AdaGC's clip factors, or null), in double, rounded once (cpu::GradScaling).
template <class R>
__device__ __forceinline__ R ef_grad_factor(const float* grad_scale, double gsign, const double* gfactors, int t) {
    const double base = grad_scale != nullptr ? gsign / (double)*grad_scale : gsign;
    return R(gfactors != nullptr ? base * gfactors[t] : base);
}

template <class Rule, class R, class P, class G, class S>
__device__ __forceinline__ void ef_step_impl(const EfHyper& hyper, const EfTensor* tensors, int n_tensors,
                                             const float* grad_scale, const float* found_inf, double gsign,
                                             const double* gfactors, ef_u32* counters, const double* sums, ef_u64 rkey) {
    if (found_inf != nullptr && *found_inf != 0.0f) return;  // AMP overflow: skip the whole step
    __shared__ int t_sh;
    __shared__ typename Rule::template Coeffs<R> c_sh;
    __shared__ R factor_sh;
    __shared__ R unscale_sh;
    if (threadIdx.x == 0) {
        int t = ef_find_tensor(tensors, n_tensors);
        const EfTensor& T = tensors[t];
        double sc[EF_MAX_SCALARS] = {0, 0, 0, 0};
        double sm[EF_MAX_SUMS] = {0, 0, 0, 0};
        for (int k = 0; k < EF_SCALARS; ++k) sc[k] = (double)*T.scalars[k];
        if (EF_SUMS > 0)
            for (int k = 0; k < EF_SUMS; ++k) sm[k] = sums[t * EF_MAX_SUMS + k];
        c_sh = Rule::template coeffs<R>(hyper, sc, sm);
        factor_sh = ef_grad_factor<R>(grad_scale, gsign, gfactors, t);
        unscale_sh = R(grad_scale != nullptr ? 1.0 / (double)*grad_scale : 1.0);
        t_sh = t;
        if (EF_SCALARS > 0) {
            __threadfence();  // our reads of the scalars happen before we are counted
            ef_u32 arrived = atomicAdd(&counters[t], 1u);
            if (arrived + 1 == (ef_u32)ef_blocks_of(T.numel)) {
                for (int k = 0; k < EF_SCALARS; ++k) *T.scalars[k] = (float)sc[k];
                counters[t] = 0;
            }
        }
    }
    __syncthreads();
    const EfTensor& T = tensors[t_sh];
    const typename Rule::template Coeffs<R> c = c_sh;
    const R factor = factor_sh;
    const R unscale = unscale_sh;
    const bool store_grad = EF_READS_INPUT && grad_scale != nullptr;
    // Stochastic rounding of bf16 stores with the batch's key (0: round to nearest).
    const bool sr = rkey != 0;
    ef_u32 streams[1 + EF_MAX_SLOTS];
#pragma unroll
    for (int a = 0; a <= EF_MAX_SLOTS; ++a) streams[a] = sr && a <= EF_SLOTS ? ef_stream_key(rkey, (ef_u64)t_sh, (ef_u64)a) : 0u;
    ef_i64 start = ((ef_i64)blockIdx.x - T.first_block) * EF_CHUNK;
    ef_i64 end = T.numel < start + EF_CHUNK ? T.numel : start + EF_CHUNK;
    if constexpr (EfIsQ8<S>::value) {
        ef_step_q8<Rule, R, P, G>(T, c, factor, unscale, store_grad, sr, streams, start, end);
        return;
    } else {
    P* p = (P*)T.p;
    G* g = (G*)T.g;
    signed char* corr = T.corr;
    S* st[EF_MAX_SLOTS];
    bool aligned = ef_aligned<P>(p) && (!EF_READS_INPUT || ef_aligned<G>(g));
#pragma unroll
    for (int k = 0; k < EF_MAX_SLOTS; ++k) {
        st[k] = (S*)T.s[k];
        if (k < EF_SLOTS) aligned = aligned && ef_aligned<S>(st[k]);
    }
    ef_i64 vec_end = aligned ? start + ((end - start) / EF_VEC) * EF_VEC : start;
    for (ef_i64 i = start + (ef_i64)threadIdx.x * EF_VEC; i < vec_end; i += (ef_i64)blockDim.x * EF_VEC) {
        EfVec<P> pv = *(const EfVec<P>*)(p + i);
        EfVec<G> gv;
        if (EF_READS_INPUT) gv = *(const EfVec<G>*)(g + i);
        EfVec<S> sv[EF_MAX_SLOTS];
#pragma unroll
        for (int k = 0; k < EF_SLOTS; ++k) sv[k] = *(const EfVec<S>*)(st[k] + i);
#pragma unroll
        for (int j = 0; j < EF_VEC; ++j) {
            R s[EF_MAX_SLOTS];
#pragma unroll
            for (int k = 0; k < EF_SLOTS; ++k) s[k] = EfElem<S, R>::load(&sv[k].v[j]);
            R gj = R(0);
            if (EF_READS_INPUT) {
                R graw = EfElem<G, R>::load(&gv.v[j]);
                gj = graw * factor;
                if (store_grad) EfElem<G, R>::store(&gv.v[j], graw * unscale);
            }
            R pj = Rule::template update<R>(c, corr != nullptr ? EfElem<P, R>::load_corrected(&pv.v[j], corr[i + j]) : EfElem<P, R>::load(&pv.v[j]), gj, s);
            ef_store_param<P, R>(&pv.v[j], pj, corr, sr, streams[0], i + j, T.offset + i + j);
#pragma unroll
            for (int k = 0; k < EF_WRITTEN_SLOTS; ++k) ef_store<S, R>(&sv[k].v[j], s[k], sr, streams[1 + k], T.offset + i + j);
        }
        *(EfVec<P>*)(p + i) = pv;
        if (store_grad) *(EfVec<G>*)(g + i) = gv;
#pragma unroll
        for (int k = 0; k < EF_WRITTEN_SLOTS; ++k) *(EfVec<S>*)(st[k] + i) = sv[k];
    }
    for (ef_i64 i = vec_end + threadIdx.x; i < end; i += blockDim.x) ef_update_one<Rule, R, P, G, S>(c, factor, unscale, store_grad, p, g, st, corr, sr, streams, T.offset, i);
    }
}

// Fold `x` into the sum `*total` (sum k of a tensor): added, or for the maxima (EF_MAX_SUMS_MASK, of
// non-negative values, whose order is that of their bits) the larger kept.
__device__ __forceinline__ void ef_combine_sum(double* total, int k, double x) {
    if ((EF_MAX_SUMS_MASK >> k) & 1) atomicMax((unsigned long long*)total, (unsigned long long)__double_as_longlong(x));
    else atomicAdd(total, x);
}

// Calls the rule's second and later sums passes where it has them (a rule with one pass declares
// neither `prepare` nor `accumulate_after`).
template <class Rule, bool LATER = (EF_SUM_PASSES > 1)>
struct EfLaterPasses {
    template <class R>
    __device__ static void prepare(const EfHyper&, int, const double*, const double*, R*) {}
    template <class R>
    __device__ static void accumulate(const EfHyper&, int, const R*, R, R, const R*, double*) {}
};
template <class Rule>
struct EfLaterPasses<Rule, true> {
    template <class R>
    __device__ static void prepare(const EfHyper& h, int pass, const double* sc, const double* sm, R* prior) {
        double out[EF_MAX_SUMS] = {0, 0, 0, 0};
        Rule::prepare(h, pass, sc, sm, out);
        for (int k = 0; k < EF_MAX_SUMS; ++k) prior[k] = R(out[k]);
    }
    template <class R>
    __device__ static void accumulate(const EfHyper& h, int pass, const R* prior, R p, R g, const R* s, double* acc) {
        Rule::template accumulate_after<R>(h, pass, prior, p, g, s, acc);
    }
};

// Per-tensor sums (rules with SUMS > 0): read-only pass `pass` before ef_step, accumulated in
// double into `sums`, which holds the earlier passes' sums (pass > 0 reads the values the rule's
// `prepare` derives from them and from the scalar state).
template <class Rule, class R, class P, class G, class S>
__device__ __forceinline__ void ef_sums_impl(const EfHyper& hyper, const EfTensor* tensors, int n_tensors,
                                             const float* grad_scale, const float* found_inf, double gsign,
                                             const double* gfactors, double* sums, int pass) {
    if (EF_SUMS == 0) return;
    if (found_inf != nullptr && *found_inf != 0.0f) return;
    int t = ef_find_tensor(tensors, n_tensors);
    const EfTensor& T = tensors[t];
    const R factor = ef_grad_factor<R>(grad_scale, gsign, gfactors, t);
    ef_i64 start = ((ef_i64)blockIdx.x - T.first_block) * EF_CHUNK;
    ef_i64 end = T.numel < start + EF_CHUNK ? T.numel : start + EF_CHUNK;
    __shared__ R prior_sh[EF_MAX_SUMS];
    if (pass > 0) {
        if (threadIdx.x == 0) {
            double sc[EF_MAX_SCALARS] = {0, 0, 0, 0};
            for (int k = 0; k < EF_SCALARS; ++k) sc[k] = (double)*T.scalars[k];
            EfLaterPasses<Rule>::template prepare<R>(hyper, pass, sc, sums + t * EF_MAX_SUMS, prior_sh);
        }
        __syncthreads();
    }
    R prior[EF_MAX_SUMS];
    for (int k = 0; k < EF_MAX_SUMS; ++k) prior[k] = pass > 0 ? prior_sh[k] : R(0);
    double acc[EF_MAX_SUMS] = {0, 0, 0, 0};
    const P* p = (const P*)T.p;
    const G* g = (const G*)T.g;
    for (ef_i64 i = start + threadIdx.x; i < end; i += blockDim.x) {
        R s[EF_MAX_SLOTS];
        for (int k = 0; k < (EF_SUMS_READ_STATE && pass >= EF_STATE_SUM_PASS ? EF_SLOTS : 0); ++k) {
            if constexpr (EfIsQ8<S>::value) s[k] = ef_q8_load(EF_Q8_VALUES, T, k, i);
            else s[k] = EfElem<S, R>::load((const S*)T.s[k] + i);
        }
        R gv = EF_READS_INPUT ? EfElem<G, R>::load(g + i) * factor : R(0);
        R pv = EF_SUMS_READ_PARAM ? ef_load_param<P, R>(p, T.corr, i) : R(0);
        if (pass == 0) Rule::template accumulate<R>(hyper, pv, gv, s, acc);
        else EfLaterPasses<Rule>::template accumulate<R>(hyper, pass, prior, pv, gv, s, acc);
    }
    __shared__ double red[EF_THREADS];
    for (int k = 0; k < EF_SUMS; ++k) {
        const bool is_max = (EF_MAX_SUMS_MASK >> k) & 1;
        red[threadIdx.x] = acc[k];
        __syncthreads();
        for (int w = blockDim.x / 2; w > 0; w /= 2) {
            if ((int)threadIdx.x < w) red[threadIdx.x] = is_max ? fmax(red[threadIdx.x], red[threadIdx.x + w]) : red[threadIdx.x] + red[threadIdx.x + w];
            __syncthreads();
        }
        if (threadIdx.x == 0) ef_combine_sum(&sums[t * EF_MAX_SUMS + k], k, red[0]);
        __syncthreads();
    }
}

#define EF_KERNELS(NAME, R, P, G, S)                                                                          \
    extern "C" __global__ void __launch_bounds__(EF_THREADS)                                              \
        ef_step_##NAME(const EfHyper hyper, const EfTensor* tensors, int n_tensors,                \
                       const float* grad_scale, const float* found_inf, double gsign,                     \
                       const double* gfactors, ef_u32* counters, const double* sums, ef_u64 rkey) {       \
        ef_step_impl<EF_RULE, R, P, G, S>(hyper, tensors, n_tensors, grad_scale, found_inf, gsign, gfactors, \
                                       counters, sums, rkey);                                             \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(EF_THREADS)                                              \
        ef_sums_##NAME(const EfHyper hyper, const EfTensor* tensors, int n_tensors,                \
                       const float* grad_scale, const float* found_inf, double gsign,                     \
                       const double* gfactors, double* sums, ef_u64 pass) {                               \
        ef_sums_impl<EF_RULE, R, P, G, S>(hyper, tensors, n_tensors, grad_scale, found_inf, gsign, gfactors, sums, \
                                       (int)pass);                                                        \
    }

// (name, compute, param, input, state): the combinations src/batch.rs accepts.
EF_KERNELS(f32, float, float, float, float)
EF_KERNELS(f64, double, double, double, double)
EF_KERNELS(bf16, float, ef_bf16, ef_bf16, ef_bf16)
EF_KERNELS(bf16_f32, float, ef_bf16, ef_bf16, float)
EF_KERNELS(f16, float, ef_f16, ef_f16, ef_f16)
EF_KERNELS(f16_f32, float, ef_f16, ef_f16, float)
EF_KERNELS(f32_bf16in, float, float, ef_bf16, float)
EF_KERNELS(f32_f16in, float, float, ef_f16, float)
EF_KERNELS(f32_bf16, float, float, float, ef_bf16)
EF_KERNELS(f32_q8, float, float, float, ef_q8)
EF_KERNELS(bf16_q8, float, ef_bf16, ef_bf16, ef_q8)
EF_KERNELS(f16_q8, float, ef_f16, ef_f16, ef_q8)
