"""The EMA optimizer family on the CPU: each emafuse optimizer against pytorch_optimizer's
implementation of the same algorithm (its default per-parameter loop and its foreach path) and
heavyball's where it has the algorithm, on the parameter shapes of real models, next to the
machine's memory bandwidth. Bytes per parameter (fp32) from optimizers.md §1 give the effective
bandwidth.

    PYTHONPATH=python python benchmarks/bench_research.py                   # writes RESULTS.md
    PYTHONPATH=python python benchmarks/bench_research.py --quick          # short, prints only
    PYTHONPATH=python python benchmarks/bench_research.py --cases Adafactor,AdafactorHF  # these cases, a section of their own

Implementations take turns step by step, round by round, as in bench_optim.py (only one
optimizer state exists at a time; load from other processes falls on all alike).
"""

from __future__ import annotations

import functools
import gc
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import emafuse
import torch
from common import device_bandwidth, device_timer, machine_info, markdown_table, workload_settings, write_section
from workloads import WORKLOADS, make_params, numel

try:
    import pytorch_optimizer as po
except ImportError:  # pragma: no cover - optional peer
    po = None
try:
    import timm.optim
except ImportError:  # pragma: no cover - optional peer
    timm = None
try:
    import adamp
except ImportError:  # pragma: no cover - optional peer
    adamp = None
try:
    import momo
except ImportError:  # pragma: no cover - optional peer
    momo = None
try:
    import transformers.optimization as hf_optim
except ImportError:  # pragma: no cover - optional peer
    hf_optim = None
try:
    import heavyball

    heavyball.utils.compile_mode = None  # eager: compiling for the CPU would dominate the run
except ImportError:  # pragma: no cover - optional peer
    heavyball = None


@dataclass(frozen=True)
class Case:
    name: str
    ours: Callable[..., torch.optim.Optimizer]
    bytes_per_param: int  # fp32, optimizers.md §1
    kwargs: dict[str, Any] = field(default_factory=dict)
    po_name: str | None = None  # pytorch_optimizer class
    po_kwargs: dict[str, Any] = field(default_factory=dict)
    heavyball_name: str | None = None
    others: tuple[tuple[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]], ...] = ()
    takes_loss: bool = False  # step(loss=...) (MoMo)

    def impls(self) -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
        out: dict[str, Callable] = {"emafuse": lambda ps: self.ours(ps, **self.kwargs), **dict(self.others)}
        if po is not None and self.po_name:
            cls = getattr(po, self.po_name)
            out["pytorch_optimizer"] = lambda ps: cls(ps, **self.po_kwargs, foreach=False)
            out["pytorch_optimizer foreach"] = lambda ps: cls(ps, **self.po_kwargs, foreach=True)
        if heavyball is not None and self.heavyball_name:
            cls = getattr(heavyball, self.heavyball_name)
            out["heavyball"] = lambda ps: cls(ps, lr=1e-4)
        return out


CASES = [
    Case("AdEMAMix", emafuse.AdEMAMix, 36, dict(lr=1e-4), "AdEMAMix", dict(lr=1e-4), "AdEMAMix"),
    Case("AdaBelief", emafuse.AdaBelief, 28, dict(lr=1e-4, print_change_log=False), "AdaBelief", dict(lr=1e-4, rectify=True)),
    Case("AdaMomentum", emafuse.AdaMomentum, 28, dict(lr=1e-4)),
    Case("Adan", emafuse.Adan, 44, dict(lr=1e-4), "Adan", dict(lr=1e-4)),
    Case("Lion", emafuse.Lion, 20, dict(lr=1e-5), "Lion", dict(lr=1e-5)),
    Case("SPAM", emafuse.SPAM, 28, dict(lr=1e-4), "SPAM", dict(lr=1e-4)),
    # Stable-SPAM's bytes: two read-only passes over g (its largest magnitude, then the clipped
    # norm) and the Adam pass: 36 per parameter (spec §11 (f))
    Case("StableSPAM", emafuse.StableSPAM, 36, dict(lr=1e-4), "StableSPAM", dict(lr=1e-4)),
    # AdamP's bytes: a read-only pass gathering the row sums (reads p, g, m, v) and the update (reads
    # them again, writes p, m, v): 44 per parameter, not the spec's 40, which writes m, v in the first
    # pass
    Case("AdamP", emafuse.AdamP, 44, dict(lr=1e-4, weight_decay=1e-2), "AdamP", dict(lr=1e-4, weight_decay=1e-2),
         others=(("adamp (official)", lambda ps: adamp.AdamP(ps, lr=1e-4, weight_decay=1e-2)),) if adamp is not None else ()),
    # Adafactor's bytes for matrices: a read-only pass over g for the row and column sums, one over
    # p and g for ‖p‖² and ‖U‖², and the update (reads p, g, writes p): 24 per parameter (vectors:
    # 32); its peer is torch's own (pytorch_optimizer's AdaFactor is the HF variant, another rule)
    Case("Adafactor", emafuse.Adafactor, 24, dict(lr=1e-2), others=(
        ("torch.optim.Adafactor", lambda ps: torch.optim.Adafactor(ps, lr=1e-2)),
        ("torch.optim.Adafactor foreach", lambda ps: torch.optim.Adafactor(ps, lr=1e-2, foreach=True)),
    )),
    # transformers' semantics (relative step sizes, no first moment by default): the same passes;
    # its peer is transformers' own
    Case("AdafactorHF", emafuse.AdafactorHF, 24, others=(("transformers Adafactor", lambda ps: hf_optim.Adafactor(ps)),) if hf_optim is not None else ()),
    Case("AdaMod", emafuse.AdaMod, 36, dict(lr=1e-4), "AdaMod", dict(lr=1e-4)),
    Case("DiffGrad", emafuse.DiffGrad, 36, dict(lr=1e-4), "DiffGrad", dict(lr=1e-4)),
    Case("AdaBound", emafuse.AdaBound, 28, dict(lr=1e-4), "AdaBound", dict(lr=1e-4)),
    Case("AdaBoundW", emafuse.AdaBoundW, 28, dict(lr=1e-4, weight_decay=1e-4), "AdaBound",
         dict(lr=1e-4, weight_decay=1e-4, weight_decouple=True, fixed_decay=True)),
    Case("SGDSaI", emafuse.SGDSaI, 20, dict(lr=1e-4), "SGDSaI", dict(lr=1e-4)),
    # MoMo's bytes: a sums pass (reads p, g, d; MoMo-Adam also v) and the update (reads them again,
    # writes p and the moments): 32 and 44 per parameter, not the spec's 28 and 40, which write d
    # in the first pass.
    Case("Momo", emafuse.Momo, 32, takes_loss=True, others=(("momo-opt (official)", lambda ps: momo.Momo(ps)),) if momo is not None else ()),
    Case("MomoAdam", emafuse.MomoAdam, 44, takes_loss=True,
         others=(("momo-opt (official)", lambda ps: momo.MomoAdam(ps)),) if momo is not None else ()),
    # The options on AdamW: what each costs (plain AdamW in the same run), and the peers'
    Case("AdamW⊥", emafuse.AdamW, 36, dict(lr=1e-4, orthograd=True), others=(
        ("emafuse AdamW, no orthograd", lambda ps: emafuse.AdamW(ps, lr=1e-4)),
        *((("pytorch_optimizer OrthoGrad(torch AdamW)", lambda ps: po.OrthoGrad(torch.optim.AdamW, params=ps, lr=1e-4, foreach=False)),)
          if po is not None else ()),
    )),
    # C-Lion's bytes: a read-only pass over g and m for the cautious count, and the Lion pass: 28
    Case("C-Lion", emafuse.Lion, 28, dict(lr=1e-5, caution=True), others=(
        ("emafuse Lion, no caution", lambda ps: emafuse.Lion(ps, lr=1e-5)),
        *((("timm Lion(caution=True)", lambda ps: timm.optim.Lion(ps, lr=1e-5, caution=True)),) if timm is not None else ()),
        *((("timm Lion(caution=True, foreach=True)", lambda ps: timm.optim.Lion(ps, lr=1e-5, caution=True, foreach=True)),) if timm is not None else ()),
    )),
    Case("C-AdamW", emafuse.AdamW, 36, dict(lr=1e-4, caution=True), others=(
        ("emafuse AdamW, no caution", lambda ps: emafuse.AdamW(ps, lr=1e-4)),
        *((("timm AdamWLegacy(caution=True)", lambda ps: timm.optim.AdamWLegacy(ps, lr=1e-4, caution=True)),) if timm is not None else ()),
        *((("timm AdamWLegacy(caution=True, foreach=True)", lambda ps: timm.optim.AdamWLegacy(ps, lr=1e-4, caution=True, foreach=True)),)
          if timm is not None else ()),
    )),
]


def selected_cases() -> tuple[list[Case], str]:
    """``--cases A,B`` on the command line (taken out of it): only those cases, and a name for
    their own results section; else every case and ""."""
    if "--cases" not in sys.argv:
        return CASES, ""
    i = sys.argv.index("--cases")
    names = sys.argv[i + 1].split(",")
    del sys.argv[i : i + 2]
    unknown = set(names) - {c.name for c in CASES}
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; known: {[c.name for c in CASES]}")
    return [c for c in CASES if c.name in names], "+".join(names)


def measure(case: Case, params: list[torch.Tensor], grads: list[torch.Tensor], rounds: int, warmup: int, steps: int) -> dict[str, list[float]]:
    impls = case.impls()
    times: dict[str, list[float]] = {name: [] for name in impls}

    loss = {"loss": torch.tensor(1.0)} if case.takes_loss else {}

    def step(opt: torch.optim.Optimizer) -> None:
        for p, g in zip(params, grads):  # heavyball drops .grad after its step
            p.grad = g
        opt.step(**loss)

    timer = device_timer(params[0].device)
    for _ in range(rounds):
        for name, make in impls.items():
            opt = make(params)
            times[name] += timer(functools.partial(step, opt), warmup, steps)
            del opt
            gc.collect()
    return times


def main() -> None:
    cases, selection = selected_cases()
    run = workload_settings(__doc__, rounds=2, repeats="steps", repeats_default=3, device=True)
    device, workloads, rounds, steps, output = run.device, run.workloads, run.rounds, run.repeats, run.output

    copy_gbs, inplace_gbs = device_bandwidth(device)
    rows = []
    for wl in workloads:
        shapes = WORKLOADS[wl]()
        n = numel(shapes)
        params = [torch.nn.Parameter(p.detach().to(device)) for p in make_params(shapes)]
        for p in params:
            p.grad = torch.randn_like(p)
        grads = [p.grad for p in params]
        for case in cases:
            times = {k: statistics.median(v) for k, v in measure(case, params, grads, rounds, 1, steps).items()}
            for impl, t in times.items():
                gbs = case.bytes_per_param * n / t / 1e9
                speedup = "-" if impl == "emafuse" else f"{t / times['emafuse']:.1f}x"
                rows.append([wl, case.name, impl, f"{t * 1e3:.1f}", f"{gbs:.1f}", f"{100 * gbs / inplace_gbs:.0f}%", speedup])
                print(" | ".join(rows[-1]), flush=True)
        del params
        gc.collect()

    info = machine_info()
    table = markdown_table(["workload", "optimizer", "implementation", "ms/step", "GB/s", "% of in-place", "emafuse speed-up"], rows)
    tag = f"RESEARCH:{device.type.upper()}" + (f":{selection.upper()}" if selection else "")
    section = (
        f"## The EMA optimizer family ({device.type.upper()}){': ' + selection if selection else ''}\n\n"
        f"`python benchmarks/bench_research.py` — {info['date']}, {info.get('cpu', '')}, torch {torch.__version__}, "
        f"emafuse threads {emafuse.num_threads()}. Median of {rounds} rounds x {steps} steps after a warm-up step. "
        f"Memory bandwidth in the same run (median, read + written): copy {copy_gbs:.1f} GB/s, in-place {inplace_gbs:.1f} GB/s. "
        "GB/s = fp32 bytes per parameter (optimizers.md §1) x parameters / time; emafuse speed-up = peer time / emafuse time. "
        "Peers: pytorch_optimizer 4.1.0 (its default loop and `foreach=True`), heavyball 3.2.1 (eager, `compile_mode=None`) "
        "where it has the algorithm; for MoMo the official momo-opt 0.1.0, for AdamP the official adamp 0.3.0, for Adafactor "
        "torch's own (its default single-tensor loop and `foreach=True`), for AdafactorHF transformers' 4.57.1. "
        "AdaMomentum has no packaged implementation. "
        "AdamW⊥ is `AdamW(orthograd=True)`, C-AdamW "
        "`AdamW(caution=True)`; their rows' GB/s count their 36 bytes per parameter, plain AdamW's rows included (it moves 28). "
        "C-Lion is `Lion(caution=True)` against timm's `Lion(caution=True)`; its rows count 28 bytes, plain Lion's included "
        "(it moves 20).\n\n" + table
    )
    print(section)
    if output:
        write_section(output, tag, section)

if __name__ == "__main__":
    main()
