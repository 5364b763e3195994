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
    #: key/value heads: k and v are (batch, kv_heads, seq_len, head_dim), query head h reads key/value
    #: head h // (heads // kv_heads) (grouped-query attention); None: heads
    kv_heads: int | None = None

    def __post_init__(self) -> None:
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.kv_heads < 1 or self.heads % self.kv_heads:
            from sparsebench.errors import ScenarioError

            raise ScenarioError(f"kv_heads={self.kv_heads} must divide heads={self.heads}")
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
    def group(self) -> int:
        """Query heads per key/value head (1: no grouped-query attention)."""
        return self.heads // self.kv_heads

    @property
    def q_bytes(self) -> int:
        """Bytes of q (and of the output, and of k or v repeated to every query head)."""
        return self.batch * self.heads * self.seq_len * self.head_dim * self.elem_bytes

    @property
    def kv_bytes(self) -> int:
        """Bytes of k and v together (kv_heads heads each)."""
        return 2 * self.batch * self.kv_heads * self.seq_len * self.head_dim * self.elem_bytes

    @property
    def io_bytes(self) -> int:
        """q, k, v and the output."""
        return 2 * self.q_bytes + self.kv_bytes


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


def repeat_kv(q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v with each key/value head repeated for the query heads it serves (query head h
    reads key/value head h // (heads // kv_heads)): what references do with grouped-query inputs
    (a copy of the size of q each; the sparse backends never make it)."""
    group = q.shape[1] // k.shape[1]
    if group == 1:
        return k, v
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def masked_softmax_attention(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """The textbook: materialise scores, mask, softmax, weight the values. Rows without any
    allowed key give zeros (not NaN). k and v with as many heads as q."""
    s = (q @ k.transpose(-1, -2)) * scale(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)
    return p @ v
