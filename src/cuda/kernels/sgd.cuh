// SGD with momentum / dampening / Nesterov: the CUDA twin of src/rules/sgd.rs.
#pragma once
#include "common.cuh"

template <bool MOMENTUM, bool NESTEROV, bool FIRST>
struct Sgd {
    template <class R>
    struct Coeffs {
        R neg_lr, momentum, one_minus_dampening, weight_decay;
    };

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double*, const double*) {
        Coeffs<R> c;
        c.neg_lr = R(-h.lr);
        c.momentum = R(h.momentum);
        c.one_minus_dampening = R(1.0 - h.dampening);
        c.weight_decay = R(h.weight_decay);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        R d = g + c.weight_decay * p;
        if (MOMENTUM) {
            R buf = FIRST ? d : s[0] * c.momentum + c.one_minus_dampening * d;
            s[0] = buf;
            d = NESTEROV ? d + c.momentum * buf : buf;
        }
        return p + c.neg_lr * d;
    }

    template <class R>
    EF_FN static void accumulate(const EfHyper&, R, R, const R*, double*) {}
};
