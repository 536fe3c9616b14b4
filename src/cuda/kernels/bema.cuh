// BEMA, bias-corrected EMA: the CUDA twin of src/rules/bema.rs.
//
// Written tensor: the EMA E; input: the model θ; slot 0: the BEMA estimate O (written); slot 1:
// the anchor θ₀ (read, written on reset).
#pragma once
#include "common.cuh"

template <bool RESET>
struct Bema {
    template <class R>
    struct Coeffs {
        EfLerp<R> lerp;
        R alpha;
    };

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double*, const double*) {
        Coeffs<R> c;
        c.lerp = EfLerp<R>::make(h.beta);
        c.alpha = R(h.alpha);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R e, R theta, R* s) {
        if (RESET) {  // burn-in: E, O and θ₀ all become θ
            s[0] = theta;
            s[1] = theta;
            return theta;
        }
        e = c.lerp.apply(e, theta);
        s[0] = c.alpha * (theta - s[1]) + e;
        return e;
    }

    template <class R>
    EF_FN static void accumulate(const EfHyper&, R, R, const R*, double*) {}
};
