// MoMo: the CUDA twin of src/rules/momo.rs `Momo` (same coefficients, same per-element operation
// order; checked against it on the CPU by tests/test_cuda_sources.py). The Polyak step size tau
// arrives as a hyper-parameter, computed by the Python layer from this rule's sums. CAUTION: the
// Cautious mask on d, from the counts in sums 3 and 4.
#pragma once
#include "common.cuh"

template <bool CAUTION>
struct Momo {
    template <class R>
    struct Coeffs {
        R keep, take, neg_tau, divisor, caution;
    };

    template <class R>
    EF_FN static void accumulate(const EfHyper& h, R p, R g, const R* s, double* sums) {
        R d = s[0] * R(h.keep) + R(h.take) * g;
        double pd = (double)p, dd = (double)d;
        sums[0] += pd * (double)g;
        sums[1] += pd * dd;
        sums[2] += dd * dd;
        if (CAUTION) ef_cautious_count(d, g, sums + 3);
    }

    // scalars[0]: the parameter's grad_dot_w (γ), updated from sums[0] = <p, g>.
    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double* scalars, const double* sums) {
        scalars[0] = h.keep * scalars[0] + h.take * sums[0];
        Coeffs<R> c;
        c.keep = R(h.keep);
        c.take = R(h.take);
        c.neg_tau = R(-h.tau);
        c.divisor = R(h.divisor);
        c.caution = CAUTION ? ef_caution_factor<R>(sums + 3, h.caution_count != 0.0) : R(1);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        R d = s[0] * c.keep + c.take * g;
        s[0] = d;
        R u = !CAUTION ? d : ef_cautious(d, g, c.caution);
        return (p + c.neg_tau * u) / c.divisor;
    }
};
