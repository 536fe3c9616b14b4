"""DTensor parameters (``torch.distributed.fsdp.fully_shard``, FSDP2): emafuse's native engine
works on each rank's local shards.

A ``DTensor`` is a wrapper subclass with no storage of its own; its data is the plain local tensor
it wraps (``_local_tensor``). Everything emafuse passes to the native engine is unwrapped here
first, so the engine only ever sees plain tensors:

* optimizers (:func:`local_call`): parameter, gradient and state slots of a DTensor parameter are
  replaced by their local shards (state entries are DTensors with the parameter's placements, so
  ``torch.distributed.checkpoint`` saves and reshards them; 8-bit block scales, shaped their own
  way, are checked for placement only). Element-wise rules need nothing else.
  Rules that read sums over each whole tensor (Lion's cautious factor, SGD-SaI's gradient
  signal-to-noise ratio) have the engine compute them on the local shards, add them across the
  mesh (:func:`add_shard_sums`), then update with the totals; norms add the local sums across
  the mesh (:func:`tensor_sum_squares`);
* averaging (:func:`local`): the model's tensors are read as their local shards, the average keeps
  one local shard per tensor inside a DTensor of the same placements (:func:`sharded_like`).

Supported: DTensors on a 1-D device mesh whose placement is ``Shard(d)`` (any dim, uneven sizes
included) or ``Replicate()``. Others (``Partial``, meshes of 2 or more dimensions, e.g. HSDP)
are refused with :class:`~emafuse.errors.UnsupportedOptionError`.

* factored state (Adafactor's row and column factors, :func:`new_factor`): a factor is sharded
  like its parameter where it keeps the parameter's sharded dim at its size, else replicated (the
  column factors of matrices whose rows are split across ranks). For such matrices the engine's
  factor statistics (column sums, and the rows' factors summed with their count) are added across
  the mesh (:func:`add_factor_stats`) before the step reads them.

Collectives: none for element-wise steps and for averaging updates. One ``all_reduce`` per process
group per step (float64) for norms, one element per sharded tensor (Adan's ``max_grad_norm``, the
clippers of ``emafuse.clipping``), and for rules with per-tensor sums, ``MAX_SUMS`` elements per
sharded parameter (SGD-SaI on a parameter's first step, Lion with ``caution=True``), and for
factored state one more per step and process group where some matrix has its rows split (its
factor statistics: a value per column and two per matrix). No step gathers a tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .errors import InvalidArgumentError, UnsupportedOptionError

__all__ = [
    "Layout", "ShardRows", "SplitRows", "add_factor_stats", "add_shard_sums", "any_dtensor", "check", "copy_into",
    "factor_placements", "factor_stats_arrays", "full_state_dict", "is_dtensor", "layout", "local", "local_call", "new_factor",
    "reshaped", "shard_dim", "shard_rows", "sharded_like", "split_rows", "tensor_sum_squares", "unwrap", "wrap",
]

_DTENSOR: Any = False  # the DTensor class once looked up (None: torch.distributed unavailable)


def _dtensor_type() -> Any:
    global _DTENSOR
    if _DTENSOR is False:
        try:
            from torch.distributed.tensor import DTensor
        except Exception:
            DTensor = None
        _DTENSOR = DTensor
    return _DTENSOR


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def any_dtensor(ts: Iterable[Any]) -> bool:
    """Whether any of ``ts`` is a DTensor (False at once when torch.distributed is unavailable)."""
    cls = _dtensor_type()
    return cls is not None and any(isinstance(t, cls) for t in ts)


def local(t: Tensor) -> Tensor:
    """``t``'s local shard if it is a DTensor, else ``t``."""
    return t._local_tensor if is_dtensor(t) else t  # type: ignore[attr-defined]


# (id(mesh), placements) pairs already checked, with their mesh (kept, so that the id stays its).
_SUPPORTED: dict[tuple[int, Any], Any] = {}


def check(t: Tensor, who: str, what: str) -> None:
    """Refuse DTensors emafuse does not handle: a mesh of more than one dimension, or a placement
    other than ``Shard(d)`` / ``Replicate()``."""
    spec = t._spec  # type: ignore[attr-defined]
    key = (id(spec.mesh), spec.placements)
    if key in _SUPPORTED:
        return
    from torch.distributed.tensor import Replicate, Shard

    mesh = spec.mesh
    if mesh.ndim != 1:
        raise UnsupportedOptionError(
            f"{who}: {what} is a DTensor on a {mesh.ndim}-D device mesh (e.g. HSDP); emafuse handles DTensor/FSDP2 "
            "tensors on a 1-D mesh only (fully_shard with a 1-D mesh). Use a 1-D mesh or torch.optim for this model."
        )
    placement = spec.placements[0]
    if not isinstance(placement, (Shard, Replicate)):
        raise UnsupportedOptionError(
            f"{who}: {what} is a DTensor with placement {placement}; emafuse handles DTensor/FSDP2 tensors placed "
            "Shard(dim) or Replicate() only (a Partial tensor must be reduced first, e.g. by redistribute())."
        )
    if len(_SUPPORTED) < 1024:
        _SUPPORTED[key] = mesh


def check_partner(p: Tensor, x: Any, who: str, what: str, same_shape: bool = True, placements: tuple | None = None) -> Tensor:
    """``x`` (a gradient or state tensor of DTensor parameter ``p``) as its local shard; it must be
    a DTensor on ``p``'s mesh placed like ``p`` (or as ``placements`` says), with ``p``'s shape
    unless ``same_shape`` is False."""
    if not is_dtensor(x):
        raise InvalidArgumentError(
            f"{who}: {what} of a DTensor (FSDP2) parameter is a plain {type(x).__name__}; it must be a DTensor placed like "
            "the parameter. Load sharded optimizer state with torch.distributed.checkpoint.state_dict.set_optimizer_state_dict."
        )
    a, b = x._spec, p._spec
    want = tuple(b.placements if placements is None else placements)
    if a is not b and (tuple(a.placements) != want or (same_shape and a.shape != b.shape) or (a.mesh is not b.mesh and a.mesh != b.mesh)):
        raise InvalidArgumentError(
            f"{who}: {what} of a DTensor (FSDP2) parameter is placed {x.placements} with shape {tuple(x.shape)}, "
            f"the parameter {p.placements} with shape {tuple(p.shape)}; it must be placed {want} on the parameter's mesh"
            f"{', with its shape' if same_shape else ''}."
        )
    return x._local_tensor


def factor_placements(p: Tensor, index: int) -> tuple:
    """The placements of factor ``index`` (0: a value per row, 1: per column, of the matrices of
    DTensor ``p``'s last two dims) of factored state: ``p``'s where the factor keeps ``p``'s
    sharded dim at its size (a leading dim, or the rows for the row factor), else ``Replicate()``
    (every rank needs the whole column factor of the matrices whose rows it holds part of)."""
    from torch.distributed.tensor import Replicate

    dim = shard_dim(p)
    if dim is None or dim < p.dim() - 2 or (dim == p.dim() - 2 and index == 0):
        return tuple(p.placements)  # type: ignore[attr-defined]
    return (Replicate(),)


def new_factor(p: Tensor, index: int, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Zeros of factor ``index`` of DTensor ``p``'s factored state, of global ``shape``, placed as
    :func:`factor_placements` says (no communication)."""
    from torch.distributed.tensor import zeros

    return zeros(shape, dtype=dtype, device_mesh=p.device_mesh, placements=factor_placements(p, index))  # type: ignore[attr-defined]


def shard_dim(t: Any) -> int | None:
    """The dim DTensor ``t`` is sharded on (``Shard(d)``); None for a plain tensor and any other
    placement (``Replicate()``; the others are refused when stepped)."""
    if not is_dtensor(t):
        return None
    from torch.distributed.tensor import Shard

    placement = t.placements[0]
    return placement.dim if isinstance(placement, Shard) else None


def _local_slice(t: Any, full: Tensor) -> Tensor:
    """The part of ``full`` (the whole tensor of DTensor ``t``) that this rank holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)  # type: ignore[attr-defined]
    out = full
    for d, (n, o) in enumerate(zip(shape, offset)):
        if n != full.shape[d]:
            out = out.narrow(d, o, n)
    return out


def local_call(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict[str, Tensor]] | None,
    slots: tuple[str, ...],
    who: str,
    scales: Collection[str] = (),
    factors: Sequence[str] = (),
) -> tuple[list[Tensor], list[Tensor], list[dict[str, Tensor]] | None, list[int]]:
    """The tensors of one native call with DTensors replaced by their local shards (checked: a
    supported placement, gradient and state slots placed like the parameter; the slots named in
    ``scales``, 8-bit block scales, on its mesh with its placements, and the two named in
    ``factors``, factored state's row and column factors, placed as :func:`factor_placements`
    says, both shaped their own way, which the engine checks), and each one's ``flat_offset``.
    Plain tensors pass unchanged; scalar state stays as it is."""
    ps: list[Tensor] = []
    gs: list[Tensor] = []
    offsets: list[int] = []
    sts: list[dict[str, Tensor]] | None = None if states is None else []
    for i, (p, g) in enumerate(zip(params, grads)):
        offsets.append(flat_offset(p) if is_dtensor(p) else 0)
        st = None if states is None else states[i]
        if not is_dtensor(p):
            if is_dtensor(g):
                raise InvalidArgumentError(
                    f"{who}: the gradient of a plain parameter is a DTensor; parameter and gradient must both be DTensors (FSDP2) or neither"
                )
            ps.append(p)
            gs.append(g)
        else:
            check(p, who, "a parameter")
            gs.append(check_partner(p, g, who, "the gradient"))
            ps.append(p._local_tensor)  # type: ignore[attr-defined]
            if st is not None:
                st = dict(st)
                for k in slots:
                    placed = factor_placements(p, factors.index(k)) if k in factors else None
                    st[k] = check_partner(p, st[k], who, f"state '{k}'", k not in scales and k not in factors, placed)  # type: ignore[index]
        if sts is not None:
            sts.append(st)  # type: ignore[arg-type]
    return ps, gs, sts, offsets


def flat_offset(t: Tensor) -> int:
    """The position in the whole (row-major) tensor of the first element of DTensor ``t``'s local
    shard, where the shard is a contiguous range of it (``Shard(0)``, FSDP2's placement, and
    ``Replicate()``); 0 for ``Shard(d > 0)``, whose elements are not one range. The engine's
    stochastic rounding draws each element's bits at its position, so a step on ``Shard(0)``
    shards rounds as the step on the whole tensor."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placement = t.placements[0]  # type: ignore[attr-defined]
    if not isinstance(placement, Shard) or placement.dim != 0 or t.dim() == 0:
        return 0
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)  # type: ignore[attr-defined]
    return int(offset[0]) * math.prod(t.shape[1:])


# Where the per-tensor sums of sharded tensors lie: {process group: {call index: [row, ...]}}.
ShardRows = dict[Any, dict[int, list[int]]]


def shard_rows(calls: Sequence[Sequence[Tensor]]) -> ShardRows:
    """The rows (call index, parameter index) of the ``Shard``-placed DTensors among ``calls``'
    parameters, by the process group of their mesh: their per-tensor sums are partial. Replicated
    DTensors and plain tensors are whole on every rank: their sums are complete."""
    rows: ShardRows = {}
    for ci, params in enumerate(calls):
        for i, p in enumerate(params):
            if shard_dim(p) is not None:
                rows.setdefault(p.device_mesh.get_group(), {}).setdefault(ci, []).append(i)  # type: ignore[attr-defined]
    return rows


# Tensors whose matrices have their rows split across ranks: {process group: [(call, parameter)]}.
SplitRows = dict[Any, list[tuple[int, int]]]


def split_rows(calls: Sequence[Sequence[Tensor]]) -> SplitRows:
    """The (call index, parameter index) of the DTensors among ``calls``' parameters (of two or
    more dims) sharded on their second-to-last dim, by the process group of their mesh: the rows
    of their matrices are split across ranks, so factored state's column statistics are partial."""
    out: SplitRows = {}
    for ci, params in enumerate(calls):
        for i, p in enumerate(params):
            if p.dim() >= 2 and shard_dim(p) == p.dim() - 2:
                out.setdefault(p.device_mesh.get_group(), []).append((ci, i))  # type: ignore[attr-defined]
    return out


def factor_stats_arrays(calls: Sequence[Sequence[Tensor]]) -> list[list[Tensor | None]]:
    """Arrays for the engine's factor statistics (``StepPlan.factor_stats``) of ``calls``' local
    tensors: for each of two or more dims, ``count · (rows + cols + 2)`` float64 elements
    (``count`` matrices ``rows × cols``); None for the others."""
    return [[torch.empty(_factor_stats_len(t), dtype=torch.float64) if t.dim() >= 2 else None for t in ts] for ts in calls]


def _factor_stats_len(t: Tensor) -> int:
    *lead, rows, cols = t.shape
    return math.prod(lead) * (rows + cols + 2)


def add_factor_stats(stats: Sequence[Sequence[Tensor | None]], locals_: Sequence[Sequence[Tensor]], split: SplitRows) -> None:
    """Add across each mesh, in place, the parts of the factor statistics ``stats`` (of the local
    tensors ``locals_``) that are partial where the rows are split (``split``): every column sum
    and each matrix's (row factors' sum, rows). One float64 ``all_reduce`` per process group;
    every rank of the mesh must call this."""
    import torch.distributed as dist

    for pg, members in split.items():
        parts = []
        for ci, i in members:
            rows = math.prod(locals_[ci][i].shape[:-1])  # the row sums come first: this shard's own
            parts.append(stats[ci][i][rows:])  # type: ignore[index]
        total = torch.cat(parts)
        dist.all_reduce(total, group=pg)
        for part, added in zip(parts, total.split([x.numel() for x in parts])):
            part.copy_(added)


def add_shard_sums(sums: Sequence[Tensor], rows: ShardRows, columns: Sequence[Sequence[tuple[int, bool]]]) -> None:
    """Combine, across each mesh, the rows ``rows`` of ``sums`` (one ``[n, MAX_SUMS]`` float64
    tensor per call, the engine's per-tensor sums over this rank's shards), in place, in the
    columns ``columns[ci]`` of call ``ci`` (``(column, is_max)``: added, or the largest kept):
    one ``all_reduce`` per process group and kind of column. Every rank of the mesh must call
    this."""
    import torch.distributed as dist

    for pg, by_call in rows.items():
        index = {ci: torch.tensor(r, device=sums[ci].device) for ci, r in by_call.items()}
        if not any(columns[ci] for ci in index):
            continue
        part = torch.cat([sums[ci].index_select(0, ix) for ci, ix in index.items()])
        kind = torch.zeros_like(part, dtype=torch.int8)  # 0: kept, 1: added, 2: largest
        start = 0
        for ci, ix in index.items():
            for col, is_max in columns[ci]:
                kind[start : start + len(ix), col] = 2 if is_max else 1
            start += len(ix)
        zero = torch.zeros((), dtype=part.dtype, device=part.device)
        if any(not is_max for ci in index for _, is_max in columns[ci]):
            added = torch.where(kind == 1, part, zero)
            dist.all_reduce(added, group=pg)
            part = torch.where(kind == 1, added, part)
        if any(is_max for ci in index for _, is_max in columns[ci]):
            largest = torch.where(kind == 2, part, zero)
            dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=pg)
            part = torch.where(kind == 2, largest, part)
        start = 0
        for ci, ix in index.items():
            sums[ci].index_copy_(0, ix, part[start : start + len(ix)])
            start += len(ix)


def tensor_sum_squares(tensors: Sequence[Tensor], local_sums: Callable[[list[Tensor]], list[float]]) -> list[float]:
    """``Σ x²`` of each of ``tensors`` where some are DTensors: ``local_sums`` over this rank's
    plain tensors and local shards, the shards' sums added across each DTensor's mesh (one float64
    ``all_reduce`` per process group); replicated DTensors and plain tensors count once, as every
    rank holds them whole."""
    import torch.distributed as dist

    local_parts: list[Tensor] = []
    by_group: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        if is_dtensor(t):
            check(t, "sum_squares", "a tensor")
            if shard_dim(t) is not None:
                by_group.setdefault(t.device_mesh.get_group(), []).append(i)  # type: ignore[attr-defined]
            t = t._local_tensor  # type: ignore[attr-defined]
        local_parts.append(t)
    sums = local_sums(local_parts)
    for pg, index in by_group.items():
        shard = local_parts[index[0]]
        part = torch.tensor([sums[i] for i in index], dtype=torch.float64, device=shard.device if shard.is_cuda else "cpu")
        dist.all_reduce(part, group=pg)
        for i, x in zip(index, part.tolist()):
            sums[i] = x
    return sums


def sharded_like(t: Tensor, data: Tensor) -> Tensor:
    """A DTensor placed like DTensor ``t`` whose local shard is ``data`` (no communication)."""
    return wrap(layout(t), data)


class Layout(NamedTuple):
    """Where a DTensor's shards lie (what :func:`wrap` / :func:`unwrap` need; no data)."""

    device_mesh: Any
    placements: tuple
    shape: torch.Size
    strides: tuple[int, ...]


def layout(t: Tensor) -> Layout | None:
    """DTensor ``t``'s :class:`Layout`, or None for a plain tensor."""
    if not is_dtensor(t):
        return None
    return Layout(t.device_mesh, tuple(t.placements), t.shape, t.stride())  # type: ignore[attr-defined]


def wrap(like: Layout | None, data: Tensor) -> Tensor:
    """Local shard ``data`` as a DTensor laid out as ``like``; ``data`` itself when ``like`` is
    None. No communication, and ``data`` stays where it is: an average offloaded to the CPU of a
    model sharded on CUDA is a CPU shard of a CUDA-mesh DTensor, as FSDP2's own CPU offload keeps
    parameters (built the way FSDP2 builds them; ``DTensor.from_local`` would move it to the
    mesh's device)."""
    if like is None:
        return data
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    spec = DTensorSpec(like.device_mesh, like.placements, tensor_meta=TensorMeta(like.shape, like.strides, data.dtype))
    return DTensor(data, spec, requires_grad=False)  # type: ignore[call-arg]


def reshaped(like: Layout | None, shape: Sequence[int]) -> Layout | None:
    """``like`` for a contiguous tensor of global shape ``shape`` with the same placements (e.g. a
    parameter's 8-bit scales, whose rows follow its rows); None stays None."""
    if like is None:
        return None
    size = torch.Size(shape)
    strides = tuple(math.prod(size[d + 1 :]) for d in range(len(size)))
    return like._replace(shape=size, strides=strides)


def unwrap(like: Layout | None, t: Tensor) -> Tensor:
    """The inverse of :func:`wrap` on a loaded tensor: a DTensor's local shard, this rank's part of
    a plain whole tensor (a consolidated checkpoint), or ``t`` as it is (already local)."""
    if is_dtensor(t):
        return t._local_tensor  # type: ignore[attr-defined]
    if like is not None and tuple(t.shape) == tuple(like.shape):
        return _local_slice(like, t)
    return t


def copy_into(dst: Tensor, src: Tensor) -> None:
    """``dst.copy_(src)``, where a plain whole ``src`` (e.g. from a consolidated checkpoint) goes
    into a DTensor ``dst`` as this rank's part of it (no communication)."""
    if is_dtensor(dst) and not is_dtensor(src):
        dst._local_tensor.copy_(_local_slice(dst, src.to(dst.device)))  # type: ignore[attr-defined]
    else:
        dst.copy_(src)


def full_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with every DTensor gathered into a plain whole tensor (every rank of the mesh
    must call this: one ``all_gather`` per sharded tensor)."""
    return {k: v.full_tensor() if is_dtensor(v) else v for k, v in state.items()}
