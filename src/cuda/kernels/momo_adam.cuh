// MoMo-Adam: the CUDA twin of src/rules/momo.rs `MomoAdam` (same coefficients, same per-element
// operation order; checked against it on the CPU by tests/test_cuda_sources.py). The Polyak step
// size tau arrives as a hyper-parameter, computed by the Python layer from this rule's sums.
// CAUTION: the Cautious mask on d / D, from the counts in sums 3 and 4.
#pragma once
#include "common.cuh"

template <bool CAUTION>
struct MomoAdam {
    template <class R>
    struct Coeffs {
        R beta1, one_minus_beta1, beta2, one_minus_beta2, bias_correction2, eps, neg_tau, decay, divisor, caution;
    };

    template <class R>
    EF_FN static Coeffs<R> coefficients(const EfHyper& h) {
        Coeffs<R> c;
        c.beta1 = R(h.beta1);
        c.one_minus_beta1 = R(1.0 - h.beta1);
        c.beta2 = R(h.beta2);
        c.one_minus_beta2 = R(1.0 - h.beta2);
        c.bias_correction2 = R(h.bias_correction2);
        c.eps = R(h.eps);
        c.neg_tau = R(-h.tau);
        c.decay = R(h.decay);
        c.divisor = R(h.divisor);
        c.caution = R(1);
        return c;
    }

    // The new d and v into s_new, and d / D.
    template <class R>
    EF_FN static R moments(const Coeffs<R>& c, R g, const R* s, R* s_new) {
        R d = s[0] * c.beta1 + c.one_minus_beta1 * g;
        R v = s[1] * c.beta2 + c.one_minus_beta2 * (g * g);
        s_new[0] = d;
        s_new[1] = v;
        return d / (ef_sqrt(v / c.bias_correction2) + c.eps);
    }

    template <class R>
    EF_FN static void accumulate(const EfHyper& h, R p, R g, const R* s, double* sums) {
        R m[2];
        R d_over = moments<R>(coefficients<R>(h), g, s, m);
        double pd = (double)p, dd = (double)m[0];
        sums[0] += pd * (double)g;
        sums[1] += pd * dd;
        sums[2] += dd * (double)d_over;
        if (CAUTION) ef_cautious_count(d_over, g, sums + 3);
    }

    // scalars[0]: the parameter's step (incremented); scalars[1]: its grad_dot_w (γ).
    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double* scalars, const double* sums) {
        scalars[0] += 1.0;
        scalars[1] = h.beta1 * scalars[1] + (1.0 - h.beta1) * sums[0];
        Coeffs<R> c = coefficients<R>(h);
        if (CAUTION) c.caution = ef_caution_factor<R>(sums + 3, h.caution_count != 0.0);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        R d_over = moments<R>(c, g, s, s);
        R u = !CAUTION ? d_over : ef_cautious(d_over, g, c.caution);
        return (p * c.decay + c.neg_tau * u) / c.divisor;
    }
};
