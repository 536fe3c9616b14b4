// AdaHessian: the CUDA twin of src/rules/adahessian.rs (same coefficients, same per-element
// operation order; checked against it on the CPU by tests/test_cuda_sources.py). Slot 2, the
// Hutchinson estimate `hessian`, is only read (the rule writes two slots). CAUTION: the Cautious
// mask on the new first moment, from the per-tensor counts of the sums pass.
#pragma once
#include "common.cuh"

template <bool SQRT, bool CAUTION>
struct AdaHessian {
    template <class R>
    struct Coeffs {
        R decay, beta1, one_minus_beta1, beta2, one_minus_beta2, bc2, half_power, eps, neg_step_size, caution;
    };

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double* scalars, const double* sums) {
        double bc1, bc2;
        ef_next_step(scalars, h.beta1, h.beta2, &bc1, &bc2);
        Coeffs<R> c;
        c.decay = R(1.0 - h.lr * h.weight_decay);
        c.beta1 = R(h.beta1);
        c.one_minus_beta1 = R(1.0 - h.beta1);
        c.beta2 = R(h.beta2);
        c.one_minus_beta2 = R(1.0 - h.beta2);
        c.bc2 = R(bc2);
        c.half_power = R(h.hessian_power / 2.0);
        c.eps = R(h.eps);
        c.neg_step_size = R(-h.lr / bc1);
        c.caution = CAUTION ? ef_caution_factor<R>(sums, h.caution_count != 0.0) : R(1);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        p = p * c.decay;
        R m = s[0] * c.beta1 + c.one_minus_beta1 * g;
        R v = s[1] * c.beta2 + c.one_minus_beta2 * s[2] * s[2];
        s[0] = m;
        s[1] = v;
        R r = v / c.bc2;
        R d = (SQRT ? ef_sqrt(r) : ef_pow(r, c.half_power)) + c.eps;
        R m_step = !CAUTION ? m : ef_cautious(m, g, c.caution);
        return p + c.neg_step_size * (m_step / d);
    }

    template <class R>
    EF_FN static void accumulate(const EfHyper& h, R, R g, const R* s, double* sums) {
        if (CAUTION) ef_cautious_count_momentum(s[0], g, h.beta1, sums);
    }
};
