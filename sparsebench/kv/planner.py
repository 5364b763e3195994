"""Analytic KV-cache accounting: how many bytes a decoder keeps for a model, a pattern, a
context and a batch, and how far a memory budget stretches. A model's bill is the sum over its
layers, each with its own attention:

    attention layer: values per token x bytes(dtype) x batch x retained tokens
        values per token = 2 (K and V) x kv_heads x head_dim, or an MLA latent
        (kv_lora_rank + qk_rope_head_dim, one for all heads)
    state layer (linear attention, Mamba): a fixed state per sequence, counted where the
        config gives its sizes (sparsebench.kv.config), otherwise reported as not counted

``retained tokens`` is the layer's pattern's ``kv_retained(context)``, the one rule for every
layer: full attention is ``dense`` (the context), a sliding layer ``sliding_window(window=W)``
(W tokens, the newest token's own key included), a chunked layer ``block_local(block=C)`` (up to
its chunk). A paged cache rounds each group of layers up to whole pages. Grouped-query and
multi-query attention are counted by ``kv_heads``: a Llama-3.1-8B layer has 32 query heads but
caches 8.

A pattern given to the planner replaces the attention of every layer of a uniform model; on a
mixed model (gpt-oss, Gemma 3, Llama 4, hybrids) it replaces the full-attention layers only,
and the sliding, chunked and state layers keep their own. The "dense" row keeps every token in
every attention layer (``ModelSpec.all_full``), the reference of the "vs dense" column.

Model presets are YAML files in ``sparsebench/kv/presets`` (configuration only, no weights),
read by sparsebench.kv.config like a user's own model file or config.json.

This module imports no torch at import time (patterns are imported when first needed), so
``sparsebench kv --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sparsebench import units
from sparsebench.errors import ScenarioError
from sparsebench.kv import config
from sparsebench.kv.config import CHUNKED, FULL, SLIDING, STATE_TYPES, ModelSpec

if TYPE_CHECKING:
    from sparsebench.patterns.base import Pattern

__all__ = ["ModelSpec", "PRESETS", "load_preset", "load_model_file", "kv_bytes", "kv_table"]

# -- dtypes ------------------------------------------------------------------------------------


def canonical_dtype(name: str) -> str:
    """A KV-cache dtype's name ('bfloat16' -> 'bf16'; every width of ``units.DTYPE_BITS``)."""
    return units.canonical_dtype(name, "KV-cache dtype")


def dtype_bytes(name: str) -> float:
    """Bytes per cached element: fp32 4, fp16/bf16 2, fp8/int8 1, int4 0.5."""
    return units.dtype_bytes(canonical_dtype(name))


# -- models (read by sparsebench.kv.config) ------------------------------------------------------

PRESETS = config.PRESETS
load_preset = config.load_preset
load_model_file = config.load_model_file


# -- sizes and their text -----------------------------------------------------------------------
# Parsing lives in sparsebench.units (parse_tokens, parse_bytes). The two formatters below are
# the KV table's: they differ from units' table formats on purpose, as their docstrings say.


def format_bytes(n: int | float) -> str:
    """1536 -> '1.50 KiB': binary units with two fixed decimals, so that the sizes of the KV
    table line up in their column (units.format_bytes writes three significant digits)."""
    return units.format_bytes(n, ".2f")


def format_tokens(n: int) -> str:
    """131072 -> '131072 (128k)': the exact count, and the short form ``--context`` takes."""
    return units.format_tokens(n, short=True)


# -- accounting ---------------------------------------------------------------------------------

# Longest context max_context() searches; a cache that still fits here is "unbounded".
CONTEXT_SEARCH_LIMIT = 2**48


def _positive(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ScenarioError(f"{what} must be a positive integer, got {value!r}")
    return value


def layer_pattern(model: ModelSpec, layer_type: str) -> "Pattern":
    """The pattern an attention layer of ``layer_type`` attends with in ``model``."""
    if layer_type == SLIDING:
        return make_pattern("sliding_window", {"window": model.sliding_window})
    if layer_type == CHUNKED:
        return make_pattern("block_local", {"block": model.chunk})
    return make_pattern("dense")


def model_default_pattern(model: ModelSpec) -> "Pattern":
    """The attention of a uniform model's layers (a mixed model has one per layer type:
    ``layer_pattern``)."""
    return layer_pattern(model, model.layer_types[0])


@dataclass(frozen=True)
class LayerGroup:
    """Layers of one type that cache alike under a row's pattern."""

    type: str  # the layers' own type (sparsebench.kv.config.LAYER_TYPES)
    layers: int
    pattern: "Pattern | None"  # what they attend with (None: a state layer)
    replaced: bool  # the row's pattern replaced the layers' own attention
    values_per_token: int  # per layer (0 for a state layer)
    state_values: int | None  # per layer and sequence, state layers only (None: not counted)
    latent: bool = False  # an MLA latent instead of per-head keys and values

    @property
    def cache(self) -> str:
        """ "kv" (keys and values), "latent" (MLA) or "state"."""
        if self.pattern is None:
            return "state"
        return "latent" if self.latent else "kv"


def replaces(model: ModelSpec) -> str:
    """Which layers a pattern replaces: "all" (a uniform model) or the type it replaces."""
    return "all" if model.uniform else FULL


def layer_groups(model: ModelSpec, pattern: "Pattern | None" = None) -> list[LayerGroup]:
    """The model's layers grouped by what they keep, in the order they first appear; with
    ``pattern``, every layer of a uniform model (its full-attention layers only on a mixed
    model) attends with it instead of its own attention."""
    counts = model.counts()
    uniform = model.uniform
    groups = []
    for t, n in counts.items():
        if t in STATE_TYPES:
            groups.append(LayerGroup(t, n, None, False, 0, model.state_of(t)))
            continue
        replaced = pattern is not None and (uniform or t == FULL)
        pat = pattern if replaced else layer_pattern(model, t)
        groups.append(LayerGroup(t, n, pat, replaced, model.values_per_token, None, model.mla))
    return groups


def _retained(pattern: "Pattern", context: int, page: int | None) -> int:
    kept = int(pattern.kv_retained(context))
    if page is not None:
        _positive("page", page)
        kept = -(-kept // page) * page
    return kept


@dataclass(frozen=True)
class GroupBytes:
    """One group's share of a cache: its layers, the tokens each keeps, its bytes."""

    type: str
    layers: int
    cache: str  # "kv", "latent" or "state"
    label: str  # the pattern's label, or "fixed state"
    replaced: bool
    retained_tokens: int | None  # per layer and sequence (None: a state layer)
    bytes: int | None  # the group's bytes for the batch (None: a state not counted)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "layers": self.layers,
            "cache": self.cache,
            "pattern": self.label,
            "replaced": self.replaced,
            "retained_tokens": self.retained_tokens,
            "bytes": self.bytes,
            "counted": self.bytes is not None,
        }


def _bits(n: int, dtype: str) -> int:
    return n * units.dtype_bits(canonical_dtype(dtype))


def group_bytes(
    model: ModelSpec,
    pattern: "Pattern | None",
    context: int,
    batch: int = 1,
    dtype: str = "fp16",
    page: int | None = None,
) -> list[GroupBytes]:
    """Each group's tokens and bytes for ``batch`` sequences of ``context`` tokens (a group's
    bytes rounded up to a whole byte)."""
    _positive("context", context)
    _positive("batch", batch)
    out = []
    for g in layer_groups(model, pattern):
        kept, bits = _group_bits(g, context, dtype, page)
        size = None if bits is None else -(-bits * batch // 8)
        if g.pattern is None:
            out.append(GroupBytes(g.type, g.layers, "state", "fixed state", False, None, size))
        else:
            out.append(GroupBytes(g.type, g.layers, g.cache, g.pattern.label(), g.replaced, kept, size))
    return out


def retained_tokens(model: ModelSpec, pattern: "Pattern | None", context: int, page: int | None = None) -> int | None:
    """Cached tokens per layer and sequence after ``context`` tokens (``pattern`` None: the
    model's own); None when the model's attention layers keep different counts (see groups)."""
    kept = {g.retained_tokens for g in group_bytes(model, pattern, context, page=page) if g.cache != "state"}
    return kept.pop() if len(kept) == 1 else None


def _group_bits(g, context: int, dtype: str, page: int | None) -> tuple[int | None, int | None]:
    """(tokens each layer keeps, bits of the group for one sequence): a state layer keeps no
    tokens, and its bits are None where its size is not counted."""
    if g.pattern is None:
        return None, None if g.state_values is None else _bits(g.layers * g.state_values, dtype)
    kept = _retained(g.pattern, context, page)
    return kept, _bits(g.layers * g.values_per_token * kept, dtype)


def _bits_per_sequence(model: ModelSpec, pattern: "Pattern | None", context: int, dtype: str, page: int | None) -> int:
    return sum(_group_bits(g, context, dtype, page)[1] or 0 for g in layer_groups(model, pattern))


def kv_bytes(
    model: ModelSpec,
    pattern: "Pattern | None",
    context: int,
    batch: int = 1,
    dtype: str = "fp16",
    page: int | None = None,
) -> int:
    """Bytes for ``batch`` sequences of ``context`` tokens, every layer together: the KV (or
    latent) cache plus the states that are counted (rounded up to a byte)."""
    _positive("context", context)
    _positive("batch", batch)
    return -(-_bits_per_sequence(model, pattern, context, dtype, page) * batch // 8)


def max_context(
    model: ModelSpec,
    pattern: "Pattern | None",
    budget: int,
    batch: int = 1,
    dtype: str = "fp16",
    page: int | None = None,
) -> int | None:
    """Longest context whose cache fits in ``budget`` bytes; 0 if not even one token fits;
    ``None`` if the cache stops growing and fits at any length (unbounded context)."""
    _positive("budget", budget)

    def fits(n: int) -> bool:
        return kv_bytes(model, pattern, n, batch, dtype, page) <= budget

    if not fits(1):
        return 0
    if fits(CONTEXT_SEARCH_LIMIT):  # retention is bounded (or the budget is astronomical)
        return None
    lo, hi = 1, CONTEXT_SEARCH_LIMIT  # fits(lo), not fits(hi); retention is nondecreasing in n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def max_batch(
    model: ModelSpec,
    pattern: "Pattern | None",
    context: int,
    budget: int,
    dtype: str = "fp16",
    page: int | None = None,
) -> int:
    """Largest batch whose cache at ``context`` fits in ``budget`` bytes (0 if none)."""
    _positive("budget", budget)
    _positive("context", context)
    return (budget * 8) // _bits_per_sequence(model, pattern, context, dtype, page)


# -- the table behind ``sparsebench kv`` ----------------------------------------------------------

DEFAULT_PATTERNS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("sliding_window", {"window": 4096}),
    ("sink_window", {"sinks": 4, "window": 4096}),
    ("strided", {"stride": 128}),
    ("longformer", {"window": 4096, "global_tokens": [0]}),
)


def make_pattern(name: str, params: dict[str, Any] | None = None) -> "Pattern":
    from sparsebench.patterns.base import PATTERNS

    return PATTERNS.get(name).from_params(params or {})


def default_patterns() -> list["Pattern"]:
    return [make_pattern(name, params) for name, params in DEFAULT_PATTERNS]


@dataclass(frozen=True)
class KVRow:
    """One pattern's cache for a model, context, batch and dtype, with its groups of layers."""

    pattern: str  # the pattern name, "model default" or "dense"
    label: str  # e.g. "sliding_window(window=4096)"; the model's own: its layer mix
    params: dict[str, Any] = field(hash=False)
    retained_tokens: int | None  # per layer; None when the groups keep different counts
    bytes: int  # every group together: kv_bytes + state_bytes
    vs_dense: float | None  # bytes / dense bytes (None when dense keeps nothing countable)
    bounded: bool  # the cache stops growing with the context
    max_context: int | None = None  # with a budget; None with context_unbounded=True: any length
    context_unbounded: bool = False
    max_batch: int | None = None
    groups: tuple[GroupBytes, ...] = ()
    kv_bytes: int = 0  # the attention layers' caches
    state_bytes: int = 0  # the state layers' fixed states that are counted
    uncounted_state_layers: int = 0  # state layers whose size the config does not give

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "label": self.label,
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()},
            "retained_tokens": self.retained_tokens,
            "bytes": self.bytes,
            "total_bytes": self.bytes,
            "kv_bytes": self.kv_bytes,
            "state_bytes": self.state_bytes,
            "uncounted_state_layers": self.uncounted_state_layers,
            "groups": [g.to_dict() for g in self.groups],
            "vs_dense": self.vs_dense,
            "bounded": self.bounded,
            "max_context": self.max_context,
            "context_unbounded": self.context_unbounded,
            "max_batch": self.max_batch,
        }


def _row(
    name: str,
    label: str,
    params: dict[str, Any],
    model: ModelSpec,
    pat: "Pattern | None",
    context: int,
    batch: int,
    dtype: str,
    page: int | None,
    budget: int | None,
    dense_bytes: int | None,
) -> KVRow:
    groups = group_bytes(model, pat, context, batch, dtype, page)
    total = kv_bytes(model, pat, context, batch, dtype, page)
    kv = sum(g.bytes or 0 for g in groups if g.cache != "state")
    state = sum(g.bytes or 0 for g in groups if g.cache == "state")
    extra: dict[str, Any] = {}
    if budget is not None:
        longest = max_context(model, pat, budget, batch, dtype, page)
        extra = {
            "max_context": longest,
            "context_unbounded": longest is None,
            "max_batch": max_batch(model, pat, context, budget, dtype, page),
        }
    reference = total if dense_bytes is None else dense_bytes
    attention = [g for g in layer_groups(model, pat) if g.pattern is not None]
    return KVRow(
        pattern=name,
        label=label,
        params=params,
        retained_tokens=retained_tokens(model, pat, context, page),
        bytes=total,
        vs_dense=total / reference if reference else None,
        bounded=all(getattr(g.pattern, "bounded_kv", False) for g in attention),
        groups=tuple(groups),
        kv_bytes=kv,
        state_bytes=state,
        uncounted_state_layers=sum(g.layers for g in groups if g.cache == "state" and g.bytes is None),
        **extra,
    )


def mix_label(model: ModelSpec) -> str:
    """The model's own attention in words: 'sliding_window(window=4096)' for a uniform model,
    '18 full + 18 sliding 128' for a mixed one."""
    if model.uniform:
        return model_default_pattern(model).label()
    return " + ".join(f"{n} {model.type_label(t)}" for t, n in model.counts().items())


def _own_label(model: ModelSpec) -> str:
    """A row's label for the model's own attention: the pattern of a uniform model, "layer mix"
    for a mixed one (its groups say the rest)."""
    return mix_label(model) if model.uniform else "layer mix"


def kv_table(
    model: ModelSpec,
    context: int,
    patterns: "list[Pattern] | None" = None,
    *,
    batch: int = 1,
    dtype: str = "fp16",
    page: int | None = None,
    budget: int | None = None,
) -> list[KVRow]:
    """Rows: "model default" (the model's own attention, for a model with sliding or chunked
    layers), "dense" (always: every attention layer keeps every token, the reference; a state
    layer keeps its state),
    then ``patterns`` (default: DEFAULT_PATTERNS), each replacing the attention of the layers
    ``replaces(model)`` names."""
    dtype = canonical_dtype(dtype)
    _positive("context", context)
    _positive("batch", batch)
    if budget is not None:
        _positive("budget", budget)
    chosen = default_patterns() if patterns is None else list(patterns)
    reference = model.all_full()
    dense_bytes = kv_bytes(reference, None, context, batch, dtype, page)
    args = (context, batch, dtype, page, budget, dense_bytes)
    rows = []
    if reference != model:  # sliding or chunked layers: the model's own attention is not dense
        rows.append(_row("model default", _own_label(model), {}, model, None, *args))
    rows.append(_row("dense", "dense", {}, reference, None, *args))
    for p in chosen:
        if p.name != "dense" or p.params():
            rows.append(_row(p.name, p.label(), p.params(), model, p, *args))
    return rows


def kv_notes(model: ModelSpec, context: int, dtype: str) -> list[str]:
    """What the reader needs to read the table right: the model's own attention, what a pattern
    replaces, MLA and multi-token-prediction layers, states counted or not, defaults used."""
    notes = []
    counts = model.counts()
    if model.max_context and context > model.max_context:
        notes.append(f"context {context} is longer than the model's trained context of {model.max_context}")
    if model.all_full() != model:
        notes.append(
            f"'model default' is the model's own attention ({mix_label(model)}); "
            "'dense' keeps every token in every attention layer"
        )
    elif not model.uniform:
        notes.append(
            "'dense' is the model as it ships: its attention layers keep every token, its other layers their state"
        )
    if not model.uniform:
        full = counts.get(FULL, 0)
        notes.append(
            f"a pattern replaces the attention of the {full} full-attention layers only; "
            "the other layers keep their own"
            if full
            else "this model has no full-attention layer: a pattern replaces nothing"
        )
    if model.mla:
        notes.append(
            f"MLA: every layer caches one latent of kv_lora_rank + qk_rope_head_dim = {model.kv_lora_rank} + "
            f"{model.qk_rope_head_dim} = {model.latent} values per token, shared by all {model.heads} heads"
        )
    if model.mtp_layers:
        notes.append(f"{model.mtp_layers} multi-token-prediction layer(s) (num_nextn_predict_layers) not counted")
    for t in STATE_TYPES:
        if t not in counts:
            continue
        if model.state_of(t) is None:
            notes.append(f"{counts[t]} {t} layers keep a fixed state: state not counted (the config gives no sizes)")
        else:
            notes.append(
                f"{counts[t]} {t} layers keep a fixed state, counted in {canonical_dtype(dtype)} "
                f"({model.state_rule}); an engine keeping it in fp32 needs more"
            )
    if model.derived and model.derived != "layer_types":
        notes.append(f"layer types derived from {model.derived}")
    return notes
