//! A parameter group's hyper-parameters as Python passed them ([`Hyper`]), checked against the
//! rule's [`RuleInfo`] and read by the rule's `visit` through [`RuleHyper`].

use super::info::{RuleInfo, ENGINE_NUMBERS, ENGINE_OPTIONS};
use crate::error::{Error, Result};

/// One hyper-parameter value as Python passed it.
#[derive(Clone, Debug)]
pub enum HyperValue {
    Num(f64),
    Flag(bool),
}

/// A parameter group's hyper-parameters and flags, by name.
#[derive(Clone, Debug, Default)]
pub struct Hyper {
    entries: Vec<(String, HyperValue)>,
}

impl Hyper {
    /// The entries of a Python dict, in its order.
    pub fn new(entries: Vec<(String, HyperValue)>) -> Self {
        Hyper { entries }
    }

    fn get(&self, name: &str) -> Option<&HyperValue> {
        self.entries.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// An engine-wide option (one of [`ENGINE_OPTIONS`]); false when absent.
    pub fn option(&self, name: &str) -> Result<bool> {
        debug_assert!(ENGINE_OPTIONS.contains(&name), "'{name}' is not an engine option");
        match self.get(name) {
            None => Ok(false),
            Some(HyperValue::Flag(b)) => Ok(*b),
            Some(HyperValue::Num(_)) => Err(Error::Value(format!("'{name}' must be a bool, got a number"))),
        }
    }

    /// What every gradient is multiplied by as it is loaded (after AMP's unscaling): −1 for
    /// `maximize`, times the engine number `grad_factor` (a finite number > 0; 1 when absent).
    pub fn grad_multiplier(&self) -> Result<f64> {
        let factor = match self.get("grad_factor") {
            None => 1.0,
            Some(HyperValue::Num(x)) if x.is_finite() && *x > 0.0 => *x,
            Some(v) => return Err(Error::Value(format!("'grad_factor' must be a finite number > 0, got {v:?}"))),
        };
        Ok(if self.option("maximize")? { -factor } else { factor })
    }

    /// The step's stochastic-rounding key (engine number `rounding_key`), or None: round to
    /// nearest.
    pub fn rounding_key(&self) -> Result<Option<u64>> {
        match self.get("rounding_key") {
            None => Ok(None),
            Some(HyperValue::Num(x)) if x.fract() == 0.0 && *x >= 1.0 && *x < 2f64.powi(53) => Ok(Some(*x as u64)),
            Some(v) => Err(Error::Value(format!("'rounding_key' must be an integer in [1, 2^53), got {v:?}"))),
        }
    }

    /// Refuse keys the rule does not declare, values of the wrong kind and missing required
    /// flags.
    pub(super) fn check(&self, info: &RuleInfo) -> Result<()> {
        let rule = info.name;
        for (key, value) in &self.entries {
            let key = key.as_str();
            let want_flag = if info.numbers.contains(&key) || ENGINE_NUMBERS.contains(&key) {
                false
            } else if info.flags.contains(&key) || ENGINE_OPTIONS.contains(&key) {
                true
            } else {
                return Err(Error::Value(format!("rule '{rule}' has no hyper-parameter '{key}' ({})", info.valid_keys())));
            };
            match (want_flag, value) {
                (true, HyperValue::Num(_)) => return Err(Error::Value(format!("rule '{rule}': '{key}' must be a bool, got a number"))),
                (false, HyperValue::Flag(_)) => return Err(Error::Value(format!("rule '{rule}': '{key}' must be a number, got a bool"))),
                _ => {}
            }
        }
        if let Some(missing) = info.flags.iter().find(|f| !info.optional_flags.contains(f) && self.get(f).is_none()) {
            return Err(Error::Value(format!("rule '{rule}': missing flag '{missing}' ({})", info.valid_keys())));
        }
        Ok(())
    }

    /// The rule's flags as passed, Python style (`amsgrad=False, decoupled=True`), for messages.
    pub fn flags_text(&self, info: &RuleInfo) -> String {
        let flags = info.flags.iter().filter_map(|f| match self.get(f) {
            Some(HyperValue::Flag(b)) => Some(format!("{f}={}", if *b { "True" } else { "False" })),
            _ => None,
        });
        flags.collect::<Vec<_>>().join(", ")
    }
}

/// A group's hyper-parameters as a rule's `visit` reads them: already checked against the rule's
/// [`RuleInfo`], and reading a key the rule does not declare is a bug (an internal error).
pub struct RuleHyper<'a> {
    hyper: &'a Hyper,
    info: &'static RuleInfo,
    /// Bit `i`: declared key `i` (numbers, then flags) was read. For the registry's tests.
    #[cfg(test)]
    read: std::cell::Cell<u64>,
}

impl<'a> RuleHyper<'a> {
    /// `hyper` seen by the rule `info`, after [`Hyper::check`].
    pub(super) fn new(hyper: &'a Hyper, info: &'static RuleInfo) -> RuleHyper<'a> {
        RuleHyper {
            hyper,
            info,
            #[cfg(test)]
            read: std::cell::Cell::new(0),
        }
    }

    fn undeclared(&self, kind: &str, name: &str) -> Error {
        Error::Internal(format!("rule '{}' reads the {kind} '{name}', which its INFO does not declare", self.info.name))
    }

    #[cfg(test)]
    fn mark(&self, index: usize) {
        self.read.set(self.read.get() | 1 << index);
    }

    #[cfg(not(test))]
    fn mark(&self, _index: usize) {}

    /// The declared keys `visit` read so far (numbers, then flags).
    #[cfg(test)]
    pub(super) fn read_keys(&self) -> Vec<&'static str> {
        let keys = self.info.numbers.iter().chain(self.info.flags);
        keys.enumerate().filter(|(i, _)| self.read.get() & (1 << i) != 0).map(|(_, k)| *k).collect()
    }

    /// A numeric hyper-parameter the rule declares in `numbers`.
    pub fn num(&self, name: &str) -> Result<f64> {
        let i = self.info.numbers.iter().position(|k| *k == name).ok_or_else(|| self.undeclared("number", name))?;
        self.mark(i);
        match self.hyper.get(name) {
            Some(HyperValue::Num(x)) => Ok(*x),
            Some(HyperValue::Flag(_)) => Err(Error::Value(format!("rule '{}': '{name}' must be a number, got a bool", self.info.name))),
            None => Err(Error::Value(format!("rule '{}': missing hyper-parameter '{name}'", self.info.name))),
        }
    }

    /// A flag the rule declares in `flags`; false when absent if it is one of `optional_flags`.
    pub fn flag(&self, name: &str) -> Result<bool> {
        let i = self.info.flags.iter().position(|k| *k == name).ok_or_else(|| self.undeclared("flag", name))?;
        self.mark(self.info.numbers.len() + i);
        match self.hyper.get(name) {
            Some(HyperValue::Flag(b)) => Ok(*b),
            Some(HyperValue::Num(_)) => Err(Error::Value(format!("rule '{}': '{name}' must be a bool, got a number", self.info.name))),
            None if self.info.optional_flags.contains(&name) => Ok(false),
            None => Err(Error::Value(format!("rule '{}': missing flag '{name}'", self.info.name))),
        }
    }
}
