//! Devices, module and table caches, and launches on the caller's stream.

use super::compile::compile_ptx;
use super::program::{hyper_bytes, Program};
use super::table::{self, TensorEntry};
use crate::batch::Batch;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::rounding;
use crate::rules::{check_state, visit_rule, Hyper, Rule, RuleVisitor, MAX_SUMS};
use crate::view::Device;
use cudarc::driver::{result, sys};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::Mutex;

/// Tables kept per device (each is a few bytes per tensor of device memory).
const MAX_TABLES: usize = 32;
/// Threads per block (`EF_THREADS` in multi_tensor.cuh).
const THREADS: u32 = 256;

fn driver_error(what: &str, e: result::DriverError) -> Error {
    Error::Cuda(format!("{what}: {e:?}"))
}

/// AMP inputs on one device: addresses of the float32 grad scale and found-inf flag (0: none).
#[derive(Copy, Clone, Debug, Default)]
pub struct DeviceAmp {
    pub grad_scale: u64,
    pub found_inf: u64,
}

/// A batch ready to launch on its device.
pub trait CudaStep: Send + Sync {
    /// The device the batch lives on.
    fn device(&self) -> u32;
    /// Enqueue read-only sums pass `pass`, combined into the sums of the earlier passes that
    /// `out` holds (the device address of a float64 `[n, MAX_SUMS]` array in group order: row
    /// `members[j]` for the batch's tensor `j`), then copies of the result into `out`. Nothing
    /// for a rule without that pass. `factors`: as for [`CudaStep::launch`].
    fn sums(&self, amp: DeviceAmp, out: u64, pass: usize, factors: Option<&[f64]>) -> Result<()>;
    /// Enqueue the update on the batch's stream (asynchronous; no host synchronisation, except
    /// that given `factors` are copied from pageable host memory), with the per-tensor sums read
    /// from `sums` (laid out as `out` of [`CudaStep::sums`]) instead of its own sums pass when
    /// given. `factors[j]` multiplies the gradient of the batch's tensor `j` as loaded
    /// (`cpu::GradScaling`).
    fn launch(&self, amp: DeviceAmp, sums: Option<u64>, factors: Option<&[f64]>) -> Result<()>;
}

/// A compiled rule: one module with a step and a sums kernel per dtype combination.
struct Module {
    _module: sys::CUmodule,
    functions: HashMap<&'static str, (sys::CUfunction, sys::CUfunction)>,
}

/// A table uploaded to the device: tensor entries, then one u32 arrival counter per tensor
/// (zeroed at creation, reset by the kernel), then MAX_SUMS f64 sums per tensor, then one f64
/// gradient factor per tensor (written before a launch that is given factors).
struct UploadedTable {
    entries: Vec<TensorEntry>,
    device_buf: u64,
    host_buf: *mut c_void,
    last_use: u64,
    /// Used while a CUDA graph was being captured: the graph refers to it forever.
    permanent: bool,
}

impl UploadedTable {
    fn counters(&self) -> u64 {
        self.device_buf + std::mem::size_of_val(self.entries.as_slice()) as u64
    }
    fn sums(&self) -> u64 {
        let counters = 4 * self.entries.len() as u64;
        self.counters() + counters.div_ceil(8) * 8
    }
    fn factors(&self) -> u64 {
        self.sums() + (8 * MAX_SUMS * self.entries.len()) as u64
    }
    fn bytes(n: usize) -> usize {
        n * std::mem::size_of::<TensorEntry>() + (4 * n).div_ceil(8) * 8 + 8 * MAX_SUMS * n + 8 * n
    }
}

struct DeviceState {
    ctx: sys::CUcontext,
    arch: String,
    modules: HashMap<String, Module>,
    tables: Vec<UploadedTable>,
    clock: u64,
}

// SAFETY: the raw CUDA handles are only used while holding the DEVICES mutex (or, for the
// context and functions, through thread-safe driver calls); the driver API is thread-safe.
unsafe impl Send for DeviceState {}

static DEVICES: Mutex<Option<HashMap<u32, DeviceState>>> = Mutex::new(None);

/// Run `f` on the (lazily initialised) state of device `ordinal`, with its context current.
fn with_device<T>(ordinal: u32, f: impl FnOnce(&mut DeviceState) -> Result<T>) -> Result<T> {
    let mut guard = DEVICES.lock().map_err(|_| Error::Internal("CUDA state poisoned".into()))?;
    let state = match guard.get_or_insert_with(HashMap::new).entry(ordinal) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => e.insert(open_device(ordinal)?),
    };
    // SAFETY: ctx is the device's primary context, retained for the life of the process.
    unsafe { result::ctx::set_current(state.ctx) }.map_err(|e| driver_error("cuCtxSetCurrent", e))?;
    f(state)
}

fn open_device(ordinal: u32) -> Result<DeviceState> {
    // SAFETY: only tries to dlopen the driver library.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::Cuda("CUDA tensors were passed but the CUDA driver (libcuda.so) cannot be loaded".into()));
    }
    result::init().map_err(|e| driver_error("cuInit", e))?;
    let dev = result::device::get(ordinal as i32).map_err(|e| driver_error("cuDeviceGet", e))?;
    // SAFETY: dev comes from cuDeviceGet; the primary context is the one PyTorch uses.
    let ctx = unsafe { result::primary_ctx::retain(dev) }.map_err(|e| driver_error("cuDevicePrimaryCtxRetain", e))?;
    let attr = |a| {
        // SAFETY: valid device and attribute.
        unsafe { result::device::get_attribute(dev, a) }.map_err(|e| driver_error("cuDeviceGetAttribute", e))
    };
    let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    Ok(DeviceState { ctx, arch: format!("compute_{major}{minor}"), modules: HashMap::new(), tables: Vec::new(), clock: 0 })
}

impl DeviceState {
    /// The compiled module of `program`, compiling it on first use.
    fn module(&mut self, program: &Program) -> Result<&Module> {
        if !self.modules.contains_key(&program.type_name) {
            let ptx = compile_ptx(program, &self.arch)?;
            let ptx = CString::new(ptx).map_err(|_| Error::Internal("PTX with a NUL byte".into()))?;
            // SAFETY: a NUL-terminated PTX image; the context is current.
            let module = unsafe { result::module::load_data(ptx.as_ptr() as *const c_void) }.map_err(|e| driver_error("cuModuleLoadData", e))?;
            let mut functions = HashMap::new();
            for name in super::KERNEL_DTYPES {
                let get = |prefix: &str| {
                    let sym = CString::new(format!("{prefix}_{name}")).expect("no NUL");
                    // SAFETY: module was just loaded and stays loaded for the process.
                    unsafe { result::module::get_function(module, sym) }.map_err(|e| driver_error("cuModuleGetFunction", e))
                };
                functions.insert(name, (get("ef_step")?, get("ef_sums")?));
            }
            self.modules.insert(program.type_name.clone(), Module { _module: module, functions });
        }
        Ok(&self.modules[&program.type_name])
    }

    /// The device copy of `entries`, uploading it (asynchronously, on `stream`) if it is new.
    fn table(&mut self, entries: Vec<TensorEntry>, stream: sys::CUstream) -> Result<usize> {
        self.clock += 1;
        // SAFETY: stream is the caller's live stream.
        let capturing = unsafe { result::stream::is_capturing(stream) }.is_ok_and(|s| s != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE);
        if let Some(i) = self.tables.iter().position(|t| t.entries == entries) {
            self.tables[i].last_use = self.clock;
            self.tables[i].permanent |= capturing;
            return Ok(i);
        }
        if capturing {
            return Err(Error::Cuda("a new set of tensors appeared during CUDA graph capture: run one step (warm-up) before capturing".into()));
        }
        if self.tables.len() >= MAX_TABLES {
            if let Some(i) = (0..self.tables.len()).filter(|&i| !self.tables[i].permanent).min_by_key(|&i| self.tables[i].last_use) {
                let old = self.tables.swap_remove(i);
                // SAFETY: stream-ordered free after every earlier use enqueued on this stream; the
                // pinned staging buffer's copy was enqueued before those uses.
                unsafe {
                    let _ = result::free_async(old.device_buf, stream);
                    let _ = result::free_host(old.host_buf);
                }
            }
        }
        let bytes = UploadedTable::bytes(entries.len());
        // SAFETY: plain allocations and a stream-ordered upload from pinned memory that stays
        // untouched for the table's lifetime.
        unsafe {
            let host_buf = result::malloc_host(bytes, 0).map_err(|e| driver_error("cuMemAllocHost", e))?;
            let host = std::slice::from_raw_parts_mut(host_buf as *mut u8, bytes);
            host.fill(0);
            let table_bytes = table::to_bytes(&entries);
            host[..table_bytes.len()].copy_from_slice(&table_bytes);
            let device_buf = match result::malloc_async(stream, bytes) {
                Ok(d) => d,
                Err(e) => {
                    let _ = result::free_host(host_buf);
                    return Err(driver_error("cuMemAllocAsync", e));
                }
            };
            result::memcpy_htod_async(device_buf, host, stream).map_err(|e| driver_error("cuMemcpyHtoDAsync", e))?;
            self.tables.push(UploadedTable { entries, device_buf, host_buf, last_use: self.clock, permanent: false });
        }
        Ok(self.tables.len() - 1)
    }
}

/// Pair a batch on a CUDA device with the rule named `rule`; compiles and uploads what is
/// needed, so that the launch itself does no allocation.
pub fn plan(rule: &str, hyper: &Hyper, batch: Batch, stream: u64) -> Result<Box<dyn CudaStep>> {
    let grad_multiplier = hyper.grad_multiplier()?;
    let rounding_key = hyper.rounding_key()?;
    if rounding_key.is_some() {
        rounding::check_batch(&batch)?;
    }
    // (0 tells the kernel to round to nearest; a batch key of 0 has probability 2^-64)
    let rounding = rounding_key.map_or(0, |key| rounding::batch_key(key, batch.members[0]));
    visit_rule(rule, hyper, Planner { batch, hyper, stream, grad_multiplier, rounding })?
}

struct Planner<'a> {
    batch: Batch,
    hyper: &'a Hyper,
    stream: u64,
    /// −1 for `maximize`, times `grad_factor` (the kernels' `gsign`).
    grad_multiplier: f64,
    /// The batch's stochastic-rounding key (the kernels' `rkey`; 0: round to nearest).
    rounding: u64,
}

/// The kernel for a batch's (param, input, state) dtypes (the combinations `batch` accepts).
fn kernel_suffix(p: DType, g: DType, s: DType) -> &'static str {
    match (p, g, s) {
        (DType::F32, DType::BF16, _) => "f32_bf16in",
        (DType::F32, _, DType::U8) => "f32_q8",
        (DType::BF16, _, DType::U8) => "bf16_q8",
        (DType::F16, _, DType::U8) => "f16_q8",
        (DType::F32, DType::F16, _) => "f32_f16in",
        (DType::F32, _, DType::BF16) => "f32_bf16",
        (DType::F32, _, _) => "f32",
        (DType::F64, _, _) => "f64",
        (DType::BF16, _, DType::BF16) => "bf16",
        (DType::BF16, _, _) => "bf16_f32",
        (DType::F16, _, DType::F16) => "f16",
        (DType::F16, _, _) => "f16_f32",
        (DType::I8 | DType::U8, _, _) => unreachable!("batch::split_group refuses integer parameters"),
    }
}

impl RuleVisitor for Planner<'_> {
    type Output = Result<Box<dyn CudaStep>>;
    fn visit<Ru: Rule>(self, rule: Ru) -> Self::Output {
        let b = &self.batch;
        let Device::Cuda(ordinal) = b.device else {
            return Err(Error::Internal("CUDA planner given a CPU batch".into()));
        };
        check_state::<Ru>(self.hyper, b.group, &b.slot_names, &b.scalar_names, b.has_input(), b.input_dtype != b.param_dtype)?;
        if Ru::ROW_SUMS {
            return Err(Error::Cuda(format!(
                "rule '{}' gathers its sums per row (dim-0 slice), which the CUDA backend does not do yet; keep these parameters on \
                 the CPU",
                Ru::INFO.name
            )));
        }
        if Ru::FACTORED {
            return Err(Error::Cuda(format!(
                "rule '{}' keeps factored state (row and column statistics), which the CUDA backend does not update yet; keep \
                 these parameters on the CPU",
                Ru::INFO.name
            )));
        }
        let program = Program::of::<Ru>()?;
        if b.scalars.iter().any(|s| s.dtype() != DType::F32) {
            return Err(Error::DType("scalar state of CUDA parameters (e.g. 'step') must be float32".into()));
        }
        let (entries, blocks) = table::build(b);
        let n_tensors = entries.len() as i32;
        let stream = self.stream as sys::CUstream;
        let (functions, table_addr, counters, sums, factors) = with_device(ordinal, |dev| {
            let functions = dev.module(&program)?.functions[kernel_suffix(b.param_dtype, b.input_dtype, b.state_dtype)];
            let i = dev.table(entries, stream)?;
            let t = &dev.tables[i];
            Ok((functions, t.device_buf, t.counters(), t.sums(), t.factors()))
        })?;
        Ok(Box::new(Launch {
            ordinal,
            hyper: hyper_bytes(&rule),
            step_fn: functions.0 as usize,
            sums_fn: functions.1 as usize,
            sum_passes: Ru::SUM_PASSES,
            table: table_addr,
            counters,
            sums,
            factors,
            n_tensors,
            blocks: blocks as u32,
            stream: self.stream,
            gsign: self.grad_multiplier,
            rounding: self.rounding,
            members: b.members.clone(),
        }))
    }
}

struct Launch {
    ordinal: u32,
    hyper: Vec<u8>,
    step_fn: usize,
    sums_fn: usize,
    /// The rule's read-only sums passes (0: none).
    sum_passes: usize,
    table: u64,
    counters: u64,
    sums: u64,
    /// The table's per-tensor gradient factors.
    factors: u64,
    n_tensors: i32,
    blocks: u32,
    stream: u64,
    gsign: f64,
    rounding: u64,
    /// The index in its group of each tensor of the batch (its row in a sums array).
    members: Vec<usize>,
}

/// Bytes of one tensor's sums.
const SUMS_BYTES: usize = 8 * MAX_SUMS;

impl Launch {
    /// Enqueue copies between the table's sums (batch order) and a sums array in group order at
    /// `rows`: into the array with `to_rows`, else from it. Consecutive rows go in one copy.
    ///
    /// # Safety
    /// The context is current; `rows` is a live device array of at least `max(members) + 1` rows
    /// that stays alive until the stream has run the copies.
    unsafe fn copy_sums(&self, rows: u64, to_rows: bool) -> Result<()> {
        let stream = self.stream as sys::CUstream;
        let mut j = 0;
        while j < self.members.len() {
            let mut run = 1;
            while j + run < self.members.len() && self.members[j + run] == self.members[j] + run {
                run += 1;
            }
            let table = self.sums + (j * SUMS_BYTES) as u64;
            let row = rows + (self.members[j] * SUMS_BYTES) as u64;
            let (dst, src) = if to_rows { (row, table) } else { (table, row) };
            // SAFETY: both ranges lie inside live device buffers (per the contract and the table).
            unsafe { result::memcpy_dtod_async(dst, src, run * SUMS_BYTES, stream) }.map_err(|e| driver_error("cuMemcpyDtoDAsync", e))?;
            j += run;
        }
        Ok(())
    }

    /// Copy `factors` (one per tensor of the batch; None: none) into the table and return the
    /// kernels' `gfactors` argument: their device address, or 0.
    ///
    /// # Safety
    /// The context is current.
    unsafe fn upload_factors(&self, factors: Option<&[f64]>) -> Result<u64> {
        let Some(f) = factors else { return Ok(0) };
        debug_assert_eq!(f.len(), self.n_tensors as usize);
        // SAFETY: the table holds one f64 per tensor at `self.factors`; a copy from pageable
        // memory is staged before the call returns, so `f` may go once it has.
        unsafe { result::memcpy_htod_async(self.factors, f, self.stream as sys::CUstream) }.map_err(|e| driver_error("cuMemcpyHtoDAsync", e))?;
        Ok(self.factors)
    }

    /// Launch `function` (an `ef_sums` or `ef_step` of this batch's module) on the batch's stream
    /// with the arguments every kernel takes first (hyper, tensors, n, grad_scale, found_inf,
    /// gsign, gfactors), then the values `last` (ef_sums: sums, pass; ef_step: counters, sums,
    /// rkey).
    ///
    /// # Safety
    /// The context is current (inside `with_device`); `last` matches the kernel's signature; the
    /// table and the tensors it points to stay alive until the stream has run the kernel (the
    /// tensors are owned by the optimizer, the table by the cache, freed stream-ordered).
    unsafe fn launch_kernel(&self, function: usize, amp: DeviceAmp, mut gfactors: u64, last: &mut [u64], what: &str) -> Result<()> {
        let (mut table, mut n, mut gs, mut fi, mut gsign) = (self.table, self.n_tensors, amp.grad_scale, amp.found_inf, self.gsign);
        let mut hyper = self.hyper.clone();
        let mut params: Vec<*mut c_void> = vec![
            hyper.as_mut_ptr() as *mut c_void,
            &mut table as *mut u64 as *mut c_void,
            &mut n as *mut i32 as *mut c_void,
            &mut gs as *mut u64 as *mut c_void,
            &mut fi as *mut u64 as *mut c_void,
            &mut gsign as *mut f64 as *mut c_void,
            &mut gfactors as *mut u64 as *mut c_void,
        ];
        params.extend(last.iter_mut().map(|x| x as *mut u64 as *mut c_void));
        // SAFETY: per the contract; the argument values live until the call returns (the driver
        // copies them at launch).
        unsafe { result::launch_kernel(function as sys::CUfunction, (self.blocks, 1, 1), (THREADS, 1, 1), 0, self.stream as sys::CUstream, &mut params) }
            .map_err(|e| driver_error(what, e))
    }

    /// Enqueue the sums passes `passes` into the table's sums (zeroed first when they start with
    /// pass 0; else they hold the earlier passes' sums).
    ///
    /// # Safety
    /// As `launch_kernel`.
    unsafe fn launch_sums(&self, amp: DeviceAmp, gfactors: u64, passes: std::ops::Range<usize>) -> Result<()> {
        // SAFETY: the table's sums buffer holds MAX_SUMS f64 per tensor; ef_sums(…, sums, pass).
        unsafe {
            if passes.start == 0 {
                result::memset_d8_async(self.sums, 0, SUMS_BYTES * self.n_tensors as usize, self.stream as sys::CUstream)
                    .map_err(|e| driver_error("cuMemsetD8Async", e))?;
            }
            for pass in passes {
                self.launch_kernel(self.sums_fn, amp, gfactors, &mut [self.sums, pass as u64], "launching ef_sums")?;
            }
            Ok(())
        }
    }
}

impl CudaStep for Launch {
    fn device(&self) -> u32 {
        self.ordinal
    }

    fn sums(&self, amp: DeviceAmp, out: u64, pass: usize, factors: Option<&[f64]>) -> Result<()> {
        if self.n_tensors == 0 || pass >= self.sum_passes {
            return Ok(()); // `out` already holds the sums
        }
        // SAFETY: see `launch_sums` and `copy_sums`; `out` is checked by the caller to hold a
        // row for every member of the group.
        with_device(self.ordinal, |_| unsafe {
            if pass > 0 {
                self.copy_sums(out, false)?;
            }
            let gfactors = self.upload_factors(factors)?;
            self.launch_sums(amp, gfactors, pass..pass + 1)?;
            self.copy_sums(out, true)
        })
    }

    fn launch(&self, amp: DeviceAmp, given: Option<u64>, factors: Option<&[f64]>) -> Result<()> {
        if self.n_tensors == 0 {
            return Ok(());
        }
        // SAFETY: see `launch_kernel`, `launch_sums`, `copy_sums` and `upload_factors` (given
        // sums are checked by the caller as for `sums`); ef_step(…, counters, sums, rkey).
        with_device(self.ordinal, |_| unsafe {
            let gfactors = self.upload_factors(factors)?;
            if self.sum_passes > 0 {
                match given {
                    Some(rows) => self.copy_sums(rows, false)?,
                    None => self.launch_sums(amp, gfactors, 0..self.sum_passes)?,
                }
            }
            self.launch_kernel(self.step_fn, amp, gfactors, &mut [self.counters, self.sums, self.rounding], "launching ef_step")
        })
    }
}
