//! What the engine and Python know of a registered rule before building it: [`RuleInfo`].

/// Options of every rule, read by the drivers (and `visit_rule`) rather than by rules: booleans,
/// false when absent.
pub const ENGINE_OPTIONS: &[&str] = &["maximize", "check_finite", "orthograd", "orthograd_rescale"];

/// Numeric options of every rule, read by the drivers: `grad_factor` (default 1) multiplies every
/// gradient as it is loaded, after AMP's unscaling and without changing what is stored back into
/// `.grad` (a global clip coefficient such as ZClip's, applied inside the step); `rounding_key`
/// (an integer in [1, 2^53); absent: round to nearest) makes every bf16 parameter and state store
/// round stochastically with this step's random bits (see `crate::rounding`).
pub const ENGINE_NUMBERS: &[&str] = &["grad_factor", "rounding_key"];

/// The description of one registered rule name: the hyper-parameter keys Python passes (checked
/// before the rule is built), its per-parameter scalar state and what input it reads. Each
/// rule file states its own as `pub const INFO`; the registry in `rules/mod.rs` lists them.
#[derive(Debug)]
pub struct RuleInfo {
    /// The name Python passes (`_native.step(who, name, ...)`).
    pub name: &'static str,
    /// One line saying what the rule computes.
    pub summary: &'static str,
    /// Numeric hyper-parameters. A `visit` may leave some unread (e.g. `ema_weight` without the
    /// `ema` flag); one it reads and Python did not pass is an error then.
    pub numbers: &'static [&'static str],
    /// Boolean hyper-parameters, including those the engine's Python layer sets (`first`,
    /// `ema`). Each must be passed unless listed in `optional_flags`.
    pub flags: &'static [&'static str],
    /// The flags (a subset of `flags`) that are false when absent.
    pub optional_flags: &'static [&'static str],
    /// Names of the per-parameter scalar state entries (0-dim tensors, e.g. `step`), in order.
    pub scalars: &'static [&'static str],
    /// What the rule's read-only input tensor is.
    pub input: Input,
    /// The state slots that are never negative (second moments): stored as 8-bit state with the
    /// unsigned map, twice as fine as the signed one (see `crate::quant`).
    pub nonnegative_slots: &'static [&'static str],
}

/// What a rule's read-only input tensor is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// None: callers pass no input (e.g. `swap`).
    None,
    /// The parameter's gradient, of the parameter's dtype (torch allows no other). The drivers
    /// unscale it (AMP), negate it (`maximize`), check it (`check_finite`) and project it
    /// (`orthograd`) before the rule sees it.
    Gradient,
    /// Model weights that an average reads: of the parameter's dtype, or bf16/fp16 for an fp32
    /// average of a low-precision model.
    Weights,
}

impl RuleInfo {
    /// Every key a group of this rule may pass, for messages.
    pub fn valid_keys(&self) -> String {
        let list = |keys: &[&str]| if keys.is_empty() { "none".to_string() } else { keys.join(", ") };
        format!("numbers: {}; flags: {}; engine options: {}", list(self.numbers), list(self.flags), list(&[ENGINE_OPTIONS, ENGINE_NUMBERS].concat()))
    }
}
