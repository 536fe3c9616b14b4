// AdaBound / AMSBound / AdaBoundW (DECOUPLED): the CUDA twin of src/rules/adabound.rs (same coefficients, same
// per-element operation order; checked against it on the CPU by tests/test_cuda_sources.py).
#pragma once
#include "common.cuh"

template <bool AMSBOUND, bool L2, bool DECOUPLED, bool CAUTION>
struct AdaBound {
    template <class R>
    struct Coeffs {
        R weight_decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, lower, upper, caution;
    };

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double* scalars, const double* sums) {
        double bc1, bc2;
        ef_next_step(scalars, h.beta1, h.beta2, &bc1, &bc2);
        double t = scalars[0];
        double final_lr = h.final_lr * h.lr / h.base_lr;
        Coeffs<R> c;
        c.weight_decay = R(h.weight_decay);
        c.beta1 = R(h.beta1);
        c.one_minus_beta1 = R(1.0 - h.beta1);
        c.beta2 = R(h.beta2);
        c.one_minus_beta2 = R(1.0 - h.beta2);
        c.eps = R(h.eps);
        c.step_size = R(h.lr * EF_SQRT_D(bc2) / bc1);
        c.lower = R(final_lr * (1.0 - 1.0 / (h.gamma * t + 1.0)));
        c.upper = R(final_lr * (1.0 + 1.0 / (h.gamma * t)));
        c.caution = CAUTION ? ef_caution_factor<R>(sums, h.caution_count != 0.0) : R(1);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        if (L2) g = g + c.weight_decay * p;
        R m = s[0] * c.beta1 + c.one_minus_beta1 * g;
        R v = s[1] * c.beta2 + c.one_minus_beta2 * g * g;
        s[0] = m;
        s[1] = v;
        R v_bar = v;
        if (AMSBOUND) {
            s[2] = ef_max_nan(s[2], v);
            v_bar = s[2];
        }
        R step = ef_min_nan(ef_max_nan(c.step_size / (ef_sqrt(v_bar) + c.eps), c.lower), c.upper);
        if (CAUTION) m = ef_cautious(m, g, c.caution);
        R stepped = p + -(step * m);
        return DECOUPLED ? stepped - c.weight_decay * p : stepped;
    }

    // With caution: count φ for the new m (adabound.rs `accumulate`).
    template <class R>
    EF_FN static void accumulate(const EfHyper& h, R p, R g, const R* s, double* sums) {
        if (CAUTION) {
            if (L2) g = g + R(h.weight_decay) * p;
            ef_cautious_count_momentum(s[0], g, h.beta1, sums);
        }
    }
};
