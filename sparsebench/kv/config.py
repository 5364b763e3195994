"""A model's attention, layer by layer, read from a preset, a YAML model file or a Hugging Face
config.json: which layers attend to everything, which slide over a window, which attend inside a
chunk, which keep a fixed state instead of a cache (linear attention, state-space layers), and
what one cached token costs (KV heads x head_dim, or an MLA latent).

Layer types are read from ``layer_types`` where the config lists them, otherwise derived as
transformers' configuration classes derive them:

* ``sliding_window_pattern: P`` (Gemma 3, Cohere 2): layer i (0-based) is full attention when
  (i + 1) % P == 0, sliding otherwise; Gemma 2 alternates (P = 2), Gemma 3's default is 6;
* ``use_sliding_window`` with ``max_window_layers`` (Qwen 2/3): layers i >= max_window_layers
  slide, the others are full; ``use_sliding_window: false`` means no layer slides;
* ``attention_chunk_size`` (Llama 4): a layer with RoPE is chunked, a NoPE layer is full
  (``no_rope_layers``, or a NoPE layer every ``no_rope_layer_interval`` layers, default 4);
* ``full_attention_interval: K`` (Qwen3-Next): full attention when (i + 1) % K == 0, linear
  attention otherwise; ``attn_layer_period`` / ``attn_layer_offset`` (Jamba): attention when
  i % period == offset, a Mamba layer otherwise;
* otherwise every layer alike: sliding when the config has a ``sliding_window``, else full.

A config that lacks a key the model needs is refused with one line naming the file and the key;
nothing is guessed beyond the defaults transformers itself applies to that ``model_type`` (and the
output says when one was used). This module imports neither torch nor the patterns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sparsebench.errors import ScenarioError

FULL, SLIDING, CHUNKED = "full_attention", "sliding_attention", "chunked_attention"
LINEAR, MAMBA = "linear_attention", "mamba"
ATTENTION_TYPES = (FULL, SLIDING, CHUNKED)
STATE_TYPES = (LINEAR, MAMBA)
LAYER_TYPES = ATTENTION_TYPES + STATE_TYPES
# other names configs use for the same layers (Jamba's and Granite's hybrids say "attention")
_TYPE_ALIASES = {"attention": FULL, "full": FULL, "sliding": SLIDING, "chunked": CHUNKED, "linear": LINEAR}
# short names for tables
SHORT = {FULL: "full", SLIDING: "sliding", CHUNKED: "chunked", LINEAR: "linear", MAMBA: "mamba"}


def _require_int(where: str, key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ScenarioError(f"{where}: field {key!r} must be {what}, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelSpec:
    """The attention shape of a decoder model (no weights), layer by layer.

    ``layer_types`` has one entry per layer (LAYER_TYPES); left empty, every layer is alike:
    sliding when ``sliding_window`` is set, full attention otherwise. ``kv_lora_rank`` with
    ``qk_rope_head_dim`` makes the attention layers cache an MLA latent of their sum per token,
    shared by all heads. ``state_values`` gives, per state layer type, the values one layer keeps
    for one sequence (absent: the state is not counted)."""

    name: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    sliding_window: int | None = None
    max_context: int | None = None
    layer_types: tuple[str, ...] = ()
    chunk: int | None = None  # attention_chunk_size of the chunked_attention layers
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    mtp_layers: int = 0  # multi-token-prediction layers (num_nextn_predict_layers), not counted
    state_values: tuple[tuple[str, int], ...] = ()
    state_rule: str = field(default="", compare=False)  # how state_values was worked out
    derived: str = field(default="", compare=False)  # how layer_types was found
    source: str = field(default="", compare=False)  # the config a preset was taken from

    def __post_init__(self) -> None:
        where = f"model {self.name!r}"
        for key in ("layers", "heads", "kv_heads", "head_dim"):
            _require_int(where, key, getattr(self, key))
        for key in ("sliding_window", "max_context", "chunk", "kv_lora_rank", "qk_rope_head_dim"):
            if getattr(self, key) is not None:
                _require_int(where, key, getattr(self, key))
        _require_int(where, "mtp_layers", self.mtp_layers, 0)
        if self.kv_heads > self.heads or self.heads % self.kv_heads:
            raise ScenarioError(f"{where}: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if (self.kv_lora_rank is None) != (self.qk_rope_head_dim is None):
            raise ScenarioError(f"{where}: an MLA cache needs both kv_lora_rank and qk_rope_head_dim")
        types = tuple(self.layer_types) or (SLIDING if self.sliding_window else FULL,) * self.layers
        if len(types) != self.layers:
            raise ScenarioError(f"{where}: layer_types lists {len(types)} layers, the model has {self.layers}")
        for t in types:
            if t not in LAYER_TYPES:
                from sparsebench.registry import unknown_choice

                raise ScenarioError(f"{where}: " + unknown_choice("attention type", t, LAYER_TYPES))
        if SLIDING in types and not self.sliding_window:
            raise ScenarioError(f"{where}: sliding_attention layers need a sliding_window")
        if CHUNKED in types and not self.chunk:
            raise ScenarioError(f"{where}: chunked_attention layers need a chunk size (attention_chunk_size)")
        object.__setattr__(self, "layer_types", types)

    # -- what the layers are ------------------------------------------------------------------
    @property
    def mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def latent(self) -> int:
        """Values an MLA layer caches per token: kv_lora_rank + qk_rope_head_dim."""
        return (self.kv_lora_rank or 0) + (self.qk_rope_head_dim or 0)

    @property
    def values_per_token(self) -> int:
        """Values one attention layer caches per token: the MLA latent, or K and V of every KV head."""
        return self.latent if self.mla else 2 * self.kv_heads * self.head_dim

    def counts(self) -> dict[str, int]:
        """{layer type: layers}, in the order the types first appear."""
        out: dict[str, int] = {}
        for t in self.layer_types:
            out[t] = out.get(t, 0) + 1
        return out

    @property
    def uniform(self) -> bool:
        """Every layer has the same attention (and no layer keeps a state instead)."""
        return len(set(self.layer_types)) == 1 and self.layer_types[0] in ATTENTION_TYPES

    def state_of(self, layer_type: str) -> int | None:
        """Values one ``layer_type`` state layer keeps per sequence, or None (not counted)."""
        return dict(self.state_values).get(layer_type)

    def all_full(self) -> "ModelSpec":
        """The same model with every attention layer full (sliding and chunked layers keep every
        token); state layers stay as they are: the reference the "dense" row stands for."""
        types = tuple(FULL if t in ATTENTION_TYPES else t for t in self.layer_types)
        return dataclasses.replace(self, layer_types=types)

    @property
    def attention(self) -> str:
        """MLA, MHA, GQA (with its group size) or MQA."""
        if self.mla:
            return "MLA"
        if self.kv_heads == self.heads:
            return "MHA"
        if self.kv_heads == 1:
            return "MQA"
        return f"GQA {self.heads // self.kv_heads}:1"

    def type_label(self, layer_type: str) -> str:
        """'sliding 128', 'chunked 8192', 'full', 'linear', 'mamba'."""
        if layer_type == SLIDING:
            return f"sliding {self.sliding_window}"
        if layer_type == CHUNKED:
            return f"chunked {self.chunk}"
        return SHORT[layer_type]

    def describe(self) -> str:
        counts = self.counts()
        layers = f"{self.layers} layers"
        if len(counts) > 1:
            layers += " (" + ", ".join(f"{n} {self.type_label(t)}" for t, n in counts.items()) + ")"
        elif self.layer_types[0] != FULL:
            layers += f", all {self.type_label(self.layer_types[0])}"
        if self.mla:
            cache = (
                f"MLA latent {self.latent} (kv_lora_rank {self.kv_lora_rank} + qk_rope_head_dim "
                f"{self.qk_rope_head_dim}) shared by all heads"
            )
            return f"{self.name}: {layers}, {self.heads} query heads, {cache}"
        return (
            f"{self.name}: {layers}, {self.heads} query heads, {self.kv_heads} KV heads "
            f"({self.attention}), head_dim {self.head_dim}"
        )


# -- native YAML fields ---------------------------------------------------------------------------

FIELDS = ("name", "layers", "heads", "kv_heads", "head_dim", "sliding_window", "max_context", "source")


def _is_hf(data: dict[str, Any]) -> bool:
    return any(k in data for k in ("model_type", "num_hidden_layers", "n_layer", "text_config"))


def spec_from_mapping(data: Any, where: str, default_name: str) -> ModelSpec:
    """A ModelSpec from a mapping: sparsebench's own fields (FIELDS) or a Hugging Face config."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{where}: expected a mapping of model fields ({', '.join(FIELDS)}) or a config.json")
    if _is_hf(data):
        return _from_hf(data, where, default_name)
    data = dict(data)
    for key in data:
        if key not in FIELDS:
            from sparsebench.registry import unknown_choice

            raise ScenarioError(f"{where}: " + unknown_choice("field", key, FIELDS))
    data.setdefault("name", default_name)
    data["name"] = str(data["name"])
    data["source"] = str(data.get("source") or "")
    for key in ("layers", "heads", "head_dim"):
        if key not in data:
            raise ScenarioError(f"{where}: missing field {key!r}")
    data.setdefault("kv_heads", data["heads"])
    for key in FIELDS[1:-1]:
        if key in data and data[key] is not None:
            _require_int(where, key, data[key])
    return _build(where, **data)


def _build(where: str, **fields: Any) -> ModelSpec:
    try:
        return ModelSpec(**fields)
    except ScenarioError as e:
        raise ScenarioError(f"{where}: {str(e).split(': ', 1)[-1]}") from None


# -- Hugging Face config.json -------------------------------------------------------------------

# transformers' defaults for keys a published config may leave out (its class supplies them)
_DEFAULTS = {
    ("gemma3_text", "sliding_window_pattern"): 6,  # Gemma3TextConfig
    ("gemma2", "sliding_window_pattern"): 2,  # Gemma2Config: sliding and full alternate
    ("llama4_text", "no_rope_layer_interval"): 4,  # Llama4TextConfig
    ("llama4_text", "attention_chunk_size"): 8192,
}
# the text model's type inside a multimodal config whose text_config does not name it
_TEXT_TYPES = {"gemma3": "gemma3_text", "llama4": "llama4_text"}
_GDN_KEYS = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim")
_MAMBA_KEYS = ("mamba_d_state", "mamba_d_conv", "mamba_expand")


class _Config:
    """The text model's keys, with the file and the key path for messages."""

    def __init__(self, data: dict[str, Any], where: str):
        self.where = where
        text = data.get("text_config")
        if text is not None and not isinstance(text, dict):
            raise ScenarioError(f"{where}: key 'text_config' must be a mapping, got {type(text).__name__}")
        self.cfg: dict[str, Any] = text if text is not None else data
        self.prefix = "text_config." if text is not None else ""
        own = self.cfg.get("model_type")
        self.model_type = str(own) if own else _TEXT_TYPES.get(str(data.get("model_type")), str(data.get("model_type")))
        self.defaults_used: list[str] = []

    def has(self, key: str) -> bool:
        return self.cfg.get(key) is not None

    def key(self, key: str) -> str:
        return self.prefix + key

    def missing(self, key: str, why: str = "") -> ScenarioError:
        return ScenarioError(f"{self.where}: missing key {self.key(key)!r}" + (f" ({why})" if why else ""))

    def int(self, *keys: str, minimum: int = 1, why: str = "") -> int:
        """The first of ``keys`` present (not null), as an integer; transformers' default for the
        model type where the config leaves it out; otherwise a "missing key" error."""
        for key in keys:
            if self.has(key):
                value = self.cfg[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
                    raise ScenarioError(f"{self.where}: key {self.key(key)!r} must be {what}, got {value!r}")
                return value
        fallback = _DEFAULTS.get((self.model_type, keys[0]))
        if fallback is not None:
            self.defaults_used.append(keys[0])
            return fallback
        raise self.missing(keys[0], why)

    def opt_int(self, *keys: str, minimum: int = 1) -> int | None:
        return self.int(*keys, minimum=minimum) if any(self.has(k) for k in keys) else None


def _from_hf(data: dict[str, Any], where: str, default_name: str) -> ModelSpec:
    c = _Config(data, where)
    layers = c.int("num_hidden_layers", "n_layer")
    heads = c.int("num_attention_heads", "n_head")
    kv_heads = c.opt_int("num_key_value_heads", "num_kv_heads", "n_head_kv") or heads
    if c.cfg.get("multi_query") is True:  # falcon
        kv_heads = 1
    kv_lora_rank = c.opt_int("kv_lora_rank")
    rope_dim = c.int("qk_rope_head_dim", why="an MLA cache (kv_lora_rank) needs it") if kv_lora_rank else None
    if c.has("head_dim"):
        head_dim = c.int("head_dim")
    elif kv_lora_rank and c.has("qk_nope_head_dim"):  # MLA: the query/key head (not what is cached)
        head_dim = c.int("qk_nope_head_dim") + (rope_dim or 0)
    else:
        hidden = c.int("hidden_size", "n_embd", why="to work out head_dim = hidden_size / num_attention_heads")
        if hidden % heads:
            raise c.missing("head_dim", f"hidden_size {hidden} is not a multiple of {heads} heads")
        head_dim = hidden // heads
    max_context = c.opt_int("max_position_embeddings", "n_positions")
    sliding = c.opt_int("sliding_window")
    if c.cfg.get("use_sliding_window") is False:  # qwen2/3 keep a sliding_window value they do not use
        sliding = None
    types, derived = _layer_types(c, layers, sliding)
    chunk = c.int("attention_chunk_size", why="chunked_attention layers need it") if CHUNKED in types else None
    if SLIDING in types and not sliding:
        raise c.missing("sliding_window", "sliding_attention layers need it")
    state, rule = _state(c, types)
    if "name" in data:
        name = str(data["name"])
    elif data.get("_name_or_path"):
        name = str(data["_name_or_path"]).rstrip("/").rsplit("/", 1)[-1].lower()
    else:
        name = default_name
    if c.defaults_used:
        derived += f" ({', '.join(c.defaults_used)} not in the config: as transformers sets it for {c.model_type})"
    return _build(
        where,
        name=name,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        sliding_window=sliding if SLIDING in types else None,
        max_context=max_context,
        layer_types=types,
        chunk=chunk,
        kv_lora_rank=kv_lora_rank,
        qk_rope_head_dim=rope_dim,
        mtp_layers=c.opt_int("num_nextn_predict_layers", minimum=0) or 0,
        state_values=state,
        state_rule=rule,
        derived=derived,
        source=str(data.get("source") or ""),
    )


def _layer_types(c: _Config, layers: int, sliding: int | None) -> tuple[tuple[str, ...], str]:
    """Per-layer types and how they were found (empty when every layer is alike by default)."""
    cfg = c.cfg
    if cfg.get("layer_types") is not None:
        raw = cfg["layer_types"]
        if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
            raise ScenarioError(f"{c.where}: key {c.key('layer_types')!r} must be a list of layer type names")
        if len(raw) != layers:
            raise ScenarioError(
                f"{c.where}: key {c.key('layer_types')!r} lists {len(raw)} layers, num_hidden_layers is {layers}"
            )
        types = []
        for t in raw:
            t = _TYPE_ALIASES.get(t, t)
            if t not in LAYER_TYPES:
                from sparsebench.registry import unknown_choice

                raise ScenarioError(
                    f"{c.where}: key {c.key('layer_types')!r}: " + unknown_choice("attention type", t, LAYER_TYPES)
                )
            types.append(t)
        return tuple(types), "layer_types"
    if c.has("full_attention_interval"):
        k = c.int("full_attention_interval")
        return tuple(FULL if (i + 1) % k == 0 else LINEAR for i in range(layers)), f"full_attention_interval {k}"
    if c.has("attn_layer_period") or c.has("attn_layer_offset"):
        period = c.int("attn_layer_period", why="with attn_layer_offset")
        offset = c.int("attn_layer_offset", minimum=0, why="with attn_layer_period")
        types = tuple(FULL if i % period == offset else MAMBA for i in range(layers))
        return types, f"attn_layer_period {period}, attn_layer_offset {offset}"
    if c.has("attention_chunk_size") or c.model_type == "llama4_text":
        rope = cfg.get("no_rope_layers")
        if rope:  # 1: the layer uses RoPE (chunked), 0: a NoPE layer (full attention)
            if not isinstance(rope, list) or len(rope) < layers or any(v not in (0, 1) for v in rope):
                raise ScenarioError(
                    f"{c.where}: key {c.key('no_rope_layers')!r} must list 0 or 1 for each of the {layers} layers"
                )
            how = "no_rope_layers"
        else:
            every = c.int("no_rope_layer_interval", why="to tell chunked layers from full ones")
            rope = [int((i + 1) % every != 0) for i in range(layers)]
            how = f"a NoPE layer every {every}"
        return tuple(CHUNKED if rope[i] else FULL for i in range(layers)), f"attention_chunk_size ({how})"
    pattern_keys = ("sliding_window_pattern", "_sliding_window_pattern")
    if any(c.has(k) for k in pattern_keys) or (c.model_type, pattern_keys[0]) in _DEFAULTS:
        if not sliding:
            raise c.missing("sliding_window", "sliding_window_pattern needs it")
        p = c.int(*pattern_keys)
        return tuple(FULL if (i + 1) % p == 0 else SLIDING for i in range(layers)), f"sliding_window_pattern {p}"
    if cfg.get("use_sliding_window") is True and sliding:
        first = c.int("max_window_layers", minimum=0, why="use_sliding_window needs it")
        types = tuple(SLIDING if i >= first else FULL for i in range(layers))
        return types, f"use_sliding_window, max_window_layers {first}"
    return (SLIDING if sliding else FULL,) * layers, ""


def _state(c: _Config, types: tuple[str, ...]) -> tuple[tuple[tuple[str, int], ...], str]:
    """Values one state layer keeps per sequence, per state type, where the config gives the
    sizes (the shapes vLLM allocates): gated delta net (Qwen3-Next) conv (kernel - 1) x
    (2 x key heads x key dim + value heads x value dim) plus value heads x key dim x value dim;
    Mamba conv (d_conv - 1) x conv dim plus the SSM state."""
    out: list[tuple[str, int]] = []
    rules: list[str] = []
    if LINEAR in types and any(c.has(k) for k in _GDN_KEYS):
        nk, nv, dk, dv = (c.int(k, why="the linear-attention state") for k in _GDN_KEYS)
        kernel = c.int("linear_conv_kernel_dim", why="the linear-attention state")
        conv, recurrent = (kernel - 1) * (2 * nk * dk + nv * dv), nv * dk * dv
        out.append((LINEAR, conv + recurrent))
        rules.append(
            f"linear: conv {kernel - 1} x {2 * nk * dk + nv * dv} + recurrent {nv} x {dk} x {dv} "
            f"= {conv + recurrent} values a layer"
        )
    if MAMBA in types and any(c.has(k) for k in _MAMBA_KEYS):
        d_state = c.int("mamba_d_state", why="the Mamba state")
        d_conv = c.int("mamba_d_conv", why="the Mamba state")
        if c.has("mamba_n_heads"):  # Mamba-2: heads x head dim x state, groups in the conv
            n_heads, d_head = c.int("mamba_n_heads"), c.int("mamba_d_head", why="the Mamba-2 state")
            groups = c.int("mamba_n_groups", why="the Mamba-2 state")
            inner = n_heads * d_head
            conv, ssm = (d_conv - 1) * (inner + 2 * groups * d_state), n_heads * d_head * d_state
        else:
            inner = c.int("mamba_expand", why="the Mamba state") * c.int("hidden_size", why="the Mamba state")
            conv, ssm = (d_conv - 1) * inner, inner * d_state
        out.append((MAMBA, conv + ssm))
        rules.append(f"mamba: conv {conv} + ssm {ssm} = {conv + ssm} values a layer")
    return tuple(out), "; ".join(rules)


# -- presets and files --------------------------------------------------------------------------


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

    return spec_from_mapping(yaml.safe_load(files[name].read_text(encoding="utf-8")), f"preset {name!r}", name)


def load_model_file(path: str | Path) -> ModelSpec:
    """A model from a YAML file with the fields of ModelSpec, or a Hugging Face config.json
    (read as JSON when the name ends in .json)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read model file ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ScenarioError(f"{path}: not a text file") from None
    if path.suffix.lower() == ".json":
        import json

        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ScenarioError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise ScenarioError(f"{path}: not valid YAML{at}") from None
    # a config.json is named by its folder (models/gpt-oss-120b/config.json -> gpt-oss-120b)
    default = path.parent.name if path.stem == "config" and path.parent.name else path.stem
    return spec_from_mapping(data, str(path), default)
