// Adam / AdamW / AMSGrad, optionally cautious and with a fused model EMA in the last slot: the CUDA twin of
// src/rules/adam.rs (same coefficients, same per-element operation order; checked against it on
// the CPU by tests/test_cuda_sources.py).
#pragma once
#include "common.cuh"

template <bool AMSGRAD, bool DECOUPLED, bool EMA, bool CAUTION>
struct Adam {
    template <class R>
    struct Coeffs {
        R decay, l2;
        EfLerp<R> m_lerp;
        R beta2, one_minus_beta2, bc2_sqrt, neg_step_size, eps;
        EfLerp<R> ema;
        R caution;
    };

    // The gradient the moments see: with L2 decay (Adam), g + wd·p.
    template <class R>
    EF_FN static R moment_input(R l2, R p, R g) {
        return DECOUPLED ? g : g + l2 * p;
    }

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double* scalars, const double* sums) {
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
        c.caution = CAUTION ? ef_caution_factor<R>(sums, h.caution_count != 0.0) : R(1);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        if (DECOUPLED) {
            p = p * c.decay;
        } else {
            g = moment_input<R>(c.l2, p, g);
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
        R m_step = !CAUTION ? m : ef_cautious(m, g, c.caution);
        p = p + c.neg_step_size * m_step / denom;
        if (EMA) {
            const int k = AMSGRAD ? 3 : 2;
            s[k] = c.ema.apply(s[k], p);
        }
        return p;
    }

    template <class R>
    EF_FN static void accumulate(const EfHyper& h, R p, R g, const R* s, double* sums) {
        g = moment_input<R>(R(h.weight_decay), p, g);
        ef_cautious_count(EfLerp<R>::make(1.0 - h.beta1).apply(s[0], g), g, sums);
    }
};
