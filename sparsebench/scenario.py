"""Scenario YAML -> validated, frozen Scenario (pydantic) -> grid of frozen Cases.

Every problem with a file is a ScenarioError whose one line names the file, the field and,
where the YAML parser knows it, the line."""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sparsebench.errors import PatternError, ScenarioError
from sparsebench.units import COMPUTE_DTYPES, parse_tokens

DTYPES = tuple(COMPUTE_DTYPES)
MODES = ("forward", "backward", "decode")
MAX_ALIASES = 64
MAX_BYTES = 1 << 20
MAX_SEQ_LEN = 1 << 24
MAX_ROUNDS = 20
BUILTIN = "quickstart"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def token_count(value: Any) -> Any:
    """A length written as text (``2k``, ``1m``, ``4096``) -> its int, read by the one parser of
    token counts (``units.parse_tokens``, as ``kv --context`` and ``show -n`` read them); anything
    else as it is, for the field's own type check. ValueError (pydantic's) for bad text."""
    if isinstance(value, str):
        try:
            return parse_tokens(value)
        except ScenarioError as exc:
            raise ValueError(str(exc)) from None
    return value


class PatternSpec(_Model):
    """One pattern: ``{name: window, params: {window: 256}}``, or just its name (``- dense``)
    when it runs with its defaults."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v):
        return {"name": v} if isinstance(v, str) else v


class SeqRange(_Model):
    """Powers of two from ``min`` to ``max`` (both included)."""

    min: int = Field(ge=1, le=MAX_SEQ_LEN)
    max: int = Field(ge=1, le=MAX_SEQ_LEN)

    @field_validator("min", "max", mode="before")
    @classmethod
    def _tokens(cls, v):
        return token_count(v)

    @model_validator(mode="after")
    def _order(self):
        if self.min > self.max:
            raise ValueError(f"min {self.min} is larger than max {self.max}")
        return self

    def values(self) -> list[int]:
        start = 1 << max(0, math.ceil(math.log2(self.min)))
        out = []
        n = start
        while n <= self.max:
            out.append(n)
            n *= 2
        return out


class RayOptions(_Model):
    """``ray:``: what every case's Ray task asks for on top of its GPU or node (executors/ray.py)."""

    resources: dict[str, float] = Field(default_factory=dict, description="custom or accelerator resources")


class SlurmOptions(_Model):
    """``slurm:``: the job array's settings (executors/slurm.py); each overridden by its --slurm-* flag."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: Union[int, str] = Field(default="1:00:00", description="per task: minutes, or [D-]H:MM:SS")
    gpus_per_node: int | None = Field(default=None, ge=0)
    cpus_per_task: int | None = Field(default=None, ge=1)
    mem: str | None = None
    constraint: str | None = None
    tasks: int | None = Field(default=None, ge=1, le=10000, description="array tasks (default: --parallel)")
    setup: list[str] = Field(default_factory=list, description="shell lines each task runs first")
    additional: dict[str, Any] = Field(default_factory=dict, description="other sbatch options")
    cluster: Literal["slurm", "local", "debug"] = "slurm"


class Limits(_Model):
    timeout_s: float = Field(default=600.0, gt=0, description="per-case wall-clock limit")
    memory: Union[int, float, str, None] = Field(default=None, description="per-case memory budget, e.g. 8GiB")

    @field_validator("memory")
    @classmethod
    def _mem(cls, v):
        if v is None:
            return v
        parse_size(v)  # raises
        return v

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory is None else parse_size(self.memory)


class Check(_Model):
    enabled: bool = True
    exact_max_elems: int = Field(default=1 << 26, ge=0, description="largest batch*heads*n*n checked exactly")
    sample_rows: int = Field(default=32, ge=1, description="query rows checked when the exact check does not fit")


class InputsSpec(BaseModel):
    """One kind of q, k and v (sparsebench.inputs): ``random`` (seeded normals, the default),
    ``synthetic`` (its knobs as keys beside ``kind``), or ``file`` with ``path`` (a
    ``sparsebench capture`` safetensors file) and optional ``layers`` (default: all of the
    file's). A bare name (``- synthetic``) is that kind with its defaults."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: Literal["random", "synthetic", "file"] = "random"
    seed: Union[int, None] = Field(default=None, ge=0, le=2**63 - 1)
    path: Union[str, None] = None
    layers: Union[list[int], None] = Field(default=None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v):
        return {"kind": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _fits_kind(self):
        import difflib

        from sparsebench.inputs.synthetic import Knobs

        extra = dict(self.__pydantic_extra__ or {})
        knobs = Knobs.names() if self.kind == "synthetic" else []
        for key in extra:
            if key not in knobs:
                valid = ["kind", "seed"] + (["path", "layers"] if self.kind == "file" else []) + knobs
                if self.kind == "file":
                    valid.remove("seed")
                hint = difflib.get_close_matches(key, valid, n=1)
                raise ValueError(
                    f"unknown key {key!r} for kind {self.kind}"
                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + f"; valid keys: {', '.join(valid)}"
                )
        if self.kind == "synthetic":
            try:
                Knobs(**extra)
            except (TypeError, ValueError) as exc:
                raise ValueError(str(exc)) from None
        if self.kind == "file":
            if self.path is None:
                raise ValueError("kind file needs path: the safetensors file of sparsebench capture")
            if self.seed is not None:
                raise ValueError("kind file has no seed (its tensors are recorded)")
            if any(layer < 0 for layer in self.layers or ()):
                raise ValueError(f"layers must be >= 0, got {self.layers}")
        else:
            for key in ("path", "layers"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} belongs to kind file, not {self.kind}")
        return self

    @property
    def knobs(self) -> dict[str, Any]:
        """The synthetic generator's knobs given here (none for the other kinds)."""
        return dict(self.__pydantic_extra__ or {}) if self.kind == "synthetic" else {}


class Scenario(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    description: str = ""
    seq_lens: Union[list[int], SeqRange]
    patterns: Union[list[PatternSpec], None] = Field(default=None, min_length=1)
    # a model's attention stack instead of patterns (see MODEL_KEYS and ``model_cases``)
    model: Union[str, list[str], None] = Field(default=None, min_length=1)
    model_file: Union[str, list[str], None] = Field(default=None, min_length=1)
    heads_scale: float = Field(default=1.0, gt=0, le=1)
    backends: list[str] = Field(min_length=1)
    devices: list[str] = Field(default_factory=lambda: ["cpu"], min_length=1)
    dtypes: list[Literal[DTYPES]] = Field(default_factory=lambda: ["fp32"], min_length=1)
    batch: int = Field(default=1, ge=1, le=4096)
    heads: int = Field(default=8, ge=1, le=1024)
    # key/value heads (grouped-query attention: each serves heads // kv_heads query heads); None: heads
    kv_heads: int | None = Field(default=None, ge=1, le=1024)
    head_dim: int = Field(default=64, ge=1, le=1024)
    causal: bool = True
    mode: Union[Literal["forward", "backward", "decode"], list[Literal["forward", "backward", "decode"]]] = "forward"
    warmup: int = Field(default=1, ge=0, le=1000)
    repeats: int = Field(default=5, ge=1, le=10000)
    min_time_s: float = Field(default=0.0, ge=0, le=3600)
    max_repeats: int = Field(default=50, ge=1, le=100000)
    rounds: int = Field(default=1, ge=1, le=MAX_ROUNDS)
    tile: int = Field(default=64, ge=8, le=4096)
    decode_tokens: int = Field(default=16, ge=1, le=100000)
    baseline: bool = True
    ray: RayOptions = Field(default_factory=RayOptions)
    slurm: SlurmOptions = Field(default_factory=SlurmOptions)
    limits: Limits = Field(default_factory=Limits)
    check: Check = Field(default_factory=Check)
    # the q, k and v of every case (sparsebench.inputs): one kind or a list, each a dimension of
    # the sweep with its own dense baseline
    inputs: list[InputsSpec] = Field(default_factory=lambda: [InputsSpec()], min_length=1)
    # one line per renamed key read under its old name (``parse`` fills it; the CLI prints it)
    _warnings: list[str] = PrivateAttr(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return list(self._warnings)

    @field_validator("seq_lens", mode="before")
    @classmethod
    def _token_counts(cls, v):
        return [token_count(x) for x in v] if isinstance(v, list) else v

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs_list(cls, v):
        return v if isinstance(v, list) else [v]

    @field_validator("decode_tokens", mode="before")
    @classmethod
    def _decode_tokens(cls, v):
        return token_count(v)

    @field_validator("seq_lens")
    @classmethod
    def _lens(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("must hold at least one sequence length")
            for n in v:
                if n < 1 or n > MAX_SEQ_LEN:
                    raise ValueError(f"sequence length {n} outside 1..{MAX_SEQ_LEN}")
            if len(set(v)) != len(v):
                raise ValueError("repeats a sequence length")
        return v

    @field_validator("kv_heads")
    @classmethod
    def _kv_heads(cls, v, info: ValidationInfo):
        heads = info.data.get("heads")
        if v is not None and heads is not None and heads % v:
            divisors = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0)
            raise ValueError(
                f"kv_heads {v} does not divide heads {heads} (each key/value head serves the same number of "
                f"query heads); give a divisor of {heads}: {divisors}"
            )
        return v

    @field_validator("backends", "devices", "dtypes")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"repeats an entry: {v}")
        return v

    @property
    def lengths(self) -> list[int]:
        return sorted(self.seq_lens.values() if isinstance(self.seq_lens, SeqRange) else self.seq_lens)

    @property
    def key_value_heads(self) -> int:
        """kv_heads, or heads where it is not given."""
        return self.kv_heads or self.heads

    @property
    def modes(self) -> list[str]:
        return [self.mode] if isinstance(self.mode, str) else list(dict.fromkeys(self.mode))


@dataclass(frozen=True)
class Case:
    """What one measurement runs. Frozen; sent as a dict to a worker process."""

    scenario: str
    pattern: str
    params: dict
    pattern_label: str
    backend: str
    device: str
    dtype: str
    mode: str
    batch: int
    heads: int
    head_dim: int
    seq_len: int
    causal: bool
    tile: int
    warmup: int
    repeats: int
    min_time_s: float
    max_repeats: int
    timeout_s: float
    memory_budget: int | None
    check: bool
    exact_max_elems: int
    sample_rows: int
    decode_tokens: int = 16
    # why the case is not run (a pattern parameter that does not fit this length ...), set when
    # the scenario is expanded; the runner records it as skipped with this reason
    skip_reason: str | None = None
    # key/value heads (grouped-query attention: q has ``heads`` heads, k and v ``kv_heads``;
    # heads % kv_heads == 0); None: heads
    kv_heads: int | None = None
    # a model scenario's stack case (``model_plan``): the model's name, where it is read from
    # ("preset:NAME" or a config's absolute path), which stack ("shipped" or its "all-dense"
    # twin) and the scale of its heads; None in a pattern scenario's cases
    model: str | None = None
    model_source: str | None = None
    stack: str | None = None
    heads_scale: float | None = None
    # the q, k and v the case runs on (sparsebench.inputs): a label ("random", "synthetic", or
    # "file:NAME#layerL"), the seed of the generated kinds, and for a file its path and layer
    inputs: str = "random"
    inputs_seed: int | None = 0
    inputs_file: str | None = None
    inputs_layer: int | None = None
    # the synthetic generator's knobs that differ from their defaults (the label names them too)
    inputs_knobs: dict | None = None

    def __post_init__(self) -> None:
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    def key(self) -> tuple:
        from sparsebench.results.schema import CASE_KEY

        return tuple(getattr(self, c) for c in CASE_KEY)

    @property
    def case_id(self) -> str:
        from sparsebench.results.schema import case_id

        return case_id(self.key())

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


@dataclass(frozen=True)
class Plan:
    scenario: Scenario
    source: str
    cases: list[Case]
    skipped_devices: dict[str, str] = field(default_factory=dict)
    # what the expansion decided that a reader should know (a pattern running with its own
    # causality, a baseline added for it); ``run`` and ``validate`` print them
    notes: tuple[str, ...] = ()

    def skipped_text(self) -> str | None:
        """'3 cases skipped: sliding_window(window=100) at n = 64, 128 (...)', one clause per
        series, or None when every case runs."""
        skipped = [c for c in self.cases if c.skip_reason]
        if not skipped:
            return None
        by_series: dict[str, list[Case]] = {}
        for c in skipped:
            by_series.setdefault(c.pattern_label, []).append(c)
        parts = [
            f"{label} at n = {', '.join(str(n) for n in sorted({c.seq_len for c in cs}))} ({cs[0].skip_reason})"
            for label, cs in by_series.items()
        ]
        return f"{len(skipped)} case{'' if len(skipped) == 1 else 's'} skipped: " + "; ".join(parts)


# ------------------------------------------------------------------------------------------


def builtin_path(name: str = BUILTIN) -> Path:
    return Path(__file__).parent / "scenarios" / f"{name}.yaml"


# Top-level keys renamed since they were first read: old -> new (the old name works, with a warning).
RENAMED_KEYS = {"block": "tile"}  # the block_sparse tile size; a pattern's own `block` is a param


# A memory budget given as a plain number is bytes; below this it is surely a forgotten unit.
MIN_BUDGET_BYTES = 1 << 20


def parse_size(value: int | str) -> int:
    """'8GiB', '512MB', 1000000 -> bytes (the units of ``units.parse_bytes``); ValueError with
    its message otherwise (pydantic reports it against the field)."""
    from sparsebench.units import parse_bytes

    if isinstance(value, float) and value.is_integer():  # YAML reads 1.5e10 as a float
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"not a size: {value!r} (try 8GiB or 512MB)")
    if isinstance(value, int) and 0 < value < MIN_BUDGET_BYTES:
        # a plain number is bytes: 16 meant as 16 GiB would skip every case
        raise ValueError(f"{value} bytes is too small for a memory budget; write {value}GiB, {value}GB or {value}MiB")
    try:
        return parse_bytes(value)
    except ScenarioError as e:
        raise ValueError(str(e)) from None


def _line_index(text: str) -> dict[tuple, int]:
    """Map of YAML paths (tuple of keys/indices) to 1-based line numbers."""
    index: dict[tuple, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return index

    def walk(node, path):
        index[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value
                index[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))

    if root is not None:
        walk(root, ())
    return index


def _where(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _line_of(index: dict[tuple, int], path: tuple) -> int | None:
    while path:
        if path in index:
            return index[path]
        path = path[:-1]
    return None


def _fail(source: str, index: dict, path: tuple, msg: str) -> ScenarioError:
    line = _line_of(index, path)
    loc = f"{source}:{line}" if line else source
    return ScenarioError(f"{loc}: field '{_where(path)}': {msg}")


def read_text(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        raise ScenarioError(f"{path}: no such scenario file")
    if path.is_dir():
        raise ScenarioError(f"{path}: is a directory, expected a scenario YAML file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) > MAX_BYTES:
        raise ScenarioError(f"{path}: {len(data)} bytes is too large for a scenario (limit {MAX_BYTES})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def parse(text: str, source: str) -> Scenario:
    """Text of a scenario -> Scenario (schema only; see ``expand`` for sizes vs patterns)."""
    try:
        aliases = sum(1 for ev in yaml.parse(text, Loader=yaml.SafeLoader) if isinstance(ev, yaml.AliasEvent))
        if aliases > MAX_ALIASES:
            raise ScenarioError(
                f"{source}: {aliases} YAML aliases (limit {MAX_ALIASES}); refusing a possible alias bomb"
            )
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ScenarioError(f"{where}: malformed YAML: {problem}") from None
    if raw is None:
        raise ScenarioError(f"{source}: empty scenario file")
    if not isinstance(raw, dict):
        raise ScenarioError(
            f"{source}: a scenario is a YAML mapping (name:, seq_lens:, patterns:, ...), got {type(raw).__name__}"
        )
    index = _line_index(text)
    warnings = []
    for old, new in RENAMED_KEYS.items():
        if old in raw:
            if new in raw:
                raise _fail(source, index, (old,), f"is the old name of '{new}'; give '{new}' only")
            line = _line_of(index, (old,))
            warnings.append(
                f"{source}{f':{line}' if line else ''}: field '{old}' is now '{new}' "
                f"(read as {new}: {raw[old]!r}); rename it"
            )
            raw = {(new if k == old else k): v for k, v in raw.items()}
    try:
        sc = Scenario.model_validate(raw)
        sc._warnings.extend(warnings)
    except ValidationError as exc:
        err, path = _first_error(exc.errors())
        if err["type"] == "extra_forbidden":
            import difflib

            model_fields = _fields_at(path[:-1])
            hint = difflib.get_close_matches(str(path[-1]), model_fields, n=1)
            msg = "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            if hint and any(e["type"] == "missing" and _path(e) == path[:-1] + (hint[0],) for e in exc.errors()):
                msg += f"; {hint[0]!r} is required and missing"
            if model_fields:
                msg += f"; valid keys: {', '.join(model_fields)}"
            if len(path) == 3 and path[0] == "patterns" and not hint:
                key = path[-1]
                msg += f"; a pattern's parameters go under params (params: {{{key}: ...}})"
        elif err["type"] == "missing":
            msg = "required field is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")  # our own validators' words, as they are
            if (
                "input" in err
                and err["type"] not in ("string_pattern_mismatch",)
                and not isinstance(err["input"], (dict, list))
            ):
                msg += f" (got {err['input']!r})"
            if err["type"] == "string_pattern_mismatch" and path == ("name",):
                msg = "must be 1-64 letters, digits, '.', '_' or '-' (it names the result folder)"
        raise _fail(source, index, path, msg) from None
    check_model_keys(sc, source, index)
    return sc


def _path(err: dict) -> tuple:
    """A pydantic error's location without the names of union members ('list[int]', ...)."""
    return tuple(
        p
        for p in err["loc"]
        if not (isinstance(p, str) and ("[" in p or p in ("list[int]", "SeqRange", "str", "list[...]")))
    )


def _first_error(errors: list[dict]) -> tuple[dict, tuple]:
    """The error to report and its path: the first, except that a required key reported missing
    while a key close to its name is given (``backend:`` for ``backends:``) is reported at that
    misspelt key, which then gets the did-you-mean an unknown optional key gets."""
    import difflib

    first = errors[0]
    if first["type"] == "missing":
        where = _path(first)
        for err in errors:
            path = _path(err)
            if (
                err["type"] == "extra_forbidden"
                and path[:-1] == where[:-1]
                and difflib.get_close_matches(str(path[-1]), [str(where[-1])], n=1)
            ):
                return err, path
    return first, _path(first)


def _fields_at(path: tuple) -> list[str]:
    model: Any = Scenario
    for p in path:
        if isinstance(p, int):
            continue
        f = getattr(model, "model_fields", {}).get(p)
        if f is None:
            return []
        ann = f.annotation
        for cand in (ann, *getattr(ann, "__args__", ())):
            for sub in (cand, *getattr(cand, "__args__", ())):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    model = sub
                    break
    return list(getattr(model, "model_fields", {}))


def load(path: Path | None) -> tuple[Scenario, str, str]:
    """(scenario, its text, source name) from a file, or the built-in quickstart."""
    path = Path(path) if path is not None else builtin_path()
    text = read_text(path)
    return parse(text, str(path)), text, str(path)


def with_rounds(text: str, rounds: int, source: str) -> tuple[Scenario, str]:
    """(scenario, text) of the scenario ``text`` run in ``rounds`` rounds (``run --rounds``): its
    top-level ``rounds:`` line rewritten, or one added, so that the scenario.yaml a run keeps says
    what ran and a resume runs the same. One ScenarioError naming the flag for a count out of range
    or a scenario whose rounds are not on a line of their own."""
    if not 1 <= rounds <= MAX_ROUNDS:
        raise ScenarioError(f"--rounds {rounds}: expected 1 to {MAX_ROUNDS}")
    lines = text.splitlines(keepends=True)
    line = _line_index(text).get(("rounds",))
    if line is None:
        end = "" if not lines or lines[-1].endswith("\n") else "\n"
        lines.append(f"{end}rounds: {rounds}  # sparsebench run --rounds {rounds}\n")
    elif m := re.fullmatch(r"rounds:[ \t]*(\d+)[ \t]*(#.*)?\r?\n?", lines[line - 1]):
        lines[line - 1] = f"rounds: {rounds}  # sparsebench run --rounds {rounds} (the file: {m.group(1)})\n"
    else:
        raise ScenarioError(f"--rounds: {source}:{line} gives rounds in a form this cannot rewrite; edit the file")
    new = "".join(lines)
    return parse(new, source), new


def resolve_device(spec: str) -> tuple[str | None, str | None]:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' -> (device string, None) or (None, reason)."""
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return "cuda:0", None
        return "cpu", None
    if spec == "cpu":
        return "cpu", None
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if m:
        if not torch.cuda.is_available():
            return None, f"device {spec!r} is absent: this torch build or machine has no CUDA GPU"
        idx = int(m.group(1) or 0)
        if idx >= torch.cuda.device_count():
            return None, f"device {spec!r} is absent: only {torch.cuda.device_count()} CUDA device(s)"
        return f"cuda:{idx}", None
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            return None, "device 'mps' is absent on this machine"
        return "mps", None
    raise ScenarioError(f"unknown device {spec!r}; expected one of: auto, cpu, cuda, cuda:N, mps")


def _measuring(sc: Scenario) -> dict[str, Any]:
    """The scenario-wide measuring settings every one of its cases carries (timing, limits, check)."""
    return dict(
        tile=sc.tile,
        warmup=sc.warmup,
        repeats=sc.repeats,
        min_time_s=sc.min_time_s,
        max_repeats=max(sc.max_repeats, sc.repeats),
        timeout_s=sc.limits.timeout_s,
        memory_budget=sc.limits.memory_bytes,
        check=sc.check.enabled,
        exact_max_elems=sc.check.exact_max_elems,
        sample_rows=sc.check.sample_rows,
        decode_tokens=sc.decode_tokens,
    )


def expand(sc: Scenario, source: str) -> Plan:
    """The grid of cases, smallest sequence length first. Raises ScenarioError for unknown
    patterns/backends/devices and for parameters that fit none of the sequence lengths; a
    parameter that does not fit some lengths (a window longer than the shortest) makes those
    cases skipped, with the reason (``Case.skip_reason``). Each pattern runs with the causality
    ``Pattern.causality`` gives it (its own where a parameter sets it), and the dense baseline is
    added for each causality that the patterns run with."""
    from sparsebench.backends.base import BACKENDS
    from sparsebench.patterns.base import PATTERNS

    index: dict = {}
    try:
        index = _line_index(Path(source).read_text(encoding="utf-8")) if Path(source).is_file() else {}
    except (OSError, UnicodeDecodeError):
        index = {}
    patterns = []  # (label, pattern)
    misfits: dict[str, dict[int, str]] = {}  # label -> {n: why the pattern does not fit n}
    notes: list[str] = []
    for i, spec in enumerate(sc.patterns or ()):  # none in a model scenario
        try:
            cls = PATTERNS.get(spec.name)
        except ScenarioError as exc:
            raise _fail(source, index, ("patterns", i, "name"), str(exc)) from None
        try:
            pat = cls.from_params(spec.params)
        except PatternError as exc:
            raise _fail(source, index, ("patterns", i, "params"), str(exc)) from None
        label = spec.label or pat.label()
        causal = pat.causality(sc.causal)
        misfit = {}
        for n in sc.lengths:
            try:
                pat.check(n, causal)
            except PatternError as exc:
                misfit[n] = str(exc)
        if len(misfit) == len(sc.lengths):
            longest = sc.lengths[-1]
            where = f"seq_lens holds {longest}"
            if len(sc.lengths) > 1:
                where = f"at every length of seq_lens, up to {longest}"
            raise _fail(source, index, ("patterns", i, "params"), f"{misfit[longest]} ({where})")
        misfits[label] = misfit
        if causal != sc.causal:
            how, scenario_how = ("causal" if c else "bidirectional" for c in (causal, sc.causal))
            notes.append(f"{label} runs {how} ({pat.causality_reason()}) where the scenario is {scenario_how}")
        patterns.append((label, pat))
    if "block_sparse" in sc.backends and sc.tile > sc.lengths[0]:
        raise _fail(
            source, index, ("tile",), f"tile {sc.tile} is larger than the shortest sequence length {sc.lengths[0]}"
        )
    labels = [lab for lab, _ in patterns]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise _fail(source, index, ("patterns",), f"duplicate series {dup[0]!r}; give one a distinct label")
    for j, b in enumerate(sc.backends):
        try:
            BACKENDS.get(b)
        except ScenarioError as exc:
            raise _fail(source, index, ("backends", j), str(exc)) from None
    devices: list[str] = []
    skipped: dict[str, str] = {}
    for j, d in enumerate(sc.devices):
        try:
            dev, why = resolve_device(d)
        except ScenarioError as exc:
            raise _fail(source, index, ("devices", j), str(exc)) from None
        if dev is None:
            skipped[d] = why or "absent"
        elif dev not in devices:
            devices.append(dev)
    if is_model_scenario(sc):
        return model_plan(sc, source, index, devices, skipped)

    combos: list[tuple[str, Any, str, bool]] = []  # (label, pattern, backend, causal)
    for label, pat in patterns:
        for b in sc.backends:
            if b == "sdpa" and pat.name != "dense":
                continue  # sdpa is the dense baseline only
            combos.append((label, pat, b, pat.causality(sc.causal)))
    if sc.baseline:
        from sparsebench.patterns.dense import Dense

        dense = next((pair for pair in patterns if pair[1].name == "dense"), ("dense", Dense()))
        # the baseline of every speedup, in each causality a pattern runs with (the scenario's first)
        used = {c for _, _, _, c in combos}
        wanted = [c for c in (sc.causal, not sc.causal) if c in used] or [sc.causal]
        for k, causal in enumerate(wanted):
            if not any(p.name == "dense" and b == "sdpa" and c == causal for _, p, b, c in combos):
                combos.insert(k, (dense[0], dense[1], "sdpa", causal))
                if causal != sc.causal:
                    notes.append(
                        f"a {'causal' if causal else 'bidirectional'} dense sdpa baseline is added for "
                        f"the series that run {'causal' if causal else 'bidirectional'}"
                    )
        if dense not in patterns:
            patterns.insert(0, dense)
            misfits[dense[0]] = {}
    variants = input_variants(sc, source, index)
    if len(variants) > 1 or variants[0][0]["inputs"] != "random":
        labels = ", ".join(fields["inputs"] for fields, _ in variants)
        notes.append(f"inputs: {labels} (each a dimension of the sweep, with its own dense baseline)")
    cases = []
    settings = _measuring(sc)
    grid = itertools.product(sc.lengths, devices, sc.dtypes, sc.modes, variants)
    for n, dev, dtype, mode, (inputs, inputs_misfit) in grid:
        mode_combos = combos
        if mode == "decode":  # every pattern's decoder on every backend (sdpa too: over its slots)
            mode_combos = [(lab, pat, b, pat.causality(sc.causal)) for lab, pat in patterns for b in sc.backends]
            if sc.baseline and "sdpa" not in sc.backends:  # the dense decoder on sdpa, as elsewhere
                lab, pat = next(pair for pair in patterns if pair[1].name == "dense")
                mode_combos.insert(0, (lab, pat, "sdpa", pat.causality(sc.causal)))
        for label, pat, b, causal in mode_combos:
            why = misfits.get(label, {}).get(n) or inputs_misfit.get(n)
            if why is None and mode == "decode" and not causal and pat.fixed_causality() is False:
                why = f"decode needs causal attention; {label} is bidirectional ({pat.causality_reason()})"
            if why is None and mode == "decode" and inputs["inputs"] != "random":
                why = (
                    f"decode runs on random inputs only (its KV cache is drawn a chunk at a time); "
                    f"{inputs['inputs']} is not decoded yet"
                )
            cases.append(
                Case(
                    scenario=sc.name,
                    pattern=pat.name,
                    params=pat.params(),
                    pattern_label=label,
                    backend=b,
                    device=dev,
                    dtype=dtype,
                    mode=mode,
                    batch=sc.batch,
                    heads=sc.heads,
                    kv_heads=sc.key_value_heads,
                    head_dim=sc.head_dim,
                    seq_len=n,
                    causal=causal,
                    **settings,
                    **inputs,
                    skip_reason=why,
                )
            )
    return Plan(scenario=sc, source=source, cases=cases, skipped_devices=skipped, notes=tuple(notes))


def _beside(source: str, value: str) -> str:
    """A path from a scenario, absolute: a relative one is read beside the scenario file (else
    from the working folder, where only it exists there)."""
    file = Path(value).expanduser()
    if not file.is_absolute():
        beside = Path(source).parent / file
        file = beside if beside.exists() or not file.exists() else file
    return str(file.resolve())


def input_variants(sc: Scenario, source: str, index: dict) -> list[tuple[dict[str, Any], dict[int, str]]]:
    """Each inputs of the scenario as (the Case fields naming it, {n: why a length is skipped}):
    one per random or synthetic spec, one per layer of a file. A file's tensors fix the shape:
    the scenario's heads, kv_heads and head_dim must be the file's (refused otherwise, naming
    the value to set), its batch at most the file's; lengths beyond the file's tokens are
    skipped with the reason."""
    from sparsebench.errors import SparsebenchError
    from sparsebench.inputs import Source
    from sparsebench.inputs import file as recorded
    from sparsebench.inputs.synthetic import Knobs

    out: list[tuple[dict[str, Any], dict[int, str]]] = []
    for i, spec in enumerate(sc.inputs):
        if spec.kind != "file":
            knobs = Knobs(**spec.knobs).changed()
            src = Source(kind=spec.kind, seed=spec.seed or 0, knobs=knobs)
            fields = dict(inputs=src.label(), inputs_seed=src.seed, inputs_knobs=knobs or None)
            out.append((fields, {}))
            continue
        path = _beside(source, spec.path)
        try:
            c = recorded.inspect(path)
        except SparsebenchError as exc:
            raise _fail(source, index, ("inputs", i, "path"), str(exc)) from None
        name = Path(path).name
        for key, want, got in (
            ("heads", sc.heads, c.heads),
            ("kv_heads", sc.key_value_heads, c.kv_heads),
            ("head_dim", sc.head_dim, c.head_dim),
        ):
            if want != got:
                raise _fail(
                    source,
                    index,
                    (key,) if key in sc.model_fields_set else ("inputs", i, "path"),
                    f"{name} holds q, k and v of {c.heads} heads over {c.kv_heads} KV heads of head_dim {c.head_dim}; "
                    f"the scenario's {key} is {want}: set {key}: {got} (a recorded file fixes the shape)",
                )
        if sc.batch > c.batch:
            raise _fail(source, index, ("batch",), f"{name} holds a batch of {c.batch}; batch {sc.batch} is larger")
        for layer in spec.layers or ():
            if layer not in c.layers:
                raise _fail(
                    source,
                    index,
                    ("inputs", i, "layers"),
                    f"{name} holds no layer {layer}; its layers: {', '.join(map(str, c.layers))}",
                )
        misfit = {n: f"{name} holds {c.tokens} tokens, fewer than n = {n}" for n in sc.lengths if n > c.tokens}
        if len(misfit) == len(sc.lengths):
            raise _fail(
                source, index, ("inputs", i, "path"), f"{name} holds {c.tokens} tokens; seq_lens are all longer"
            )
        for layer in spec.layers or c.layers:
            src = Source(kind="file", file=path, layer=layer)
            out.append((dict(inputs=src.label(), inputs_seed=None, inputs_file=path, inputs_layer=layer), misfit))
    labels = [fields["inputs"] for fields, _ in out]
    dup = next((label for label in labels if labels.count(label) > 1), None)
    if dup:
        raise _fail(source, index, ("inputs",), f"names the inputs {dup} twice")
    return out


# ------------------------------------------------------------------------------------------
# Model scenarios: ``model: gpt-oss-20b`` (a preset of sparsebench.kv) or ``model_file:
# path/config.json`` instead of ``patterns:``. A case then runs the model's whole attention
# stack at n (measure/stack.py): each layer group with the pattern sparsebench.kv reads from the
# config; beside it the same stack with every attention layer full, its all-dense twin.

MODEL_KEYS = ("model", "model_file")
STACK_PATTERN = "model_stack"  # a stack case's pattern name: it runs one pattern per layer group
SHIPPED, ALL_DENSE = "shipped", "all-dense"
# fields a model scenario takes from the model (``heads_scale`` scales its heads instead)
MODEL_SHAPE_KEYS = ("heads", "kv_heads", "head_dim")


def is_model_scenario(sc: Scenario) -> bool:
    return sc.model is not None or sc.model_file is not None


def check_model_keys(sc: Scenario, source: str, index: dict) -> None:
    """One of ``patterns``, ``model`` and ``model_file``, and in a model scenario none of the
    fields the model itself sets; ScenarioError naming the field otherwise."""
    given = [k for k in MODEL_KEYS if getattr(sc, k) is not None]
    if sc.patterns is None and not given:
        raise _fail(
            source,
            index,
            ("patterns",),
            "required field is missing (or name a model instead: model: gpt-oss-20b, or model_file: config.json)",
        )
    if len(given) == 2:
        raise _fail(source, index, ("model_file",), "give model (a preset) or model_file (a config), not both")
    if given and sc.patterns is not None:
        raise _fail(source, index, (given[0],), "give patterns or a model, not both (a model's layers bring their own)")
    if given and any(spec.kind != "random" or spec.seed for spec in sc.inputs):
        raise _fail(source, index, ("inputs",), "a model scenario runs on random inputs (seed 0); no other inputs yet")
    if not given:
        if "heads_scale" in sc.model_fields_set:
            raise _fail(source, index, ("heads_scale",), "scales a model's heads: give it with model: or model_file:")
        return
    for key in MODEL_SHAPE_KEYS:
        if key in sc.model_fields_set:
            raise _fail(
                source, index, (key,), "comes from the model in a model scenario (heads_scale scales its heads down)"
            )
    if not sc.causal:
        raise _fail(source, index, ("causal",), "a model's attention layers are causal decoder layers; drop causal")
    if "decode" in sc.modes:
        raise _fail(
            source,
            index,
            ("mode",),
            "a model scenario runs forward (a prefill) or backward; decode of a stack is not supported yet",
        )


def model_sources(sc: Scenario, source: str) -> list[tuple[tuple, str]]:
    """Each model of a model scenario: (its field's path, where it is read from: "preset:NAME",
    or a config's absolute path; a relative ``model_file`` is read beside the scenario file, else
    from the working folder)."""
    key = "model" if sc.model is not None else "model_file"
    value = getattr(sc, key)
    entries = [((key,), value)] if isinstance(value, str) else [((key, i), v) for i, v in enumerate(value)]
    out = []
    for path, v in entries:
        if key == "model":
            out.append((path, f"preset:{v}"))
            continue
        out.append((path, _beside(source, v)))
    return out


def read_model(where: str):
    """The ModelSpec (sparsebench.kv.config) of ``model_source``'s text; ScenarioError when the
    preset is unknown or the config is refused."""
    from sparsebench.kv import config

    if where.startswith("preset:"):
        return config.load_preset(where[len("preset:") :])
    return config.load_model_file(where)


def scale_heads(spec, scale: float):
    """``spec`` with its query and KV heads times ``scale`` (both whole numbers, at least 1)."""
    import dataclasses

    if scale == 1:
        return spec
    scaled = []
    for what, count in (("query heads", spec.heads), ("KV heads", spec.kv_heads)):
        value = count * scale
        if value < 1 - 1e-9 or abs(value - round(value)) > 1e-9:
            raise ScenarioError(
                f"{scale:g} x the {count} {what} of {spec.name} is {value:g}, not a whole number of heads "
                f"(the model has {spec.heads} query heads and {spec.kv_heads} KV heads)"
            )
        scaled.append(int(round(value)))
    return dataclasses.replace(spec, heads=scaled[0], kv_heads=scaled[1])


def plural(count: int, what: str) -> str:
    """'1 KV head', '8 KV heads'."""
    return f"{count} {what}{'' if count == 1 else 's'}"


def model_plan(sc: Scenario, source: str, index: dict, devices: list[str], skipped: dict[str, str]) -> Plan:
    """The cases of a model scenario: at each n, device, dtype, mode and backend the model's
    stack as shipped and its all-dense twin (one case when every attention layer is already
    full). A layer pattern that does not fit a length (a window longer than n) skips that n."""
    from sparsebench.kv.config import ATTENTION_TYPES
    from sparsebench.kv.planner import layer_pattern

    models = []  # (spec, spec as run, where it is read from, its stacks, {n: why it is skipped})
    notes: list[str] = []
    for path, where in model_sources(sc, source):
        try:
            spec = read_model(where)
        except ScenarioError as exc:
            raise _fail(source, index, path, str(exc)) from None
        try:
            run_spec = scale_heads(spec, sc.heads_scale)
        except ScenarioError as exc:
            raise _fail(source, index, ("heads_scale",), str(exc)) from None
        if any(spec.name == m[0].name for m in models):
            raise _fail(source, index, path, f"names {spec.name} a second time")
        types = [t for t in spec.counts() if t in ATTENTION_TYPES]
        if not types:
            raise _fail(source, index, path, f"{spec.name} has no attention layer to time (every layer keeps a state)")
        misfit: dict[int, str] = {}
        for n in sc.lengths:
            for t in types:
                try:
                    layer_pattern(spec, t).check(n, True)
                except PatternError as exc:
                    misfit.setdefault(n, f"its {spec.type_label(t)} layers: {exc}")
        if len(misfit) == len(sc.lengths):
            raise _fail(source, index, path, f"{spec.name} fits none of seq_lens: {misfit[sc.lengths[-1]]}")
        stacks = [SHIPPED] if spec.all_full() == spec else [SHIPPED, ALL_DENSE]
        notes += [
            spec.describe(),
            f"{spec.name} timed with {run_spec.heads} query heads over {plural(run_spec.kv_heads, 'KV head')}"
            + ("" if sc.heads_scale == 1 else f" (heads_scale {sc.heads_scale:g} of the model's)"),
        ]
        if len(stacks) == 1:
            notes.append(f"every attention layer of {spec.name} is full: it is its own all-dense twin, run once")
        models.append((spec, run_spec, where, stacks, misfit))

    cases = []
    settings = _measuring(sc)
    grid = itertools.product(sc.lengths, devices, sc.dtypes, sc.modes, sc.backends, models)
    for n, dev, dtype, mode, b, (spec, run_spec, where, stacks, misfit) in grid:
        for stack in stacks:
            cases.append(
                Case(
                    scenario=sc.name,
                    pattern=STACK_PATTERN,
                    params={"model": spec.name, "stack": stack},
                    pattern_label=spec.name if stack == SHIPPED else f"{spec.name} {ALL_DENSE}",
                    backend=b,
                    device=dev,
                    dtype=dtype,
                    mode=mode,
                    batch=sc.batch,
                    heads=run_spec.heads,
                    head_dim=spec.head_dim,
                    seq_len=n,
                    causal=True,
                    **settings,
                    skip_reason=misfit.get(n),
                    model=spec.name,
                    model_source=where,
                    stack=stack,
                    heads_scale=sc.heads_scale,
                    kv_heads=run_spec.kv_heads,
                )
            )
    return Plan(scenario=sc, source=source, cases=cases, skipped_devices=skipped, notes=tuple(notes))
