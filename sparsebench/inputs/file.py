"""``kind: file``: q, k and v recorded from a model, read from a safetensors file.

The format (written by ``sparsebench capture``, capture.py): per recorded layer L the tensors
``layer{L}.q`` (batch, heads, tokens, head_dim), ``layer{L}.k`` and ``layer{L}.v`` (batch,
kv_heads, tokens, head_dim), q and k after the rotary embedding, as the model's attention
receives them (before grouped-query attention repeats k and v); and string metadata:
``format`` (``sparsebench-qkv/1``), ``model``, ``layers`` ("0,8,15"), ``tokens``,
``text_sha256`` and how the model scales its scores. A case of n tokens reads the first n
tokens of its layer (a case longer than the file is skipped, with the reason)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from sparsebench.errors import ScenarioError, SparsebenchError

FORMAT = "sparsebench-qkv/1"
HF_EXTRA = "install the [hf] extra: pip install -e '.[hf]'"
_NAME = re.compile(r"^layer(\d+)\.([qkv])$")


def names(layer: int) -> tuple[str, str, str]:
    """The tensor names of one layer: q, k, v."""
    return tuple(f"layer{layer}.{t}" for t in "qkv")  # type: ignore[return-value]


@dataclass(frozen=True)
class Contents:
    """What a recorded file holds: its layers and the shape they share, and its metadata."""

    path: str
    layers: tuple[int, ...]
    batch: int
    heads: int
    kv_heads: int
    tokens: int
    head_dim: int
    metadata: dict[str, str] = field(default_factory=dict)


def safe_open(path: str):
    """safetensors' reader of ``path`` (torch tensors); SparsebenchError naming the extra where
    safetensors is missing, ScenarioError where the file is not a safetensors file."""
    try:
        from safetensors import safe_open as open_
    except ImportError:
        raise SparsebenchError(f"reading {path} needs safetensors; {HF_EXTRA}") from None
    p = Path(path)
    if not p.is_file():
        raise ScenarioError(f"{path}: no such file")
    try:
        return open_(str(p), framework="pt")
    except Exception as exc:  # noqa: BLE001 - safetensors' own error types differ by version
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ScenarioError(f"{path}: not a safetensors file ({why})") from None


def inspect(path: str) -> Contents:
    """The layers and shapes of a recorded file, read from its header (no tensor is loaded);
    ScenarioError naming the file where it does not hold q, k and v of a shared shape."""
    with safe_open(path) as f:
        metadata = dict(f.metadata() or {})
        shapes: dict[int, dict[str, list[int]]] = {}
        for key in f.keys():
            m = _NAME.match(key)
            if m:
                shapes.setdefault(int(m.group(1)), {})[m.group(2)] = list(f.get_slice(key).get_shape())
    if not shapes:
        raise ScenarioError(f"{path}: holds no recorded layer (tensors layer<L>.q, .k, .v; see sparsebench capture)")
    first = None
    for layer, got in sorted(shapes.items()):
        missing = [t for t in "qkv" if t not in got]
        if missing:
            raise ScenarioError(f"{path}: layer {layer} lacks {', '.join(f'layer{layer}.{t}' for t in missing)}")
        q, k, v = got["q"], got["k"], got["v"]
        if len(q) != 4 or len(k) != 4 or k != v or q[0] != k[0] or q[2:] != k[2:] or q[1] % k[1]:
            raise ScenarioError(
                f"{path}: layer {layer} has q {q}, k {k}, v {v}; expected q (batch, heads, tokens, head_dim) and "
                "k, v (batch, kv_heads, tokens, head_dim) with kv_heads dividing heads"
            )
        shape = (q[0], q[1], k[1], q[2], q[3])
        if first is None:
            first = (layer, shape)
        elif shape != first[1]:
            raise ScenarioError(f"{path}: layer {layer}'s q, k, v shape differs from layer {first[0]}'s")
    assert first is not None
    batch, heads, kv_heads, tokens, head_dim = first[1]
    return Contents(str(path), tuple(sorted(shapes)), batch, heads, kv_heads, tokens, head_dim, metadata)


def read(path: str, layer: int, *, batch: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, **to):
    """q, k and v of ``layer``: the first ``batch`` sequences and ``seq_len`` tokens, converted by
    ``to`` (``dtype``, ``device``; fp32 on the CPU without). ScenarioError where the file does
    not hold them in that shape."""
    import torch

    c = inspect(path)
    if layer not in c.layers:
        raise ScenarioError(f"{path}: no layer {layer} (it holds layers {', '.join(map(str, c.layers))})")
    if (c.heads, c.kv_heads, c.head_dim) != (heads, kv_heads, head_dim) or batch > c.batch or seq_len > c.tokens:
        raise ScenarioError(
            f"{path}: holds batch {c.batch}, {c.heads} heads over {c.kv_heads} KV heads of {c.head_dim} and "
            f"{c.tokens} tokens; the case asks batch {batch}, {heads} heads over {kv_heads} of {head_dim} and "
            f"{seq_len} tokens"
        )
    out = []
    with safe_open(path) as f:
        for name in names(layer):
            part = f.get_slice(name)[:batch, :, :seq_len, :]
            out.append(part.to(**{"dtype": torch.float32, **{k: v for k, v in to.items() if v is not None}}))
    return out


def write(path: str, layers: dict[int, tuple], metadata: dict[str, str]) -> None:
    """Save each layer's (q, k, v) under the format's names, with ``metadata`` (strings)."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise SparsebenchError(f"writing {path} needs safetensors; {HF_EXTRA}") from None
    tensors = {}
    for layer, qkv in sorted(layers.items()):
        for name, t in zip(names(layer), qkv):
            tensors[name] = t.contiguous()
    meta = {"format": FORMAT, "layers": ",".join(str(layer) for layer in sorted(layers)), **metadata}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()})
