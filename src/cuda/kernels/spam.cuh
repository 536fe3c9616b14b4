// SPAM: the CUDA twin of src/rules/spam.rs (same coefficients, same per-element operation order;
// checked against it on the CPU by tests/test_cuda_sources.py).
#pragma once
#include "common.cuh"

template <bool RESET, bool CLIP, bool CORRECT_BIAS, bool DECAY, bool CAUTION>
struct Spam {
    template <class R>
    struct Coeffs {
        R threshold, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, neg_step, neg_lr_wd, caution;
    };

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double* scalars, const double* sums) {
        scalars[0] += 1.0;
        double k = scalars[0];
        double step_size = CORRECT_BIAS ? h.lr * EF_SQRT_D(1.0 - EF_POW_D(h.beta2, k)) / (1.0 - EF_POW_D(h.beta1, k)) : h.lr;
        Coeffs<R> c;
        c.threshold = R(h.threshold);
        c.beta1 = R(h.beta1);
        c.one_minus_beta1 = R(1.0 - h.beta1);
        c.beta2 = R(h.beta2);
        c.one_minus_beta2 = R(1.0 - h.beta2);
        c.eps = R(h.eps);
        c.neg_step = R(-step_size * h.scale);
        c.neg_lr_wd = R(-h.lr * h.weight_decay);
        c.caution = CAUTION ? ef_caution_factor<R>(sums, h.caution_count != 0.0) : R(1);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        R m = RESET ? R(0) : s[0];
        R v = RESET ? R(0) : s[1];
        if (CLIP && g * g > c.threshold * v) g = ef_sign(g) * ef_sqrt(v * c.threshold);
        m = m * c.beta1 + c.one_minus_beta1 * g;
        v = v * c.beta2 + c.one_minus_beta2 * g * g;
        s[0] = m;
        s[1] = v;
        if (CAUTION) m = ef_cautious(m, g, c.caution);
        p = p + c.neg_step * (m / (ef_sqrt(v) + c.eps));
        if (DECAY) return p + c.neg_lr_wd * p;
        return p;
    }

    // With caution: count φ for the new m (spam.rs `accumulate`).
    template <class R>
    EF_FN static void accumulate(const EfHyper& h, R, R g, const R* s, double* sums) {
        if (CAUTION) {
            R m = RESET ? R(0) : s[0];
            R v = RESET ? R(0) : s[1];
            if (CLIP && g * g > R(h.threshold) * v) g = ef_sign(g) * ef_sqrt(v * R(h.threshold));
            ef_cautious_count_momentum(m, g, h.beta1, sums);
        }
    }
};
