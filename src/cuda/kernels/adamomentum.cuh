// AdaMomentum: the CUDA twin of src/rules/adamomentum.rs (same coefficients, same per-element
// operation order; checked against it on the CPU by tests/test_cuda_sources.py).
#pragma once
#include "common.cuh"

template <bool DECOUPLE, bool CAUTION>
struct AdaMomentum {
    template <class R>
    struct Coeffs {
        R decay, l2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bc2_sqrt, neg_step_size, caution;
    };

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double* scalars, const double* sums) {
        double bc1, bc2;
        ef_next_step(scalars, h.beta1, h.beta2, &bc1, &bc2);
        Coeffs<R> c;
        c.decay = R(DECOUPLE ? 1.0 - h.decay_lr * h.weight_decay : 1.0);
        c.l2 = R(DECOUPLE ? 0.0 : h.weight_decay);
        c.beta1 = R(h.beta1);
        c.one_minus_beta1 = R(1.0 - h.beta1);
        c.beta2 = R(h.beta2);
        c.one_minus_beta2 = R(1.0 - h.beta2);
        c.eps = R(h.eps);
        c.bc2_sqrt = R(EF_SQRT_D(bc2));
        c.neg_step_size = R(-(h.lr / bc1));
        c.caution = CAUTION ? ef_caution_factor<R>(sums, h.caution_count != 0.0) : R(1);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        if (DECOUPLE) {
            p = p * c.decay;
        } else {
            g = g + c.l2 * p;
        }
        R m = s[0] * c.beta1 + c.one_minus_beta1 * g;
        R v = s[1] * c.beta2 + c.one_minus_beta2 * m * m + c.eps;
        s[0] = m;
        s[1] = v;
        if (CAUTION) m = ef_cautious(m, g, c.caution);
        return p + c.neg_step_size * m / (ef_sqrt(v) / c.bc2_sqrt);
    }

    // With caution: count φ for the new m (adamomentum.rs `accumulate`).
    template <class R>
    EF_FN static void accumulate(const EfHyper& h, R p, R g, const R* s, double* sums) {
        if (CAUTION) {
            if (!DECOUPLE) g = g + R(h.weight_decay) * p;
            ef_cautious_count_momentum(s[0], g, h.beta1, sums);
        }
    }
};
