// In-place exchange of the written tensor A and slot 0 B: the CUDA twin of src/rules/swap.rs.
// Reads no input.
#pragma once
#include "common.cuh"

struct Swap {
    struct Hyper {  // layout of the Rust `Swap` struct (#[repr(C)]): a placeholder, so the kernel
        double unused;  // argument is not an empty struct
    };
    static const int SLOTS = 1;
    static const int SCALARS = 0;
    static const int SUMS = 0;
    static const bool READS_INPUT = false;

    template <class R>
    struct Coeffs {};

    template <class R>
    EF_FN static Coeffs<R> coeffs(const Hyper&, double*, const double*) {
        return Coeffs<R>();
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>&, R a, R, R* s) {
        R b = s[0];
        s[0] = a;
        return b;
    }

    template <class R>
    EF_FN static void accumulate(const Hyper&, R, R, const R*, double*) {}
};
