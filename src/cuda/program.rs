//! The NVRTC program of one concrete rule type: a preamble generated from the Rust type (its
//! parameters as the kernels' `EfHyper`, its counts as `EF_*` constants), then `common.cuh`, the
//! rule's header and the multi-tensor kernel. The kernels' hyper-parameter argument is built from
//! the same Rust facts ([`hyper_bytes`]), so the two cannot disagree.

use super::kernels::kernel;
use crate::error::{Error, Result};
use crate::quant;
use crate::rules::{Rule, MAX_SCALARS, MAX_SLOTS, MAX_SUMS};

const COMMON: &str = include_str!("kernels/common.cuh");
const MULTI_TENSOR: &str = include_str!("kernels/multi_tensor.cuh");
/// Templates that wrap any rule (⊥Grad), part of every program.
const WRAPPERS: &str = include_str!("kernels/orthograd.cuh");

/// The one `EfHyper` field of a rule without parameters: a kernel argument cannot be an empty
/// struct (C++ gives it size 1, which the launch would read from an empty buffer).
const PLACEHOLDER: &[&str] = &["unused"];

/// The fields of `EfHyper` for a rule with the parameters `params`, in order.
fn hyper_fields(params: &'static [&'static str]) -> &'static [&'static str] {
    if params.is_empty() {
        PLACEHOLDER
    } else {
        params
    }
}

/// The CUDA program of one rule type.
#[derive(Clone, Debug)]
pub struct Program {
    /// The C++ type the kernels are instantiated with, e.g. `Adam<true, false, false>` (also the
    /// key of compiled modules).
    pub type_name: String,
    /// The rule's header, `src/cuda/kernels/<rule>.cuh`, followed by the wrappers' headers.
    pub header: String,
    rule: &'static str,
    fields: &'static [&'static str],
    counts: [(&'static str, usize); 8],
    bools: [(&'static str, bool); 5],
}

impl Program {
    /// The program of the rule type `Ru`.
    pub fn of<Ru: Rule>() -> Result<Program> {
        let rule = Ru::INFO.name;
        let k = kernel(rule).ok_or_else(|| Error::Cuda(format!("rule '{rule}' has no CUDA kernel")))?;
        Ok(Program {
            type_name: Ru::twin_type(k.template),
            header: format!("{}\n{WRAPPERS}", k.header),
            rule,
            fields: hyper_fields(Ru::PARAM_NAMES),
            counts: [
                ("EF_SLOTS", Ru::SLOTS),
                ("EF_WRITTEN_SLOTS", Ru::WRITTEN_SLOTS),
                ("EF_SCALARS", Ru::SCALARS),
                ("EF_SUMS", Ru::SUMS),
                ("EF_SUM_PASSES", Ru::SUM_PASSES),
                ("EF_STATE_SUM_PASS", Ru::STATE_SUM_PASS),
                // bit k set when sum k is a maximum (combined with max, not added)
                ("EF_MAX_SUMS_MASK", Ru::MAX_SUMS_MASK as usize),
                // 8-bit state: bit k set when slot k is never negative (decoded with the unsigned map)
                ("EF_NONNEG_SLOTS", nonnegative_mask::<Ru>()),
            ],
            bools: [
                ("EF_READS_INPUT", Ru::READS_INPUT),
                ("EF_SUMS_READ_STATE", Ru::SUMS_READ_STATE),
                ("EF_SUMS_READ_PARAM", Ru::SUMS_READ_PARAM),
                // sums gathered per row and folded per tensor (`fold_row`, `row_coeffs`)
                ("EF_ROW_SUMS", Ru::ROW_SUMS),
                // factored state: a value per row and one per column (`factor_term`, `update_factors`,
                // `factor_reads`)
                ("EF_FACTORED", Ru::FACTORED),
            ],
        })
    }

    /// The generated part: the rule type (`EF_RULE`), the engine's limits, the parameters'
    /// struct `EfHyper` and the type's counts. Valid C++ for NVRTC and for the host test build.
    pub fn preamble(&self) -> String {
        let mut s = format!("#define EF_RULE {}\n// Generated from the Rust rule '{}' (src/cuda/program.rs).\n", self.type_name, self.rule);
        for (name, value) in [("EF_MAX_SLOTS", MAX_SLOTS), ("EF_MAX_SCALARS", MAX_SCALARS), ("EF_MAX_SUMS", MAX_SUMS)] {
            s += &format!("#define {name} {value}\n");
        }
        s += "struct EfHyper {\n";
        for field in self.fields {
            s += &format!("    double {field};\n");
        }
        s += "};\n";
        for (name, value) in self.counts {
            s += &format!("constexpr int {name} = {value};\n");
        }
        for (name, value) in self.bools {
            s += &format!("constexpr bool {name} = {value};\n");
        }
        s
    }

    /// The complete NVRTC program: the preamble, then the headers with their `#include`s of
    /// local headers removed (their text is inlined here), with 8-bit state's maps after
    /// `common.cuh`.
    pub fn source(&self) -> String {
        let strip = |s: &str| s.lines().filter(|l| !l.trim_start().starts_with("#include \"")).collect::<Vec<_>>().join("\n");
        format!("{}\n{}\n{}\n{}\n{}\n", self.preamble(), strip(COMMON), quant_tables(), strip(&self.header), strip(MULTI_TENSOR))
    }
}

/// The bit mask of `Ru`'s slots that are never negative (`RuleInfo::nonnegative_slots`).
fn nonnegative_mask<Ru: Rule>() -> usize {
    Ru::SLOT_NAMES.iter().enumerate().filter(|(_, name)| Ru::INFO.nonnegative_slots.contains(name)).map(|(k, _)| 1 << k).sum()
}

/// 8-bit state's maps as device constants: `EF_Q8_VALUES[m]` and `EF_Q8_MIDS[m]` (m = 1 for the
/// unsigned map), the values of `crate::quant` to the bit (hexadecimal float literals).
fn quant_tables() -> String {
    let table = |name: &str, rows: [&[f32; 256]; 2]| {
        // (the last midpoint, +inf, is never read: the code search stops at 255)
        let row = |r: &[f32; 256]| r.iter().map(|x| format!("{:e}f", x.min(f32::MAX))).collect::<Vec<_>>().join(", ");
        format!("__constant__ const float {name}[2][256] = {{{{{}}}, {{{}}}}};\n", row(rows[0]), row(rows[1]))
    };
    let (signed, unsigned) = (quant::signed(), quant::unsigned());
    table("EF_Q8_VALUES", [&signed.values, &unsigned.values]) + &table("EF_Q8_MIDS", [&signed.mids, &unsigned.mids])
}

/// The bytes of `rule`'s `EfHyper` kernel argument: its parameter words in declaration order
/// (the placeholder's 0 for a rule without parameters).
pub fn hyper_bytes<Ru: Rule>(rule: &Ru) -> Vec<u8> {
    let words = if Ru::PARAM_NAMES.is_empty() { vec![0.0] } else { rule.param_words() };
    words.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::tests::samples;
    use crate::rules::{all, visit_rule, Hyper, RuleVisitor};

    struct Check;

    impl RuleVisitor for Check {
        type Output = ();
        fn visit<Ru: Rule>(self, rule: Ru) {
            let program = Program::of::<Ru>().expect("every rule has a kernel");
            assert_eq!(hyper_bytes(&rule).len(), 8 * program.fields.len(), "{}", program.type_name);
            let preamble = program.preamble();
            assert!(preamble.starts_with(&format!("#define EF_RULE {}\n", program.type_name)));
            for name in Ru::PARAM_NAMES {
                assert!(preamble.contains(&format!("    double {name};\n")), "{preamble}");
            }
            assert!(preamble.contains(&format!("constexpr int EF_SLOTS = {};", Ru::SLOTS)));
            assert!(program.source().contains("EF_KERNELS(f32"));
        }
    }

    /// Every variant of every rule has a program whose `EfHyper` has one field per word passed.
    #[test]
    fn every_variant_has_a_program_matching_its_bytes() {
        for info in all() {
            for entries in samples(info) {
                // A refused combination (exclusive flags) has no program to check.
                let _ = visit_rule(info.name, &Hyper::new(entries), Check);
            }
        }
    }

    #[test]
    fn the_type_name_carries_the_const_arguments_in_order() {
        type AdamW = crate::rules::adam::Adam<true, false, true, false>;
        assert_eq!(Program::of::<AdamW>().unwrap().type_name, "Adam<true, false, true, false>");
        assert_eq!(Program::of::<crate::rules::ema::EmaMulti<3>>().unwrap().type_name, "EmaMulti<3>");
        let swap = Program::of::<crate::rules::swap::Swap>().unwrap();
        assert_eq!((swap.type_name.as_str(), swap.fields), ("Swap", PLACEHOLDER));
        assert_eq!(hyper_bytes(&crate::rules::swap::Swap {}), vec![0u8; 8]);
    }
}
