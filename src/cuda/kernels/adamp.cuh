// AdamP: the CUDA twin of src/rules/adamp.rs (same coefficients, same per-element operation order;
// checked against it on the CPU by tests/test_cuda_sources.py, the row sums included). The sums are
// gathered per row and folded per tensor (fold_row, row_coeffs), which the CUDA launcher does not do
// yet: it refuses rules with row sums, so this header runs in the host checks only today.
#pragma once
#include "common.cuh"

template <bool NESTEROV, bool DECAY>
struct AdamP {
    template <class R>
    struct Coeffs {
        R beta1, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, neg_step, decay, proj;
        bool by_row;
    };

    // |<g,p>| / (max(|g|, eps) * max(|p|, eps)) from the sums {<g,p>, |g|^2, |p|^2, ...}.
    EF_FN static double cosine(const EfHyper& h, const double* s) {
        const double gn = EF_SQRT_D(s[1]), pn = EF_SQRT_D(s[2]);  // max(., eps) as Rust's f64::max
        return ef_abs(s[0]) / ((gn > h.eps ? gn : h.eps) * (pn > h.eps ? pn : h.eps));
    }

    // <p,u> / (|p| + eps)^2.
    EF_FN static double radial(const EfHyper& h, const double* s) {
        const double norm = EF_SQRT_D(s[2]) + h.eps;
        return s[3] / (norm * norm);
    }

    // The coefficients before the projection is decided, from the step's bias corrections.
    template <class R>
    EF_FN static Coeffs<R> base(const EfHyper& h, double bc1, double bc2) {
        Coeffs<R> c;
        c.beta1 = R(h.beta1);
        c.one_minus_beta1 = R(1.0 - h.beta1);
        c.beta2 = R(h.beta2);
        c.one_minus_beta2 = R(1.0 - h.beta2);
        c.sqrt_bc2 = R(EF_SQRT_D(bc2));
        c.eps = R(h.eps);
        c.neg_step = R(-h.lr / bc1);
        c.decay = R(1.0 - h.lr * h.weight_decay);
        c.proj = R(0);
        c.by_row = false;
        return c;
    }

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double* scalars, const double* sums) {
        double bc1, bc2;
        ef_next_step(scalars, h.beta1, h.beta2, &bc1, &bc2);
        Coeffs<R> c = base<R>(h, bc1, bc2);
        bool channel = false, layer = false;
        if (sums[5] > 0.0) {
            channel = sums[4] < h.delta;
            layer = !channel && cosine(h, sums) * EF_SQRT_D(sums[5]) < h.delta;
        }
        if (channel || layer) {
            c.decay = R(1.0 - h.lr * h.weight_decay * h.wd_ratio);
            c.by_row = channel;
            if (layer) c.proj = R(radial(h, sums));
        }
        return c;
    }

    template <class R>
    EF_FN static R direction(const Coeffs<R>& c, R g, R* s) {
        R m = s[0] * c.beta1 + c.one_minus_beta1 * g;
        R v = s[1] * c.beta2 + c.one_minus_beta2 * g * g;
        s[0] = m;
        s[1] = v;
        R n = NESTEROV ? m * c.beta1 + c.one_minus_beta1 * g : m;
        return n / (ef_sqrt(v) / c.sqrt_bc2 + c.eps);
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        R u = direction(c, g, s) - c.proj * p;
        if (DECAY) p = p * c.decay;
        return p + c.neg_step * u;
    }

    // One row's sums {<g,p>, |g|^2, |p|^2, <p,u>} of `len` elements folded into its tensor's:
    // the four added, the largest cos_i * sqrt(len) kept, len counted.
    EF_FN static void fold_row(const EfHyper& h, const double* row, long long len, double* tensor) {
        for (int k = 0; k < 4; ++k) tensor[k] += row[k];
        const double cos = cosine(h, row) * EF_SQRT_D((double)len);
        if (cos > tensor[4] || cos != cos) tensor[4] = cos;
        tensor[5] += (double)len;
    }

    // A row's coefficients: its own radial coefficient under the channel view.
    template <class R>
    EF_FN static Coeffs<R> row_coeffs(const EfHyper& h, const Coeffs<R>& c, const double*, const double* row) {
        Coeffs<R> out = c;
        if (c.by_row) out.proj = R(radial(h, row));
        return out;
    }

    // Pass 0 gathers nothing.
    template <class R>
    EF_FN static void accumulate(const EfHyper&, R, R, const R*, double*) {}

    // Pass 1: the coefficients the direction needs, for the coming step.
    EF_FN static void prepare(const EfHyper& h, int, const double* sc, const double*, double* out) {
        double next[EF_MAX_SCALARS] = {sc[0]}, bc1, bc2;  // (the scalars are read only here)
        ef_next_step(next, h.beta1, h.beta2, &bc1, &bc2);
        Coeffs<double> c = base<double>(h, bc1, bc2);
        out[0] = c.beta1;
        out[1] = c.one_minus_beta1;
        out[2] = c.beta2;
        out[3] = c.one_minus_beta2;
        out[4] = c.sqrt_bc2;
        out[5] = c.eps;
    }

    // Pass 1: one row's <g,p>, |g|^2, |p|^2, <p,u>.
    template <class R>
    EF_FN static void accumulate_after(const EfHyper&, int, const R* prior, R p, R g, const R* s, double* sums) {
        Coeffs<R> c = {};
        c.beta1 = prior[0];
        c.one_minus_beta1 = prior[1];
        c.beta2 = prior[2];
        c.one_minus_beta2 = prior[3];
        c.sqrt_bc2 = prior[4];
        c.eps = prior[5];
        R st[2] = {s[0], s[1]};
        const double u = (double)direction(c, g, st), pd = (double)p, gd = (double)g;
        sums[0] += gd * pd;
        sums[1] += gd * gd;
        sums[2] += pd * pd;
        sums[3] += pd * u;
    }
};
