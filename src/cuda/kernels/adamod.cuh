// AdaMod: the CUDA twin of src/rules/adamod.rs (same coefficients, same per-element operation
// order; checked against it on the CPU by tests/test_cuda_sources.py).
#pragma once
#include "common.cuh"

template <bool CAUTION>
struct AdaMod {
    template <class R>
    struct Coeffs {
        R beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3, eps, step_size, neg_decay, caution;
    };

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double* scalars, const double* sums) {
        double bc1, bc2;
        ef_next_step(scalars, h.beta1, h.beta2, &bc1, &bc2);
        Coeffs<R> c;
        c.beta1 = R(h.beta1);
        c.one_minus_beta1 = R(1.0 - h.beta1);
        c.beta2 = R(h.beta2);
        c.one_minus_beta2 = R(1.0 - h.beta2);
        c.beta3 = R(h.beta3);
        c.one_minus_beta3 = R(1.0 - h.beta3);
        c.eps = R(h.eps);
        c.step_size = R(h.lr * EF_SQRT_D(bc2) / bc1);
        c.neg_decay = R(-h.weight_decay * h.lr);
        c.caution = CAUTION ? ef_caution_factor<R>(sums, h.caution_count != 0.0) : R(1);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        R m = s[0] * c.beta1 + c.one_minus_beta1 * g;
        R v = s[1] * c.beta2 + c.one_minus_beta2 * g * g;
        p = p + c.neg_decay * p;
        R eta = c.step_size / (ef_sqrt(v) + c.eps);
        R bound = s[2] * c.beta3 + c.one_minus_beta3 * eta;
        s[0] = m;
        s[1] = v;
        s[2] = bound;
        if (CAUTION) m = ef_cautious(m, g, c.caution);
        return p - ef_min_nan(eta, bound) * m;
    }

    // With caution: count φ for the new m (adamod.rs `accumulate`).
    template <class R>
    EF_FN static void accumulate(const EfHyper& h, R, R g, const R* s, double* sums) {
        if (CAUTION) {
            ef_cautious_count_momentum(s[0], g, h.beta1, sums);
        }
    }
};
