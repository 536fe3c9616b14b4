//! `_native.step`: one optimizer step over all parameter groups, validated in full before any
//! tensor is written.

use super::errors::to_py;
use super::tensor::{infos, unpack, Unpacked};
use crate::batch::{check_no_shared_outputs, split_group, GroupTensors, TensorInfo};
use crate::cpu::{self, CpuStep};
use crate::cuda::{self, CudaStep, DeviceAmp};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::rules::{Hyper, HyperValue};
use crate::view::Device;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyList, PyString, PyTuple};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;
use std::thread::JoinHandle;

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

/// Where a tensor passed to [`step`] sits, for messages: group, parameter index, which tensor.
#[derive(Clone, Copy)]
struct Role {
    group: u32,
    index: u32,
    what: What,
}

#[derive(Clone, Copy)]
enum What {
    Param,
    Grad,
    /// A state entry; the index into the plan's state names.
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
            What::Grad => format!("param group {group}, grad {index}"),
            What::State(k) => format!("param group {group}, parameter {index}: state '{}'", self.names[k as usize]),
        }
    }
}

/// The tensor objects of every group, gathered (and kept alive) before any is unpacked, so that
/// [`infos`] reads them all in one pass.
#[derive(Default)]
struct Gathered<'py> {
    objs: Vec<Bound<'py, PyAny>>,
    roles: Roles,
    groups: Vec<GroupLists>,
}

/// One group's hyper-parameters and the lengths of its tensor lists, which lie in
/// [`Gathered::objs`] in this order: parameters, gradients (if given), each slot, each scalar.
struct GroupLists {
    hyper: Hyper,
    lens: Vec<usize>,
    has_grads: bool,
    slot_names: Vec<String>,
    scalar_names: Vec<String>,
}

impl<'py> Gathered<'py> {
    fn push(&mut self, obj: Bound<'py, PyAny>, group: usize, index: usize, what: What) {
        self.objs.push(obj);
        // u32 keeps the table small; a step over more than 4 billion tensors is not a real case.
        self.roles.roles.push(Role { group: group as u32, index: index as u32, what });
    }

    fn push_list(&mut self, list: &Bound<'py, PyAny>, what: What, gi: usize) -> Result<usize> {
        let name = if matches!(what, What::Grad) { "grads" } else { "params" };
        let list = list.cast::<PyList>().map_err(|_| Error::Value(format!("param group {gi}: {name} must be a list")))?;
        for (i, obj) in list.iter().enumerate() {
            self.push(obj, gi, i, what);
        }
        Ok(list.len())
    }

    /// Look up `key` in each state dict.
    fn push_states(&mut self, dicts: &Bound<'py, PyList>, key: &Bound<'py, PyString>, gi: usize) -> Result<usize> {
        let k = self.roles.names.len();
        self.roles.names.push(key.to_string());
        for (i, d) in dicts.iter().enumerate() {
            let d = d.cast::<PyDict>().map_err(|_| Error::Value(format!("param group {gi}: state {i} is not a dict")))?;
            let t = d
                .get_item(key)
                .map_err(|e| Error::Value(e.to_string()))?
                .ok_or_else(|| Error::Value(format!("param group {gi}, parameter {i}: state has no '{key}'")))?;
            self.push(t, gi, i, What::State(k as u32));
        }
        Ok(dicts.len())
    }

    /// One group as passed from Python: `(hyper: dict, params: list, inputs: list | None,
    /// states: list[dict] | None, slots: tuple[str, ...], scalars: tuple[str, ...])`. `inputs`
    /// are the gradients (None for rules that read none); each state dict holds the tensors named
    /// in `slots` and the one-element tensors named in `scalars`.
    fn push_group(&mut self, group: &Bound<'py, PyTuple>, gi: usize) -> Result<()> {
        if group.len() != 6 {
            return Err(Error::Value("each group is (hyper, params, inputs, states, slots, scalars)".into()));
        }
        let item = |k: usize| group.get_item(k).expect("length checked");
        let hyper = hyper_from(item(0).cast::<PyDict>().map_err(|_| Error::Value("hyper must be a dict".into()))?)?;
        let mut lens = vec![self.push_list(&item(1), What::Param, gi)?];
        let grads_obj = item(2);
        let has_grads = !grads_obj.is_none();
        if has_grads {
            lens.push(self.push_list(&grads_obj, What::Grad, gi)?);
        }
        let names = |k: usize, what: &str| -> Result<Vec<Bound<'py, PyString>>> {
            let t = item(k);
            let t = t.cast::<PyTuple>().map_err(|_| Error::Value(format!("{what} must be a tuple of str")))?;
            t.iter().map(|n| n.cast_into::<PyString>().map_err(|_| Error::Value(format!("{what} must be a tuple of str")))).collect()
        };
        let (slots, scalar_keys) = (names(4, "slots")?, names(5, "scalars")?);
        let states_obj = item(3);
        if states_obj.is_none() {
            if !slots.is_empty() || !scalar_keys.is_empty() {
                return Err(Error::Value("slots or scalars given without states".into()));
            }
        } else {
            let dicts = states_obj.cast::<PyList>().map_err(|_| Error::Value("states must be a list of dicts".into()))?;
            for name in slots.iter().chain(&scalar_keys) {
                lens.push(self.push_states(dicts, name, gi)?);
            }
        }
        let (slot_names, scalar_names) = (slots.iter().map(|n| n.to_string()).collect(), scalar_keys.iter().map(|n| n.to_string()).collect());
        self.groups.push(GroupLists { hyper, lens, has_grads, slot_names, scalar_names });
        Ok(())
    }

    /// Unpack every gathered tensor and split them back into groups.
    fn assemble(&self) -> Result<Vec<(Hyper, GroupTensors)>> {
        let roles = &self.roles;
        let mut infos = infos(&self.objs, &|i| roles.describe(i))?.into_iter();
        let mut out = Vec::with_capacity(self.groups.len());
        for g in &self.groups {
            let mut lists = g.lens.iter().map(|&n| infos.by_ref().take(n).collect::<Vec<TensorInfo>>());
            let params = lists.next().expect("parameters come first");
            let grads = if g.has_grads { lists.next() } else { None };
            let states = lists.by_ref().take(g.slot_names.len()).collect();
            let scalars = lists.collect();
            let (slot_names, scalar_names) = (g.slot_names.clone(), g.scalar_names.clone());
            out.push((g.hyper.clone(), GroupTensors { params, grads, slot_names, states, scalar_names, scalars }));
        }
        Ok(out)
    }
}

/// AMP inputs as Python passed them: None, one tensor, or a dict {device index (-1: CPU): tensor}.
struct AmpInput<'py> {
    by_device: Vec<(Device, Unpacked<'py>)>,
    _obj: Option<Bound<'py, PyAny>>,
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
        Ok(AmpInput { by_device, _obj: obj.cloned() })
    }

    /// The tensor for `device`; `Ok(None)` when no AMP input was given at all.
    fn on(&self, device: Device, role: &str) -> Result<Option<&Unpacked<'py>>> {
        if self.by_device.is_empty() {
            return Ok(None);
        }
        self.by_device
            .iter()
            .find(|(d, _)| *d == device)
            .map(|(_, u)| Some(u))
            .ok_or_else(|| Error::Device(format!("{role} is not available on {device}, where parameters are")))
    }

    /// The value for CPU parameters, read on the host.
    fn host_value(&self, role: &str) -> Result<Option<f64>> {
        // SAFETY: a one-element float32 CPU tensor (checked above) kept alive by `self`.
        Ok(self.on(Device::Cpu, role)?.map(|u| unsafe { *u.info.view.at::<f32>(0) as f64 }))
    }

    /// The device address for CUDA parameters on `device` (0: none).
    fn device_ptr(&self, device: Device, role: &str) -> Result<u64> {
        Ok(self.on(device, role)?.map_or(0, |u| u.info.view.ptr() as u64))
    }
}

struct Plan {
    cpu: Vec<Box<dyn CpuStep>>,
    cuda: Vec<(Box<dyn CudaStep>, DeviceAmp)>,
    grad_scale: Option<f64>,
    skip_cpu: bool,
}

#[allow(clippy::too_many_arguments)]
fn plan<'py>(
    who: &str,
    rule: &str,
    groups: &Bound<'py, PyList>,
    grad_scale: Option<&Bound<'py, PyAny>>,
    found_inf: Option<&Bound<'py, PyAny>>,
    streams: Option<&Bound<'py, PyAny>>,
    keep: &mut Vec<Bound<'py, PyAny>>,
) -> Result<Plan> {
    let mut gathered = Gathered::default();
    for (gi, group) in groups.iter().enumerate() {
        let group = group.cast::<PyTuple>().map_err(|_| Error::Value("each group must be a tuple".into()))?;
        gathered.push_group(group, gi)?;
    }
    let mut batches = Vec::new();
    for (gi, (hyper, tensors)) in gathered.assemble()?.into_iter().enumerate() {
        for batch in split_group(who, gi, &tensors)? {
            batches.push((batch, hyper.clone()));
        }
    }
    keep.append(&mut gathered.objs);
    check_no_shared_outputs(who, batches.iter().map(|(b, _)| b))?;
    let grad_scale = AmpInput::from(grad_scale, "grad_scale")?;
    let found_inf = AmpInput::from(found_inf, "found_inf")?;
    let mut plan = Plan { cpu: Vec::new(), cuda: Vec::new(), grad_scale: None, skip_cpu: false };
    for (batch, hyper) in batches {
        match batch.device {
            Device::Cpu => {
                plan.grad_scale = grad_scale.host_value("grad_scale")?;
                plan.skip_cpu = found_inf.host_value("found_inf")?.is_some_and(|x| x != 0.0);
                plan.cpu.push(cpu::plan(rule, &hyper, batch)?);
            }
            Device::Cuda(i) => {
                let stream = streams
                    .and_then(|s| s.get_item(i).ok())
                    .and_then(|s| s.extract::<u64>().ok())
                    .ok_or_else(|| Error::Value(format!("{who}: no CUDA stream given for cuda:{i}")))?;
                let amp = DeviceAmp {
                    grad_scale: grad_scale.device_ptr(batch.device, "grad_scale")?,
                    found_inf: found_inf.device_ptr(batch.device, "found_inf")?,
                };
                plan.cuda.push((cuda::plan(rule, &hyper, batch, stream)?, amp));
            }
        }
    }
    Ok(plan)
}

/// Run the plan; `Ok(false)` when AMP's found-inf flag (read on the host) skipped the CPU update.
fn execute(plan: &Plan, who: &str) -> Result<bool> {
    if !plan.skip_cpu {
        for s in &plan.cpu {
            s.check_finite(who)?;
        }
        for s in &plan.cpu {
            s.run(plan.grad_scale);
        }
    }
    for (s, amp) in &plan.cuda {
        s.launch(*amp)?;
    }
    Ok(!plan.skip_cpu)
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> Error {
    let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
    Error::Internal(format!("panic in the native step: {}", msg.unwrap_or_else(|| "(no message)".into())))
}

/// One optimizer step over `groups` (see [`Gathered::push_group`] for their shape). Nothing is written
/// unless every group validates (and, for groups with the `check_finite` flag, every gradient is
/// finite). AMP: `grad_scale` divides every gradient and a non-zero `found_inf` skips the step;
/// each is None, a one-element float32 tensor, or a dict {device index: tensor} (CUDA kernels read
/// them on the device). `streams[i]` is the CUDA stream handle to launch on for cuda:i.
/// Returns whether the step was applied, so that the Python layer advances group- or
/// optimizer-level counters exactly when the tensors moved; CUDA kernels decide on the device
/// without telling the host, so there it is True unless the CPU part was skipped.
#[pyfunction]
#[pyo3(signature = (who, rule, groups, grad_scale=None, found_inf=None, streams=None))]
#[allow(clippy::too_many_arguments)]
pub fn step<'py>(
    py: Python<'py>,
    who: &str,
    rule: &str,
    groups: &Bound<'py, PyList>,
    grad_scale: Option<&Bound<'py, PyAny>>,
    found_inf: Option<&Bound<'py, PyAny>>,
    streams: Option<&Bound<'py, PyAny>>,
) -> PyResult<bool> {
    let mut keep = Vec::new();
    let planned = catch_unwind(AssertUnwindSafe(|| plan(who, rule, groups, grad_scale, found_inf, streams, &mut keep)))
        .unwrap_or_else(|p| Err(panic_message(p)));
    let plan = planned.map_err(|e| to_py(py, e))?;
    let result = py.detach(|| {
        catch_unwind(AssertUnwindSafe(|| execute(&plan, who))).unwrap_or_else(|p| Err(panic_message(p)))
    });
    drop(keep);
    result.map_err(|e| to_py(py, e))
}

/// An update running on a background thread (see [`step_async`]).
#[pyclass(module = "emafuse._native")]
pub struct PendingStep {
    who: String,
    handle: Mutex<Option<JoinHandle<Result<()>>>>,
}

#[pymethods]
impl PendingStep {
    /// Block (without holding the GIL) until the update has finished; raise its error, if any.
    /// Later calls return at once.
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        let handle = self.handle.lock().map_err(|_| to_py(py, Error::Internal("poisoned lock".into())))?.take();
        let Some(handle) = handle else { return Ok(()) };
        let joined = py.detach(|| handle.join());
        let result = joined.unwrap_or_else(|p| Err(panic_message(p)));
        result.map_err(|e| to_py(py, Error::from_background(&self.who, e)))
    }

    /// Whether the update has finished (or was already waited for).
    fn done(&self) -> bool {
        self.handle.lock().map(|h| h.as_ref().is_none_or(|h| h.is_finished())).unwrap_or(true)
    }
}

impl Error {
    fn from_background(who: &str, e: Error) -> Error {
        match e {
            Error::Internal(m) => Error::Internal(format!("{who} (background update): {m}")),
            other => other,
        }
    }
}

/// Like [`step`] (no AMP arguments), but the update runs on a new native thread: everything is
/// validated here, before returning, and the returned [`PendingStep`] is joined with `wait()`.
/// `wait_for`, if given, is a Python callable the thread calls first (e.g. a CUDA event's
/// `synchronize`, so that the update reads a device-to-host copy only once it has landed). The
/// caller must not touch the tensors passed until `wait()` returned.
#[pyfunction]
#[pyo3(signature = (who, rule, groups, wait_for=None))]
pub fn step_async(
    py: Python<'_>,
    who: &str,
    rule: &str,
    groups: &Bound<'_, PyList>,
    wait_for: Option<Py<PyAny>>,
) -> PyResult<PendingStep> {
    let mut keep = Vec::new();
    let planned = catch_unwind(AssertUnwindSafe(|| plan(who, rule, groups, None, None, None, &mut keep)))
        .unwrap_or_else(|p| Err(panic_message(p)));
    let plan = planned.map_err(|e| to_py(py, e))?;
    // The tensors' Python objects stay referenced until the thread is done with them.
    let keep: Vec<Py<PyAny>> = keep.into_iter().map(Bound::unbind).collect();
    let name = who.to_string();
    let thread_name = name.clone();
    let handle = std::thread::Builder::new()
        .name("emafuse-async".into())
        .spawn(move || {
            if let Some(f) = wait_for {
                let waited = Python::attach(|py| {
                    let r = f.call0(py).map(drop).map_err(|e| Error::Value(format!("{thread_name}: waiting for the input failed: {e}")));
                    drop(f);
                    r
                });
                waited?;
            }
            let result = catch_unwind(AssertUnwindSafe(|| execute(&plan, &thread_name))).unwrap_or_else(|p| Err(panic_message(p)));
            Python::attach(move |_| drop(keep));
            result.map(drop)
        })
        .map_err(|e| to_py(py, Error::Internal(format!("cannot start a background thread: {e}"))))?;
    Ok(PendingStep { who: name, handle: Mutex::new(Some(handle)) })
}
