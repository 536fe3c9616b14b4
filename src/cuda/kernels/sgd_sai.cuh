// SGD-SaI: the CUDA twin of src/rules/sgd_sai.rs (same coefficients, same per-element operation
// order; checked against it on the CPU by tests/test_cuda_sources.py). On the first step the
// sums pass gathers Σg, Σg² and n in double; on the device their order of addition differs from
// the CPU engine's, so gsnr (and the step) can differ from the CPU's in the last bits.
#pragma once
#include "common.cuh"

template <bool MOMENTUM, bool FIRST, bool CAUTION>
struct SgdSai {
    template <class R>
    struct Coeffs {
        R momentum, one_minus_momentum, decay, neg_step, caution;
    };

    // gsnr of a tensor from its sums (Σg, Σg², n): ‖g‖ / (unbiased std + eps).
    EF_FN static double gsnr(double sum, double sum_sq, double n, double eps) {
        double sigma = 0.0;
        if (n > 1.0) {
            double var = (sum_sq - sum * sum / n) / (n - 1.0);
            sigma = EF_SQRT_D(var > 0.0 ? var : 0.0);  // f64::max(var, 0): NaN and negatives give 0
        }
        if (sigma != sigma) sigma = 0.0;
        return EF_SQRT_D(sum_sq) / (sigma + eps);
    }

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double* scalars, const double* sums) {
        if (FIRST) scalars[0] = CAUTION ? gsnr(sums[2], sums[3], sums[1], h.eps) : gsnr(sums[0], sums[1], sums[2], h.eps);
        Coeffs<R> c;
        c.momentum = R(h.momentum);
        c.one_minus_momentum = R(1.0 - h.momentum);
        c.decay = R(1.0 - h.weight_decay * h.lr);
        c.neg_step = R(-(h.lr * scalars[0]));
        c.caution = CAUTION ? ef_caution_factor<R>(sums, h.caution_count != 0.0) : R(1);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        R b = (!MOMENTUM || FIRST) ? g : s[0] * c.momentum + c.one_minus_momentum * g;
        if (MOMENTUM) s[0] = b;
        if (CAUTION) b = ef_cautious(b, g, c.caution);
        return p * c.decay + c.neg_step * b;
    }

    // sgd_sai.rs `accumulate`: [Σφ, n] with caution, then on the first step Σg, Σg² (without
    // caution: [Σg, Σg², n]).
    template <class R>
    EF_FN static void accumulate(const EfHyper& h, R, R g, const R* s, double* sums) {
        if (CAUTION) {
            R b = (!MOMENTUM || FIRST) ? g : s[0] * R(h.momentum) + R(1.0 - h.momentum) * g;
            ef_cautious_count(b, g, sums);
        }
        if (FIRST) {
            const int at = CAUTION ? 2 : 0;
            double gd = (double)g;
            sums[at] += gd;
            sums[at + 1] += gd * gd;
            if (!CAUTION) sums[2] += 1.0;
        }
    }
};
