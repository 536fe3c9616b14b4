// Adam / AdamW / AMSGrad, optionally with a fused model EMA in the last slot: the CUDA twin of
// src/rules/adam.rs (same coefficients, same per-element operation order; checked against it on
// the CPU by tests/test_cuda_sources.py).
#pragma once
#include "common.cuh"

template <bool AMSGRAD, bool DECOUPLED, bool EMA>
struct Adam {
    template <class R>
    struct Coeffs {
        R decay, l2;
        EfLerp<R> m_lerp;
        R beta2, one_minus_beta2, bc2_sqrt, neg_step_size, eps;
        EfLerp<R> ema;
    };

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double* scalars, const double*) {
        double bc1, bc2;
        ef_next_step(scalars, h.beta1, h.beta2, &bc1, &bc2);
        Coeffs<R> c;
        c.decay = R(DECOUPLED ? 1.0 - h.lr * h.weight_decay : 1.0);
        c.l2 = R(DECOUPLED ? 0.0 : h.weight_decay);
        c.m_lerp = EfLerp<R>::make(1.0 - h.beta1);
        c.beta2 = R(h.beta2);
        c.one_minus_beta2 = R(1.0 - h.beta2);
        c.bc2_sqrt = R(EF_SQRT_D(bc2));
        c.neg_step_size = R(-(h.lr / bc1));
        c.eps = R(h.eps);
        c.ema = EfLerp<R>::make(h.ema_weight);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        if (DECOUPLED) {
            p = p * c.decay;
        } else {
            g = g + c.l2 * p;
        }
        R m = c.m_lerp.apply(s[0], g);
        R v = s[1] * c.beta2 + c.one_minus_beta2 * g * g;
        s[0] = m;
        s[1] = v;
        R v_hat = v;
        if (AMSGRAD) {
            s[2] = ef_max_nan(s[2], v);
            v_hat = s[2];
        }
        R denom = ef_sqrt(v_hat) / c.bc2_sqrt + c.eps;
        p = p + c.neg_step_size * m / denom;
        if (EMA) {
            const int k = AMSGRAD ? 3 : 2;
            s[k] = c.ema.apply(s[k], p);
        }
        return p;
    }

    template <class R>
    EF_FN static void accumulate(const EfHyper&, R, R, const R*, double*) {}
};
