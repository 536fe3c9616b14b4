"""Benchmark: the model-EMA update and the evaluation swap, emafuse vs the common tools.

Peers (each measured on the same model, in the same run): timm ``ModelEmaV3``, lucidrains
``ema-pytorch``, ``torch-ema``, ``swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``,
Lightning's ``EMAWeightAveraging`` (its ``AveragedModel`` + ``get_ema_avg_fn`` update path and its
swap), and a plain ``torch._foreach_lerp_``. Peers that are not installed are skipped.

Workloads: ResNet-50 (25.6 M parameters, 161 parameter tensors + BatchNorm buffers) and GPT-2
small (124 M parameters, 148 tensors), fp32; plus a bf16 model with an fp32 average.

Reported: ms per update (median), effective GB/s (spec bytes per element ÷ time: 12 B/param for an
fp32 EMA update — read E, read θ, write E; 10 for bf16 θ + fp32 E; 16 for a swap), the ratio of
each peer's time to emafuse's, and the machine's copy bandwidth measured in the same run (a large
``copy_``: bytes read + written ÷ time).

    python benchmarks/bench_ema.py                  # CPU, print the table
    python benchmarks/bench_ema.py --write          # also update the EMA section of RESULTS.md
    python benchmarks/bench_ema.py --device cuda    # a CUDA model (GPU machine): same peers, plus
                                                    # the CPU-offloaded average overlapping training
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from collections.abc import Callable

import emafuse
import torch
from common import write_section
from emafuse import ModelEMA
from torch import nn

DECAY = 0.999


# -- workloads ----------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if stride != 1 or cin != cout else None


def resnet50() -> nn.Module:
    """ResNet-50's parameters and buffers (torchvision layout), 25.6 M parameters."""
    m = nn.Module()
    m.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    m.bn1 = nn.BatchNorm2d(64)
    cin = 64
    for i, (width, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]):
        layer = nn.Sequential()
        for b in range(blocks):
            layer.append(Bottleneck(cin, width, stride if b == 0 else 1))
            cin = width * 4
        setattr(m, f"layer{i + 1}", layer)
    m.fc = nn.Linear(2048, 1000)
    return m


def gpt2_small() -> nn.Module:
    """GPT-2 small's parameters (HF layout), 124 M parameters."""
    m = nn.Module()
    m.wte = nn.Embedding(50257, 768)
    m.wpe = nn.Embedding(1024, 768)
    m.h = nn.ModuleList()
    for _ in range(12):
        b = nn.Module()
        b.ln_1 = nn.LayerNorm(768)
        b.c_attn = nn.Linear(768, 2304)
        b.attn_proj = nn.Linear(768, 768)
        b.ln_2 = nn.LayerNorm(768)
        b.c_fc = nn.Linear(768, 3072)
        b.mlp_proj = nn.Linear(3072, 768)
        m.h.append(b)
    m.ln_f = nn.LayerNorm(768)
    return m


# -- timing -------------------------------------------------------------------------------------


def measure(fns: dict[str, Callable[[], None]], reps: int, device: torch.device) -> dict[str, float]:
    """Best-of-``reps`` seconds per call of each function, measured round-robin (one call of each
    per round, after a warm-up round) so that load from other processes hits all alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = {k: float("inf") for k in fns}
    for r in range(reps + 1):
        for k, fn in list(fns.items()):
            try:
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                dt = time.perf_counter() - t0
            except Exception as e:  # e.g. a CUDA model before emafuse has its CUDA backend
                print(f"  {k}: skipped ({type(e).__name__}: {str(e)[:100]})")
                del fns[k]
                best.pop(k)
                continue
            if r > 0:
                best[k] = min(best[k], dt)
    return best


def copy_fn(device: torch.device, mib: int = 256) -> tuple[Callable[[], None], int]:
    """A large copy_ and the bytes it moves (read + written). The copy also reads its destination
    (write-allocate) without being credited for it, so in-place updates can pass 100 % of it."""
    n = mib * 2**20 // 4
    a = torch.rand(n, device=device)
    b = torch.empty_like(a)
    return (lambda: b.copy_(a)), 2 * n * 4


def inplace_fn(device: torch.device, mib: int = 256) -> tuple[Callable[[], None], int]:
    """A large in-place ``x.mul_(1.0)`` (reads and writes every element where it is, like an EMA
    updates its average) and the bytes it moves."""
    n = mib * 2**20 // 4
    x = torch.rand(n, device=device)
    return (lambda: x.mul_(1.0)), 2 * n * 4


# -- peers ----------------------------------------------------------------------------------------


def update_peers(model: nn.Module) -> dict[str, Callable[[], None]]:
    """name -> one EMA update of ``model`` (each peer's own update path, warmed up by a first call)."""
    peers: dict[str, Callable[[], None]] = {}
    ema = ModelEMA(model, DECAY)
    ema.update(model)
    peers["emafuse ModelEMA"] = lambda: ema.update(model)
    ema_list = [p.detach().clone() for p in model.parameters()]
    model_list = [p.detach() for p in model.parameters()]
    peers["torch._foreach_lerp_ (params)"] = lambda: torch._foreach_lerp_(ema_list, model_list, 1 - DECAY)
    try:
        from timm.utils.model_ema import ModelEmaV3

        timm_ema = ModelEmaV3(model, decay=DECAY)
        peers["timm ModelEmaV3"] = lambda: timm_ema.update(model, step=10)
    except ImportError:
        pass
    try:
        from ema_pytorch import EMA

        lp = EMA(model, beta=DECAY, update_after_step=0, update_every=1, include_online_model=False)
        lp.update()
        peers["ema-pytorch EMA"] = lp.update
        lpf = EMA(model, beta=DECAY, update_after_step=0, update_every=1, include_online_model=False, use_foreach=True)
        lpf.update()
        peers["ema-pytorch EMA (use_foreach)"] = lpf.update
    except ImportError:
        pass
    try:
        from torch_ema import ExponentialMovingAverage

        te = ExponentialMovingAverage(model.parameters(), decay=DECAY)
        peers["torch-ema"] = lambda: te.update(model.parameters())
    except ImportError:
        pass
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn

    am = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True)
    am.update_parameters(model)
    peers["AveragedModel + get_ema_multi_avg_fn"] = lambda: am.update_parameters(model)
    try:
        import lightning.pytorch  # noqa: F401  (the callback's update path is AveragedModel + get_ema_avg_fn)

        lam = AveragedModel(model, avg_fn=get_ema_avg_fn(DECAY), use_buffers=True)
        lam.update_parameters(model)
        peers["Lightning EMAWeightAveraging"] = lambda: lam.update_parameters(model)
    except ImportError:
        pass
    return peers


def swap_peers(model: nn.Module) -> dict[str, Callable[[], None]]:
    """name -> one swap of the averaged weights into the model (or out of it)."""
    peers: dict[str, Callable[[], None]] = {}
    ema = ModelEMA(model, DECAY)
    ema.update(model)
    peers["emafuse ModelEMA.swap"] = lambda: ema.swap(model)
    try:
        from lightning.pytorch.callbacks import EMAWeightAveraging
        from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

        cb = EMAWeightAveraging(decay=DECAY)
        cb._average_model = AveragedModel(model, avg_fn=get_ema_avg_fn(DECAY), use_buffers=True)
        peers["Lightning EMAWeightAveraging swap"] = lambda: cb._swap_models(model)
    except ImportError:
        pass
    try:
        from torch_ema import ExponentialMovingAverage

        te = ExponentialMovingAverage(model.parameters(), decay=DECAY)

        def te_half_swap():  # store + copy_to (entering average_parameters); restore is the other half
            te.store(model.parameters())
            te.copy_to(model.parameters())
            te.restore(model.parameters())

        peers["torch-ema store+copy_to+restore (÷2)"] = te_half_swap
    except ImportError:
        pass
    return peers


# -- runs -------------------------------------------------------------------------------------------


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


COPY = "copy_ (machine bandwidth)"
INPLACE = "in-place mul_ (machine bandwidth)"


def with_bandwidth(fns: dict[str, Callable[[], None]], device: torch.device) -> tuple[dict[str, Callable[[], None]], dict[str, int]]:
    cfn, cbytes = copy_fn(device)
    ifn, ibytes = inplace_fn(device)
    return {COPY: cfn, INPLACE: ifn, **fns}, {COPY: cbytes, INPLACE: ibytes}


def add_rows(rows: list, name: str, op: str, times: dict[str, float], bw_bytes: dict[str, int], nbytes: Callable[[str], int], base_key: str) -> None:
    copy_bw = bw_bytes[COPY] / times.pop(COPY) / 1e9
    inplace_bw = bw_bytes[INPLACE] / times.pop(INPLACE) / 1e9
    base = times.get(base_key)
    for peer, t in times.items():
        gbs = nbytes(peer) / t / 1e9
        rows.append((name, op, peer, t * 1e3, gbs, gbs / copy_bw, gbs / inplace_bw, (t / base) if base else float("nan"), copy_bw, inplace_bw))


def run_workload(name: str, model: nn.Module, device: torch.device, reps: int, rows: list) -> None:
    model = model.to(device)
    numel = n_params(model) + sum(b.numel() for b in model.buffers() if b.is_floating_point())
    print(f"{name}: {n_params(model) / 1e6:.1f} M params, {len(list(model.parameters()))} tensors", flush=True)

    def nb(mult: int) -> Callable[[str], int]:
        return lambda peer: mult * (n_params(model) if ("foreach_lerp" in peer or "torch-ema" in peer) else numel)

    fns, bw = with_bandwidth(update_peers(model), device)
    add_rows(rows, name, "update", measure(fns, reps, device), bw, nb(12), "emafuse ModelEMA")
    fns, bw = with_bandwidth(swap_peers(model), device)
    t = measure(fns, reps, device)
    if "torch-ema store+copy_to+restore (÷2)" in t:
        t["torch-ema store+copy_to+restore (÷2)"] /= 2
    add_rows(rows, name, "swap", t, bw, nb(16), "emafuse ModelEMA.swap")


def run_mixed(device: torch.device, reps: int, rows: list) -> None:
    """bf16 model, fp32 average (10 B/param)."""
    model = resnet50().to(device=device, dtype=torch.bfloat16)
    numel = n_params(model) + sum(b.numel() for b in model.buffers() if b.is_floating_point())
    fns: dict[str, Callable[[], None]] = {}
    ema = ModelEMA(model, DECAY, ema_dtype=torch.float32)
    ema.update(model)
    fns["emafuse ModelEMA"] = lambda: ema.update(model)
    try:
        from timm.utils.model_ema import ModelEmaV3

        t3 = ModelEmaV3(model, decay=DECAY, dtype=torch.float32)
        fns["timm ModelEmaV3 (dtype=float32)"] = lambda: t3.update(model, step=10)
    except (ImportError, TypeError):
        pass
    fns, bw = with_bandwidth(fns, device)
    add_rows(rows, "ResNet-50 bf16 → fp32 EMA", "update", measure(fns, reps, device), bw, lambda peer: 10 * numel, "emafuse ModelEMA")


def run_offload_overlap(reps: int) -> list[str]:
    """CUDA only: a training step of GPT-2-small-sized MLP with and without the CPU-offloaded
    average (device-to-host copy on a side stream + background native update)."""
    dev = torch.device("cuda")
    model = gpt2_small().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, 50257, (8, 512), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        h = model.wte(x) + model.wpe.weight[: x.shape[1]]
        for b in model.h:
            h = h + b.mlp_proj(torch.relu(b.c_fc(b.ln_2(h + b.attn_proj(b.c_attn(b.ln_1(h))[..., :768])))))
        loss = (model.ln_f(h) @ model.wte.weight.t()).logsumexp(-1).mean()
        loss.backward()
        opt.step()

    base = measure({"step": step}, reps, dev)["step"]
    ema = ModelEMA(model, DECAY, device="cpu").attach(opt)

    def step_with_ema():
        step()
        ema.update(model)

    with_ema = measure({"step": step_with_ema}, reps, dev)["step"]
    ema.wait()
    return [
        f"| GPT-2 small training step (AdamW fused, batch 8×512) | {base * 1e3:.1f} ms | {with_ema * 1e3:.1f} ms | "
        f"{(with_ema / base - 1) * 100:+.1f} % |"
    ]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, emafuse threads {emafuse.num_threads()}"


def format_section(rows: list, device: torch.device, reps: int, overlap: list[str]) -> str:
    out = ["## EMA (model weight averaging)", ""]
    out.append(f"`python benchmarks/bench_ema.py --device {device.type} --reps {reps}` — {datetime.date.today()}, {machine()}"
               + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else "") + ".")
    out.append("")
    out.append(f"Decay {DECAY}. Best of {reps} calls per implementation, measured round-robin with a 256 MiB "
               "`copy_` and a 256 MiB in-place `mul_` in the same rounds (the machine's bandwidth, bytes read + "
               "written ÷ time, shown per row group; a copy also reads its destination without credit, so in-place "
               "updates can pass 100 % of it — the in-place figure is the tighter limit). "
               "GB/s = spec bytes ÷ time: 12 B/param per fp32 update (read E, read θ, write E), 10 with a "
               "bf16 model and fp32 average, 16 per swap; peers that average parameters only are counted on "
               "parameters only. `× emafuse` = peer time ÷ emafuse time (higher = emafuse faster).")
    out.append("")
    out.append("| model | op | implementation | ms | GB/s | of copy | of in-place | × emafuse | copy / in-place GB/s |")
    out.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, op, peer, ms, gbs, frac, ifrac, ratio, cbw, ibw in rows:
        out.append(f"| {name} | {op} | {peer} | {ms:.2f} | {gbs:.1f} | {frac * 100:.0f} % | {ifrac * 100:.0f} % | {ratio:.2f} | {cbw:.1f} / {ibw:.1f} |")
    if device.type == "cpu":
        out += ["", "Reading the CPU numbers: an EMA update is memory-bound (12 B/param, no arithmetic to speak of), so "
                "every implementation built on fused multi-tensor kernels (emafuse, `_foreach_lerp_` in timm V3, "
                "AveragedModel, ema-pytorch `use_foreach`) lands near the copy bandwidth and the ratios between them "
                "mostly reflect noise; the gaps that remain are the per-tensor paths (torch-ema, Lightning's "
                "`get_ema_avg_fn` with its temporaries, the clone-based swaps) and the mixed-dtype path (timm's "
                "mul + add with type promotion vs. emafuse reading bf16 directly). On a shared 2-vCPU machine "
                "run-to-run variation is large; `of copy BW` above 100 % means the copy round happened to be slowed "
                "by other load or by the uncredited write-allocate reads. The ratio targets of the issue are GPU targets (kernel launches and Python overhead "
                "dominate there): run `--device cuda` on a GPU machine."]
    if overlap:
        out += ["", "CPU-offloaded average overlapping training (CUDA model, average in pinned host memory):", "",
                "| workload | step alone | step + offloaded EMA | added |", "| --- | ---: | ---: | ---: |", *overlap]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--models", default="resnet50,gpt2", help="comma-separated: resnet50, gpt2")
    ap.add_argument("--write", action="store_true", help="update the EMA section of benchmarks/RESULTS.md")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(machine())
    rows: list = []
    with torch.no_grad():
        if "resnet50" in args.models:
            run_workload("ResNet-50", resnet50(), device, args.reps, rows)
            run_mixed(device, args.reps, rows)
        if "gpt2" in args.models:
            run_workload("GPT-2 small", gpt2_small(), device, args.reps, rows)
    overlap = run_offload_overlap(args.reps) if device.type == "cuda" else []
    section = format_section(rows, device, args.reps, overlap)
    print()
    print(section)
    if args.write:
        write_section(os.path.join(os.path.dirname(__file__), "RESULTS.md"), "EMA", section)


if __name__ == "__main__":
    main()
