"""Type stubs of emafuse's native module (Rust, ``src/py/``). Checked against the built module
by ``stubtest`` in the test suite."""

from collections.abc import Callable, Sequence
from typing import Any, final

from torch import Tensor

Hyper = dict[str, float | bool]
AmpTensor = Tensor | dict[int, Tensor] | None

@final
class Group:
    """The tensors of one native call: a parameter group (or the part of one that shares
    flags), or the tensors of one averaging update."""

    @property
    def hyper(self) -> Hyper: ...
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
    def __new__(
        cls,
        *,
        hyper: Hyper,
        params: list[Tensor],
        inputs: list[Tensor] | None = None,
        states: list[dict[str, Tensor]] | None = None,
        slots: tuple[str, ...] | None = None,
        scalars: tuple[str, ...] | None = None,
    ) -> Group: ...

@final
class StepPlan:
    """Every group of a step, validated once and kept between steps (see ``src/py/plan.rs``)."""

    def __new__(cls, who: str, rule: str, groups: list[Group], watch: list[list[Tensor]] | None = None) -> StepPlan: ...
    def run(
        self,
        hypers: list[Hyper] | None = None,
        grad_scale: AmpTensor = None,
        found_inf: AmpTensor = None,
        streams: Sequence[int] | None = None,
    ) -> bool | None: ...
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
    grad_scale: AmpTensor = None,
    found_inf: AmpTensor = None,
    streams: Sequence[int] | None = None,
) -> bool: ...
def step_async(who: str, rule: str, groups: list[Group], wait_for: Callable[[], Any] | None = None) -> PendingStep: ...
def sum_squares(tensors: list[Tensor]) -> float: ...
def num_threads() -> int: ...
def rule_names() -> list[str]: ...
def cuda_source(rule: str, hyper: Hyper) -> tuple[str, str, bytes, str]: ...
def cuda_compile(rule: str, hyper: Hyper, arch: str) -> str: ...
