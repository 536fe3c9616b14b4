//! Which CUDA twin runs each registered rule: its header in `kernels/` and the C++ template in
//! it, instantiated with the Rust type's const generic arguments (`Rule`'s `Params::const_args`).

/// A rule's CUDA twin.
#[derive(Copy, Clone, Debug)]
pub struct Kernel {
    /// The registered rule name.
    pub rule: &'static str,
    /// Text of `src/cuda/kernels/<rule>.cuh`.
    pub header: &'static str,
    /// The C++ template (or struct) in it.
    pub template: &'static str,
}

const fn k(rule: &'static str, header: &'static str, template: &'static str) -> Kernel {
    Kernel { rule, header, template }
}

/// One line per registered rule.
const KERNELS: &[Kernel] = &[
    k("adam", include_str!("kernels/adam.cuh"), "Adam"),
    k("sgd", include_str!("kernels/sgd.cuh"), "Sgd"),
    k("adan", include_str!("kernels/adan.cuh"), "Adan"),
    k("spam", include_str!("kernels/spam.cuh"), "Spam"),
    k("stable_spam", include_str!("kernels/stable_spam.cuh"), "StableSpam"),
    k("diffgrad", include_str!("kernels/diffgrad.cuh"), "DiffGrad"),
    k("adabound", include_str!("kernels/adabound.cuh"), "AdaBound"),
    k("sgd_sai", include_str!("kernels/sgd_sai.cuh"), "SgdSai"),
    k("ademamix", include_str!("kernels/ademamix.cuh"), "AdEMAMix"),
    k("adabelief", include_str!("kernels/adabelief.cuh"), "AdaBelief"),
    k("adafactor", include_str!("kernels/adafactor.cuh"), "Adafactor"),
    k("adafactor_hf", include_str!("kernels/adafactor_hf.cuh"), "AdafactorHf"),
    k("adamomentum", include_str!("kernels/adamomentum.cuh"), "AdaMomentum"),
    k("lion", include_str!("kernels/lion.cuh"), "Lion"),
    k("adamod", include_str!("kernels/adamod.cuh"), "AdaMod"),
    k("adahessian", include_str!("kernels/adahessian.cuh"), "AdaHessian"),
    k("adamp", include_str!("kernels/adamp.cuh"), "AdamP"),
    k("momo", include_str!("kernels/momo.cuh"), "Momo"),
    k("momo_adam", include_str!("kernels/momo_adam.cuh"), "MomoAdam"),
    k("ema", include_str!("kernels/ema.cuh"), "Ema"),
    k("ema_multi", include_str!("kernels/ema_multi.cuh"), "EmaMulti"),
    k("bema", include_str!("kernels/bema.cuh"), "Bema"),
    k("swap", include_str!("kernels/swap.cuh"), "Swap"),
    k("axpby", include_str!("kernels/axpby.cuh"), "Axpby"),
    k("slerp", include_str!("kernels/slerp.cuh"), "Slerp"),
];

/// The CUDA twin of the rule called `rule`.
pub fn kernel(rule: &str) -> Option<&'static Kernel> {
    KERNELS.iter().find(|k| k.rule == rule)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_registered_rule_has_one_kernel() {
        let registered: HashSet<&str> = crate::rules::all().map(|i| i.name).collect();
        let listed: HashSet<&str> = KERNELS.iter().map(|k| k.rule).collect();
        assert_eq!(listed.len(), KERNELS.len(), "a rule is listed twice");
        assert_eq!(registered, listed);
        for k in KERNELS {
            assert!(k.header.contains(&format!("struct {} {{", k.template)), "{}: no struct {} in its header", k.rule, k.template);
        }
    }
}
