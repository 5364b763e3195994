"""What every attention pattern is: a frozen set of parameters plus four questions.

* ``allowed(q, k, n, causal)``: which (query, key) pairs may attend, elementwise on broadcast
  index tensors (the exact semantics of ../shared/design.md; causality is applied here, once).
* ``key_intervals(n, block, causal)``: a cheap *superset* of the keys each query block may
  touch, as inclusive key ranges. From it ``block_layout`` finds the non-empty blocks by
  evaluating ``allowed`` on those tiles only, so building a layout costs time and memory in
  proportion to the non-empty blocks, never n^2.
* ``keys_per_query(n, causal)``: keys each query attends (analytic where a formula exists,
  otherwise counted tile by tile from the layout); ``nnz`` is its sum.
* ``kv_retained(n)``: past keys a decoder must keep after n tokens so that every future query
  still finds its keys (counting the newest token's own key).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sparsebench.errors import PatternError
from sparsebench.registry import Registry

PATTERNS: Registry["Pattern"] = Registry("pattern", "sparsebench.patterns")

# Upper bound on tile elements evaluated at once while scanning blocks.
_TILE_CHUNK = 1 << 22
LAYOUT_BLOCK = 64


def param(help: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A pattern parameter with a one-line help text (shown by ``sparsebench list``)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


@dataclass(frozen=True)
class Intervals:
    """Key ranges [lo, hi] (inclusive) that query block ``qb`` may touch."""

    qb: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    @staticmethod
    def cat(parts: list["Intervals"]) -> "Intervals":
        return Intervals(
            torch.cat([p.qb for p in parts]),
            torch.cat([p.lo for p in parts]),
            torch.cat([p.hi for p in parts]),
        )


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Non-empty (query block, key block) tiles in CSR form; ``full`` marks tiles where every
    in-range pair is allowed (no mask needed). Sequences that are not a multiple of ``block``
    end in a short last block."""

    n: int
    block: int
    causal: bool
    crow: torch.Tensor  # (num_blocks + 1,) int64
    col: torch.Tensor  # (nnz_blocks,) int64, key block indices
    full: torch.Tensor  # (nnz_blocks,) bool
    count: torch.Tensor  # (nnz_blocks,) int64, allowed pairs inside the tile

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.n / self.block)

    @property
    def nnz_blocks(self) -> int:
        return int(self.col.numel())

    def row_of_tiles(self) -> torch.Tensor:
        """Query block index of each tile."""
        counts = self.crow[1:] - self.crow[:-1]
        return torch.repeat_interleave(torch.arange(self.num_blocks), counts)

    def dense(self) -> torch.Tensor:
        """(num_blocks, num_blocks) int8 matrix of non-empty tiles (for display and tests)."""
        out = torch.zeros(self.num_blocks, self.num_blocks, dtype=torch.int8)
        out[self.row_of_tiles(), self.col] = 1
        return out


@dataclass(frozen=True, kw_only=True)
class Pattern:
    """Base class. Subclasses are frozen dataclasses whose fields are the pattern's parameters."""

    name: ClassVar[str] = ""
    rule: ClassVar[str] = ""
    # Whether the pattern is (block-)structured enough that a decoder can drop old keys.
    bounded_kv: ClassVar[bool] = False

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def parameters(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> "Pattern":
        params = dict(params or {})
        valid = {f.name: f for f in cls.parameters()}
        for key in params:
            if key not in valid:
                from sparsebench.registry import unknown_choice

                raise PatternError(unknown_choice(f"parameter for pattern {cls.name!r}:", key, valid))
        missing = [
            f.name
            for f in valid.values()
            if f.name not in params
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        ]
        if missing:
            raise PatternError(f"pattern {cls.name!r} needs parameter(s): {', '.join(missing)}")
        clean: dict[str, Any] = {}
        for key, value in params.items():
            clean[key] = _coerce(cls.name, key, value, valid[key])
        obj = cls(**clean)
        obj.validate()
        return obj

    def validate(self) -> None:
        """Checks that do not depend on the sequence length (sizes >= 1 ...)."""

    def check(self, n: int, causal: bool) -> None:
        """Raise PatternError if the parameters are impossible for a sequence of n tokens."""

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def label(self) -> str:
        inner = ", ".join(f"{k}={_fmt(v)}" for k, v in self.params().items() if k != "seed")
        return f"{self.name}({inner})" if inner else self.name

    # -- semantics ----------------------------------------------------------------------------
    def _allowed(self, q: torch.Tensor, k: torch.Tensor, n: int, causal: bool) -> torch.Tensor:
        raise NotImplementedError

    def allowed(self, q: torch.Tensor, k: torch.Tensor, n: int, causal: bool) -> torch.Tensor:
        """Bool tensor of broadcast(q, k) shape: may query q attend key k?"""
        m = self._allowed(q, k, n, causal)
        shape = torch.broadcast_shapes(q.shape, k.shape)
        if m.shape != shape:
            m = m.expand(shape)
        return m & (k <= q) if causal else m

    def mask_fn(self, n: int, causal: bool, device: str | torch.device = "cpu"):
        """A closure ``f(q, k)`` with any lookup tables already built and on ``device``:
        traceable by torch.compile (FlexAttention's mask_mod)."""
        return lambda q, k: self.allowed(q, k, n, causal)

    def mask(self, n: int, causal: bool, device: str | torch.device = "cpu") -> torch.Tensor:
        """The full (n, n) boolean mask. Only for small n (reference checks, drawings)."""
        idx = torch.arange(n, device=device)
        return self.allowed(idx[:, None], idx[None, :], n, causal)

    def rows(self, rows: torch.Tensor, n: int, causal: bool) -> torch.Tensor:
        """(len(rows), n) mask of the given query rows."""
        return self.allowed(rows[:, None], torch.arange(n, device=rows.device)[None, :], n, causal)

    # -- structure ----------------------------------------------------------------------------
    def key_intervals(self, n: int, block: int, causal: bool) -> Intervals:
        """A superset of touched keys per query block. Default: everything (fine for small n)."""
        nb = math.ceil(n / block)
        qb = torch.arange(nb)
        return Intervals(qb, torch.zeros(nb, dtype=torch.long), torch.full((nb,), n - 1))

    def block_layout(self, n: int, block: int, causal: bool) -> BlockLayout:
        return _layout(self, n, block, causal)

    def keys_per_query(self, n: int, causal: bool) -> torch.Tensor:
        """(n,) int64: keys attended by each query. Default: counted over the layout's tiles."""
        return _scan(self, n, LAYOUT_BLOCK, causal, per_row=True)[1]

    def nnz(self, n: int, causal: bool) -> int:
        return int(self.keys_per_query(n, causal).sum())

    def density(self, n: int, causal: bool) -> float:
        return self.nnz(n, causal) / float(n * n)

    def kv_retained(self, n: int) -> int:
        """Tokens a causal decoder keeps in its cache after a context of n tokens."""
        return n


# ------------------------------------------------------------------------------------------
# helpers shared by the pattern files


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(str(x) for x in v) + "]"
    return str(v)


def _coerce(pattern: str, key: str, value: Any, field: dataclasses.Field) -> Any:
    want = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    where = f"pattern {pattern!r} parameter {key!r}"
    if "list" in want:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in value
        ):
            raise PatternError(f"{where} must be a list of integers, got {value!r}")
        return tuple(int(x) for x in value)
    if "int" in want:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise PatternError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if "str" in want:
        if not isinstance(value, str):
            raise PatternError(f"{where} must be a string, got {value!r}")
        return value
    if "bool" in want:
        if not isinstance(value, bool):
            raise PatternError(f"{where} must be true or false, got {value!r}")
        return value
    return value


def require_positive(pattern: "Pattern", *names: str) -> None:
    for name in names:
        value = getattr(pattern, name)
        if value < 1:
            raise PatternError(f"pattern {pattern.name!r} parameter {name!r} must be >= 1, got {value}")


def require_at_most_n(pattern: "Pattern", n: int, *names: str) -> None:
    for name in names:
        value = getattr(pattern, name)
        if value > n:
            raise PatternError(
                f"pattern {pattern.name!r} parameter {name!r}={value} is larger than the sequence length {n}"
            )


def band(n: int, block: int, before: int, after: int) -> Intervals:
    """Each query block may touch keys from ``before`` positions before its first query to
    ``after`` positions after its last."""
    nb = math.ceil(n / block)
    qb = torch.arange(nb)
    lo = (qb * block - before).clamp(min=0)
    hi = (qb * block + block - 1 + after).clamp(max=n - 1)
    return Intervals(qb, lo, hi)


def fixed_keys(n: int, block: int, lo: int, hi: int) -> Intervals:
    """Every query block may touch keys lo..hi (global tokens, sinks)."""
    nb = math.ceil(n / block)
    qb = torch.arange(nb)
    return Intervals(qb, torch.full((nb,), max(lo, 0)), torch.full((nb,), min(hi, n - 1)))


def key_list(n: int, block: int, qblocks: torch.Tensor, keys: torch.Tensor) -> Intervals:
    """Query block qblocks[i] may touch key keys[i] (single keys, e.g. random ones)."""
    keys = keys.clamp(0, n - 1)
    return Intervals(qblocks, keys, keys)


def any_equal(x: torch.Tensor, values) -> torch.Tensor:
    """x == v for any v of a short list (traceable, unlike torch.isin under vmap)."""
    out = torch.zeros_like(x, dtype=torch.bool)
    for v in values:
        out = out | (x == v)
    return out


def all_keys_for(n: int, qblocks: torch.Tensor) -> Intervals:
    return Intervals(qblocks, torch.zeros_like(qblocks), torch.full_like(qblocks, n - 1))


def sample_distinct(counts: torch.Tensor, r: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, r) int64: for each row, min(r, counts[row]) distinct values drawn uniformly from
    [0, counts[row]) (Floyd's algorithm, vectorised over rows); unused slots are -1."""
    rows = counts.numel()
    out = torch.full((rows, r), -1, dtype=torch.long)
    if r == 0 or rows == 0:
        return out
    small = counts <= r
    for t_off in range(r):
        # rows with few candidates take them all
        take_all = small & (t_off < counts)
        out[take_all, t_off] = t_off
        t = counts - r + t_off  # candidate upper bound for Floyd's step
        u = torch.rand(rows, generator=generator, dtype=torch.float64)
        j = (u * (t + 1).clamp(min=1).double()).floor().long()
        seen = (out[:, :t_off] == j[:, None]).any(dim=1) if t_off else torch.zeros(rows, dtype=torch.bool)
        pick = torch.where(seen, t, j)
        out[~small, t_off] = pick[~small]
    return out


def _pairs(iv: Intervals, n: int, block: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique (query block, key block) candidate pairs from key intervals."""
    nb = math.ceil(n / block)
    keep = iv.lo <= iv.hi
    qb, lo, hi = iv.qb[keep], iv.lo[keep] // block, iv.hi[keep] // block
    if causal:
        hi = torch.minimum(hi, qb)
        keep = lo <= hi
        qb, lo, hi = qb[keep], lo[keep], hi[keep]
    span = hi - lo + 1
    qbs = torch.repeat_interleave(qb, span)
    offs = torch.arange(int(span.sum())) - torch.repeat_interleave(torch.cumsum(span, 0) - span, span)
    kbs = torch.repeat_interleave(lo, span) + offs
    code = torch.unique(qbs * nb + kbs)  # sorted: by query block, then key block
    return code // nb, code % nb


def _scan(
    pattern: Pattern, n: int, block: int, causal: bool, per_row: bool = False
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """Evaluate ``allowed`` on every candidate tile. Returns ((qb, kb, count, full), per-row
    key counts or None)."""
    qb, kb = _pairs(pattern.key_intervals(n, block, causal), n, block, causal)
    ar = torch.arange(block)
    counts = torch.empty(qb.numel(), dtype=torch.long)
    full = torch.empty(qb.numel(), dtype=torch.bool)
    row_counts = torch.zeros(n, dtype=torch.long) if per_row else None
    step = max(1, _TILE_CHUNK // (block * block))
    for s in range(0, qb.numel(), step):
        q = qb[s : s + step, None] * block + ar  # (P, b)
        k = kb[s : s + step, None] * block + ar
        valid = (q < n)[:, :, None] & (k < n)[:, None, :]
        m = pattern.allowed(q.clamp(max=n - 1)[:, :, None], k.clamp(max=n - 1)[:, None, :], n, causal) & valid
        c = m.sum(dim=(1, 2))
        counts[s : s + step] = c
        full[s : s + step] = c == valid.sum(dim=(1, 2))
        if row_counts is not None:
            rc = m.sum(dim=2).flatten()
            qf = q.flatten()
            ok = qf < n
            row_counts.index_add_(0, qf[ok], rc[ok])
    return (qb, kb, counts, full), row_counts


def _layout(pattern: Pattern, n: int, block: int, causal: bool) -> BlockLayout:
    (qb, kb, counts, full), _ = _scan(pattern, n, block, causal)
    keep = counts > 0
    qb, kb, counts, full = qb[keep], kb[keep], counts[keep], full[keep]
    nb = math.ceil(n / block)
    crow = torch.zeros(nb + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(qb, minlength=nb), 0)
    return BlockLayout(n=n, block=block, causal=causal, crow=crow, col=kb, full=full, count=counts)


def window_keys(n: int, window: int, causal: bool) -> torch.Tensor:
    """Keys per query of a sliding window (W keys incl. self causal; |i-j| < W otherwise)."""
    i = torch.arange(n)
    if causal:
        return torch.clamp(i + 1, max=window)
    return torch.minimum(i, torch.tensor(window - 1)) + torch.minimum(n - 1 - i, torch.tensor(window - 1)) + 1
