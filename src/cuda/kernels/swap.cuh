// In-place exchange of the written tensor A and slot 0 B: the CUDA twin of src/rules/swap.rs.
// Reads no input.
#pragma once
#include "common.cuh"

struct Swap {
    template <class R>
    struct Coeffs {};

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper&, double*, const double*) {
        return Coeffs<R>();
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>&, R a, R, R* s) {
        R b = s[0];
        s[0] = a;
        return b;
    }

    template <class R>
    EF_FN static void accumulate(const EfHyper&, R, R, const R*, double*) {}
};
