// diffGrad: the CUDA twin of src/rules/diffgrad.rs (same coefficients, same per-element operation
// order; checked against it on the CPU by tests/test_cuda_sources.py). The friction's e^x is the
// device's expf/exp, which may differ from the CPU's libm in the last bit.
#pragma once
#include "common.cuh"

template <bool L2, bool CAUTION>
struct DiffGrad {
    template <class R>
    struct Coeffs {
        R weight_decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, neg_step, caution;
    };

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double* scalars, const double* sums) {
        double bc1, bc2;
        ef_next_step(scalars, h.beta1, h.beta2, &bc1, &bc2);
        Coeffs<R> c;
        c.weight_decay = R(h.weight_decay);
        c.beta1 = R(h.beta1);
        c.one_minus_beta1 = R(1.0 - h.beta1);
        c.beta2 = R(h.beta2);
        c.one_minus_beta2 = R(1.0 - h.beta2);
        c.eps = R(h.eps);
        c.neg_step = R(-(h.lr * EF_SQRT_D(bc2) / bc1));
        c.caution = CAUTION ? ef_caution_factor<R>(sums, h.caution_count != 0.0) : R(1);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        if (L2) g = g + c.weight_decay * p;
        R m = s[0] * c.beta1 + c.one_minus_beta1 * g;
        R v = s[1] * c.beta2 + c.one_minus_beta2 * g * g;
        R friction = R(1) / (R(1) + ef_exp(-ef_abs(s[2] - g)));
        s[0] = m;
        s[1] = v;
        s[2] = g;
        if (CAUTION) m = ef_cautious(m, g, c.caution);
        return p + c.neg_step * (m * friction) / (ef_sqrt(v) + c.eps);
    }

    // With caution: count φ for the new m (diffgrad.rs `accumulate`).
    template <class R>
    EF_FN static void accumulate(const EfHyper& h, R p, R g, const R* s, double* sums) {
        if (CAUTION) {
            if (L2) g = g + R(h.weight_decay) * p;
            ef_cautious_count_momentum(s[0], g, h.beta1, sums);
        }
    }
};
