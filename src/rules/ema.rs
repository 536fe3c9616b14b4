//! Model EMA (spec averaging.md §1.2, A.*, D.1 K1/K2): the average `E` is the written tensor, the
//! model weight `θ` the read-only input.
//!
//! `ema` (one average, weight `w = 1 − decay` computed on the host in f64):
//! ```text
//! E ← lerp(E, θ, w)            default: torch's two-form lerp (timm V3, ema-pytorch, swa_utils)
//! E ← d·E + w·θ                MULADD: timm V2, get_ema_avg_fn (Lightning), NeMo, Keras
//! E ← E − w·(E − θ)            SUB: torch-ema
//! ```
//! `ema_multi` (K2, EDM2 power EMA tracks): `J` averages of the same `θ`, each with its own weight,
//! reading `θ` once: `E_j ← lerp(E_j, θ, w_j)`; track 0 is the written tensor, tracks 1.. are
//! state slots 0.. (`t1`, `t2`, ...).

use super::{rule_params, Input, Rule, RuleHyper, RuleInfo, RuleVisitor, MAX_SCALARS, MAX_SLOTS, MAX_SUMS};
use crate::error::{Error, Result};
use crate::real::{Lerp, Real};

/// The `ema` rule; `muladd` and `sub` (exclusive) pick another reference's rounding form.
pub const INFO: RuleInfo = RuleInfo {
    name: "ema",
    summary: "Model EMA E <- lerp(E, theta, weight), or the muladd / sub forms of other references",
    numbers: &["weight"],
    flags: &["muladd", "sub"],
    optional_flags: &["muladd", "sub"],
    scalars: &[],
    input: Input::Weights,
    nonnegative_slots: &[],
};

/// The `ema_multi` rule: `tracks` averages with weights `w0`, `w1`, ...
pub const MULTI_INFO: RuleInfo = RuleInfo {
    name: "ema_multi",
    summary: "Up to five EMAs of the same model with their own weights (EDM2 power-EMA tracks), reading it once",
    numbers: &["tracks", "w0", "w1", "w2", "w3", "w4"],
    flags: &[],
    optional_flags: &[],
    scalars: &[],
    input: Input::Weights,
    nonnegative_slots: &[],
};

/// The most tracks one `ema_multi` call updates.
pub const MAX_TRACKS: usize = 1 + MAX_SLOTS;

/// State slot names of tracks 1.. (track 0 is the written tensor).
const TRACK_SLOTS: [&str; MAX_SLOTS] = ["t1", "t2", "t3", "t4"];

/// Check an update weight `w = 1 − decay` in [0, 1].
fn check_weight(name: &str, w: f64) -> Result<f64> {
    if (0.0..=1.0).contains(&w) {
        Ok(w)
    } else {
        Err(Error::Value(format!("{name} must be in [0, 1], got {w}")))
    }
}

rule_params! {
    /// One EMA with update weight `weight`; `MULADD` / `SUB` pick the reference's rounding form.
    pub struct Ema<const MULADD: bool, const SUB: bool> {
        weight: f64,
    }
}

/// Per-call coefficients of [`Ema`].
#[derive(Copy, Clone, Debug)]
pub struct EmaCoeffs<R: Real> {
    lerp: Lerp<R>,
    decay: R,
    weight: R,
}

impl<const MULADD: bool, const SUB: bool> Rule for Ema<MULADD, SUB> {
    const INFO: &'static RuleInfo = &INFO;
    const SLOT_NAMES: &'static [&'static str] = &[];
    type Coeffs<R: Real> = EmaCoeffs<R>;

    fn coeffs<R: Real>(&self, _scalars: &mut [f64; MAX_SCALARS], _sums: &[f64; MAX_SUMS]) -> EmaCoeffs<R> {
        // Python computes `1 - decay` in f64 and torch rounds each Python scalar to the op type.
        EmaCoeffs { lerp: Lerp::new(self.weight), decay: R::from_f64(1.0 - self.weight), weight: R::from_f64(self.weight) }
    }

    #[inline(always)]
    fn update<R: Real>(c: &EmaCoeffs<R>, e: R, theta: R, _s: &mut [R; MAX_SLOTS]) -> R {
        if MULADD {
            c.decay * e + c.weight * theta
        } else if SUB {
            e - c.weight * (e - theta)
        } else {
            c.lerp.apply(e, theta)
        }
    }
}

rule_params! {
    /// Several EMAs of the same input, `J` tracks with their own weights `w0..` (unused ones 0).
    pub struct EmaMulti<const J: usize> {
        w0: f64,
        w1: f64,
        w2: f64,
        w3: f64,
        w4: f64,
    }
}

impl<const J: usize> EmaMulti<J> {
    fn weights(&self) -> [f64; MAX_TRACKS] {
        [self.w0, self.w1, self.w2, self.w3, self.w4]
    }
}

impl<const J: usize> Rule for EmaMulti<J> {
    const INFO: &'static RuleInfo = &MULTI_INFO;
    const SLOT_NAMES: &'static [&'static str] = TRACK_SLOTS.split_at(J - 1).0;
    type Coeffs<R: Real> = [Lerp<R>; MAX_TRACKS];

    fn coeffs<R: Real>(&self, _scalars: &mut [f64; MAX_SCALARS], _sums: &[f64; MAX_SUMS]) -> [Lerp<R>; MAX_TRACKS] {
        self.weights().map(Lerp::new)
    }

    #[inline(always)]
    fn update<R: Real>(c: &[Lerp<R>; MAX_TRACKS], e: R, theta: R, s: &mut [R; MAX_SLOTS]) -> R {
        for k in 0..J - 1 {
            s[k] = c[k + 1].apply(s[k], theta);
        }
        c[0].apply(e, theta)
    }
}

/// Build `ema` from `weight` and the flags `muladd`, `sub` (both optional).
pub fn visit<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let weight = check_weight("weight", h.num("weight")?)?;
    match (h.flag("muladd")?, h.flag("sub")?) {
        (false, false) => Ok(v.visit(Ema::<false, false> { weight })),
        (true, false) => Ok(v.visit(Ema::<true, false> { weight })),
        (false, true) => Ok(v.visit(Ema::<false, true> { weight })),
        (true, true) => Err(Error::Value("ema: 'muladd' and 'sub' are exclusive".into())),
    }
}

/// Build `ema_multi` from `tracks` (1..=5) and `w0`, `w1`, ... (one weight per track).
pub fn visit_multi<V: RuleVisitor>(h: &RuleHyper<'_>, v: V) -> Result<V::Output> {
    let tracks = h.num("tracks")?;
    if !(1.0..=MAX_TRACKS as f64).contains(&tracks) || tracks.fract() != 0.0 {
        return Err(Error::Value(format!("ema_multi: tracks must be an integer in 1..={MAX_TRACKS}, got {tracks}")));
    }
    let n = tracks as usize;
    let mut weights = [0.0; MAX_TRACKS];
    for (j, w) in weights.iter_mut().enumerate().take(n) {
        *w = check_weight(&format!("w{j}"), h.num(&format!("w{j}"))?)?;
    }
    let [w0, w1, w2, w3, w4] = weights;
    Ok(match n {
        1 => v.visit(EmaMulti::<1> { w0, w1, w2, w3, w4 }),
        2 => v.visit(EmaMulti::<2> { w0, w1, w2, w3, w4 }),
        3 => v.visit(EmaMulti::<3> { w0, w1, w2, w3, w4 }),
        4 => v.visit(EmaMulti::<4> { w0, w1, w2, w3, w4 }),
        _ => v.visit(EmaMulti::<5> { w0, w1, w2, w3, w4 }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<Ru: Rule>(rule: &Ru, e: f64, theta: f64, s: &mut [f64; MAX_SLOTS]) -> f64 {
        Ru::update(&rule.coeffs::<f64>(&mut [0.0; MAX_SCALARS], &[0.0; MAX_SUMS]), e, theta, s)
    }

    #[test]
    fn forms_agree_in_exact_cases_and_follow_their_formula() {
        let (e, th, w) = (0.3f64, 1.7, 0.1);
        let mut s = [0.0; MAX_SLOTS];
        assert_eq!(run(&Ema::<false, false> { weight: w }, e, th, &mut s), e + w * (th - e));
        assert_eq!(run(&Ema::<true, false> { weight: w }, e, th, &mut s), (1.0 - w) * e + w * th);
        assert_eq!(run(&Ema::<false, true> { weight: w }, e, th, &mut s), e - w * (e - th));
        // w = 1 copies exactly (the first update event of every EMA convention).
        assert_eq!(run(&Ema::<false, false> { weight: 1.0 }, e, th, &mut s), th);
    }

    #[test]
    fn multi_track_equals_separate_lerps() {
        let rule = EmaMulti::<3> { w0: 0.5, w1: 0.04, w2: 0.7, w3: 0.0, w4: 0.0 };
        let mut s = [2.0, -1.0, 0.0, 0.0];
        let e = run(&rule, 1.0, 3.0, &mut s);
        assert_eq!(e, 1.0 + 0.5 * 2.0);
        assert_eq!(s[0], 2.0 + 0.04 * 1.0);
        assert_eq!(s[1], 3.0 - 4.0 * (1.0 - 0.7));
    }
}
