//! The Python → native boundary: [`Group`] (the tensors of one native call, by name) and
//! [`StepPlan`] (every group of a step, validated once and kept between steps).
//!
//! Building a plan reads and validates every tensor and splits the groups into batches (one per
//! device and dtypes). A run performs one update with it. While the tensors stay what they were
//! when the plan was built (the same Python objects, over the same memory, in the same lists and
//! state dicts), a run re-reads only what changes from step to step (the gradients, for an
//! optimizer) and checks that nothing else did: the parameter lists, the state dicts' entries
//! and every tensor's data address, size, strides, dtype and device. If anything else changed,
//! the run writes nothing and returns None, and the caller builds a new plan.

use super::errors::to_py;
use super::tensor::{infos, unchanged, unpack, Unpacked};
use crate::batch::Layout;
use crate::batch::{check_input, split_group, Batch, GroupTensors, Operand, TensorInfo, Written};
use crate::cpu;
use crate::cuda::{self, DeviceAmp};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::rules::FactorDims;
use crate::rules::{Hyper, HyperValue, MAX_SUMS};
use crate::view::{Device, TensorView};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyList, PyString, PyTuple};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Read a Python dict of numbers and bools.
pub(super) fn hyper_from(d: &Bound<'_, PyDict>) -> Result<Hyper> {
    let mut entries = Vec::with_capacity(d.len());
    for (k, v) in d.iter() {
        let name: String = k.extract().map_err(|_| Error::Value("hyper-parameter names must be str".into()))?;
        let value = if v.is_instance_of::<PyBool>() {
            HyperValue::Flag(v.extract().expect("a bool"))
        } else {
            HyperValue::Num(v.extract::<f64>().map_err(|_| Error::Value(format!("hyper-parameter '{name}' must be a number or a bool")))?)
        };
        entries.push((name, value));
    }
    Ok(Hyper::new(entries))
}

/// The tensors of one native call: a parameter group (or the part of one that shares flags), or
/// the tensors of one averaging update.
#[pyclass(module = "emafuse._native", frozen, get_all)]
pub struct Group {
    /// The rule's hyper-parameters and flags, by name.
    hyper: Py<PyDict>,
    /// The written tensors: parameters, or averages.
    params: Py<PyList>,
    /// One read-only input per parameter (its gradient, or the model tensor an average reads),
    /// or None for rules that read none.
    inputs: Option<Py<PyList>>,
    /// One dict per parameter holding its state tensors (named in `slots`) and its one-element
    /// scalar state (named in `scalars`), or None for rules that keep none.
    states: Option<Py<PyList>>,
    /// Names of the state tensors, in the rule's order.
    slots: Py<PyTuple>,
    /// Names of the scalar state entries, in the rule's order.
    scalars: Py<PyTuple>,
    /// For each parameter, the position of its first element in the whole tensor it is a shard
    /// of (a DTensor's local shard), or None: every parameter is whole. Stochastic rounding draws
    /// element `i`'s bits at position `offset + i`, so a sharded step rounds as the whole one.
    offsets: Option<Vec<u64>>,
    /// For messages: the index of the param group the tensors belong to (one group may be passed
    /// as several calls) and each parameter's index in it, or None: the call's index and the
    /// parameters' indices in the call.
    place: Option<(usize, Vec<usize>)>,
}

#[pymethods]
impl Group {
    #[new]
    #[pyo3(signature = (*, hyper, params, inputs=None, states=None, slots=None, scalars=None, offsets=None, place=None))]
    #[allow(clippy::too_many_arguments)] // (keyword arguments of the Python constructor)
    fn new(
        py: Python<'_>,
        hyper: Py<PyDict>,
        params: Py<PyList>,
        inputs: Option<Py<PyList>>,
        states: Option<Py<PyList>>,
        slots: Option<Py<PyTuple>>,
        scalars: Option<Py<PyTuple>>,
        offsets: Option<Vec<u64>>,
        place: Option<(usize, Vec<usize>)>,
    ) -> Group {
        let empty = || PyTuple::empty(py).unbind();
        Group { hyper, params, inputs, states, slots: slots.unwrap_or_else(empty), scalars: scalars.unwrap_or_else(empty), offsets, place }
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Group(hyper={}, params=<{} tensors>, inputs={}, states={}, slots={}, scalars={})",
            self.hyper.bind(py),
            self.params.bind(py).len(),
            if self.inputs.is_some() { "<list>" } else { "None" },
            if self.states.is_some() { "<list>" } else { "None" },
            self.slots.bind(py),
            self.scalars.bind(py)
        )
    }
}

/// Where a tensor of a plan sits, for messages: param group, parameter index, which tensor.
#[derive(Clone, Copy)]
struct Role {
    group: u32,
    index: u32,
    what: What,
}

#[derive(Clone, Copy)]
enum What {
    Param,
    Input,
    /// A state entry; the index into [`Roles::names`].
    State(u32),
}

/// The role of each gathered tensor, and the state names they refer to.
#[derive(Default)]
struct Roles {
    roles: Vec<Role>,
    names: Vec<String>,
}

impl Roles {
    fn describe(&self, i: usize) -> String {
        let Role { group, index, what } = self.roles[i];
        match what {
            What::Param => format!("param group {group}, parameter {index}"),
            What::Input => format!("param group {group}, grad {index}"),
            What::State(k) => format!("param group {group}, parameter {index}: state '{}'", self.names[k as usize]),
        }
    }

    fn push(&mut self, place: &Place, i: usize, what: What) {
        // u32 keeps the table small; a step over more than 4 billion tensors is not a real case.
        // (a list longer than the parameters' is refused once gathered: its extra items keep `i`)
        let index = place.positions.get(i).copied().unwrap_or(i);
        self.roles.push(Role { group: place.group as u32, index: index as u32, what });
    }
}

/// Where the tensors of one call sit, for messages: their param group and each parameter's index
/// in it.
#[derive(Clone)]
struct Place {
    group: usize,
    positions: Vec<usize>,
}

impl Place {
    /// The place Python gave a call (checked against its `n` parameters), else the call's index
    /// and the parameters' indices in it.
    fn of(given: &Option<(usize, Vec<usize>)>, call: usize, n: usize) -> Result<Place> {
        match given {
            Some((_, positions)) if positions.len() != n => {
                Err(Error::Value(format!("param group {call}: {} positions given for {n} parameters", positions.len())))
            }
            Some((group, positions)) => Ok(Place { group: *group, positions: positions.clone() }),
            None => Ok(Place { group: call, positions: (0..n).collect() }),
        }
    }
}

/// Where a call's read-only inputs come from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Inputs {
    /// The rule reads none.
    None,
    /// Kept in the plan, after the parameters (averaging: the model's tensors).
    Fixed,
    /// Each parameter's `.grad`, re-read at every run; the call's first one is at this index of
    /// the run's gradients.
    Grads(usize),
}

/// One call of a plan. Its tensor objects lie in [`StepPlan::objs`] from `base`: `n` parameters,
/// then `n` fixed inputs (if any), then `n` per state key.
struct Call {
    base: usize,
    n: usize,
    inputs: Inputs,
    /// State slots (the first `n_slots` keys); the other keys are scalar state.
    n_slots: usize,
    /// Slot names, then scalar names: the keys of each state dict.
    keys: Vec<Py<PyString>>,
    /// The state dict of each parameter (empty when the rule keeps no state).
    dicts: Vec<Py<PyDict>>,
    /// Each parameter's position in its whole tensor ([`Group`]'s `offsets`; empty: all 0).
    offsets: Vec<usize>,
    /// Where its tensors sit, for messages.
    place: Place,
    batches: Vec<Batch>,
}

impl Call {
    /// The index in [`StepPlan::objs`] of state entry `key` of parameter `i`.
    fn state_obj(&self, key: usize, i: usize) -> usize {
        self.base + (1 + usize::from(self.inputs == Inputs::Fixed) + key) * self.n + i
    }
}

/// A list a run walks to read gradients (a parameter group's `params`): each item's address and,
/// for a planned parameter, the index of its gradient among the run's gradients (None: it had
/// no gradient when the plan was built, and must still have none).
struct Watched {
    list: Py<PyList>,
    items: Vec<(usize, Option<usize>)>,
}

/// Every group of a step, validated, with the tensors' metadata as it was when the plan was
/// built (see the module docs).
#[pyclass(module = "emafuse._native")]
pub struct StepPlan {
    who: String,
    rule: String,
    /// Every tensor object the plan keeps (parameters, fixed inputs, state), kept alive.
    objs: Vec<Py<PyAny>>,
    /// Their metadata when the plan was built.
    infos: Vec<TensorInfo>,
    calls: Vec<Call>,
    /// The hyper-parameters given at build time, used by runs that pass none.
    hypers: Vec<Hyper>,
    /// Parameter lists whose `.grad`s are the inputs (optimizers); empty for fixed inputs.
    watched: Vec<Watched>,
    /// Whether every run is given the gradients (see [`StepPlan::build`]).
    grads_given: bool,
    /// Gradients read per run, and their roles for messages.
    grad_roles: Roles,
    /// The roles of the kept tensors, for messages.
    kept_roles: Roles,
    /// The written tensors' memory, against which each run checks its gradients.
    written: Written,
    /// Built and not yet run: the cached metadata is current.
    fresh: bool,
}

/// Collects tensor objects and their roles while a plan is built.
#[derive(Default)]
struct Gathered<'py> {
    objs: Vec<Bound<'py, PyAny>>,
    roles: Roles,
}

impl<'py> Gathered<'py> {
    fn push_list(&mut self, list: &Bound<'py, PyList>, place: &Place, what: What) {
        for (i, obj) in list.iter().enumerate() {
            self.objs.push(obj);
            self.roles.push(place, i, what);
        }
    }

    fn infos(&self) -> Result<Vec<TensorInfo>> {
        let roles = &self.roles;
        infos(&self.objs, &|i| roles.describe(i))
    }
}

fn state_dicts<'py>(states: &Bound<'py, PyList>, call: usize) -> Result<Vec<Bound<'py, PyDict>>> {
    states.iter().enumerate().map(|(i, d)| d.cast_into::<PyDict>().map_err(|_| Error::Value(format!("param group {call}: state {i} is not a dict")))).collect()
}

fn names<'py>(t: &Bound<'py, PyTuple>, what: &str) -> Result<Vec<Bound<'py, PyString>>> {
    t.iter().map(|n| n.cast_into::<PyString>().map_err(|_| Error::Value(format!("{what} must be a tuple of str")))).collect()
}

impl StepPlan {
    /// Read and validate every tensor of `groups`. With `watch` (the parameter groups' `params`
    /// lists), the inputs are the parameters' gradients, re-read by every run; with
    /// `grads_given`, every run is given them (`run(grads=...)`, e.g. the local shards of DTensor
    /// gradients, which no parameter list holds); else they are fixed.
    pub(super) fn build(
        py: Python<'_>,
        who: &str,
        rule: &str,
        groups: &Bound<'_, PyList>,
        watch: Option<&Bound<'_, PyList>>,
        grads_given: bool,
    ) -> Result<StepPlan> {
        let mut kept = Gathered::default();
        let mut grads = Gathered::default();
        let mut calls = Vec::with_capacity(groups.len());
        let mut hypers = Vec::with_capacity(groups.len());
        for (ci, group) in groups.iter().enumerate() {
            let group = group.cast::<Group>().map_err(|_| Error::Value(format!("{who}: groups must be emafuse._native.Group objects")))?;
            let g = group.get();
            hypers.push(hyper_from(g.hyper.bind(py))?);
            let params = g.params.bind(py);
            let (base, n) = (kept.objs.len(), params.len());
            let place = Place::of(&g.place, ci, n)?;
            kept.push_list(params, &place, What::Param);
            let inputs = match (&g.inputs, watch.is_some() || grads_given) {
                (None, _) => Inputs::None,
                (Some(inputs), false) => {
                    kept.push_list(inputs.bind(py), &place, What::Input);
                    Inputs::Fixed
                }
                (Some(inputs), true) => {
                    let first = grads.objs.len();
                    grads.push_list(inputs.bind(py), &place, What::Input);
                    Inputs::Grads(first)
                }
            };
            let (slots, scalars) = (names(g.slots.bind(py), "slots")?, names(g.scalars.bind(py), "scalars")?);
            let dicts = match &g.states {
                None if !slots.is_empty() || !scalars.is_empty() => {
                    return Err(Error::Value(format!("{who}: slots or scalars given without states")));
                }
                None => Vec::new(),
                Some(states) => state_dicts(states.bind(py), ci)?,
            };
            for key in slots.iter().chain(&scalars) {
                let k = kept.roles.names.len() as u32;
                kept.roles.names.push(key.to_string());
                for (i, d) in dicts.iter().enumerate() {
                    let t = d
                        .get_item(key)
                        .map_err(|e| Error::Value(e.to_string()))?
                        .ok_or_else(|| Error::Value(format!("param group {ci}, parameter {i}: state has no '{key}'")))?;
                    kept.objs.push(t);
                    kept.roles.push(&place, i, What::State(k));
                }
            }
            let keys = slots.iter().chain(&scalars).map(|k| k.clone().unbind()).collect();
            let offsets: Vec<usize> = g.offsets.iter().flatten().map(|&o| o as usize).collect();
            calls.push(Call {
                base,
                n,
                inputs,
                n_slots: slots.len(),
                keys,
                dicts: dicts.into_iter().map(Bound::unbind).collect(),
                offsets,
                place,
                batches: Vec::new(),
            });
            let lens_ok = [g.inputs.as_ref().map(|l| l.bind(py).len()), g.states.as_ref().map(|l| l.bind(py).len()), g.offsets.as_ref().map(Vec::len)]
                .into_iter()
                .flatten()
                .all(|len| len == n);
            if !lens_ok {
                return Err(Error::Value(format!("{who}: param group {ci}: tensor lists of different lengths")));
            }
        }
        let kept_infos = kept.infos()?;
        let grad_infos = grads.infos()?;
        for (ci, call) in calls.iter_mut().enumerate() {
            let tensors = call_tensors(call, &kept_infos, &grad_infos, crate::rules::factored(rule, &hypers[ci])?);
            call.batches = split_group(who, &tensors)?;
        }
        let written = index_written(who, &calls, &kept_infos, &grad_infos, &kept.roles, &grads.roles)?;
        let watched = match watch {
            Some(watch) => watched_lists(who, watch, &kept.objs, &calls)?,
            None => Vec::new(),
        };
        Ok(StepPlan {
            who: who.to_string(),
            rule: rule.to_string(),
            objs: kept.objs.into_iter().map(Bound::unbind).collect(),
            infos: kept_infos,
            calls,
            hypers,
            watched,
            grads_given,
            grad_roles: grads.roles,
            kept_roles: kept.roles,
            written,
            fresh: true,
        })
    }
}

/// Check that no tensor a step writes (parameter, state, scalar state) shares memory with any
/// other tensor of the step, before anything is written: the result would depend on the order of
/// reads and writes (a gradient that is a view of its parameter, two state slots over one
/// storage after a crafted `load_state_dict`). Returns the written tensors' index, against
/// which later runs check their new gradients. Ids: kept tensors first, then gradients.
fn index_written(who: &str, calls: &[Call], kept: &[TensorInfo], grads: &[TensorInfo], kept_roles: &Roles, grad_roles: &Roles) -> Result<Written> {
    let mut ops: Vec<Operand> = Vec::with_capacity(kept.len() + grads.len());
    for call in calls {
        let fixed = usize::from(call.inputs == Inputs::Fixed);
        for (k, info) in kept[call.base..call.base + (1 + fixed + call.keys.len()) * call.n].iter().enumerate() {
            let written = k < call.n || k >= (1 + fixed) * call.n;
            ops.extend(info.extent().map(|e| (e, written, (call.base + k) as u32)));
        }
    }
    ops.extend(grads.iter().enumerate().filter_map(|(i, g)| g.extent().map(|e| (e, false, (kept.len() + i) as u32))));
    Written::index(ops).map_err(|(a, b)| {
        let name = |id: u32| match (id as usize).checked_sub(kept.len()) {
            None => kept_roles.describe(id as usize),
            Some(g) => grad_roles.describe(g),
        };
        overlap_error(who, &name(a), &name(b))
    })
}

/// The refusal of a step whose written memory overlaps another operand (one wording).
fn overlap_error(who: &str, a: &str, b: &str) -> Error {
    Error::Value(format!(
        "{who}: {a} and {b} share memory, and the step writes at least one of them: the result would depend on the \
         order of reads and writes. Give every parameter, gradient and state tensor its own memory (e.g. .clone())"
    ))
}

/// A call's tensors as `split_group` takes them.
fn call_tensors(call: &Call, kept: &[TensorInfo], grads: &[TensorInfo], factored: Option<FactorDims>) -> GroupTensors {
    let n = call.n;
    let list = |start: usize| kept[start..start + n].to_vec();
    let grads = match call.inputs {
        Inputs::None => None,
        Inputs::Fixed => Some(list(call.base + n)),
        Inputs::Grads(first) => Some(grads[first..first + n].to_vec()),
    };
    let states = (0..call.n_slots).map(|k| list(call.state_obj(k, 0))).collect();
    let scalars = (call.n_slots..call.keys.len()).map(|k| list(call.state_obj(k, 0))).collect();
    let (slot_keys, scalar_keys) = call.keys.split_at(call.n_slots);
    let names = |keys: &[Py<PyString>]| keys.iter().map(|k| k.to_string()).collect();
    GroupTensors {
        params: list(call.base),
        grads,
        slot_names: names(slot_keys),
        states,
        scalar_names: names(scalar_keys),
        scalars,
        offsets: call.offsets.clone(),
        factored,
        group: call.place.group,
        positions: call.place.positions.clone(),
    }
}

/// Map every parameter whose gradient a run reads to its place in the watched lists.
fn watched_lists(who: &str, watch: &Bound<'_, PyList>, kept: &[Bound<'_, PyAny>], calls: &[Call]) -> Result<Vec<Watched>> {
    let mut grad_of = std::collections::HashMap::new();
    for call in calls {
        if let Inputs::Grads(first) = call.inputs {
            for i in 0..call.n {
                grad_of.insert(kept[call.base + i].as_ptr() as usize, first + i);
            }
        }
    }
    let mut watched = Vec::with_capacity(watch.len());
    for list in watch.iter() {
        let list = list.cast_into::<PyList>().map_err(|_| Error::Value(format!("{who}: watch must be a list of lists")))?;
        let items = list.iter().map(|p| (p.as_ptr() as usize, grad_of.remove(&(p.as_ptr() as usize)))).collect();
        watched.push(Watched { list: list.unbind(), items });
    }
    if !grad_of.is_empty() {
        return Err(Error::Value(format!("{who}: a parameter with a gradient is in no watched list (or in one twice)")));
    }
    Ok(watched)
}

impl StepPlan {
    /// Whether the kept tensors are still the ones the plan was built with: the same objects in
    /// the state dicts, over the same memory with the same metadata.
    fn current(&self, py: Python<'_>) -> Result<bool> {
        for call in &self.calls {
            for (i, d) in call.dicts.iter().enumerate() {
                let d = d.bind(py);
                for (k, key) in call.keys.iter().enumerate() {
                    let now = d.get_item(key.bind(py)).map_err(|e| Error::Value(e.to_string()))?;
                    if now.is_none_or(|t| t.as_ptr() != self.objs[call.state_obj(k, i)].as_ptr()) {
                        return Ok(false);
                    }
                }
            }
        }
        // SAFETY: the objects are live torch.Tensors (checked when the plan was built, kept
        // alive by the plan) and this thread holds the GIL.
        Ok(unsafe { unchanged(&self.objs, &self.infos) })
    }

    /// Each planned parameter's current `.grad`, in the order of the run's gradients; None if a
    /// watched list changed, a planned parameter lost its gradient or another one gained one.
    fn current_grads<'py>(&self, py: Python<'py>) -> Result<Option<Vec<Bound<'py, PyAny>>>> {
        let grad = pyo3::intern!(py, "grad");
        let mut grads: Vec<Option<Bound<'py, PyAny>>> = vec![None; self.grad_roles.roles.len()];
        for w in &self.watched {
            let list = w.list.bind(py);
            if list.len() != w.items.len() {
                return Ok(None);
            }
            for (p, &(ptr, slot)) in list.iter().zip(&w.items) {
                if p.as_ptr() as usize != ptr {
                    return Ok(None);
                }
                let g = p.getattr(grad).map_err(|e| Error::Value(e.to_string()))?;
                match slot {
                    Some(k) if !g.is_none() => grads[k] = Some(g),
                    None if g.is_none() => {}
                    _ => return Ok(None),
                }
            }
        }
        Ok(Some(grads.into_iter().map(|g| g.expect("every planned parameter is watched")).collect()))
    }

    /// Put this run's gradients into the batches, checking each against its parameter; Ok(false)
    /// if one has another dtype than its batch was planned for (the plan must be rebuilt).
    fn set_grads(&mut self, grads: &[TensorInfo]) -> Result<bool> {
        for (ci, call) in self.calls.iter_mut().enumerate() {
            let Inputs::Grads(first) = call.inputs else { continue };
            for batch in &mut call.batches {
                for (j, &i) in batch.members.iter().enumerate() {
                    let (p, g) = (&self.infos[call.base + i], &grads[first + i]);
                    check_input(&|| format!("{}: param group {ci}, parameter {i}", self.who), p, g)?;
                    if g.view.dtype() != batch.input_dtype {
                        return Ok(false);
                    }
                    batch.grads[j] = g.view;
                }
            }
        }
        Ok(true)
    }

    /// One update (or with `SumsArg::Write`, only the per-tensor sums; with
    /// `SumsArg::FactorStats`, only the factor statistics); None (nothing written) when the plan
    /// no longer describes the tensors. `given.grads`: this run's gradients, for a plan built
    /// with `grads_given` (and only then).
    fn run(
        &mut self,
        py: Python<'_>,
        hypers: Option<&Bound<'_, PyList>>,
        amp: AmpArgs<'_, '_>,
        sums: SumsArg<'_, '_>,
        given: RunInputs<'_, '_>,
    ) -> Result<Option<bool>> {
        let RunInputs { grads: given_grads, grad_factors, factor_stats } = given;
        let given = match hypers {
            None => None,
            Some(h) if h.len() == self.calls.len() => {
                Some(h.iter().map(|d| hyper_from(d.cast::<PyDict>().map_err(|_| Error::Value("hypers must be dicts".into()))?)).collect::<Result<Vec<_>>>()?)
            }
            Some(h) => return Err(Error::Value(format!("{}: {} hyper dicts for {} groups", self.who, h.len(), self.calls.len()))),
        };
        if !self.fresh && !self.current(py)? {
            return Ok(None);
        }
        let mut keep_grads = Vec::new();
        let per_run = match (given_grads, self.grads_given) {
            (Some(list), true) if list.len() == self.grad_roles.roles.len() => Some(list.iter().collect()),
            (Some(list), true) => {
                return Err(Error::Value(format!("{}: {} gradients given for {} planned", self.who, list.len(), self.grad_roles.roles.len())))
            }
            (Some(_), false) => return Err(Error::Value(format!("{}: gradients given to a plan that reads its own", self.who))),
            (None, true) => return Err(Error::Value(format!("{}: this plan is given its gradients at every run", self.who))),
            (None, false) if !self.watched.is_empty() => match self.current_grads(py)? {
                Some(grads) => Some(grads),
                None => return Ok(None),
            },
            (None, false) => None,
        };
        if let Some(grads) = per_run {
            let roles = &self.grad_roles;
            let infos = infos(&grads, &|i| roles.describe(i))?;
            if !self.set_grads(&infos)? {
                return Ok(None);
            }
            for (i, g) in infos.iter().enumerate() {
                if let Some(w) = g.extent().and_then(|e| self.written.overlapping(e)) {
                    return Err(overlap_error(&self.who, &self.kept_roles.describe(w as usize), &self.grad_roles.describe(i)));
                }
            }
            keep_grads = grads;
        }
        let env = RunEnv::resolve(&self.who, self.calls.iter().flat_map(|c| c.batches.iter().map(|b| b.device)), amp.grad_scale, amp.found_inf, amp.streams)?;
        let factors = grad_factors.map(|list| factor_lists(&self.who, list, &self.calls)).transpose()?;
        let mut keep_sums = Vec::new();
        let io = match sums {
            SumsArg::Own => SumsIo::Own,
            SumsArg::Read(list) => SumsIo::Read(sums_arrays(&self.who, list, &self.calls, &mut keep_sums)?),
            SumsArg::Write(list, pass) => SumsIo::Write(sums_arrays(&self.who, list, &self.calls, &mut keep_sums)?, pass),
            SumsArg::FactorStats(list) => SumsIo::FactorStats(factor_arrays(&self.who, list, &self.calls, &mut keep_sums)?),
        };
        let given_factors = factor_stats.map(|list| factor_arrays(&self.who, list, &self.calls, &mut keep_sums)).transpose()?;
        self.fresh = false;
        let hypers = given.as_ref().unwrap_or(&self.hypers);
        let (who, rule, calls) = (&self.who, &self.rule, &self.calls);
        let work = || calls.iter().zip(hypers).enumerate().flat_map(|(ci, (c, h))| c.batches.iter().map(move |b| (ci, h, b)));
        // The GIL stays held while the kernels read and write: no Python thread can free or
        // replace a tensor's memory meanwhile (a `.data` swap, `set_`, a storage resize), so
        // every storage the step touches stays alive until it returns. (CUDA kernels only
        // queue work on the stream, whose memory torch's caching allocator keeps.)
        let applied = guarded(|| execute(who, rule, work(), &env, &io, factors.as_deref(), given_factors.as_deref()))?;
        drop((keep_grads, keep_sums));
        Ok(Some(applied))
    }
}

#[pymethods]
impl StepPlan {
    /// Validate `groups` (a list of [`Group`]) for the rule `rule`; `who` names the caller in
    /// messages. `watch`, `grads_given`: see [`StepPlan::build`].
    #[new]
    #[pyo3(signature = (who, rule, groups, watch=None, grads_given=false))]
    fn py_new(py: Python<'_>, who: &str, rule: &str, groups: &Bound<'_, PyList>, watch: Option<&Bound<'_, PyList>>, grads_given: bool) -> PyResult<StepPlan> {
        guarded(|| StepPlan::build(py, who, rule, groups, watch, grads_given)).map_err(|e| to_py(py, e))
    }

    /// Run one update. `hypers`: one dict per group (None: the groups' own). AMP: `grad_scale`
    /// divides every input and a non-zero `found_inf` skips the update; each is None, a
    /// one-element float32 tensor, or a dict {device index: tensor} (CUDA kernels read them on
    /// the device). `streams[i]`: the CUDA stream to launch on for cuda:i. Returns whether the
    /// update was applied (False: AMP skipped the CPU part; CUDA kernels decide on the device),
    /// or None when the tensors changed since the plan was built: nothing was written and a new
    /// plan is needed. A refused update (an error) writes nothing either.
    ///
    /// `sums`: per-tensor sums to use instead of the rule's own pass (rules that reduce over each
    /// tensor, e.g. when the tensors are shards and the sums were added across them), as
    /// [`StepPlan::sums`] writes them. `grads`: this run's gradients, in the order of the
    /// groups' inputs (only and always for a plan built with `grads_given`). `grad_factors`: one
    /// entry per group, None or a sequence of a float per parameter (finite, >= 0) that multiplies
    /// its gradient as the step loads it (per-tensor clipping, e.g. AdaGC's; the gradients are
    /// not written). `factor_stats`: for a rule with factored state, each parameter's factor
    /// statistics to use instead of the rule's own (e.g. added across the shards of tensors whose
    /// rows are split across ranks), as [`StepPlan::factor_stats`] writes them.
    #[pyo3(name = "run", signature = (hypers=None, grad_scale=None, found_inf=None, streams=None, sums=None, grads=None, grad_factors=None, factor_stats=None))]
    #[allow(clippy::too_many_arguments)]
    fn py_run(
        &mut self,
        py: Python<'_>,
        hypers: Option<&Bound<'_, PyList>>,
        grad_scale: Option<&Bound<'_, PyAny>>,
        found_inf: Option<&Bound<'_, PyAny>>,
        streams: Option<&Bound<'_, PyAny>>,
        sums: Option<&Bound<'_, PyList>>,
        grads: Option<&Bound<'_, PyList>>,
        grad_factors: Option<&Bound<'_, PyList>>,
        factor_stats: Option<&Bound<'_, PyList>>,
    ) -> PyResult<Option<bool>> {
        let sums = sums.map_or(SumsArg::Own, SumsArg::Read);
        guarded(|| self.run(py, hypers, AmpArgs { grad_scale, found_inf, streams }, sums, RunInputs { grads, grad_factors, factor_stats }))
            .map_err(|e| to_py(py, e))
    }

    /// The rule's per-tensor sums of read-only pass `sum_pass` (read only, nothing updated) into
    /// `out`: one contiguous float64 tensor of shape `[n, MAX_SUMS]` per group, on its
    /// parameters' device, row `i` for parameter `i`, holding the sums of the earlier passes
    /// (zeros for pass 0; the pass's own columns zero); the pass's sums are combined into it
    /// (see `rule_sums`). Queued on `streams` for CUDA tensors. Other arguments and the return
    /// value as for `run` (give the same `grad_factors` and `factor_stats` as to the update).
    #[pyo3(name = "sums", signature = (out, hypers=None, grad_scale=None, found_inf=None, streams=None, grads=None, sum_pass=0, grad_factors=None, factor_stats=None))]
    #[allow(clippy::too_many_arguments)]
    fn py_sums(
        &mut self,
        py: Python<'_>,
        out: &Bound<'_, PyList>,
        hypers: Option<&Bound<'_, PyList>>,
        grad_scale: Option<&Bound<'_, PyAny>>,
        found_inf: Option<&Bound<'_, PyAny>>,
        streams: Option<&Bound<'_, PyAny>>,
        grads: Option<&Bound<'_, PyList>>,
        sum_pass: usize,
        grad_factors: Option<&Bound<'_, PyList>>,
        factor_stats: Option<&Bound<'_, PyList>>,
    ) -> PyResult<Option<bool>> {
        let amp = AmpArgs { grad_scale, found_inf, streams };
        guarded(|| self.run(py, hypers, amp, SumsArg::Write(out, sum_pass), RunInputs { grads, grad_factors, factor_stats })).map_err(|e| to_py(py, e))
    }

    /// For a rule with factored state (Adafactor's): each parameter's factor statistics (read
    /// only, nothing updated) into `out`, one list per group with an entry per parameter: a
    /// contiguous float64 CPU tensor of `count · (rows + cols + 2)` elements for a parameter of
    /// `count` matrices `rows × cols` (its last two dimensions), laid out `[row sums | column
    /// sums | (sum of the row factors, rows) per matrix]`: the sums of the rule's term over this
    /// tensor's rows and columns, and its row factors as this step updates them. None for a
    /// parameter without factored state. Where a tensor is a shard of one whose rows are split
    /// across ranks, adding its column sums and pairs across the ranks gives the whole tensor's,
    /// which `sums` and `run` then take (`factor_stats=`). Other arguments and the return value as
    /// for `run` (give the same `grad_factors` as to the update).
    #[pyo3(name = "factor_stats", signature = (out, hypers=None, grad_scale=None, found_inf=None, streams=None, grads=None, grad_factors=None))]
    #[allow(clippy::too_many_arguments)]
    fn py_factor_stats(
        &mut self,
        py: Python<'_>,
        out: &Bound<'_, PyList>,
        hypers: Option<&Bound<'_, PyList>>,
        grad_scale: Option<&Bound<'_, PyAny>>,
        found_inf: Option<&Bound<'_, PyAny>>,
        streams: Option<&Bound<'_, PyAny>>,
        grads: Option<&Bound<'_, PyList>>,
        grad_factors: Option<&Bound<'_, PyList>>,
    ) -> PyResult<Option<bool>> {
        let amp = AmpArgs { grad_scale, found_inf, streams };
        guarded(|| self.run(py, hypers, amp, SumsArg::FactorStats(out), RunInputs { grads, grad_factors, factor_stats: None })).map_err(|e| to_py(py, e))
    }

    /// The parameters (written tensors) of every group, in order.
    fn params(&self, py: Python<'_>) -> Vec<Py<PyAny>> {
        self.calls.iter().flat_map(|c| self.objs[c.base..c.base + c.n].iter().map(|o| o.clone_ref(py))).collect()
    }
}

/// One update over `groups` without keeping a plan: build, then run (see [`StepPlan`]).
#[pyfunction]
#[pyo3(signature = (who, rule, groups, grad_scale=None, found_inf=None, streams=None))]
pub fn step(
    py: Python<'_>,
    who: &str,
    rule: &str,
    groups: &Bound<'_, PyList>,
    grad_scale: Option<&Bound<'_, PyAny>>,
    found_inf: Option<&Bound<'_, PyAny>>,
    streams: Option<&Bound<'_, PyAny>>,
) -> PyResult<bool> {
    let run = || -> Result<bool> {
        let mut plan = StepPlan::build(py, who, rule, groups, None, false)?;
        Ok(plan.run(py, None, AmpArgs { grad_scale, found_inf, streams }, SumsArg::Own, RunInputs::default())?.expect("a fresh plan is current"))
    };
    guarded(run).map_err(|e| to_py(py, e))
}

impl StepPlan {
    /// The plan's update with the hyper-parameters given at build time, for a run on another
    /// thread (no AMP, CPU batches only); the tensor objects are released with the GIL held.
    pub(super) fn into_background(self) -> Result<impl FnOnce() -> Result<bool> + Send> {
        let env = RunEnv::resolve(&self.who, self.calls.iter().flat_map(|c| c.batches.iter().map(|b| b.device)), None, None, None)?;
        Ok(move || {
            let StepPlan { who, rule, objs, calls, hypers, .. } = self;
            let work = calls.iter().zip(&hypers).enumerate().flat_map(|(ci, (c, h))| c.batches.iter().map(move |b| (ci, h, b)));
            let result = guarded(|| execute(&who, &rule, work, &env, &SumsIo::Own, None, None));
            if super::step::interpreter_alive() {
                Python::attach(move |_| drop((objs, calls)));
            } else {
                std::mem::forget((objs, calls)); // the process is ending: nothing to release into
            }
            result
        })
    }
}

/// AMP inputs as Python passed them: None, one tensor, or a dict {device index (-1: CPU): tensor}.
struct AmpInput<'py> {
    by_device: Vec<(Device, Unpacked<'py>)>,
}

impl<'py> AmpInput<'py> {
    fn from(obj: Option<&Bound<'py, PyAny>>, role: &str) -> Result<AmpInput<'py>> {
        let mut by_device = Vec::new();
        if let Some(obj) = obj {
            if let Ok(d) = obj.cast::<PyDict>() {
                for (_, t) in d.iter() {
                    let u = unpack(&t, &|| role.to_string())?;
                    by_device.push((u.info.view.device(), u));
                }
            } else {
                let u = unpack(obj, &|| role.to_string())?;
                by_device.push((u.info.view.device(), u));
            }
            for (_, u) in &by_device {
                if u.info.view.numel() != 1 || u.info.view.dtype() != DType::F32 {
                    return Err(Error::Value(format!("{role} must be a one-element float32 tensor")));
                }
            }
        }
        Ok(AmpInput { by_device })
    }

    /// The tensor for `device`; `Ok(None)` when no AMP input was given at all.
    fn on(&self, device: Device, role: &str) -> Result<Option<TensorView>> {
        if self.by_device.is_empty() {
            return Ok(None);
        }
        self.by_device
            .iter()
            .find(|(d, _)| *d == device)
            .map(|(_, u)| Some(u.info.view))
            .ok_or_else(|| Error::Device(format!("{role} is not available on {device}, where parameters are")))
    }
}

/// AMP and stream settings of one run, resolved for the devices its batches are on.
#[derive(Default)]
struct RunEnv {
    /// CPU batches: the grad scale, and whether found-inf skips them.
    cpu_scale: Option<f64>,
    cpu_skip: bool,
    /// CUDA batches: (device, AMP addresses, stream handle).
    cuda: Vec<(u32, DeviceAmp, u64)>,
}

impl RunEnv {
    fn resolve(
        who: &str,
        devices: impl Iterator<Item = Device>,
        grad_scale: Option<&Bound<'_, PyAny>>,
        found_inf: Option<&Bound<'_, PyAny>>,
        streams: Option<&Bound<'_, PyAny>>,
    ) -> Result<RunEnv> {
        let grad_scale = AmpInput::from(grad_scale, "grad_scale")?;
        let found_inf = AmpInput::from(found_inf, "found_inf")?;
        let mut env = RunEnv::default();
        let mut seen = Vec::new();
        for device in devices {
            if seen.contains(&device) {
                continue;
            }
            seen.push(device);
            match device {
                Device::Cpu => {
                    // SAFETY (both reads): one-element float32 CPU tensors (checked by AmpInput),
                    // kept alive by the caller's arguments for the whole run.
                    env.cpu_scale = grad_scale.on(device, "grad_scale")?.map(|v| unsafe { *v.at::<f32>(0) as f64 });
                    env.cpu_skip = found_inf.on(device, "found_inf")?.is_some_and(|v| unsafe { *v.at::<f32>(0) } != 0.0);
                }
                Device::Cuda(i) => {
                    let stream = streams
                        .and_then(|s| s.get_item(i).ok())
                        .and_then(|s| s.extract::<u64>().ok())
                        .ok_or_else(|| Error::Value(format!("{who}: no CUDA stream given for cuda:{i}")))?;
                    let address = |v: Option<TensorView>| v.map_or(0, |v| v.ptr() as u64);
                    let amp = DeviceAmp { grad_scale: address(grad_scale.on(device, "grad_scale")?), found_inf: address(found_inf.on(device, "found_inf")?) };
                    env.cuda.push((i, amp, stream));
                }
            }
        }
        Ok(env)
    }

    /// How a CPU batch's gradients are scaled: AMP's scale, and the batch's factors `f`.
    fn cpu_scaling<'f>(&self, f: &'f Option<Vec<f64>>) -> cpu::GradScaling<'f> {
        cpu::GradScaling { grad_scale: self.cpu_scale, factors: f.as_deref() }
    }

    fn cuda(&self, device: u32) -> (DeviceAmp, u64) {
        let &(_, amp, stream) = self.cuda.iter().find(|(d, ..)| *d == device).expect("resolved for every device");
        (amp, stream)
    }
}

/// A run's AMP inputs and streams as Python passes them (see `StepPlan::run`).
struct AmpArgs<'a, 'py> {
    grad_scale: Option<&'a Bound<'py, PyAny>>,
    found_inf: Option<&'a Bound<'py, PyAny>>,
    streams: Option<&'a Bound<'py, PyAny>>,
}

/// What Python may give a run besides the tensors planned (see `StepPlan.run`): the gradients
/// (`grads`), per-tensor gradient factors (`grad_factors`), factor statistics (`factor_stats`).
#[derive(Default)]
struct RunInputs<'a, 'py> {
    grads: Option<&'a Bound<'py, PyList>>,
    grad_factors: Option<&'a Bound<'py, PyList>>,
    factor_stats: Option<&'a Bound<'py, PyList>>,
}

/// Per-tensor sums as Python passes them to a run (see `StepPlan::sums`).
enum SumsArg<'a, 'py> {
    /// Each batch computes its own (the usual update).
    Own,
    /// Only compute the sums of one pass, into these arrays (which hold the earlier passes').
    Write(&'a Bound<'py, PyList>, usize),
    /// Update with the sums in these arrays.
    Read(&'a Bound<'py, PyList>),
    /// Only compute the factor statistics, into these arrays (see `StepPlan::factor_stats`).
    FactorStats(&'a Bound<'py, PyList>),
}

/// [`SumsArg`] validated: one float64 `[n, MAX_SUMS]` array per call, or the factor statistics'
/// arrays (see [`factor_arrays`]).
enum SumsIo {
    Own,
    Write(Vec<TensorView>, usize),
    Read(Vec<TensorView>),
    FactorStats(FactorArrays),
}

/// Factor statistics' arrays: per call, per parameter, a contiguous float64 CPU array or None.
type FactorArrays = Vec<Vec<Option<TensorView>>>;

/// The factor statistics' arrays of `list` (see `StepPlan::factor_stats`), checked: one list
/// per call with an entry per parameter, each None or a contiguous float64 CPU tensor (whose
/// length [`factor_slices`] checks). `keep` holds them while they are used.
fn factor_arrays<'py>(who: &str, list: &Bound<'py, PyList>, calls: &[Call], keep: &mut Vec<Bound<'py, PyAny>>) -> Result<FactorArrays> {
    if list.len() != calls.len() {
        return Err(Error::Value(format!("{who}: {} factor statistics lists for {} groups", list.len(), calls.len())));
    }
    let mut out = Vec::with_capacity(calls.len());
    for (ci, (entries, call)) in list.iter().zip(calls).enumerate() {
        let entries: Vec<Bound<'py, PyAny>> =
            entries.extract().map_err(|_| Error::Value(format!("{who}: the factor statistics of group {ci} must be a list")))?;
        if entries.len() != call.n {
            return Err(Error::Value(format!("{who}: the factor statistics of group {ci}: {} arrays for {} parameters", entries.len(), call.n)));
        }
        let mut views = Vec::with_capacity(call.n);
        for (i, obj) in entries.iter().enumerate() {
            if obj.is_none() {
                views.push(None);
                continue;
            }
            let what = || format!("{who}: the factor statistics of group {ci}, parameter {i}");
            let Unpacked { obj, info } = unpack(obj, &what)?;
            let v = info.view;
            if v.dtype() != DType::F64 || info.layout != Layout::Contiguous || v.device() != Device::Cpu {
                return Err(Error::Value(format!("{} must be a contiguous float64 CPU tensor", what())));
            }
            keep.push(obj);
            views.push(Some(v));
        }
        out.push(views);
    }
    Ok(out)
}

/// `batch`'s parameters' entries of its call's factor statistics arrays, checked to have the
/// length of their parameter's ([`cpu::FactorStats::len`]); empty for a step without factored
/// state.
///
/// # Safety
/// `arrays` must be live CPU float64 arrays validated by [`factor_arrays`] for the batch's call,
/// which nothing else accesses while the slices live.
unsafe fn factor_slices<'a>(who: &str, arrays: &[Option<TensorView>], batch: &Batch, step: &dyn cpu::CpuStep) -> Result<Vec<&'a mut [f64]>> {
    if !step.factored() {
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity(batch.members.len());
    for (j, &m) in batch.members.iter().enumerate() {
        let want = cpu::FactorStats::len(batch.matrices[j]).unwrap_or(0);
        let at = || format!("{who}: param group {}, parameter {}: its factor statistics", batch.group, batch.positions[j]);
        let Some(v) = &arrays[m] else { return Err(Error::Value(format!("{} are missing", at()))) };
        if v.numel() != want {
            return Err(Error::Shape(format!("{} have {} elements; its shape needs {want}", at(), v.numel())));
        }
        // SAFETY: per the contract (an empty array may have no memory).
        out.push(if want == 0 { &mut [][..] } else { unsafe { std::slice::from_raw_parts_mut(v.at::<f64>(0), want) } });
    }
    Ok(out)
}

/// The sums arrays of `list`, one per call, checked: contiguous float64, `n × MAX_SUMS`
/// elements, on the device of every batch of its call. `keep` holds them while they are used.
fn sums_arrays<'py>(who: &str, list: &Bound<'py, PyList>, calls: &[Call], keep: &mut Vec<Bound<'py, PyAny>>) -> Result<Vec<TensorView>> {
    if list.len() != calls.len() {
        return Err(Error::Value(format!("{who}: {} sums arrays for {} groups", list.len(), calls.len())));
    }
    let mut out = Vec::with_capacity(calls.len());
    for (ci, (obj, call)) in list.iter().zip(calls).enumerate() {
        let what = || format!("{who}: the sums of group {ci}");
        let Unpacked { obj, info } = unpack(&obj, &what)?;
        let v = info.view;
        if v.dtype() != DType::F64 || info.layout != Layout::Contiguous || v.numel() != call.n * MAX_SUMS {
            return Err(Error::Value(format!("{} must be a contiguous float64 tensor of shape [{}, {MAX_SUMS}]", what(), call.n)));
        }
        if let Some(b) = call.batches.iter().find(|b| b.device != v.device()) {
            return Err(Error::Device(format!("{} are on {}, but some of its tensors are on {}", what(), v.device(), b.device)));
        }
        keep.push(obj);
        out.push(v);
    }
    Ok(out)
}

/// The per-tensor gradient factors of `list` (one entry per call: None, or a float per parameter
/// of the call), checked: finite and >= 0.
fn factor_lists(who: &str, list: &Bound<'_, PyList>, calls: &[Call]) -> Result<Vec<Option<Vec<f64>>>> {
    if list.len() != calls.len() {
        return Err(Error::Value(format!("{who}: {} gradient factor lists for {} groups", list.len(), calls.len())));
    }
    let mut out = Vec::with_capacity(calls.len());
    for (ci, (obj, call)) in list.iter().zip(calls).enumerate() {
        if obj.is_none() {
            out.push(None);
            continue;
        }
        let what = || format!("{who}: the gradient factors of group {ci}");
        let factors: Vec<f64> = obj.extract().map_err(|_| Error::Value(format!("{} must be a sequence of floats", what())))?;
        if factors.len() != call.n {
            return Err(Error::Value(format!("{}: {} factors for {} parameters", what(), factors.len(), call.n)));
        }
        if let Some(x) = factors.iter().find(|x| !(x.is_finite() && **x >= 0.0)) {
            return Err(Error::Value(format!("{} must be finite numbers >= 0, got {x}", what())));
        }
        out.push(Some(factors));
    }
    Ok(out)
}

/// `batch`'s tensors' entries of its call's factors (see [`factor_lists`]).
fn batch_factors(factors: Option<&[Option<Vec<f64>>]>, ci: usize, batch: &Batch) -> Option<Vec<f64>> {
    let call = factors?.get(ci)?.as_ref()?;
    Some(batch.members.iter().map(|&m| call[m]).collect())
}

/// The rows of `batch`'s tensors in a CPU sums array of its call.
///
/// # Safety
/// `rows` is a live CPU float64 array validated by [`sums_arrays`] for the batch's call.
unsafe fn read_rows(rows: &TensorView, batch: &Batch) -> Vec<[f64; MAX_SUMS]> {
    // SAFETY: every member's row lies inside the array (per the contract).
    batch.members.iter().map(|&m| std::array::from_fn(|k| unsafe { *rows.at::<f64>(m * MAX_SUMS + k) })).collect()
}

/// Write `sums` (in `batch`'s order) into the rows of its tensors in a CPU sums array.
///
/// # Safety
/// As [`read_rows`], and nothing else accesses the array.
unsafe fn write_rows(rows: &TensorView, batch: &Batch, sums: &[[f64; MAX_SUMS]]) {
    for (&m, s) in batch.members.iter().zip(sums) {
        for (k, &x) in s.iter().enumerate() {
            // SAFETY: per the contract.
            unsafe { *rows.at::<f64>(m * MAX_SUMS + k) = x };
        }
    }
}

/// Plan every batch (`(call index, hyper, batch)`), then run them all: nothing is written
/// unless every batch planned (and, with `check_finite`, every gradient is finite). `Ok(false)`
/// when AMP's found-inf flag skipped the CPU batches. With `SumsIo::Write`, only the per-tensor
/// sums are computed, with `SumsIo::FactorStats` only the factor statistics. `factors`:
/// per-tensor gradient factors of each call (see [`factor_lists`]); `given_factors`: the factor
/// statistics to use (see `StepPlan::factor_stats`).
fn execute<'a>(
    who: &str,
    rule: &str,
    work: impl Iterator<Item = (usize, &'a Hyper, &'a Batch)>,
    env: &RunEnv,
    io: &SumsIo,
    factors: Option<&[Option<Vec<f64>>]>,
    given_factors: Option<&[Vec<Option<TensorView>>]>,
) -> Result<bool> {
    let mut cpu_steps = Vec::new();
    let mut cuda_steps = Vec::new();
    for (ci, hyper, batch) in work {
        let f = batch_factors(factors, ci, batch);
        match batch.device {
            Device::Cpu => {
                let step = cpu::plan(rule, hyper, batch)?;
                // SAFETY: validated CPU arrays (factor_arrays), fresh from the caller; each
                // parameter's array is taken by its one batch.
                let arrays = match io {
                    SumsIo::FactorStats(out) => Some(&out[ci]),
                    _ => given_factors.map(|g| &g[ci]),
                };
                let stats = arrays.map(|a| unsafe { factor_slices(who, a, batch, &*step) }).transpose()?;
                cpu_steps.push((ci, batch, step, f, stats));
            }
            Device::Cuda(i) => {
                if given_factors.is_some() || matches!(io, SumsIo::FactorStats(_)) {
                    return Err(Error::Device(format!("{who}: factor statistics are computed for CPU tensors only")));
                }
                let (amp, stream) = env.cuda(i);
                cuda_steps.push((ci, cuda::plan(rule, hyper, batch.clone(), stream)?, amp, f));
            }
        }
    }
    if !env.cpu_skip {
        match io {
            SumsIo::FactorStats(_) => {
                for (_, _, s, f, stats) in cpu_steps {
                    s.factor_stats(env.cpu_scaling(&f), stats.unwrap_or_default());
                }
            }
            SumsIo::Write(out, pass) => {
                for (ci, batch, s, f, stats) in &cpu_steps {
                    let given = stats.as_ref().map(|v| v.iter().map(|x| &**x).collect::<Vec<&[f64]>>());
                    // SAFETY: validated CPU arrays (sums_arrays), fresh from the caller.
                    unsafe {
                        let prior = read_rows(&out[*ci], batch);
                        write_rows(&out[*ci], batch, &s.sums(env.cpu_scaling(f), *pass, Some(prior), given.as_deref()));
                    }
                }
            }
            _ => {
                for (_, _, s, _, _) in &cpu_steps {
                    s.check_finite(who)?;
                }
                for (ci, batch, s, f, stats) in &cpu_steps {
                    // SAFETY: validated CPU arrays (sums_arrays).
                    let given = if let SumsIo::Read(rows) = io { Some(unsafe { read_rows(&rows[*ci], batch) }) } else { None };
                    let given_factors = stats.as_ref().map(|v| v.iter().map(|x| &**x).collect::<Vec<&[f64]>>());
                    s.run(env.cpu_scaling(f), given.as_deref(), given_factors.as_deref());
                }
            }
        }
    }
    for (ci, s, amp, f) in &cuda_steps {
        let f = f.as_deref();
        match io {
            SumsIo::Own => s.launch(*amp, None, f)?,
            SumsIo::Read(rows) => s.launch(*amp, Some(rows[*ci].ptr() as u64), f)?,
            SumsIo::Write(out, pass) => s.sums(*amp, out[*ci].ptr() as u64, *pass, f)?,
            SumsIo::FactorStats(_) => unreachable!("refused above"),
        }
    }
    Ok(!env.cpu_skip)
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> Error {
    let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
    Error::Internal(format!("panic in the native step: {}", msg.unwrap_or_else(|| "(no message)".into())))
}

/// Run `f`, turning a panic into an internal error.
pub(super) fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(panic_message(p)))
}
