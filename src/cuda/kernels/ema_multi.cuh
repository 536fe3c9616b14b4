// Several EMAs of the same input (`ema_multi`, EDM2 power-EMA tracks): the CUDA twin of
// `EmaMulti` in src/rules/ema.rs (same coefficients, same per-element operation order; checked
// against it on the CPU by tests/test_cuda_sources.py).
//
// The written tensor is the first average, the input the model weight θ.
#pragma once
#include "common.cuh"

// J tracks: track 0 is the written tensor, tracks 1.. are state slots 0..J-2.
template <int J>
struct EmaMulti {
    static const int MAX_TRACKS = 1 + EF_MAX_SLOTS;

    template <class R>
    struct Coeffs {
        EfLerp<R> lerp[1 + EF_MAX_SLOTS];
    };

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double*, const double*) {
        Coeffs<R> c;
        const double w[MAX_TRACKS] = {h.w0, h.w1, h.w2, h.w3, h.w4};  // EfHyper: one weight per track
        for (int j = 0; j < MAX_TRACKS; ++j) c.lerp[j] = EfLerp<R>::make(w[j]);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R e, R theta, R* s) {
#pragma unroll
        for (int k = 0; k < J - 1; ++k) s[k] = c.lerp[k + 1].apply(s[k], theta);
        return c.lerp[0].apply(e, theta);
    }

    template <class R>
    EF_FN static void accumulate(const EfHyper&, R, R, const R*, double*) {}
};
