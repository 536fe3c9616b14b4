// AdEMAMix: the CUDA twin of src/rules/ademamix.rs (same coefficients and warm-up schedules, same
// per-element operation order; checked against it on the CPU by tests/test_cuda_sources.py).
#pragma once
#include "common.cuh"

template <bool FAST, bool CAUTION>
struct AdEMAMix {
    template <class R>
    struct Coeffs {
        R beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3, bc1, bc2_sqrt, alpha, eps,
            weight_decay, neg_lr, caution;
    };

    // α at step t (ademamix.rs `alpha_at`).
    EF_FN static double alpha_at(double t, double alpha, double warmup) {
        if (t < warmup) {
            double a = t / warmup;
            return (1.0 - a) * 0.0 + a * alpha;
        }
        return alpha;
    }

    EF_FN static double half_life(double b) { return EF_LOG_D(0.5) / EF_LOG_D(b + 1e-8) - 1.0; }

    // β3 at step t (ademamix.rs `beta3_at`).
    EF_FN static double beta3_at(double t, double beta1, double beta3, double warmup) {
        if (t < warmup) {
            double a = t / warmup;
            double h = (1.0 - a) * half_life(beta1) + a * half_life(beta3);
            return EF_POW_D(0.5, 1.0 / (h + 1.0));
        }
        return beta3;
    }

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double* scalars, const double* sums) {
        scalars[0] += 1.0;
        double t = scalars[0];
        double beta3 = beta3_at(t, h.beta1, h.beta3, h.beta3_warmup);
        Coeffs<R> c;
        c.beta1 = R(h.beta1);
        c.one_minus_beta1 = R(1.0 - h.beta1);
        c.beta2 = R(h.beta2);
        c.one_minus_beta2 = R(1.0 - h.beta2);
        c.beta3 = R(beta3);
        c.one_minus_beta3 = R(1.0 - beta3);
        c.bc1 = R(1.0 - EF_POW_D(h.beta1, t));
        c.bc2_sqrt = R(EF_SQRT_D(1.0 - EF_POW_D(h.beta2, t)));
        c.alpha = R(alpha_at(t, h.alpha, h.alpha_warmup));
        c.eps = R(h.eps);
        c.weight_decay = R(h.weight_decay);
        c.neg_lr = R(-h.lr);
        c.caution = CAUTION ? ef_caution_factor<R>(sums, h.caution_count != 0.0) : R(1);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        const int fast = 0, slow = FAST ? 1 : 0, sq = FAST ? 2 : 1;
        R m1 = g;
        if (FAST) {
            m1 = s[fast] * c.beta1 + c.one_minus_beta1 * g;
            s[fast] = m1;
        }
        R m2 = s[slow] * c.beta3 + c.one_minus_beta3 * g;
        R v = s[sq] * c.beta2 + c.one_minus_beta2 * g * g;
        s[slow] = m2;
        s[sq] = v;
        R denom = ef_sqrt(v) / c.bc2_sqrt + c.eps;
        if (CAUTION) m1 = ef_cautious(m1, g, c.caution);
        R u = (m1 / c.bc1 + c.alpha * m2) / denom + c.weight_decay * p;
        return p + c.neg_lr * u;
    }

    // With caution: count φ for the new fast EMA (ademamix.rs `accumulate`).
    template <class R>
    EF_FN static void accumulate(const EfHyper& h, R, R g, const R* s, double* sums) {
        if (CAUTION) {
            R m1 = FAST ? s[0] * R(h.beta1) + R(1.0 - h.beta1) * g : g;
            ef_cautious_count(m1, g, sums);
        }
    }
};
