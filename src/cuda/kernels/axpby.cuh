// Weighted sums S ← a·S + b·X (ASSIGN: S ← b·X, S not read): the CUDA twin of
// src/rules/axpby.rs.
#pragma once
#include "common.cuh"

template <bool ASSIGN>
struct Axpby {
    template <class R>
    struct Coeffs {
        R a, b;
    };

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double*, const double*) {
        Coeffs<R> c;
        c.a = R(h.a);
        c.b = R(h.b);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R s, R x, R*) {
        if (ASSIGN) return c.b * x;
        return c.a * s + c.b * x;
    }

    template <class R>
    EF_FN static void accumulate(const EfHyper&, R, R, const R*, double*) {}
};
