// Adafactor as Hugging Face transformers' Adafactor: the CUDA twin of src/rules/adafactor_hf.rs
// (same coefficients, same per-element operation order, the same factor update and reads; checked
// against it on the CPU by tests/test_cuda_sources.py, the factored statistics included). As for
// Adafactor, the CUDA launcher refuses rules with factored state today; the vector variants run.
#pragma once
#include "common.cuh"

template <bool FACTORED, bool FIRST_MOMENT, bool DECAY>
struct AdafactorHf {
    template <class R>
    struct Coeffs {
        R keep, take, eps1, step, beta1, one_minus_beta1, decay;
    };

    // The second moment's slot (not FACTORED): after exp_avg.
    static constexpr int V = FIRST_MOMENT ? 1 : 0;

    // The weight b of the old second moment at the step after `step` (HF's beta2t).
    EF_FN static double keep_of(const EfHyper& h, double step) { return 1.0 - EF_POW_D(step + 1.0, h.decay_rate); }

    // U: g times its row's and column's reads (FACTORED), else g / sqrt of the new variance,
    // which `v` receives.
    template <class R>
    EF_FN static R direction(R keep, R take, R eps1, R g, const R* s, R* v) {
        if (FACTORED) {
            const int f = FIRST_MOMENT ? 1 : 0;
            return s[f] * s[f + 1] * g;
        }
        *v = s[V] * keep + take * (g * g + eps1);
        return R(1) / ef_sqrt(*v) * g;
    }

    // {|p|^2, |U|^2, numel}.
    template <class R>
    EF_FN static void count(R keep, R take, R eps1, R p, R g, const R* s, double* sums) {
        R v;
        const double u = (double)direction(keep, take, eps1, g, s, &v), w = (double)p;
        sums[0] += w * w;
        sums[1] += u * u;
        sums[2] += 1.0;
    }

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double* scalars, const double* sums) {
        const double keep = keep_of(h, scalars[0]), t = scalars[0] + 1.0;
        const double root_n = EF_SQRT_D(sums[2]);
        const double rms = sums[2] > 0.0 ? EF_SQRT_D(sums[0]) / root_n : 0.0;
        scalars[0] = t;
        scalars[1] = rms;
        double rho = h.lr;
        if (h.relative_step != 0.0) {
            const double cap = h.warmup_init != 0.0 ? 1e-6 * t : 1e-2, inv = 1.0 / EF_SQRT_D(t);
            rho = inv < cap ? inv : cap;  // f64::min
        }
        const double alpha = h.scale_parameter != 0.0 ? (rms > h.eps2 ? rms : h.eps2) * rho : rho;  // f64::max
        const double clip = EF_SQRT_D(sums[1]) / root_n / h.clip_threshold;
        Coeffs<R> c;
        c.keep = R(keep);
        c.take = R(1.0 - keep);
        c.eps1 = R(h.eps1);
        c.step = R(alpha / (clip > 1.0 ? clip : 1.0));
        c.beta1 = R(h.beta1);
        c.one_minus_beta1 = R(1.0 - h.beta1);
        c.decay = R(1.0 - h.weight_decay * alpha);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        R v;
        R u = c.step * direction(c.keep, c.take, c.eps1, g, s, &v);
        if (!FACTORED) s[V] = v;
        if (FIRST_MOMENT) {
            s[0] = s[0] * c.beta1 + c.one_minus_beta1 * u;
            u = s[0];
        }
        if (DECAY) p = p * c.decay;
        return p - u;
    }

    // FACTORED: the sums in pass 0 (the factors are already new).
    template <class R>
    EF_FN static void accumulate(const EfHyper&, R p, R g, const R* s, double* sums) {
        if (FACTORED) count(R(0), R(0), R(0), p, g, s, sums);
    }

    // Not FACTORED: pass 1 reads the weights of the old second moment and of q, and eps1.
    EF_FN static void prepare(const EfHyper& h, int, const double* sc, const double*, double* out) {
        const double keep = keep_of(h, sc[0]);
        out[0] = keep;
        out[1] = 1.0 - keep;
        out[2] = h.eps1;
    }

    template <class R>
    EF_FN static void accumulate_after(const EfHyper&, int, const R* prior, R p, R g, const R* s, double* sums) {
        count(prior[0], prior[1], prior[2], p, g, s, sums);
    }

    // One element's part of its row's and its column's sums: q = g^2 + eps1 in R.
    template <class R>
    EF_FN static double factor_term(const EfHyper& h, R g) {
        return (double)(g * g + R(h.eps1));
    }

    // One tensor's factors (`matrices` matrices of n_rows x n_cols, one after another) from the
    // sums of q over their rows and columns: R <- b*R + (1 - b)*mean, the mean rounded to R first.
    template <class R>
    EF_FN static void update_factors(const EfHyper& h, const double* sc, long long matrices, long long n_rows, long long n_cols,
                                     const double* row_sums, const double* col_sums, R* rows, R* cols) {
        const double keep = keep_of(h, sc[0]);
        const R b = R(keep), one_minus_b = R(1.0 - keep);
        for (long long r = 0; r < matrices * n_rows; ++r) rows[r] = rows[r] * b + one_minus_b * R(row_sums[r] / (double)n_cols);
        for (long long c = 0; c < matrices * n_cols; ++c) cols[c] = cols[c] * b + one_minus_b * R(col_sums[c] / (double)n_rows);
    }

    // What the elements of one tensor read: rows 1/sqrt(R / mean of the matrix's R), columns
    // 1/sqrt(C).
    template <class R>
    EF_FN static void factor_reads(const EfHyper&, long long matrices, long long n_rows, long long n_cols, R* rows, R* cols) {
        for (long long m = 0; m < matrices; ++m) {
            double sum = 0.0;
            for (long long r = 0; r < n_rows; ++r) sum += (double)rows[m * n_rows + r];
            const R mean = R(sum / (double)n_rows);
            for (long long r = 0; r < n_rows; ++r) rows[m * n_rows + r] = R(1) / ef_sqrt(rows[m * n_rows + r] / mean);
        }
        for (long long c = 0; c < matrices * n_cols; ++c) cols[c] = R(1) / ef_sqrt(cols[c]);
    }
};
