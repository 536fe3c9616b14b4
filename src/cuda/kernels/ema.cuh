// Model EMA, one average (`ema`) or several of the same input (`ema_multi`, EDM2 power-EMA
// tracks): the CUDA twin of src/rules/ema.rs (same coefficients, same per-element operation
// order; checked against it on the CPU by tests/test_cuda_sources.py).
//
// The written tensor is the average E, the input the model weight θ.
#pragma once
#include "common.cuh"

template <bool MULADD, bool SUB>
struct Ema {
    struct Hyper {  // layout of the Rust `Ema` struct (#[repr(C)])
        double weight;
    };
    static const int SLOTS = 0;
    static const int SCALARS = 0;
    static const int SUMS = 0;
    static const bool READS_INPUT = true;

    template <class R>
    struct Coeffs {
        EfLerp<R> lerp;
        R decay, weight;
    };

    template <class R>
    EF_FN static Coeffs<R> coeffs(const Hyper& h, double*, const double*) {
        Coeffs<R> c;
        c.lerp = EfLerp<R>::make(h.weight);
        c.decay = R(1.0 - h.weight);
        c.weight = R(h.weight);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R e, R theta, R*) {
        if (MULADD) return c.decay * e + c.weight * theta;  // timm V2, Lightning, NeMo, Keras
        if (SUB) return e - c.weight * (e - theta);         // torch-ema
        return c.lerp.apply(e, theta);                      // torch.lerp's two forms
    }

    template <class R>
    EF_FN static void accumulate(const Hyper&, R, R, const R*, double*) {}
};

// J tracks: track 0 is the written tensor, tracks 1.. are state slots 0..J-2.
template <int J>
struct EmaMulti {
    static const int MAX_TRACKS = 1 + EF_MAX_SLOTS;
    struct Hyper {  // layout of the Rust `EmaMulti` struct (#[repr(C)]): one weight per track
        double weights[1 + EF_MAX_SLOTS];
    };
    static const int SLOTS = J - 1;
    static const int SCALARS = 0;
    static const int SUMS = 0;
    static const bool READS_INPUT = true;

    template <class R>
    struct Coeffs {
        EfLerp<R> lerp[1 + EF_MAX_SLOTS];
    };

    template <class R>
    EF_FN static Coeffs<R> coeffs(const Hyper& h, double*, const double*) {
        Coeffs<R> c;
        for (int j = 0; j < MAX_TRACKS; ++j) c.lerp[j] = EfLerp<R>::make(h.weights[j]);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R e, R theta, R* s) {
#pragma unroll
        for (int k = 0; k < J - 1; ++k) s[k] = c.lerp[k + 1].apply(s[k], theta);
        return c.lerp[0].apply(e, theta);
    }

    template <class R>
    EF_FN static void accumulate(const Hyper&, R, R, const R*, double*) {}
};
