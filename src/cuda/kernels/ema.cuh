// Model EMA, one average (`ema`): the CUDA twin of `Ema` in src/rules/ema.rs (same coefficients,
// same per-element operation order; checked against it on the CPU by tests/test_cuda_sources.py).
//
// The written tensor is the average E, the input the model weight θ.
#pragma once
#include "common.cuh"

template <bool MULADD, bool SUB>
struct Ema {
    template <class R>
    struct Coeffs {
        EfLerp<R> lerp;
        R decay, weight;
    };

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double*, const double*) {
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
    EF_FN static void accumulate(const EfHyper&, R, R, const R*, double*) {}
};
