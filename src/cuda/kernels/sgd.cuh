// SGD with momentum / dampening / Nesterov: the CUDA twin of src/rules/sgd.rs.
#pragma once
#include "common.cuh"

template <bool MOMENTUM, bool NESTEROV, bool FIRST, bool CAUTION>
struct Sgd {
    template <class R>
    struct Coeffs {
        R neg_lr, momentum, one_minus_dampening, weight_decay, caution;
    };

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double*, const double* sums) {
        Coeffs<R> c;
        c.neg_lr = R(-h.lr);
        c.momentum = R(h.momentum);
        c.one_minus_dampening = R(1.0 - h.dampening);
        c.weight_decay = R(h.weight_decay);
        c.caution = CAUTION ? ef_caution_factor<R>(sums, h.caution_count != 0.0) : R(1);
        return c;
    }

    // The step's direction for gradient d (decay added), advancing the buffer `buf` (sgd.rs `direction`).
    template <class R>
    EF_FN static R direction(R momentum, R one_minus_dampening, R d, R* buf) {
        if (!MOMENTUM) return d;
        *buf = FIRST ? d : *buf * momentum + one_minus_dampening * d;
        return NESTEROV ? d + momentum * *buf : *buf;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        g = g + c.weight_decay * p;
        R d = direction<R>(c.momentum, c.one_minus_dampening, g, &s[0]);
        if (CAUTION) d = ef_cautious(d, g, c.caution);
        return p + c.neg_lr * d;
    }

    // With caution: count φ for this step's direction (sgd.rs `accumulate`).
    template <class R>
    EF_FN static void accumulate(const EfHyper& h, R p, R g, const R* s, double* sums) {
        if (CAUTION) {
            g = g + R(h.weight_decay) * p;
            R buf = s[0];
            R d = direction<R>(R(h.momentum), R(1.0 - h.dampening), g, &buf);
            ef_cautious_count(d, g, sums);
        }
    }
};
