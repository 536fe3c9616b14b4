"""Type stubs of emafuse's native module (Rust, ``src/py/``). Checked against the built module
by ``stubtest`` in the test suite."""

from collections.abc import Callable, Sequence
from typing import Any, final

from torch import Tensor

_Hyper = dict[str, float | bool]
_AmpTensor = Tensor | dict[int, Tensor] | None

__all__ = [
    "ABSMAX_SUFFIX",
    "MAX_SUMS",
    "QUANT_BLOCK",
    "TORCH_VERSION",
    "WEIGHT_CORRECTION",
    "Group",
    "PendingStep",
    "StepPlan",
    "check_tensor",
    "cuda_compile",
    "cuda_source",
    "num_threads",
    "quantization_map",
    "read_tensor",
    "rule_info",
    "rule_names",
    "rule_slots",
    "rule_sums",
    "step",
    "step_async",
    "sum_squares",
    "tensor_sum_squares",
]

@final
class Group:
    """The tensors of one native call: a parameter group (or the part of one that shares
    flags), or the tensors of one averaging update."""

    @property
    def hyper(self) -> _Hyper: ...
    @property
    def params(self) -> list[Tensor]: ...
    @property
    def inputs(self) -> list[Tensor] | None: ...
    @property
    def states(self) -> list[dict[str, Tensor]] | None: ...
    @property
    def slots(self) -> tuple[str, ...]: ...
    @property
    def scalars(self) -> tuple[str, ...]: ...
    @property
    def offsets(self) -> list[int] | None:
        """Each parameter's first element's position in the whole tensor it is a shard of (where
        stochastic rounding draws its bits), or None: every parameter is whole."""
    @property
    def place(self) -> tuple[int, list[int]] | None:
        """For messages: the param group the tensors belong to and each parameter's index in it,
        or None: the call's index and the parameters' indices in the call."""
    def __new__(
        cls,
        *,
        hyper: _Hyper,
        params: list[Tensor],
        inputs: list[Tensor] | None = None,
        states: list[dict[str, Tensor]] | None = None,
        slots: tuple[str, ...] | None = None,
        scalars: tuple[str, ...] | None = None,
        offsets: list[int] | None = None,
        place: tuple[int, list[int]] | None = None,
    ) -> Group: ...

@final
class StepPlan:
    """Every group of a step, validated once and kept between steps (see ``src/py/plan.rs``)."""

    def __new__(
        cls, who: str, rule: str, groups: list[Group], watch: list[list[Tensor]] | None = None, grads_given: bool = False
    ) -> StepPlan: ...
    def run(
        self,
        hypers: list[_Hyper] | None = None,
        grad_scale: _AmpTensor = None,
        found_inf: _AmpTensor = None,
        streams: Sequence[int] | None = None,
        sums: list[Tensor] | None = None,
        grads: list[Tensor] | None = None,
        grad_factors: list[Sequence[float] | None] | None = None,
        factor_stats: list[list[Tensor | None]] | None = None,
    ) -> bool | None:
        """One update (None: the tensors changed since the plan was built, nothing written).
        ``grad_factors``: per group, None or a float per parameter (finite, >= 0) multiplying its
        gradient as the step loads it (e.g. AdaGC's clip factors; ``.grad`` is not written).
        ``factor_stats``: a factored rule's statistics to use instead of its own (see
        ``factor_stats``)."""
    def sums(
        self,
        out: list[Tensor],
        hypers: list[_Hyper] | None = None,
        grad_scale: _AmpTensor = None,
        found_inf: _AmpTensor = None,
        streams: Sequence[int] | None = None,
        grads: list[Tensor] | None = None,
        sum_pass: int = 0,
        grad_factors: list[Sequence[float] | None] | None = None,
        factor_stats: list[list[Tensor | None]] | None = None,
    ) -> bool | None:
        """The rule's per-tensor sums of read-only pass ``sum_pass`` combined into ``out`` (one
        float64 ``[n, MAX_SUMS]`` tensor per group, holding the earlier passes' sums: zeros for
        pass 0); nothing is updated. ``grad_factors``, ``factor_stats``: as for ``run`` (give
        the update's)."""
    def factor_stats(
        self,
        out: list[list[Tensor | None]],
        hypers: list[_Hyper] | None = None,
        grad_scale: _AmpTensor = None,
        found_inf: _AmpTensor = None,
        streams: Sequence[int] | None = None,
        grads: list[Tensor] | None = None,
        grad_factors: list[Sequence[float] | None] | None = None,
    ) -> bool | None:
        """A factored rule's statistics of each parameter into ``out`` (per group, per parameter:
        a contiguous float64 CPU tensor of ``count * (rows + cols + 2)`` elements, laid out
        ``[row sums | column sums | (row factors' sum, rows) per matrix]``; None for a parameter
        without factored state); nothing is updated. Adding the column sums and the pairs across
        the shards of a tensor whose rows are split across ranks gives the whole tensor's."""
    def params(self) -> list[Tensor]: ...

@final
class PendingStep:
    """An update running on a background thread."""

    def wait(self) -> None: ...
    def done(self) -> bool: ...

def step(
    who: str,
    rule: str,
    groups: list[Group],
    grad_scale: _AmpTensor = None,
    found_inf: _AmpTensor = None,
    streams: Sequence[int] | None = None,
) -> bool: ...
def step_async(who: str, rule: str, groups: list[Group], wait_for: Callable[[], Any] | None = None) -> PendingStep: ...
def sum_squares(tensors: list[Tensor]) -> float: ...
def tensor_sum_squares(tensors: list[Tensor]) -> list[float]: ...
def num_threads() -> int: ...
def check_tensor(tensor: Any, role: str) -> None: ...

TORCH_VERSION: str
"""The torch release (major.minor.patch) the module was compiled against."""

def read_tensor(tensor: Tensor) -> dict[str, Any]:
    """What the engine reads of a tensor: in_place, data_ptr, shape, layout, strides, dtype, device."""
def rule_names() -> list[str]: ...
def rule_info(name: str) -> dict[str, Any]:
    """The rule's description: name, summary, numbers, flags, optional_flags, scalars,
    nonnegative_slots (stored with the unsigned 8-bit map), reads_input, input ("gradient", "weights"
    or "none")."""

def rule_slots(name: str, hyper: _Hyper) -> tuple[str, ...]:
    """The state slot names (in order) of the rule built from these hyper-parameters."""

def rule_sums(name: str, hyper: _Hyper) -> list[tuple[int, bool]]:
    """The per-tensor sums the rule built from these hyper-parameters reads, as ``(pass, is_max)``
    each: the read-only pass gathering it and whether it is a maximum (empty: element-wise)."""

MAX_SUMS: int
"""The most per-tensor sums any rule reads (the width of ``StepPlan.sums`` arrays)."""

WEIGHT_CORRECTION: str
"""The name of a 16-bit parameter's weight correction: as the last state slot of a ``Group``, an int8
tensor shaped like the parameter that the engine reads and writes with it (``src/rounding.rs``)."""

ABSMAX_SUFFIX: str
"""8-bit state: the scales of slot ``s`` are the state entry ``s + ABSMAX_SUFFIX``; a ``Group``
lists every (uint8) slot, then every slot's scales in the same order (``src/quant.rs``)."""

QUANT_BLOCK: int
"""8-bit state: elements per quantization block (one float32 scale each)."""

def quantization_map(nonnegative: bool) -> list[float]:
    """The 256 values of 8-bit state's map, ascending: the unsigned map for never-negative state,
    else the signed (dynamic) one."""

def cuda_source(rule: str, hyper: _Hyper) -> dict[str, Any]:
    """The rule's CUDA program (for tests): type_name, source, preamble, header, hyper_bytes."""

def cuda_compile(rule: str, hyper: _Hyper, arch: str) -> str: ...
