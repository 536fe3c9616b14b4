// Lion and Cautious Lion: the CUDA twin of src/rules/lion.rs (same coefficients, same
// per-element operation order; checked against it on the CPU by tests/test_cuda_sources.py).
#pragma once
#include "common.cuh"

template <bool CAUTION>
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
        ef_cautious_count(direction<R>(R(h.beta1), R(1.0 - h.beta1), s[0], g), g, sums);
    }

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double*, const double* sums) {
        Coeffs<R> c;
        c.caution = CAUTION ? ef_caution_factor<R>(sums, h.caution_count != 0.0) : R(1);
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
