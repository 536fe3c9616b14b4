// AdaBelief (with amsgrad, decoupled decay, rectification): the CUDA twin of
// src/rules/adabelief.rs (same per-tensor regime choice and coefficients, same per-element
// operation order; checked against it on the CPU by tests/test_cuda_sources.py).
#pragma once
#include "common.cuh"

template <bool AMSGRAD, bool DECOUPLE, bool RECTIFY, bool CAUTION>
struct AdaBelief {
    template <class R>
    struct Coeffs {
        R decay, l2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step, div, add, caution;
    };

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double* scalars, const double* sums) {
        double bc1, bc2;
        ef_next_step(scalars, h.beta1, h.beta2, &bc1, &bc2);
        double t = scalars[0];
        double step, div, add;
        if (!RECTIFY) {
            step = -(h.lr / bc1);
            div = EF_SQRT_D(bc2);
            add = h.eps;
        } else {
            // adabelief.rs `rectified_step`
            double beta2_t = EF_POW_D(h.beta2, t);
            double n_sma_max = 2.0 / (1.0 - h.beta2) - 1.0;
            double n_sma = n_sma_max - 2.0 * t * beta2_t / (1.0 - beta2_t);
            if (n_sma >= 5.0) {
                double r = (1.0 - beta2_t) * (n_sma - 4.0) / (n_sma_max - 4.0) * (n_sma - 2.0) / n_sma * n_sma_max /
                           (n_sma_max - 2.0);
                double s = EF_SQRT_D(r) / bc1;
                step = -s * h.lr;
                div = 1.0;
                add = h.eps;
            } else if (h.degenerated_to_sgd != 0.0) {
                double s = 1.0 / bc1;
                step = -s * h.lr;
                div = ef_inf_d();
                add = 1.0;
            } else {
                step = 0.0;
                div = ef_inf_d();
                add = 1.0;
            }
        }
        Coeffs<R> c;
        c.decay = R(DECOUPLE ? 1.0 - h.decay_lr * h.weight_decay : 1.0);
        c.l2 = R(DECOUPLE ? 0.0 : h.weight_decay);
        c.beta1 = R(h.beta1);
        c.one_minus_beta1 = R(1.0 - h.beta1);
        c.beta2 = R(h.beta2);
        c.one_minus_beta2 = R(1.0 - h.beta2);
        c.eps = R(h.eps);
        c.step = R(step);
        c.div = R(div);
        c.add = R(add);
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
        R r = g - m;
        R v = s[1] * c.beta2 + c.one_minus_beta2 * r * r + c.eps;
        s[0] = m;
        s[1] = v;
        if (AMSGRAD) s[2] = ef_max_nan(s[2], v);
        R x = (AMSGRAD && !RECTIFY) ? s[2] : v;
        if (CAUTION) m = ef_cautious(m, g, c.caution);
        return p + c.step * m / (ef_sqrt(x) / c.div + c.add);
    }

    // With caution: count φ for the new m (adabelief.rs `accumulate`).
    template <class R>
    EF_FN static void accumulate(const EfHyper& h, R p, R g, const R* s, double* sums) {
        if (CAUTION) {
            if (!DECOUPLE) g = g + R(h.weight_decay) * p;
            ef_cautious_count_momentum(s[0], g, h.beta1, sums);
        }
    }
};
