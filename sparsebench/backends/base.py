"""What every attention implementation is: a name, whether it runs here, and ``prepare``
(setup work such as building a mask or layout, kept out of the timed call) returning a callable
``fn(q, k, v) -> out`` on (batch, heads, n, head_dim) tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from sparsebench.patterns.base import Pattern
from sparsebench.registry import Registry
from sparsebench.units import COMPUTE_DTYPES, dtype_bytes

BACKENDS: Registry["Backend"] = Registry("backend", "sparsebench.backends")

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# the compute dtypes, by torch dtype, with their bytes per element
DTYPE_BYTES = {getattr(torch, t): int(dtype_bytes(name)) for name, t in COMPUTE_DTYPES.items()}


@dataclass(frozen=True)
class Problem:
    """One attention problem: what a backend is asked to compute."""

    pattern: Pattern
    seq_len: int
    causal: bool
    batch: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    mode: str = "forward"
    tile: int = 64

    def __post_init__(self) -> None:
        # a pattern whose own parameter sets its causality (a ds_* layout's attention=bidirectional)
        # runs as that parameter says, whatever the caller asked: every backend and the reference
        # check read ``causal`` from here
        causality = getattr(self.pattern, "causality", None)
        if causality is not None:
            object.__setattr__(self, "causal", bool(causality(self.causal)))

    @property
    def block(self) -> int:
        """The old name of ``tile`` (the block_sparse tile size); read with a warning, for one version."""
        import warnings

        warnings.warn("Problem.block is now Problem.tile", DeprecationWarning, stacklevel=2)
        return self.tile

    @property
    def elem_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def io_bytes(self) -> int:
        """q, k, v and the output."""
        return 4 * self.batch * self.heads * self.seq_len * self.head_dim * self.elem_bytes


class Backend:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: computes only (blocks of) allowed pairs
    sparse: ClassVar[bool] = False
    #: its first call compiles (first-call time is reported as compile_s)
    compiled: ClassVar[bool] = False
    supports_backward: ClassVar[bool] = True

    @classmethod
    def unavailable(cls, device: torch.device | None = None) -> str | None:
        """None when the backend can run here (on ``device`` if given), else the reason."""
        return None

    def unsupported(self, p: Problem) -> str | None:
        """None when the backend can run this problem, else the reason (then it is skipped)."""
        if p.mode == "backward" and not self.supports_backward:
            return f"backend {self.name!r} has no backward pass"
        return None

    def prepare(self, p: Problem) -> AttnFn:
        raise NotImplementedError

    @classmethod
    def load(cls, device: torch.device) -> None:
        """This process's one-time costs of the backend that are not its first call's: the
        modules ``prepare`` imports (a compiler's), loaded once per process before the first
        case on ``device`` is measured (the harness), so that they are no case's peak memory
        or setup time. Nothing by default."""

    def estimate_bytes(self, p: Problem) -> int:
        """Analytic peak memory of the call, inputs and output included."""
        return p.io_bytes


def scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def masked_softmax_attention(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """The textbook: materialise scores, mask, softmax, weight the values. Rows without any
    allowed key give zeros (not NaN)."""
    s = (q @ k.transpose(-1, -2)) * scale(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)
    return p @ v
