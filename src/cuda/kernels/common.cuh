// Shared definitions of emafuse's CUDA kernels. Every rule header includes this file.
//
// The same headers compile as host C++ (g++ -DEF_HOST): the test suite runs each rule's device
// math on the CPU and checks it against the Rust rule, so the two versions cannot drift apart.
#pragma once

#ifdef EF_HOST
#include <cmath>
#include <cstdint>
#include <cstring>
#define EF_FN inline
#define EF_SQRT_F(x) std::sqrt(x)
#define EF_SQRT_D(x) std::sqrt(x)
#define EF_FLOOR_F(x) std::floor(x)
#define EF_EXP_D(x) std::exp(x)
#define EF_ABS_F(x) std::fabs(x)
#define EF_ABS_D(x) std::fabs(x)
#define EF_POW_D(x, y) std::pow(x, y)
#define EF_POW_F(x, y) std::pow(x, y)
#define EF_LOG_D(x) std::log(x)
#define EF_COS_D(x) std::cos(x)
#define EF_SIN_D(x) std::sin(x)
#define EF_ACOS_D(x) std::acos(x)
typedef std::uint16_t ef_u16;
typedef std::uint32_t ef_u32;
typedef std::uint64_t ef_u64;
typedef std::int64_t ef_i64;
#else
#define EF_FN __device__ __forceinline__
#define EF_SQRT_F(x) sqrtf(x)
#define EF_SQRT_D(x) sqrt(x)
#define EF_FLOOR_F(x) floorf(x)
#define EF_EXP_D(x) exp(x)
#define EF_ABS_F(x) fabsf(x)
#define EF_ABS_D(x) fabs(x)
#define EF_POW_D(x, y) pow(x, y)
#define EF_POW_F(x, y) powf(x, y)
#define EF_LOG_D(x) log(x)
#define EF_COS_D(x) cos(x)
#define EF_SIN_D(x) sin(x)
#define EF_ACOS_D(x) acos(x)
typedef unsigned short ef_u16;
typedef unsigned int ef_u32;
typedef unsigned long long ef_u64;
typedef long long ef_i64;
#endif

// EF_MAX_SLOTS, EF_MAX_SCALARS and EF_MAX_SUMS (src/rules/mod.rs), the rule's EfHyper and its
// counts come from the generated preamble before this file (src/cuda/program.rs).

// ---- compute-type helpers (float or double), mirroring src/real.rs ----------------------------

// The float with the bit pattern `u`.
EF_FN float ef_bits_to_float(ef_u32 u) {
    float f;
#ifdef EF_HOST
    std::memcpy(&f, &u, 4);
#else
    f = __uint_as_float(u);
#endif
    return f;
}

// The bit pattern of the float `f`.
EF_FN ef_u32 ef_float_to_bits(float f) {
    ef_u32 u;
#ifdef EF_HOST
    std::memcpy(&u, &f, 4);
#else
    u = __float_as_uint(f);
#endif
    return u;
}

EF_FN float ef_sqrt(float x) { return EF_SQRT_F(x); }
EF_FN double ef_sqrt(double x) { return EF_SQRT_D(x); }
EF_FN float ef_abs(float x) { return EF_ABS_F(x); }
EF_FN double ef_abs(double x) { return EF_ABS_D(x); }
// x^e: libm's pow on the host (as Rust's powf), CUDA's on the device (within 2 ulp).
EF_FN float ef_pow(float x, float e) { return EF_POW_F(x, e); }
EF_FN double ef_pow(double x, double e) { return EF_POW_D(x, e); }
// e^x. float: the operations of `exp_f32` in src/real.rs, in the same order (bit-identical to the
// CPU engine on host and device; within 2 ulp). double: libm's exp on the host (as Rust's
// f64::exp), CUDA's on the device (may differ in the last bit).
EF_FN float ef_exp(float x) {
    const float LO = -87.33655f, HI = 88.72283f;
    float xc = x >= LO ? (x <= HI ? x : HI) : LO;  // NaN -> LO, fixed below
    float n = EF_FLOOR_F(xc * 1.44269504f + 0.5f);
    float r = (xc - n * 0.6933594f) - n * -2.1219444e-4f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6.0f + r * (1.0f / 24.0f + r * (1.0f / 120.0f + r * (1.0f / 720.0f + r * (1.0f / 5040.0f)))))));
    int k = (int)n;
    int k1 = k >> 1, k2 = k - (k >> 1);
    float y = p * ef_bits_to_float((ef_u32)(k1 + 127) << 23) * ef_bits_to_float((ef_u32)(k2 + 127) << 23);
    if (x != x) return x;
    if (x > HI) return ef_bits_to_float(0x7f800000u);
    if (x < LO) return 0.0f;
    return y;
}
EF_FN double ef_exp(double x) { return EF_EXP_D(x); }

// +infinity as a double (f64::INFINITY), without <limits> on the device.
EF_FN double ef_inf_d() {
#ifdef EF_HOST
    return HUGE_VAL;
#else
    return __longlong_as_double(0x7ff0000000000000LL);
#endif
}

// torch.maximum / torch.minimum: NaN if either operand is NaN.
template <class R> EF_FN R ef_max_nan(R a, R b) { return (a != a || a > b) ? a : b; }
template <class R> EF_FN R ef_min_nan(R a, R b) { return (a != a || a < b) ? a : b; }

// torch.sign: sign(0) = 0, NaN stays NaN.
template <class R> EF_FN R ef_sign(R x) { return x > R(0) ? R(1) : (x < R(0) ? R(-1) : x * R(0)); }

// torch.lerp's two rounding forms, chosen on the host side of the weight (src/real.rs `Lerp`).
template <class R> struct EfLerp {
    R w, one_minus_w;
    bool small;
    EF_FN static EfLerp make(double weight) {
        EfLerp l;
        l.w = R(weight);
        l.one_minus_w = R(1) - l.w;
        l.small = (l.w < R(0) ? -l.w : l.w) < R(0.5);
        return l;
    }
    EF_FN R apply(R a, R b) const { return small ? a + w * (b - a) : b - (b - a) * one_minus_w; }
};

// Advance the step counter kept in scalars[0]; the Adam-style bias corrections of the new step
// (src/rules/mod.rs `next_step`).
EF_FN void ef_next_step(double* scalars, double beta1, double beta2, double* bc1, double* bc2) {
    scalars[0] += 1.0;
    double t = scalars[0];
    *bc1 = 1.0 - EF_POW_D(beta1, t);
    *bc2 = 1.0 - EF_POW_D(beta2, t);
}

// ---- storage types and conversions -------------------------------------------------------------

struct ef_bf16 { ef_u16 bits; };
struct ef_f16 { ef_u16 bits; };

EF_FN float ef_to_float(float x) { return x; }
EF_FN double ef_to_double(double x) { return x; }

EF_FN float ef_bf16_to_float(ef_u16 b) { return ef_bits_to_float(((ef_u32)b) << 16); }

EF_FN ef_u16 ef_float_to_bf16(float f) {
    ef_u32 u = ef_float_to_bits(f);
    if (f != f) return (ef_u16)((u >> 16) | 0x40);
    u += 0x7fff + ((u >> 16) & 1);  // round to nearest even
    return (ef_u16)(u >> 16);
}

#ifndef EF_HOST
EF_FN float ef_f16_to_float(ef_u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
EF_FN ef_u16 ef_float_to_f16(float f) {
    ef_u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

// ---- stochastic rounding of bf16 stores (src/rounding.rs, bit for bit) ------------------------

EF_FN ef_u64 ef_mix64(ef_u64 x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}
// The 32-bit stream of array `array` (0: the parameter, 1 + k: state slot k) of tensor `tensor`.
EF_FN ef_u32 ef_stream_key(ef_u64 batch_key, ef_u64 tensor, ef_u64 array) {
    return (ef_u32)(ef_mix64(batch_key ^ ef_mix64((tensor << 3) | array)) >> 32);
}
// 16 random bits for element `index` of a stream.
EF_FN ef_u32 ef_random16(ef_u32 stream, ef_u32 index) {
    ef_u32 x = index ^ stream;
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x >> 16;
}
EF_FN ef_u16 ef_bf16_stochastic(float f, ef_u32 r16) {
    ef_u32 u = ef_float_to_bits(f);
    if (f != f) return (ef_u16)((u >> 16) | 0x40);
    return (ef_u16)((u + r16) >> 16);
}

// ---- weight corrections of bf16 and fp16 parameters (src/rounding.rs, bit for bit) -----------
// A 16-bit weight hi with int8 correction c stands for hi + c·u(hi): u is 2^-8 of hi's ulp,
// 2^(E − 127 − M − 8) for hi's f32 exponent field E clamped to [E_MIN, E_MAX] and M mantissa bits
// (bf16: 7, [16, 254]; fp16: 10, [113, 142]); a float splits into its nearest 16-bit value and
// the rounded remainder.

template <ef_u32 M, ef_u32 E_MIN, ef_u32 E_MAX> struct EfCorrection {
    EF_FN static ef_u32 exponent(float hi) {
        ef_u32 e = (ef_float_to_bits(hi) >> 23) & 0xffu;
        return e < E_MIN ? E_MIN : (e > E_MAX ? E_MAX : e);
    }
    // The weight of the 16-bit value hi with correction c (exact; infinities and NaN stay).
    EF_FN static float corrected(float hi, signed char c) { return hi + (float)c * ef_bits_to_float((exponent(hi) - M - 8u) << 23); }
    // The correction of x against hi, its nearest 16-bit value (0 for infinities and NaN).
    EF_FN static signed char correction(float x, float hi) {
        float units = (x - hi) * ef_bits_to_float((254u + M + 8u - exponent(hi)) << 23);  // exact
        units = units != units || units < -127.0f ? -127.0f : (units > 127.0f ? 127.0f : units);
        // adding 1.5·2^23 rounds to an integer, half to even, held by the low bits in two's complement
        signed char c = (signed char)(unsigned char)(ef_float_to_bits(units + 12582912.0f) & 0xffu);
        return hi - hi == 0.0f ? c : (signed char)0;
    }
};
typedef EfCorrection<7u, 16u, 254u> EfBf16Correction;
typedef EfCorrection<10u, 113u, 142u> EfF16Correction;

// Load/store one element of storage type S as compute type R; `store_sr` rounds with the 16
// random bits `r16` (bf16 only: the compute types store exactly, fp16 is refused on the host).
// `load_corrected` / `store_corrected` read and write a parameter with its weight correction
// (bf16 and fp16 only: the host refuses corrections of other parameters, so the others never run).
template <class S, class R> struct EfElem;
template <> struct EfElem<float, float> {
    EF_FN static float load(const float* p) { return *p; }
    EF_FN static void store(float* p, float x) { *p = x; }
    EF_FN static void store_sr(float* p, float x, ef_u32) { *p = x; }
    EF_FN static float load_corrected(const float* p, signed char) { return *p; }
    EF_FN static void store_corrected(float* p, float x, signed char* c) { *p = x; *c = 0; }
};
template <> struct EfElem<double, double> {
    EF_FN static double load(const double* p) { return *p; }
    EF_FN static void store(double* p, double x) { *p = x; }
    EF_FN static void store_sr(double* p, double x, ef_u32) { *p = x; }
    EF_FN static double load_corrected(const double* p, signed char) { return *p; }
    EF_FN static void store_corrected(double* p, double x, signed char* c) { *p = x; *c = 0; }
};
template <> struct EfElem<ef_bf16, float> {
    EF_FN static float load(const ef_bf16* p) { return ef_bf16_to_float(p->bits); }
    EF_FN static void store(ef_bf16* p, float x) { p->bits = ef_float_to_bf16(x); }
    EF_FN static void store_sr(ef_bf16* p, float x, ef_u32 r16) { p->bits = ef_bf16_stochastic(x, r16); }
    EF_FN static float load_corrected(const ef_bf16* p, signed char c) { return EfBf16Correction::corrected(ef_bf16_to_float(p->bits), c); }
    EF_FN static void store_corrected(ef_bf16* p, float x, signed char* c) {
        p->bits = ef_float_to_bf16(x);
        *c = EfBf16Correction::correction(x, ef_bf16_to_float(p->bits));
    }
};
#ifndef EF_HOST
template <> struct EfElem<ef_f16, float> {
    EF_FN static float load(const ef_f16* p) { return ef_f16_to_float(p->bits); }
    EF_FN static void store(ef_f16* p, float x) { p->bits = ef_float_to_f16(x); }
    EF_FN static void store_sr(ef_f16* p, float x, ef_u32) { p->bits = ef_float_to_f16(x); }
    EF_FN static float load_corrected(const ef_f16* p, signed char c) { return EfF16Correction::corrected(ef_f16_to_float(p->bits), c); }
    EF_FN static void store_corrected(ef_f16* p, float x, signed char* c) {
        p->bits = ef_float_to_f16(x);
        *c = EfF16Correction::correction(x, ef_f16_to_float(p->bits));
    }
};
#endif

// ---- blockwise 8-bit state (src/quant.rs, bit for bit) ------------------------------------------
// A state slot stored as one code per element and one float scale (absmax) per block of 256: the
// value is map[code] · absmax. The kernels decode a block, update it, and encode it again with the
// block's new absmax (the largest magnitude, compared as bits so that NaN wins) and each scaled
// element's nearest map entry (ties to the lower one): the number of midpoints below it.

struct ef_q8 { unsigned char code; };  // the storage type of 8-bit state
template <class S> struct EfIsQ8 { static constexpr bool value = false; };
template <> struct EfIsQ8<ef_q8> { static constexpr bool value = true; };

// |x| as bits: integers order magnitudes (infinity below NaN).
EF_FN ef_u32 ef_abs_bits(float x) { return ef_float_to_bits(x) & 0x7fffffffu; }
// The factor that scales a block of absmax `absmax` into [−1, 1] (Rust: 1 / absmax.max(1e-38)).
EF_FN float ef_q8_inverse(float absmax) { return 1.0f / (absmax > 1e-38f ? absmax : 1e-38f); }
// The code of the scaled value y: how many of the 255 sorted midpoints `mids` lie below it, after
// clamping y to [−1, 1] (NaN to −1, as Rust's f32::max).
EF_FN unsigned char ef_q8_code(const float* mids, float y) {
    y = y > -1.0f ? y : -1.0f;
    y = y < 1.0f ? y : 1.0f;
    int below = 0;
    for (int step = 128; step > 0; step >>= 1)
        if (mids[below + step - 1] < y) below += step;
    return (unsigned char)below;
}

// A parameter element, with its weight correction when the tensor has them (`corr` not null).
template <class P, class R> EF_FN R ef_load_param(const P* p, const signed char* corr, ef_i64 i) {
    return corr != nullptr ? EfElem<P, R>::load_corrected(p + i, corr[i]) : EfElem<P, R>::load(p + i);
}

// A store of the element at position `i` of an array: stochastic with the array's stream when `sr`.
template <class S, class R> EF_FN void ef_store(S* p, R x, bool sr, ef_u32 stream, ef_i64 i) {
    if (sr) EfElem<S, R>::store_sr(p, x, ef_random16(stream, (ef_u32)i));
    else EfElem<S, R>::store(p, x);
}
// A store of parameter element `i` (at `p`, at position `at` in its whole tensor): with its new
// weight correction when the tensor has them (`corr` not null; rounded to nearest), else as
// `ef_store`.
template <class P, class R> EF_FN void ef_store_param(P* p, R x, signed char* corr, bool sr, ef_u32 stream, ef_i64 i, ef_i64 at) {
    if (corr != nullptr) EfElem<P, R>::store_corrected(p, x, corr + i);
    else ef_store<P, R>(p, x, sr, stream, at);
}

// The Cautious optimizers' sums [Σφ, numel] and per-tensor factor (src/rules/mod.rs
// `cautious_count`, `caution_factor`). The sums are counts, exact in double, so the device's order
// of addition cannot change them.
template <class R> EF_FN void ef_cautious_count(R u, R g, double* sums) {
    sums[0] += (u * g > R(0)) ? 1.0 : 0.0;
    sums[1] += 1.0;
}
// ef_cautious_count for a rule whose step has the sign of its new first moment
// m = m_old·β1 + (1 − β1)·g (src/rules/mod.rs `cautious_count_momentum`).
template <class R> EF_FN void ef_cautious_count_momentum(R m_old, R g, double beta1, double* sums) {
    ef_cautious_count(m_old * R(beta1) + R(1.0 - beta1) * g, g, sums);
}
template <class R> EF_FN R ef_cautious(R u, R g, R k) { return u * g > R(0) ? u * k : R(0); }
template <class R> EF_FN R ef_caution_factor(const double* sums, bool count) {
    R agree = R(sums[0]), n = R(sums[1]);
    return count ? n / (agree + R(1)) : R(1) / ef_max_nan(agree / n, R(1e-3));
}
