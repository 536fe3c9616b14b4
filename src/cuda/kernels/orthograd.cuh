// ⊥Grad around any rule that reads a gradient: the CUDA twin of src/rules/orthograd.rs (same
// sums, same coefficients in double, same per-element operation order; checked against it on the
// CPU by tests/test_cuda_sources.py). Part of every program: EF_RULE names it as
// OrthoGrad<Rule<flags...>, RESCALE> when a group asks for orthograd.
#pragma once
#include "common.cuh"

template <class Inner, bool RESCALE>
struct OrthoGrad {
    template <class R>
    struct Coeffs {
        typename Inner::template Coeffs<R> inner;
        double along, scale;  // u⊥ = (u − along·w)·scale, in double, rounded once
    };

    // ⟨w,u⟩, ⟨w,w⟩, ‖u‖², numel
    template <class R>
    EF_FN static void accumulate(const EfHyper&, R p, R g, const R*, double* sums) {
        double w = (double)p, u = (double)g;
        sums[0] += w * u;
        sums[1] += w * w;
        sums[2] += u * u;
        sums[3] += 1.0;
    }

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double* scalars, const double* sums) {
        double none[EF_MAX_SUMS] = {};
        Coeffs<R> c;
        c.inner = Inner::template coeffs<R>(h, scalars, none);
        double along = 0.0, scale = 1.0;
        if (sums[3] > 1.0) {  // a one-element tensor keeps its gradient
            along = sums[0] / (sums[1] + 1e-30);
            double perp2 = sums[2] - 2.0 * along * sums[0] + along * along * sums[1];
            double perp = EF_SQRT_D(perp2 > 0.0 ? perp2 : 0.0);
            if (RESCALE) scale = EF_SQRT_D(sums[2]) / (perp + 1e-30);
        }
        c.along = along;
        c.scale = scale;
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        return Inner::template update<R>(c.inner, p, R(((double)g - c.along * (double)p) * c.scale), s);
    }
};
