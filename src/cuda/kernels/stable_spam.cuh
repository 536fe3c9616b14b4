// Stable-SPAM: the CUDA twin of src/rules/stable_spam.rs (same coefficients, same per-element
// operation order, the same three read-only passes; checked against it on the CPU by
// tests/test_cuda_sources.py).
#pragma once
#include "common.cuh"

template <bool AMSGRAD, bool RESET, bool CLEAN, bool DECAY, bool CAUTION>
struct StableSpam {
    template <class R>
    struct Coeffs {
        R tau, max, norm, target;
        bool rescale;
        R decay, beta1, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, neg_step, caution;
    };

    // stable_spam.rs `norms`: out = {k, m_max, tau, n, c, m_norm, v_norm}.
    EF_FN static void norms(const EfHyper& h, const double* sc, const double* sums, double* out) {
        double k = sc[0] + 1.0;
        double m_max = h.theta * sc[1] + (1.0 - h.theta) * sums[0];
        double tau = m_max / (1.0 - EF_POW_D(h.theta, k));
        double n = EF_SQRT_D(sums[1]);
        double m_norm = h.gamma1 * sc[2] + (1.0 - h.gamma1) * n;
        double v_norm = h.gamma2 * sc[3] + (1.0 - h.gamma2) * sums[1];
        double m_hat = m_norm / (1.0 - EF_POW_D(h.gamma1, k));
        double v_hat = v_norm / (1.0 - EF_POW_D(h.gamma2, k));
        out[0] = k;
        out[1] = m_max;
        out[2] = tau;
        out[3] = n;
        out[4] = m_hat / (EF_SQRT_D(v_hat) + h.eps);
        out[5] = m_norm;
        out[6] = v_norm;
    }

    template <class R>
    EF_FN static R clipped(R g, R tau, R max) { return ef_abs(g) > tau ? g / max * tau : g; }

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double* scalars, const double* sums) {
        double x[7];
        norms(h, scalars, sums, x);
        double k = RESET ? 1.0 : x[0];
        scalars[0] = k;
        scalars[1] = x[1];
        scalars[2] = x[5];
        scalars[3] = x[6];
        double bc1 = 1.0 - EF_POW_D(h.beta1, k), bc2 = 1.0 - EF_POW_D(h.beta2, k);
        Coeffs<R> c;
        c.tau = R(x[2]);
        c.max = R(sums[0]);
        c.norm = R(x[3]);
        c.target = R(x[4]);
        c.rescale = x[3] > 0.0;
        c.decay = R(1.0 - h.lr * h.weight_decay);
        c.beta1 = R(h.beta1);
        c.one_minus_beta1 = R(1.0 - h.beta1);
        c.beta2 = R(h.beta2);
        c.one_minus_beta2 = R(1.0 - h.beta2);
        c.sqrt_bc2 = R(EF_SQRT_D(bc2));
        c.eps = R(h.eps);
        c.neg_step = R(-h.lr / bc1);
        const double counts[EF_MAX_SUMS] = {sums[2], sums[3], 0, 0};
        c.caution = CAUTION ? ef_caution_factor<R>(counts, h.caution_count != 0.0) : R(1);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        if (DECAY) p = p * c.decay;
        g = clipped(g, c.tau, c.max);
        if (c.rescale) g = g / c.norm * c.target;
        R m = (RESET && CLEAN) ? R(0) : s[0];
        R v = (RESET && CLEAN) ? R(0) : s[1];
        m = m * c.beta1 + c.one_minus_beta1 * g;
        v = v * c.beta2 + c.one_minus_beta2 * g * g;
        R denom_v = v;
        if (AMSGRAD) {
            s[2] = ef_max_nan(s[2], v);
            denom_v = s[2];
        }
        s[0] = (RESET && !CLEAN) ? R(0) : m;
        s[1] = (RESET && !CLEAN) ? R(0) : v;
        if (CAUTION) m = ef_cautious(m, g, c.caution);
        return p + c.neg_step * (m / (ef_sqrt(denom_v) / c.sqrt_bc2 + c.eps));
    }

    // Pass 0: the largest gradient magnitude.
    template <class R>
    EF_FN static void accumulate(const EfHyper&, R, R g, const R*, double* sums) {
        double a = (double)ef_abs(g);
        if (a > sums[0] || a != a) sums[0] = a;
    }

    // Pass 1: {tau, M}; pass 2 (caution): also the norm n and its target c.
    EF_FN static void prepare(const EfHyper& h, int pass, const double* sc, const double* sums, double* out) {
        double x[7];
        norms(h, sc, sums, x);
        out[0] = x[2];
        out[1] = sums[0];
        out[2] = pass == 1 ? 0.0 : x[3];
        out[3] = pass == 1 ? 0.0 : x[4];
    }

    // Pass 1: the squared norm of the clipped g; pass 2: count φ for the new m.
    template <class R>
    EF_FN static void accumulate_after(const EfHyper& h, int pass, const R* prior, R, R g, const R* s, double* sums) {
        g = clipped(g, prior[0], prior[1]);
        if (pass == 1) {
            double x = (double)g;
            sums[1] += x * x;
        } else if (CAUTION) {
            if (prior[2] > R(0)) g = g / prior[2] * prior[3];
            R m = (RESET && CLEAN) ? R(0) : s[0];
            m = m * R(h.beta1) + R(1.0 - h.beta1) * g;
            sums[2] += m * g > R(0) ? 1.0 : 0.0;
            sums[3] += 1.0;
        }
    }
};
