"""What every attention pattern is: a frozen set of parameters plus four questions.

* ``allowed(q, k, n, causal)``: which (query, key) pairs may attend, elementwise on broadcast
  index tensors (the semantics the README's pattern table states; causality is applied here, once).
* ``key_intervals(n, block, causal)``: a cheap *superset* of the keys each query block may
  touch, as inclusive key ranges. From it ``block_layout`` finds the non-empty blocks by
  evaluating ``allowed`` on those tiles only, so building a layout costs time and memory in
  proportion to the non-empty blocks, never n^2.
* ``keys_per_query(n, causal)``: keys each query attends (analytic where a formula exists,
  otherwise counted tile by tile from the layout); ``nnz`` is its sum.
* ``kv_retained(n)``: past keys a decoder must keep after n tokens so that every future query
  still finds its keys (counting the newest token's own key).

Optionally, ``structure(n, causal)`` describes the pattern as a union of a few structured parts
(diagonal bands, block bands, key columns, query rows, per-query key tables) that a kernel can
compute without gathers or n x n masks. A pattern with a structure also gets its block layout
analytically, without evaluating ``allowed`` tile by tile.

The tile geometry these answers are made of (``Intervals``, ``BlockLayout``, the structure parts
and how layouts are found) is ``sparsebench.patterns.geometry``; this module is the Pattern API:
the base class, the registry, parameters and the checks and helpers the pattern files share.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sparsebench.errors import PatternError, ScenarioError
from sparsebench.patterns.geometry import (
    BlockLayout,
    Intervals,
    Structure,
    scan_tiles,
    scanned_layout,
    structured_layout,
)
from sparsebench.registry import Registry
from sparsebench.shapes import broadcast_shape

PATTERNS: Registry["Pattern"] = Registry("pattern", "sparsebench.patterns")
# Mask elements built per band of rows by Pattern.mask (int64 temporaries: 8 bytes each).
MASK_CHUNK_ELEMENTS = 1 << 18

# Tile size at which the default ``keys_per_query`` counts keys tile by tile.
LAYOUT_BLOCK = 64

# The families ``sparsebench list`` groups patterns by, in this order (a pattern names its own
# with the class attribute ``family``; a family not listed here comes after these, by name).
FAMILIES = ("window", "global + window", "strided", "random", "block", "DeepSpeed", "content-selected", "dense")
OTHER_FAMILY = "other"


def param(help: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A pattern parameter with a one-line help text (shown by ``sparsebench list``)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


@dataclass(frozen=True, kw_only=True)
class Pattern:
    """Base class. Subclasses are frozen dataclasses whose fields are the pattern's parameters."""

    name: ClassVar[str] = ""
    rule: ClassVar[str] = ""
    # Whether the pattern is (block-)structured enough that a decoder can drop old keys.
    bounded_kv: ClassVar[bool] = False
    # The family ``sparsebench list`` groups it under (one of FAMILIES, or a new one).
    family: ClassVar[str] = OTHER_FAMILY

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
            if f.name not in params and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
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

    # -- causality ------------------------------------------------------------------------------
    def fixed_causality(self) -> bool | None:
        """The causality this pattern's own parameters set (True causal, False bidirectional),
        whatever the scenario or the caller asks; None (the default) when it follows theirs.
        A pattern that defines its own causality overrides this, and every caller (the scenario's
        cases, ``Problem``, ``show``) goes through ``causality``."""
        return None

    def causality_reason(self) -> str:
        """Why ``fixed_causality`` is what it is, as a short phrase ("its attention=bidirectional")."""
        return ""

    def causality(self, causal: bool) -> bool:
        """The causality this pattern runs with when ``causal`` is asked for."""
        fixed = self.fixed_causality()
        return causal if fixed is None else fixed

    # -- quality ------------------------------------------------------------------------------
    def quality_exempt(self, causal: bool) -> str | None:
        """Why this pattern's distance from full attention is no cost (its mask is the model's
        semantics, as a document mask or a prefix-LM's is, not an approximation of full
        attention), as a short sentence; None (the default) for a pattern that approximates full
        attention, whose quality figures (full_rel_err, recall) are then measured."""
        return None

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
        shape = broadcast_shape(q.shape, k.shape)
        if m.shape != shape:
            m = m.expand(shape)
        return m & (k <= q) if causal else m

    def mask_fn(self, n: int, causal: bool, device: str | torch.device = "cpu"):
        """A closure ``f(q, k)`` with any lookup tables already built and on ``device``:
        traceable by torch.compile (FlexAttention's mask_mod)."""
        return lambda q, k: self.allowed(q, k, n, causal)

    def mask(self, n: int, causal: bool, device: str | torch.device = "cpu") -> torch.Tensor:
        """The full (n, n) boolean mask. Only for small n (reference checks, drawings, the masked
        backends). Built a band of rows at a time, so that its temporaries (index differences,
        int64) stay a few MiB instead of several times the mask itself."""
        idx = torch.arange(n, device=device)
        out = torch.empty(n, n, dtype=torch.bool, device=device)
        step = max(1, MASK_CHUNK_ELEMENTS // max(1, n))
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            out[r0:r1] = self.allowed(idx[r0:r1, None], idx[None, :], n, causal)
        return out

    def mask_build_bytes(self, n: int) -> int:
        """Peak temporaries of ``mask(n)`` beyond the mask itself: a few int64 index tensors of
        one band of rows (an estimate for memory budgets)."""
        band = min(n * n, max(n, MASK_CHUNK_ELEMENTS))
        return 6 * 8 * band

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
        st = self.structure(n, causal)
        if st is not None:
            fast = structured_layout(self, st, block)
            if fast is not None:
                return fast
        return scanned_layout(self, n, block, causal)

    def structure(self, n: int, causal: bool) -> Structure | None:
        """The pattern as a union of structured parts (see ``Structure``), or None when it has
        no such description (kernels then work from the block layout)."""
        return None

    def keys_per_query(self, n: int, causal: bool) -> torch.Tensor:
        """(n,) int64: keys attended by each query. Default: counted over the layout's tiles."""
        return scan_tiles(self, n, LAYOUT_BLOCK, causal, per_row=True)[1]

    def nnz(self, n: int, causal: bool) -> int:
        return int(self.keys_per_query(n, causal).sum())

    def density(self, n: int, causal: bool) -> float:
        return self.nnz(n, causal) / float(n * n)

    def kv_retained(self, n: int) -> int:
        """Tokens a causal decoder keeps in its cache after a context of n tokens."""
        return n


def by_family(entries) -> list[tuple[str, list[tuple[str, type]]]]:
    """(name, pattern class) pairs grouped by the class's ``family``: the FAMILIES in their
    order, then any other family by name; within a family the order of ``entries`` (the
    registry's: files by name, classes as they stand in their file, plugins last)."""
    groups: dict[str, list[tuple[str, type]]] = {}
    for name, cls in entries:
        groups.setdefault(getattr(cls, "family", OTHER_FAMILY) or OTHER_FAMILY, []).append((name, cls))

    def rank(family: str) -> tuple[int, str]:
        return (FAMILIES.index(family), "") if family in FAMILIES else (len(FAMILIES), family)

    return [(fam, groups[fam]) for fam in sorted(groups, key=rank)]


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
        if isinstance(value, str):  # a size such as 4k, read as seq_lens and --context read it
            from sparsebench.units import parse_tokens

            try:
                return parse_tokens(value)
            except ScenarioError:
                raise PatternError(f"{where} must be an integer (or a count such as 4k), got {value!r}") from None
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


def any_equal(x: torch.Tensor, values) -> torch.Tensor:
    """x == v for any v of a short list (traceable, unlike torch.isin under vmap)."""
    out = torch.zeros_like(x, dtype=torch.bool)
    for v in values:
        out = out | (x == v)
    return out


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


def window_keys(n: int, window: int, causal: bool) -> torch.Tensor:
    """Keys per query of a sliding window (W keys incl. self causal; |i-j| < W otherwise)."""
    i = torch.arange(n)
    if causal:
        return torch.clamp(i + 1, max=window)
    return torch.minimum(i, torch.tensor(window - 1)) + torch.minimum(n - 1 - i, torch.tensor(window - 1)) + 1


# Tile geometry that lived in this module until the geometry module was split off: still found
# here for one version, with a warning that names the new place.
_MOVED_TO_GEOMETRY = (
    "band",
    "fixed_keys",
    "key_list",
    "all_keys_for",
    "Band",
    "BlockBand",
    "Keys",
    "Rows",
    "Table",
    "BlockTable",
)


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_GEOMETRY:
        import warnings

        from sparsebench.patterns import geometry

        warnings.warn(
            f"sparsebench.patterns.base.{name} is now sparsebench.patterns.geometry.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(geometry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
