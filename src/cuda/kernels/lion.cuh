// Lion and Cautious Lion: the CUDA twin of src/rules/lion.rs (same coefficients, same
// per-element operation order; checked against it on the CPU by tests/test_cuda_sources.py).
// The cautious sums are counts, exact in double, so the device's order of addition cannot change
// them.
#pragma once
#include "common.cuh"

template <bool CAUTION, bool COUNT>
struct Lion {
    template <class R>
    struct Coeffs {
        R decay, beta1, one_minus_beta1, beta2, one_minus_beta2, neg_lr, caution;
    };

    // sign(m·β1 + g·(1 − β1)), identical in both passes.
    template <class R>
    EF_FN static R direction(R beta1, R one_minus_beta1, R m, R g) {
        return ef_sign(m * beta1 + g * one_minus_beta1);
    }

    template <class R>
    EF_FN static void accumulate(const EfHyper& h, R, R g, const R* s, double* sums) {
        R u = direction<R>(R(h.beta1), R(1.0 - h.beta1), s[0], g);
        sums[0] += (u * g > R(0)) ? 1.0 : 0.0;
        sums[1] += 1.0;
    }

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double*, const double* sums) {
        R agree = R(sums[0]), n = R(sums[1]);
        Coeffs<R> c;
        if (!CAUTION) {
            c.caution = R(1);
        } else if (COUNT) {
            c.caution = n / (agree + R(1));
        } else {
            c.caution = R(1) / ef_max_nan(agree / n, R(1e-3));
        }
        c.decay = R(1.0 - h.lr * h.weight_decay);
        c.beta1 = R(h.beta1);
        c.one_minus_beta1 = R(1.0 - h.beta1);
        c.beta2 = R(h.beta2);
        c.one_minus_beta2 = R(1.0 - h.beta2);
        c.neg_lr = R(-h.lr);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        p = p * c.decay;
        R dir = direction<R>(c.beta1, c.one_minus_beta1, s[0], g);
        if (CAUTION) dir = dir * (dir * g > R(0) ? c.caution : R(0));
        s[0] = s[0] * c.beta2 + c.one_minus_beta2 * g;
        return p + c.neg_lr * dir;
    }
};
