// Adafactor: the CUDA twin of src/rules/adafactor.rs (same coefficients, same per-element operation
// order, the same factor update and reads; checked against it on the CPU by
// tests/test_cuda_sources.py, the factored statistics included). The CUDA launcher does not gather
// row and column statistics yet: it refuses rules with factored state, so this header runs in the
// host checks only today.
#pragma once
#include "common.cuh"

template <bool FACTORED, bool DECAY>
struct Adafactor {
    template <class R>
    struct Coeffs {
        EfLerp<R> lerp;
        R floor, decay, neg_step;  // floor: of sqrt(V) (FACTORED: eps1), else of V (eps1^2)
    };

    // The weight of new data t^beta2_decay of the step after `step`.
    EF_FN static double weight(const EfHyper& h, double step) { return EF_POW_D(step + 1.0, h.beta2_decay); }

    // The floor of the estimate: eps1 for sqrt(V) (FACTORED), eps1^2 for V.
    EF_FN static double floor_of(const EfHyper& h) { return FACTORED ? h.eps1 : h.eps1 * h.eps1; }

    // U = g / sqrt(max(V, eps1^2)) from the estimate (FACTORED: sqrt(V), floored at eps1).
    template <class R>
    EF_FN static R direction(R floor, R estimate, R g) {
        return FACTORED ? R(1) / ef_max_nan(estimate, floor) * g : R(1) / ef_sqrt(ef_max_nan(estimate, floor)) * g;
    }

    // The estimate: sqrt(V), the row's read times the column's (FACTORED), else V, the new variance.
    template <class R>
    EF_FN static R estimate(const EfLerp<R>& lerp, R g, const R* s) { return FACTORED ? s[0] * s[1] : lerp.apply(s[0], g * g); }

    // {|p|^2, |U|^2, numel}.
    template <class R>
    EF_FN static void count(R floor, const EfLerp<R>& lerp, R p, R g, const R* s, double* sums) {
        const double u = (double)direction(floor, estimate(lerp, g, s), g), w = (double)p;
        sums[0] += w * w;
        sums[1] += u * u;
        sums[2] += 1.0;
    }

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double* scalars, const double* sums) {
        const double w = weight(h, scalars[0]), t = scalars[0] + 1.0;
        scalars[0] = t;
        const double root_n = EF_SQRT_D(sums[2]), rms = EF_SQRT_D(sums[0]) / root_n, inv = 1.0 / EF_SQRT_D(t);
        const double alpha = (rms > h.eps2 ? rms : h.eps2) * (inv < h.lr ? inv : h.lr);  // f64::max, f64::min
        const double clip = EF_SQRT_D(sums[1]) / (root_n * h.d);
        Coeffs<R> c;
        c.lerp = EfLerp<R>::make(w);
        c.floor = R(floor_of(h));
        c.decay = R(1.0 - h.lr * h.weight_decay);
        c.neg_step = R(-alpha / (clip > 1.0 ? clip : 1.0));
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        const R e = estimate(c.lerp, g, s);
        if (!FACTORED) s[0] = e;
        if (DECAY) p = p * c.decay;
        return p + c.neg_step * direction(c.floor, e, g);
    }

    // FACTORED: the sums in pass 0 (the factors are already new).
    template <class R>
    EF_FN static void accumulate(const EfHyper& h, R p, R g, const R* s, double* sums) {
        if (FACTORED) count(R(floor_of(h)), EfLerp<R>::make(0.0), p, g, s, sums);
    }

    // Not FACTORED: pass 1 reads the weight of new data and eps1^2.
    EF_FN static void prepare(const EfHyper& h, int, const double* sc, const double*, double* out) {
        out[0] = weight(h, sc[0]);
        out[1] = floor_of(h);
    }

    template <class R>
    EF_FN static void accumulate_after(const EfHyper&, int, const R* prior, R p, R g, const R* s, double* sums) {
        count(prior[1], EfLerp<R>::make((double)prior[0]), p, g, s, sums);
    }

    // One element's part of its row's and its column's sums.
    template <class R>
    EF_FN static double factor_term(const EfHyper&, R g) {
        const double x = (double)g;
        return x * x;
    }

    // One tensor's factors (`matrices` matrices of n_rows x n_cols, one after another) from the
    // sums of their rows and columns: R <- lerp(R, |row|^2/cols, w), C <- lerp(C, |column|^2/rows,
    // w), the norm rounded to R first. A launcher may as well pass one matrix at a time.
    template <class R>
    EF_FN static void update_factors(const EfHyper& h, const double* sc, long long matrices, long long n_rows, long long n_cols,
                                     const double* row_sums, const double* col_sums, R* rows, R* cols) {
        const EfLerp<R> lerp = EfLerp<R>::make(weight(h, sc[0]));
        for (long long r = 0; r < matrices * n_rows; ++r) {
            const R norm = R(EF_SQRT_D(row_sums[r]));
            rows[r] = lerp.apply(rows[r], norm * norm / R((double)n_cols));
        }
        for (long long c = 0; c < matrices * n_cols; ++c) {
            const R norm = R(EF_SQRT_D(col_sums[c]));
            cols[c] = lerp.apply(cols[c], norm * norm / R((double)n_rows));
        }
    }

    // What the elements of one tensor read: rows sqrt(R), columns sqrt(C / max(mean of the matrix's
    // R, eps1)).
    template <class R>
    EF_FN static void factor_reads(const EfHyper& h, long long matrices, long long n_rows, long long n_cols, R* rows, R* cols) {
        for (long long m = 0; m < matrices; ++m) {
            double sum = 0.0;
            for (long long r = 0; r < n_rows; ++r) sum += (double)rows[m * n_rows + r];
            const R divisor = ef_max_nan(R(sum / (double)n_rows), R(h.eps1));
            for (long long c = 0; c < n_cols; ++c) cols[m * n_cols + c] = ef_sqrt(cols[m * n_cols + c] / divisor);
        }
        for (long long r = 0; r < matrices * n_rows; ++r) rows[r] = ef_sqrt(rows[r]);
    }
};
