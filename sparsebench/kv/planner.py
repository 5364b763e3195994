"""Analytic KV-cache accounting: how many bytes a decoder keeps for a model, a pattern, a
context and a batch, and how far a memory budget stretches.

    bytes = 2 (K and V) x layers x kv_heads x head_dim x bytes(dtype) x batch x retained tokens

``retained tokens`` is the pattern's ``kv_retained(context)`` (rounded up to whole pages when
the cache is paged). Grouped-query and multi-query attention are counted by ``kv_heads``: a
Llama-3.1-8B layer has 32 query heads but caches 8.

Model presets live as YAML files in ``sparsebench/models`` (configuration only, no weights).
A preset with its own ``sliding_window`` (Mistral-7B: 4096) gets an extra table row
"model default" that uses that window; the "dense" row is always full attention, so the
"vs dense" column compares every row with a cache that keeps every token.

This module imports no torch at import time (patterns are imported when first needed), so
``sparsebench kv --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparsebench import units
from sparsebench.errors import ScenarioError

if TYPE_CHECKING:
    from sparsebench.patterns.base import Pattern

# -- dtypes ------------------------------------------------------------------------------------


def canonical_dtype(name: str) -> str:
    """A KV-cache dtype's name ('bfloat16' -> 'bf16'; every width of ``units.DTYPE_BITS``)."""
    return units.canonical_dtype(name, "KV-cache dtype")


def dtype_bytes(name: str) -> float:
    """Bytes per cached element: fp32 4, fp16/bf16 2, fp8/int8 1, int4 0.5."""
    return units.dtype_bytes(canonical_dtype(name))


# -- models --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """The attention shape of a decoder model (no weights)."""

    name: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    sliding_window: int | None = None
    max_context: int | None = None

    def __post_init__(self) -> None:
        for key in ("layers", "heads", "kv_heads", "head_dim"):
            _require_int(f"model {self.name!r}", key, getattr(self, key))
        for key in ("sliding_window", "max_context"):
            if getattr(self, key) is not None:
                _require_int(f"model {self.name!r}", key, getattr(self, key))
        if self.kv_heads > self.heads or self.heads % self.kv_heads:
            raise ScenarioError(
                f"model {self.name!r}: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})"
            )

    @property
    def attention(self) -> str:
        """MHA, GQA (with its group size) or MQA."""
        if self.kv_heads == self.heads:
            return "MHA"
        if self.kv_heads == 1:
            return "MQA"
        return f"GQA {self.heads // self.kv_heads}:1"

    def describe(self) -> str:
        text = (
            f"{self.name}: {self.layers} layers, {self.heads} query heads, {self.kv_heads} KV heads "
            f"({self.attention}), head_dim {self.head_dim}"
        )
        if self.sliding_window:
            text += f", sliding window {self.sliding_window}"
        return text


def _require_int(where: str, key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ScenarioError(f"{where}: field {key!r} must be a positive integer, got {value!r}")


_FIELDS = ("name", "layers", "heads", "kv_heads", "head_dim", "sliding_window", "max_context")
# Hugging Face config.json keys (JSON is YAML, so a downloaded config.json loads as a model file).
_HF_KEYS = {
    "num_hidden_layers": "layers",
    "n_layer": "layers",
    "num_attention_heads": "heads",
    "n_head": "heads",
    "num_key_value_heads": "kv_heads",
    "max_position_embeddings": "max_context",
    "n_positions": "max_context",
}


def _spec_from_mapping(data: Any, where: str, default_name: str) -> ModelSpec:
    if not isinstance(data, dict):
        raise ScenarioError(f"{where}: expected a mapping of model fields ({', '.join(_FIELDS)})")
    data = dict(data)
    if "model_type" in data or "num_hidden_layers" in data or "n_layer" in data:
        data = _from_hf_config(data)
    for key in data:
        if key not in _FIELDS:
            from sparsebench.registry import unknown_choice

            raise ScenarioError(f"{where}: " + unknown_choice("field", key, _FIELDS))
    data.setdefault("name", default_name)
    data["name"] = str(data["name"])
    for key in ("layers", "heads", "head_dim"):
        if key not in data:
            raise ScenarioError(f"{where}: missing field {key!r}")
    data.setdefault("kv_heads", data["heads"])
    for key in _FIELDS[1:]:
        if key in data and data[key] is not None:
            _require_int(where, key, data[key])
    try:
        return ModelSpec(**data)
    except ScenarioError as e:
        raise ScenarioError(f"{where}: {str(e).split(': ', 1)[-1]}") from None


def _from_hf_config(data: dict[str, Any]) -> dict[str, Any]:
    """Map a Hugging Face config.json onto ModelSpec fields; other keys are ignored."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in _FIELDS and key != "name":
            out[key] = value
        elif key in _HF_KEYS:
            out.setdefault(_HF_KEYS[key], value)
    hidden = data.get("hidden_size", data.get("n_embd"))
    if "head_dim" not in out and isinstance(hidden, int) and isinstance(out.get("heads"), int) and out["heads"]:
        out["head_dim"] = hidden // out["heads"]
    if data.get("multi_query") is True:  # falcon
        out["kv_heads"] = 1
    if data.get("use_sliding_window") is False:  # qwen2 keeps a sliding_window value it does not use
        out.pop("sliding_window", None)
    if "_name_or_path" in data:
        out["name"] = str(data["_name_or_path"]).rsplit("/", 1)[-1].lower()
    return out


def _preset_files() -> dict[str, Any]:
    root = resources.files("sparsebench.kv.presets")
    return {p.name[: -len(".yaml")]: p for p in root.iterdir() if p.name.endswith(".yaml")}


PRESETS: tuple[str, ...] = tuple(sorted(_preset_files()))


def load_preset(name: str) -> ModelSpec:
    files = _preset_files()
    if name not in files:
        from sparsebench.registry import unknown_choice

        raise ScenarioError(unknown_choice("model preset", name, sorted(files)) + " (or use --model-file)")
    import yaml

    return _spec_from_mapping(yaml.safe_load(files[name].read_text(encoding="utf-8")), f"preset {name!r}", name)


def load_model_file(path: str | Path) -> ModelSpec:
    """A model from a YAML file with the fields of ModelSpec (or a Hugging Face config.json)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read model file ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ScenarioError(f"{path}: not valid YAML{at}") from None
    return _spec_from_mapping(data, str(path), path.stem)


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


def model_default_pattern(model: ModelSpec) -> "Pattern":
    """The model's own attention: its sliding window when it has one, otherwise dense."""
    from sparsebench.patterns.base import PATTERNS

    if model.sliding_window:
        return PATTERNS.get("sliding_window").from_params({"window": model.sliding_window})
    return PATTERNS.get("dense").from_params({})


def _positive(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ScenarioError(f"{what} must be a positive integer, got {value!r}")
    return value


def retained_tokens(model: ModelSpec, pattern: "Pattern | None", context: int, page: int | None = None) -> int:
    """Cached tokens per sequence after ``context`` tokens (``pattern`` None: the model's own)."""
    _positive("context", context)
    pat = pattern if pattern is not None else model_default_pattern(model)
    kept = int(pat.kv_retained(context))
    if page is not None:
        _positive("page", page)
        kept = -(-kept // page) * page
    return kept


def _bits_per_sequence(model: ModelSpec, retained: int, dtype: str) -> int:
    return 2 * model.layers * model.kv_heads * model.head_dim * units.dtype_bits(canonical_dtype(dtype)) * retained


def kv_bytes(
    model: ModelSpec,
    pattern: "Pattern | None",
    context: int,
    batch: int = 1,
    dtype: str = "fp16",
    page: int | None = None,
) -> int:
    """KV-cache bytes for ``batch`` sequences of ``context`` tokens (rounded up to a byte)."""
    _positive("batch", batch)
    bits = _bits_per_sequence(model, retained_tokens(model, pattern, context, page), dtype) * batch
    return -(-bits // 8)


def max_context(
    model: ModelSpec,
    pattern: "Pattern | None",
    budget: int,
    batch: int = 1,
    dtype: str = "fp16",
    page: int | None = None,
) -> int | None:
    """Longest context whose cache fits in ``budget`` bytes; 0 if not even one token fits;
    ``None`` if the pattern's cache stops growing and fits at any length (unbounded context)."""
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
    per_seq = _bits_per_sequence(model, retained_tokens(model, pattern, context, page), dtype)
    return (budget * 8) // per_seq


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
    """One pattern's cache for a model, context, batch and dtype."""

    pattern: str  # the pattern name, or "model default"
    label: str  # e.g. "sliding_window(window=4096)"
    params: dict[str, Any] = field(hash=False)
    retained_tokens: int
    bytes: int
    vs_dense: float  # bytes / dense bytes
    bounded: bool  # the cache stops growing with the context
    max_context: int | None = None  # with a budget; None with context_unbounded=True: any length
    context_unbounded: bool = False
    max_batch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "label": self.label,
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()},
            "retained_tokens": self.retained_tokens,
            "bytes": self.bytes,
            "vs_dense": self.vs_dense,
            "bounded": self.bounded,
            "max_context": self.max_context,
            "context_unbounded": self.context_unbounded,
            "max_batch": self.max_batch,
        }


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
    """Rows: "model default" (only for a model with its own sliding window), dense (always,
    the reference), then ``patterns`` (default: DEFAULT_PATTERNS)."""
    dtype = canonical_dtype(dtype)
    _positive("context", context)
    _positive("batch", batch)
    if budget is not None:
        _positive("budget", budget)
    dense = make_pattern("dense")
    chosen = default_patterns() if patterns is None else list(patterns)
    entries: list[tuple[str, Pattern]] = []
    if model.sliding_window:
        entries.append(("model default", model_default_pattern(model)))
    entries.append(("dense", dense))
    entries += [(p.name, p) for p in chosen if p.name != "dense" or p.params()]
    dense_bytes = kv_bytes(model, dense, context, batch, dtype, page)
    rows = []
    for name, pat in entries:
        size = kv_bytes(model, pat, context, batch, dtype, page)
        extra: dict[str, Any] = {}
        if budget is not None:
            longest = max_context(model, pat, budget, batch, dtype, page)
            extra = {
                "max_context": longest,
                "context_unbounded": longest is None,
                "max_batch": max_batch(model, pat, context, budget, dtype, page),
            }
        rows.append(
            KVRow(
                pattern=name,
                label=pat.label(),
                params=pat.params(),
                retained_tokens=retained_tokens(model, pat, context, page),
                bytes=size,
                vs_dense=size / dense_bytes,
                bounded=bool(getattr(pat, "bounded_kv", False)),
                **extra,
            )
        )
    return rows
