// Adan: the CUDA twin of src/rules/adan.rs (same coefficients, same per-element operation order;
// checked against it on the CPU by tests/test_cuda_sources.py).
#pragma once
#include "common.cuh"

template <bool NO_PROX, bool FIRST, bool CAUTION>
struct Adan {
    template <class R>
    struct Coeffs {
        R clip, beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3, bc3_sqrt, eps, neg_step,
            neg_step_diff, decay, prox, dir_m, dir_v, caution;
    };

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double*, const double* sums) {
        double k = h.step;
        double bc1 = 1.0 - EF_POW_D(h.beta1, k);
        double bc2 = 1.0 - EF_POW_D(h.beta2, k);
        double bc3 = 1.0 - EF_POW_D(h.beta3, k);
        double lr_wd = h.lr * h.weight_decay;
        Coeffs<R> c;
        c.clip = R(h.clip);
        c.beta1 = R(h.beta1);
        c.one_minus_beta1 = R(1.0 - h.beta1);
        c.beta2 = R(h.beta2);
        c.one_minus_beta2 = R(1.0 - h.beta2);
        c.beta3 = R(h.beta3);
        c.one_minus_beta3 = R(1.0 - h.beta3);
        c.bc3_sqrt = R(EF_SQRT_D(bc3));
        c.eps = R(h.eps);
        c.neg_step = R(-(h.lr / bc1));
        c.neg_step_diff = R(-(h.lr * h.beta2 / bc2));
        c.decay = R(1.0 - lr_wd);
        c.prox = R(1.0 + lr_wd);
        c.dir_m = R(h.dir_m);
        c.dir_v = R(h.dir_v);
        c.caution = CAUTION ? ef_caution_factor<R>(sums, h.caution_count != 0.0) : R(1);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        g = g * c.clip;
        R neg_prev = FIRST ? -g : s[3];
        R diff = neg_prev + g;
        R m = s[0] * c.beta1 + c.one_minus_beta1 * g;
        R v = s[2] * c.beta2 + c.one_minus_beta2 * diff;
        R u = diff * c.beta2 + g;
        R n = s[1] * c.beta3 + c.one_minus_beta3 * u * u;
        s[0] = m;
        s[1] = n;
        s[2] = v;
        s[3] = -g;
        R denom = ef_sqrt(n) / c.bc3_sqrt + c.eps;
        if (CAUTION) {
            R k = (m * c.dir_m + v * c.dir_v) * g > R(0) ? c.caution : R(0);
            m = m * k;
            v = v * k;
        }
        if (NO_PROX) {
            p = p * c.decay;
            p = p + c.neg_step * m / denom;
            return p + c.neg_step_diff * v / denom;
        } else {
            p = p + c.neg_step * m / denom;
            p = p + c.neg_step_diff * v / denom;
            return p / c.prox;
        }
    }

    // With caution: count φ for the new direction (adan.rs `accumulate`).
    template <class R>
    EF_FN static void accumulate(const EfHyper& h, R, R g, const R* s, double* sums) {
        if (CAUTION) {
            g = g * R(h.clip);
            R diff = FIRST ? R(0) : s[3] + g;
            R m = s[0] * R(h.beta1) + R(1.0 - h.beta1) * g;
            R v = s[2] * R(h.beta2) + R(1.0 - h.beta2) * diff;
            ef_cautious_count(m * R(h.dir_m) + v * R(h.dir_v), g, sums);
        }
    }
};
