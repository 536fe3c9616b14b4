// BEMA, bias-corrected EMA: the CUDA twin of src/rules/bema.rs.
//
// Written tensor: the EMA E; input: the model θ; slot 0: the BEMA estimate O (written); slot 1:
// the anchor θ₀ (read, written on reset).
#pragma once
#include "common.cuh"

template <bool RESET>
struct Bema {
    struct Hyper {  // layout of the Rust `Bema` struct (#[repr(C)])
        double alpha, beta;
    };
    static const int SLOTS = 2;
    static const int WRITTEN_SLOTS = RESET ? 2 : 1;  // the anchor is only written by a reset
    static const int SCALARS = 0;
    static const int SUMS = 0;
    static const bool READS_INPUT = true;

    template <class R>
    struct Coeffs {
        EfLerp<R> lerp;
        R alpha;
    };

    template <class R>
    EF_FN static Coeffs<R> coeffs(const Hyper& h, double*, const double*) {
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
    EF_FN static void accumulate(const Hyper&, R, R, const R*, double*) {}
};
