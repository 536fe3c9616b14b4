// Spherical interpolation of two task vectors, per tensor: the CUDA twin of src/rules/slerp.rs.
//
// Written tensor: the output, holding θ₁ on entry; input: θ₂; slot 0: the base θ_init (read).
// The sums pass gathers ⟨δ₁,δ₂⟩, ‖δ₁‖², ‖δ₂‖² in double (δᵢ = θᵢ − θ_init); the coefficients
// follow from them on the device's thread 0 in double, as the Rust `coefficients` does on the
// host. On a GPU the sums are added in another order than on the CPU (per thread, per block,
// then atomically across blocks), so they and the coefficients may differ in the last bits.
#pragma once
#include "common.cuh"

struct Slerp {
    template <class R>
    struct Coeffs {
        R c1, c2;
    };

    template <class R>
    EF_FN static Coeffs<R> coeffs(const EfHyper& h, double*, const double* sums) {
        const double t = h.t;
        double c1 = 1.0 - t, c2 = t;  // LERP: a tiny task vector, or nearly parallel ones
        const double n1 = EF_SQRT_D(sums[1]), n2 = EF_SQRT_D(sums[2]);
        if (!(n1 <= 1e-8 || n2 <= 1e-8)) {  // slerp::MIN_NORM
            double cos_omega = sums[0] / (n1 * n2);
            if (cos_omega < -1.0) cos_omega = -1.0;  // f64::clamp (NaN stays NaN)
            if (cos_omega > 1.0) cos_omega = 1.0;
            if (!((cos_omega < 0.0 ? -cos_omega : cos_omega) > 0.9995)) {  // slerp::LERP_THRESHOLD
                const double omega = EF_ACOS_D(cos_omega);
                const double s = EF_SIN_D(omega);
                c1 = EF_SIN_D((1.0 - t) * omega) / s;
                c2 = EF_SIN_D(t * omega) / s;
            }
        }
        Coeffs<R> c;
        c.c1 = R(c1);
        c.c2 = R(c2);
        return c;
    }

    template <class R>
    EF_FN static R update(const Coeffs<R>& c, R p, R g, R* s) {
        const R base = s[0];
        return base + c.c1 * (p - base) + c.c2 * (g - base);
    }

    template <class R>
    EF_FN static void accumulate(const EfHyper&, R p, R g, const R* s, double* sums) {
        const double base = (double)s[0];
        const double d1 = (double)p - base, d2 = (double)g - base;
        sums[0] += d1 * d2;
        sums[1] += d1 * d1;
        sums[2] += d2 * d2;
    }
};
