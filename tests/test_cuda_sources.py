"""The CUDA backend, checked without a GPU.

* Every kernel variant (each rule, each flag combination, all six dtype combinations) compiles
  with NVRTC for sm_80 and sm_90 (libnvrtc ships with the torch wheel's CUDA packages).
* Every rule's CUDA twin (`src/cuda/kernels/<rule>.cuh`) computes exactly what the Rust rule
  computes: the header is compiled as host C++ (g++, no contraction into FMA, as NVRTC is told
  with --fmad=false) and run on random inputs beside the CPU engine; fp32 and fp64 results must be
  bit-identical.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import pathlib
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import emafuse
import pytest
import torch
from emafuse import _native

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNELS = ROOT / "src" / "cuda" / "kernels"

# Every rule: sample numbers, and optionally `extra` variants of them, `valid` (which flag
# combinations the rule accepts) and `inputs` (functions (p, g, states) -> g making inputs that reach
# other branches than random ones do). Every combination of the rule's flags is tried; the flags,
# state slots, scalar state and whether the rule reads an input come from the engine's own
# description (`_native.rule_info`, `_native.rule_slots`). `test_every_rule_is_covered` keeps this
# complete.
RULES: dict[str, dict] = {
    "adam": dict(
        hyper=dict(lr=3e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, ema_weight=0.01),
        valid=lambda f: f["caution"] or not f["caution_count"],  # the normalisation without the mask: the same kernel
    ),
    "sgd": dict(hyper=dict(lr=3e-2, momentum=0.9, dampening=0.2, weight_decay=0.01), extra=[dict(momentum=0.0)]),
    # weight averaging: the written tensor is the average, the input the model
    "ema": dict(
        hyper=dict(weight=0.3),
        valid=lambda f: not (f["muladd"] and f["sub"]),
        extra=[dict(weight=0.75), dict(weight=1.0), dict(weight=0.0)],
    ),
    "ema_multi": dict(
        hyper=dict(tracks=5.0, w0=0.3, w1=0.7, w2=1e-3, w3=1.0, w4=0.5),
        extra=[dict(tracks=1.0), dict(tracks=2.0), dict(tracks=3.0), dict(tracks=4.0)],
    ),
    "bema": dict(hyper=dict(alpha=0.4, beta=0.2), extra=[dict(alpha=-1.3, beta=0.8)]),
    "swap": dict(hyper={}),
    "axpby": dict(hyper=dict(a=0.5, b=3.0), extra=[dict(a=-1.25, b=0.1)]),
    "slerp": dict(
        hyper=dict(t=0.3),
        extra=[dict(t=0.5), dict(t=0.0), dict(t=1.0)],
        # random task vectors (SLERP), nearly parallel ones (LERP), a zero one (LERP)
        inputs=[lambda p, g, s: g, lambda p, g, s: p + 1e-5 * g, lambda p, g, s: s[0].clone()],
    ),
    "adan": dict(hyper=dict(lr=3e-2, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.05, clip=0.7, step=7.0)),
    "spam": dict(
        hyper=dict(lr=3e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.1, threshold=5.0, scale=0.6),
        extra=[dict(weight_decay=0.0)],  # no decay: another kernel
    ),
    # spikes of 30x every 97th element and theta 0.5: the clip threshold (about half the largest
    # magnitude) sits inside the spikes' range, so AdaClip changes some of them
    "stable_spam": dict(
        hyper=dict(lr=3e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, gamma1=0.7, gamma2=0.9, theta=0.5),
        extra=[dict(weight_decay=0.0)],
        inputs=[lambda p, g, s: g * torch.where(torch.arange(len(g)) % 97 == 0, 30.0, 1.0).to(g.dtype)],
    ),
    "diffgrad": dict(
        hyper=dict(lr=3e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05),
        extra=[dict(weight_decay=0.0)],  # no L2: another kernel
    ),
    "adabound": dict(
        # bounds f·(1 ∓ …) with f = 0.02 cut the step size η0/(sqrt(v) + eps) from below and above
        hyper=dict(lr=3e-2, beta1=0.9, beta2=0.999, final_lr=0.01, gamma=0.1, eps=1e-8, weight_decay=0.01, base_lr=1.5e-2),
        extra=[dict(weight_decay=0.0)],
    ),
    "sgd_sai": dict(hyper=dict(lr=3e-2, momentum=0.9, eps=1e-8, weight_decay=0.01), extra=[dict(momentum=0.0)]),
    "ademamix": dict(
        # warm-ups longer than any sampled step: both schedules are in their ramps
        hyper=dict(lr=3e-2, beta1=0.9, beta2=0.999, beta3=0.9999, alpha=5.0, alpha_warmup=1000.0, beta3_warmup=700.0, eps=1e-8, weight_decay=0.1),
        extra=[dict(alpha_warmup=0.0, beta3_warmup=0.0), dict(beta1=0.0)],
    ),
    "adabelief": dict(
        hyper=dict(lr=3e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1),
        extra=[dict(beta2=0.5)],  # rho_t < 5 at every step: the rectified update's SGD / no-update regimes
    ),
    "adamomentum": dict(hyper=dict(lr=3e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)),
    "lion": dict(hyper=dict(lr=3e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, decay_base_lr=1e-2)),
    "adamod": dict(hyper=dict(lr=3e-2, beta1=0.9, beta2=0.999, beta3=0.99, eps=1e-8, weight_decay=0.1)),
    "adahessian": dict(
        hyper=dict(lr=3e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, hessian_power=1.0),
        extra=[dict(hessian_power=0.5, weight_decay=0.0)],  # a general power: another kernel
    ),
    # 8 rows: sums per row. delta 10 projects every row; rows alternately along and against
    # the gradient cancel over the layer, which delta 3 then projects as a whole.
    "adamp": dict(
        hyper=dict(lr=3e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, delta=0.1, wd_ratio=0.1),
        extra=[dict(weight_decay=0.0), dict(delta=10.0), dict(delta=3.0)],
        rows=8,
        inputs=[lambda p, g, s: g, lambda p, g, s: p.view(8, -1) * torch.tensor([1.0, -1.0] * 4, dtype=p.dtype).view(8, 1) + 0.01 * g.view(8, -1)],
    ),
    # factored: 2 matrices of 30 × 50 (slots: a value per row, one per column); eps1 1e-30 with
    # d 1.5: the clip of RMS(U) at 1.5 rather than 1
    "adafactor": dict(
        hyper=dict(lr=3e-2, beta2_decay=-0.8, eps1=1e-6, eps2=1e-3, d=1.0, weight_decay=0.1),
        extra=[dict(weight_decay=0.0), dict(eps1=1e-30, d=1.5)],
        matrices=(2, 30, 50),
    ),
    # transformers' semantics: relative steps scaled by RMS(p); a fixed step without scaling and
    # weight decay; the warm-up cap with clipping at 2 and a large ε1 (flags: factored, first moment)
    "adafactor_hf": dict(
        hyper=dict(lr=0.0, eps1=1e-30, eps2=1e-3, clip_threshold=1.0, decay_rate=-0.8, beta1=0.9, weight_decay=0.0, relative_step=1.0,
                   scale_parameter=1.0, warmup_init=0.0),
        extra=[dict(lr=3e-2, relative_step=0.0, scale_parameter=0.0, weight_decay=0.1), dict(warmup_init=1.0, clip_threshold=2.0, eps1=1e-3)],
        matrices=(2, 30, 50),
        dropped=True,  # its factors are shaped [..., rows] and [..., cols]
    ),
    # tau: the Polyak step size the Python layer computes from the sums of every tensor
    "momo": dict(hyper=dict(lr=3e-2, beta=0.9, weight_decay=0.1, tau=0.02), extra=[dict(weight_decay=0.0)]),
    "momo_adam": dict(
        hyper=dict(lr=3e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, tau=0.02, step=4.0),
        extra=[dict(weight_decay=0.0)],
    ),
}

# Rules whose every variant reads per-tensor sums, which ⊥Grad cannot be combined with.
ALWAYS_SUMS = ("momo", "momo_adam", "stable_spam", "adamp", "adafactor", "adafactor_hf")

def variants():
    for name, spec in RULES.items():
        info = _native.rule_info(name)
        for values in itertools.product([False, True], repeat=len(info["flags"])):
            flags = dict(zip(info["flags"], values))
            if not spec.get("valid", lambda f: True)(flags):
                continue
            for extra in [{}] + spec.get("extra", []):
                hyper = {**spec["hyper"], **extra, **flags}
                yield name, hyper, _native.rule_slots(name, hyper), info["scalars"]
        # ⊥Grad (the OrthoGrad wrapper) around each optimizer rule's plain variant; both forms
        # around Adam
        if "lr" in info["numbers"] and name not in ALWAYS_SUMS:
            hyper = {**spec["hyper"], **dict.fromkeys(info["flags"], False), "orthograd": True}
            for rescale in (True, False) if name == "adam" else (True,):
                yield name, {**hyper, "orthograd_rescale": rescale}, _native.rule_slots(name, hyper), info["scalars"]


VARIANTS = list(variants())


def test_every_rule_is_covered():
    assert set(_native.rule_names()) == set(RULES), "add the new rule (and its CUDA twin) to RULES in this file"


def test_every_variant_has_a_cuda_twin():
    for name, hyper, *_ in VARIANTS:
        program = _native.cuda_source(name, hyper)
        source, preamble, header = program["source"], program["preamble"], program["header"]
        assert "EF_KERNELS(f32" in source and source.startswith(preamble)
        assert preamble.splitlines()[0] == f"#define EF_RULE {program['type_name']}"
        # EfHyper is generated from the Rust rule: one double per word of the kernel argument.
        n_bytes = len(program["hyper_bytes"])
        assert n_bytes > 0 and n_bytes == 8 * preamble.count("\n    double ")
        # The rule's header states only math: its parameters and counts come from the preamble.
        assert "struct Hyper" not in header and "SLOTS =" not in header and "READS_INPUT =" not in header


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_every_kernel_compiles_with_nvrtc(arch):
    # One compilation per C++ type: the hyper-parameters are kernel arguments, not part of the program.
    jobs = {(name, _native.cuda_source(name, h)["type_name"]): h for name, h, *_ in VARIANTS}

    def compile_one(key):
        return key, _native.cuda_compile(key[0], jobs[key], arch)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for (name, _), ptx in pool.map(compile_one, jobs):
            assert f".target sm_{arch[-2:]}" in ptx, name
            for dtype in ["f32", "f64", "bf16", "bf16_f32", "f16", "f16_f32", "f32_bf16in", "f32_f16in", "f32_bf16", "f32_q8", "bf16_q8", "f16_q8"]:
                assert f".entry ef_step_{dtype}" in ptx and f".entry ef_sums_{dtype}" in ptx, (name, dtype)


def test_a_broken_kernel_is_a_clear_error(monkeypatch):
    with pytest.raises(emafuse.EmafuseError):
        _native.cuda_compile("adam", {**RULES["adam"]["hyper"], "amsgrad": False, "decoupled": True}, "compute_1")


# Appended to the generated preamble (which defines EF_RULE, EfHyper and the EF_* counts).
HARNESS = r"""
#define EF_HOST
#include <vector>
#include "common.cuh"
#include "rule.cuh"
// Rules with row sums (EF_ROW_SUMS) see `rows` rows of n / rows elements: each row's sums as the
// CPU engine gathers them (its own lanes, from zeros), folded into the tensor's in row order, and
// each row updated with its own coefficients.
template <class Rule, class R, bool ROWS = EF_ROW_SUMS>
struct EfHostRows {
    static void fold(const EfHyper&, double (*)[EF_MAX_SUMS], long, long, double*) {}
    template <class C>
    static C coeffs(const EfHyper&, const C& c, const double*, const double*) { return c; }
};
template <class Rule, class R>
struct EfHostRows<Rule, R, true> {
    static void fold(const EfHyper& h, double (*rows)[EF_MAX_SUMS], long n_rows, long len, double* sums) {
        for (long r = 0; r < n_rows; ++r) Rule::fold_row(h, rows[r], len, sums);
    }
    template <class C>
    static C coeffs(const EfHyper& h, const C& c, const double* sums, const double* row) { return Rule::template row_coeffs<R>(h, c, sums, row); }
};

// Rules with factored state (EF_FACTORED) see matrices of `rows` × `cols` elements, their last two
// slots (from F) holding a value per row and one per column: each row's and column's sums as the CPU engine adds
// them over one span (a row's terms into lane (column % 8), lanes in order; a column's in row
// order), the tensor's factors updated, and every element reading its row's and column's values.
template <class Rule, class R, bool FACTORED = EF_FACTORED>
struct EfHostFactors {
    EfHostFactors(const EfHyper&, const double*, R**, const R*, R, long, long, long) {}
    void read(R* s, R** st, long i) const { for (int k = 0; k < EF_SLOTS; ++k) s[k] = st[k][i]; }
};
template <class Rule, class R>
struct EfHostFactors<Rule, R, true> {
    static constexpr int F = EF_SLOTS - 2;
    long n_rows, n_cols;
    std::vector<R> rows, cols;
    EfHostFactors(const EfHyper& h, const double* sc, R** st, const R* g, R f, long n, long r, long c) : n_rows(r), n_cols(c) {
        const long mats = n / (r * c);
        std::vector<double> rs(mats * r, 0.0), cs(mats * c, 0.0);
        for (long q = 0; q < mats * r; ++q) {
            double lanes[8] = {};
            for (long j = 0; j < c; ++j) {
                const double t = Rule::template factor_term<R>(h, g[q * c + j] * f);
                lanes[j % 8] += t;
                cs[q / r * c + j] += t;
            }
            for (int l = 0; l < 8; ++l) rs[q] += lanes[l];
        }
        Rule::template update_factors<R>(h, sc, mats, r, c, rs.data(), cs.data(), st[F], st[F + 1]);
        rows.assign(st[F], st[F] + mats * r);
        cols.assign(st[F + 1], st[F + 1] + mats * c);
        Rule::template factor_reads<R>(h, mats, r, c, rows.data(), cols.data());
    }
    void read(R* s, R** st, long i) const {
        for (int k = 0; k < F; ++k) s[k] = st[k][i];
        s[F] = rows[i / n_cols];
        s[F + 1] = cols[i / (n_rows * n_cols) * n_cols + i % n_cols];
    }
};

template <class Rule, class R>
void ef_host_run(const void* hyper, R* p, const R* g, R* s0, R* s1, R* s2, R* s3, float* scalars, long n, long rows, long cols, double factor) {
    R* st[4] = {s0, s1, s2, s3};
    R f = R(factor);
    const EfHyper& h = *(const EfHyper*)hyper;
    double sc[EF_MAX_SCALARS] = {0, 0, 0, 0};
    for (int k = 0; k < EF_SCALARS; ++k) sc[k] = scalars[k];
    const EfHostFactors<Rule, R> factors(h, sc, st, g, f, n, rows, cols);
    // the CPU engine's order (src/cpu/kernel.rs): pass by pass, element i into lane i % 8, lanes
    // combined in order (added, or the largest kept for the maxima)
    double sums[EF_MAX_SUMS] = {0, 0, 0, 0};
    const long n_rows = EF_ROW_SUMS ? rows : 1, len = n / n_rows;
    double row_sums[64][EF_MAX_SUMS] = {};
    for (int pass = 0; pass < EF_SUM_PASSES; ++pass) {
        R prior[EF_MAX_SUMS] = {R(0), R(0), R(0), R(0)};
        if constexpr (EF_SUM_PASSES > 1) {
            double out[EF_MAX_SUMS] = {0, 0, 0, 0};
            if (pass > 0) Rule::prepare(h, pass, sc, sums, out);
            for (int k = 0; k < EF_MAX_SUMS; ++k) prior[k] = R(out[k]);
        }
        for (long r = 0; r < n_rows; ++r) {
            double lanes[8][EF_MAX_SUMS] = {};
            for (long i = r * len; i < (r + 1) * len; ++i) {
                R s[EF_MAX_SLOTS];
                factors.read(s, st, i);
                R gi = EF_READS_INPUT ? g[i] * f : R(0);
                if (pass == 0) Rule::template accumulate<R>(h, p[i], gi, s, lanes[(i - r * len) % 8]);
                else if constexpr (EF_SUM_PASSES > 1) Rule::template accumulate_after<R>(h, pass, prior, p[i], gi, s, lanes[(i - r * len) % 8]);
            }
            double* into = EF_ROW_SUMS ? row_sums[r] : sums;
            for (int l = 0; l < 8; ++l)
                for (int k = 0; k < EF_MAX_SUMS; ++k) {
                    double x = lanes[l][k];
                    if (!((EF_MAX_SUMS_MASK >> k) & 1)) into[k] += x;
                    else if (x > into[k] || x != x) into[k] = x;
                }
        }
        if (pass == EF_SUM_PASSES - 1) EfHostRows<Rule, R>::fold(h, row_sums, n_rows, len, sums);  // (a rule's row sums are its last pass's)
    }
    const auto c = Rule::template coeffs<R>(h, sc, sums);
    for (long r = 0; r < n_rows; ++r) {
        const auto cr = EfHostRows<Rule, R>::coeffs(h, c, sums, row_sums[r]);
        for (long i = r * len; i < (r + 1) * len; ++i) {
            R s[EF_MAX_SLOTS];
            factors.read(s, st, i);
            R gi = EF_READS_INPUT ? g[i] * f : R(0);
            p[i] = Rule::template update<R>(cr, p[i], gi, s);
            for (int k = 0; k < EF_WRITTEN_SLOTS; ++k) st[k][i] = s[k];
        }
    }
    for (int k = 0; k < EF_SCALARS; ++k) scalars[k] = (float)sc[k];
}
extern "C" void run_f32(const void* h, float* p, const float* g, float* a, float* b, float* c, float* d, float* sc, long n, long rows, long cols,
                        double f) {
    ef_host_run<EF_RULE, float>(h, p, g, a, b, c, d, sc, n, rows, cols, f);
}
extern "C" long hyper_size() { return (long)sizeof(EfHyper); }
extern "C" void run_f64(const void* h, double* p, const double* g, double* a, double* b, double* c, double* d, float* sc, long n, long rows,
                        long cols, double f) {
    ef_host_run<EF_RULE, double>(h, p, g, a, b, c, d, sc, n, rows, cols, f);
}
"""


_HOST_LIBS: dict[tuple[str, str], ctypes.CDLL] = {}


@pytest.fixture(scope="module")
def host_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("host")


def compile_host(directory, preamble: str, rule_source: str):
    """The rule's header built as host C++ after its generated preamble, with the harness; once
    per preamble (one per C++ type) and header text."""
    key = (preamble, rule_source)
    if key in _HOST_LIBS:
        return _HOST_LIBS[key]
    if shutil.which("g++") is None:
        pytest.fail("g++ is needed to check the CUDA rules on the CPU")
    d = directory / f"h{len(_HOST_LIBS)}"
    d.mkdir()
    shutil.copy(KERNELS / "common.cuh", d / "common.cuh")
    (d / "rule.cuh").write_text(rule_source)
    (d / "harness.cpp").write_text(preamble + HARNESS)
    lib = d / "harness.so"
    subprocess.run(
        ["g++", "-O2", "-std=c++17", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC", str(d / "harness.cpp"), "-o", str(lib)],
        check=True,
        capture_output=True,
    )
    _HOST_LIBS[key] = ctypes.CDLL(str(lib))
    return _HOST_LIBS[key]


def ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


@pytest.mark.parametrize("variant", VARIANTS, ids=[f"{v[0]}-{'-'.join(k for k, x in v[1].items() if x is True) or 'plain'}-{len(v[2])}" for v in VARIANTS])
def test_cuda_rule_equals_rust_rule_on_the_cpu(variant, tmp_path, host_dir):
    name, hyper, slots, scalar_keys = variant
    spec = RULES[name]
    info = _native.rule_info(name)
    reads_input = info["reads_input"]
    program = _native.cuda_source(name, hyper)
    hyper_bytes = program["hyper_bytes"]
    lib = compile_host(host_dir, program["preamble"], program["header"])
    assert lib.hyper_size() == len(hyper_bytes), "EfHyper must have one double per parameter word"
    gen = torch.Generator().manual_seed(len(tmp_path.name))
    # one CPU work item: the CPU engine adds per-tensor sums in the harness's order (rule with row
    # sums: a matrix of `rows` rows, the sums of each row in its own order)
    rows = spec.get("rows", 1)
    n = 3000 if rows > 1 or "matrices" in spec else 3001
    # the shapes of the parameter and its slots: factored state (the last two slots) holds a value
    # per row, one per column
    if hyper.get("factored"):
        shape = spec["matrices"]
        factors = [shape[:-1], (*shape[:-2], shape[-1])] if spec.get("dropped") else [(*shape[:-1], 1), (*shape[:-2], 1, shape[-1])]
        slot_shapes = [shape] * (len(slots) - 2) + factors
        rows, cols = shape[-2], shape[-1]
    else:
        shape = (rows, n // rows) if rows > 1 else (n,)
        slot_shapes, cols = [shape] * len(slots), 0
    # (target dtype, input dtype): an fp32 average may read bf16/fp16 weights (of a low-precision
    # model; the host side gets the same values widened to fp32, as the kernels load them).
    dtypes = [(torch.float32, torch.float32), (torch.float64, torch.float64)]
    if info["input"] == "weights":
        dtypes += [(torch.float32, torch.bfloat16), (torch.float32, torch.float16)]
    for (dtype, in_dtype), make_input in itertools.product(dtypes, spec.get("inputs", [lambda p, g, s: g])):
        fn = lib.run_f32 if dtype == torch.float32 else lib.run_f64
        for maximize in (False, True):
            p = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
            g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
            states = [(torch.rand(math.prod(s), generator=gen, dtype=torch.float64) + 0.01).to(dtype) for s in slot_shapes]
            g = make_input(p, g, states).reshape(-1).to(in_dtype)
            g_host = g.to(dtype)
            step = float(torch.randint(0, 40, (1,), generator=gen).item())
            p_native = p.clone().view(shape)
            ours = {k: s.clone().view(sh) for k, s, sh in zip(slots, states, slot_shapes)}
            ours.update({k: torch.tensor(step) for k in scalar_keys})
            inputs = [g.view(p_native.shape)] if reads_input else None
            state_dicts = [ours] if (slots or scalar_keys) else None
            group = _native.Group(
                hyper={**hyper, "maximize": maximize}, params=[p_native], inputs=inputs, states=state_dicts, slots=tuple(slots), scalars=tuple(scalar_keys)
            )
            _native.step("check", name, [group])

            host_states = [s.clone() for s in states] + [torch.zeros(1, dtype=dtype) for _ in range(4 - len(states))]
            host_scalars = torch.tensor([step] * len(scalar_keys) + [0.0] * (4 - len(scalar_keys)), dtype=torch.float32)
            p_host = p.clone()
            buf = ctypes.create_string_buffer(bytes(hyper_bytes), len(hyper_bytes))
            g_ptr = ptr(g_host) if reads_input else ctypes.c_void_p(None)
            fn(buf, ptr(p_host), g_ptr, *(ptr(s) for s in host_states), ptr(host_scalars), ctypes.c_long(n), ctypes.c_long(rows),
               ctypes.c_long(cols), ctypes.c_double(-1.0 if maximize else 1.0))

            where = (dtype, in_dtype, maximize)
            p_native = p_native.reshape(-1)
            assert torch.equal(p_native, p_host), (*where, (p_native - p_host).abs().max())
            for k, s in zip(slots, host_states):
                assert torch.equal(ours[k].reshape(-1), s), (k, *where)
            for i, k in enumerate(scalar_keys):
                assert ours[k].item() == host_scalars[i].item()


ROUNDING_HARNESS = r"""
#define EF_HOST
#include "common.cuh"
// Weight corrections: x split into bf16 bits and corrections, and those joined back.
// (bf16: fp16's conversions are device instructions)
extern "C" void split_corrected(const float* x, ef_u16* hi, signed char* c, long n) {
    for (long i = 0; i < n; ++i) {
        ef_bf16 b;
        EfElem<ef_bf16, float>::store_corrected(&b, x[i], &c[i]);
        hi[i] = b.bits;
    }
}
extern "C" void join_corrected(const ef_u16* hi, const signed char* c, float* w, long n) {
    for (long i = 0; i < n; ++i) w[i] = EfBf16Correction::corrected(ef_bf16_to_float(hi[i]), c[i]);
}
// fp16's unit rule, given the fp16 values as floats.
extern "C" void f16_corrections(const float* x, const float* hi, signed char* c, long n) {
    for (long i = 0; i < n; ++i) c[i] = EfF16Correction::correction(x[i], hi[i]);
}
extern "C" void f16_join(const float* hi, const signed char* c, float* w, long n) {
    for (long i = 0; i < n; ++i) w[i] = EfF16Correction::corrected(hi[i], c[i]);
}
// 8-bit state: a block's absmax (as bits) and the codes of its elements, as the kernels encode it
// (their block-wide max is a max of the same bits).
extern "C" float encode_block(const float* mids, const float* x, unsigned char* codes, long n) {
    ef_u32 bits = 0;
    for (long i = 0; i < n; ++i) bits = ef_abs_bits(x[i]) > bits ? ef_abs_bits(x[i]) : bits;
    float absmax = ef_bits_to_float(bits);
    for (long i = 0; i < n; ++i) codes[i] = ef_q8_code(mids, x[i] * ef_q8_inverse(absmax));
    return absmax;
}
// Element i of a stream: the bf16 bits of x[i] rounded stochastically, as the kernels store them.
extern "C" void round_bf16(ef_u64 step_key, ef_u64 first_member, ef_u64 tensor, ef_u64 array, const float* x, ef_u16* out, long n) {
    ef_u64 batch_key = ef_mix64(step_key ^ ef_mix64(first_member));  // src/rounding.rs batch_key (done on the host there)
    ef_u32 stream = ef_stream_key(batch_key, tensor, array);
    for (long i = 0; i < n; ++i) {
        ef_bf16 b;
        ef_store<ef_bf16, float>(&b, x[i], true, stream, i);
        out[i] = b.bits;
    }
}
"""


@pytest.fixture(scope="module")
def rounding_lib(tmp_path_factory):
    """``common.cuh``'s rounding built as host C++ (``ROUNDING_HARNESS``)."""
    if shutil.which("g++") is None:
        pytest.fail("g++ is needed to check the CUDA rounding on the CPU")
    tmp_path = tmp_path_factory.mktemp("rounding")
    shutil.copy(KERNELS / "common.cuh", tmp_path / "common.cuh")
    (tmp_path / "harness.cpp").write_text(ROUNDING_HARNESS)
    lib_path = tmp_path / "rounding.so"
    subprocess.run(["g++", "-O2", "-std=c++17", "-shared", "-fPIC", str(tmp_path / "harness.cpp"), "-o", str(lib_path)], check=True, capture_output=True)
    return ctypes.CDLL(str(lib_path))


def test_cuda_weight_corrections_equal_the_reference(rounding_lib):
    """The kernels' split of a weight into bf16 and correction and their join (``common.cuh``),
    built as host C++, against the reference the CPU engine equals (test_lean_state): magnitudes
    across the whole float range, ties, infinities and NaN."""
    from references import rounding as ref

    g = torch.Generator().manual_seed(5)
    bits = torch.randint(-(2**31), 2**31 - 1, (20000,), generator=g, dtype=torch.int64).to(torch.int32)
    x = torch.cat([bits.view(torch.float32), torch.tensor([0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-9, float("inf"), -float("inf"), float("nan"), 3.4e38])])
    n = x.numel()
    hi, c = torch.empty(n, dtype=torch.int16), torch.empty(n, dtype=torch.int8)
    rounding_lib.split_corrected(ptr(x), ptr(hi), ptr(c), ctypes.c_long(n))
    want_hi, want_c = ref.split_corrected(x)
    same_hi = (hi == want_hi.view(torch.int16)) | (want_hi.isnan() & hi.view(torch.bfloat16).isnan())
    assert same_hi.all() and torch.equal(c, want_c)
    w = torch.empty(n, dtype=torch.float32)
    rounding_lib.join_corrected(ptr(hi), ptr(c), ptr(w), ctypes.c_long(n))
    want_w = ref.corrected(want_hi, want_c)
    assert torch.equal(w.isnan(), want_w.isnan()) and torch.equal(w[~w.isnan()], want_w[~want_w.isnan()])
    # fp16: the unit rule, on the fp16 values torch rounds to (the device's conversion instruction
    # rounds to nearest even as well)
    x16 = x[x.abs() < 1e6]
    n16 = x16.numel()
    want_hi16, want_c16 = ref.split_corrected(x16, torch.float16)
    hi16 = want_hi16.float().contiguous()
    c16, w16 = torch.empty(n16, dtype=torch.int8), torch.empty(n16, dtype=torch.float32)
    rounding_lib.f16_corrections(ptr(x16), ptr(hi16), ptr(c16), ctypes.c_long(n16))
    assert torch.equal(c16, want_c16)
    rounding_lib.f16_join(ptr(hi16), ptr(c16), ptr(w16), ctypes.c_long(n16))
    want_w16 = ref.corrected(want_hi16, want_c16)
    assert torch.equal(w16.isnan(), want_w16.isnan()) and torch.equal(w16[~w16.isnan()], want_w16[~want_w16.isnan()])


@pytest.mark.parametrize("nonnegative", [False, True])
def test_cuda_8bit_encoding_equals_the_engine(rounding_lib, nonnegative):
    """The kernels' 8-bit encoding of a block (``common.cuh``: absmax as bits, binary search over
    the midpoints), built as host C++ with the engine's map, against the engine's (through
    ``_precision.quantize``, which the lockstep tests tie to it): values over 40 decades, midpoints
    and their neighbours, zeros, infinities and NaN."""
    from emafuse import _native
    from emafuse.optim import _precision

    values = torch.tensor(_native.quantization_map(nonnegative))
    mids = ((values[:-1] + values[1:]) / 2).contiguous()
    g = torch.Generator().manual_seed(9)
    blocks = [torch.randn(256, generator=g) * 10.0 ** torch.randint(-30, 10, (1,), generator=g).item() for _ in range(40)]
    blocks.append(torch.cat([mids, mids.nextafter(torch.tensor(2.0)), mids.nextafter(torch.tensor(-2.0))])[:256])
    blocks += [torch.zeros(256), torch.tensor([1.0, float("inf"), -3.0] * 10), torch.tensor([2.0, float("nan"), 0.5])]
    rounding_lib.encode_block.restype = ctypes.c_float
    for x in blocks:
        x = (x.abs() if nonnegative else x).contiguous()
        codes = torch.empty(x.numel(), dtype=torch.uint8)
        absmax = rounding_lib.encode_block(ptr(mids), ptr(x), ptr(codes), ctypes.c_long(x.numel()))
        want_codes, want_absmax = _precision.quantize(x, nonnegative)
        assert absmax == want_absmax.item() or (math.isnan(absmax) and want_absmax.isnan().item())
        if not want_absmax.isnan().any():
            assert torch.equal(codes, want_codes)


def test_cuda_stochastic_rounding_equals_the_reference(rounding_lib):
    """The kernels' bf16 stochastic rounding (``common.cuh``), built as host C++, against the
    reference written from ``src/rounding.rs``, which the CPU engine equals (test_lean_state)."""
    from references import rounding as ref

    lib = rounding_lib
    x = torch.randn(5001, generator=torch.Generator().manual_seed(4), dtype=torch.float64).float() * 3
    for step_key, member, tensor, array in [(12345, 0, 0, 0), (2**53 - 1, 7, 3, 2), (1, 1, 100, 4)]:
        out = torch.empty(x.numel(), dtype=torch.int16)
        lib.round_bf16(
            ctypes.c_uint64(step_key), ctypes.c_uint64(member), ctypes.c_uint64(tensor), ctypes.c_uint64(array), ptr(x), ptr(out), ctypes.c_long(x.numel())
        )
        want = ref.to_bf16_stochastic(x, ref.stream(step_key, member, tensor, array)).view(torch.int16)
        assert torch.equal(out, want), (step_key, member, tensor, array)
