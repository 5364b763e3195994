"""The q, k and v a case runs on. Three kinds, one per module:

- ``random`` (random.py): seeded standard normals, the default (what every run before this
  package measured, bit for bit);
- ``synthetic`` (synthetic.py): a seeded generator with the structure of a trained model's
  attention (rotary locality, sink tokens, heavy-hitter keys, heads that differ), its knobs
  documented there and set against published measurements;
- ``file`` (file.py): q, k and v recorded from a model (``sparsebench capture``, capture.py)
  into a safetensors file, one layer at a time.

A case names its inputs by the Case fields ``inputs`` (a label: ``random``, ``synthetic``,
``synthetic(sinks=2)`` where a knob differs from its default, ``file:NAME#layerL``),
``inputs_seed``, ``inputs_file``, ``inputs_layer`` and ``inputs_knobs``; ``Source.of_case``
reads them and ``make`` builds the tensors. torch is imported inside the functions only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KINDS = ("random", "synthetic", "file")


@dataclass(frozen=True)
class Source:
    """Which inputs: the kind, the seed of the generated kinds, a file and its layer, and the
    synthetic generator's knobs that differ from their defaults."""

    kind: str = "random"
    seed: int = 0
    file: str | None = None
    layer: int | None = None
    knobs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_case(cls, case: Any) -> "Source":
        """The inputs a ``sparsebench.scenario.Case`` names."""
        kind = case.inputs.split(":", 1)[0].split("(", 1)[0]
        return cls(
            kind=kind,
            seed=case.inputs_seed if case.inputs_seed is not None else 0,
            file=case.inputs_file,
            layer=case.inputs_layer,
            knobs=dict(getattr(case, "inputs_knobs", None) or {}),
        )

    def label(self) -> str:
        """The case key's ``inputs`` value: the kind, with the seed and the knobs that differ from
        their defaults (``synthetic(seed=1, sinks=2)``); ``file:NAME#layerL`` for a file."""
        if self.kind == "file":
            from pathlib import Path

            return f"file:{Path(self.file or '').stem}#layer{self.layer}"
        parts = ([f"seed={self.seed}"] if self.seed else []) + [f"{k}={v:g}" for k, v in sorted(self.knobs.items())]
        return self.kind + (f"({', '.join(parts)})" if parts else "")


def make(source: Source, *, batch: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, dtype, device):
    """q (batch, heads, n, head_dim), k and v (batch, kv_heads, n, head_dim) in ``dtype`` on
    ``device``, as ``source`` says; each kind converts as it goes, so that what it holds beside
    the three tensors stays small (the case's peak memory includes them). ScenarioError for a
    kind it does not know or a file that does not hold what the case asks."""
    shape = dict(batch=batch, heads=heads, kv_heads=kv_heads, seq_len=seq_len, head_dim=head_dim)
    shape.update(dtype=dtype, device=device)
    if source.kind == "random":
        from sparsebench.inputs import random

        q, k, v = random.generate(seed=source.seed, **shape)
    elif source.kind == "synthetic":
        from sparsebench.inputs import synthetic

        q, k, v = synthetic.generate(synthetic.Knobs(**source.knobs), seed=source.seed, **shape)
    elif source.kind == "file":
        from sparsebench.inputs import file

        q, k, v = file.read(source.file, source.layer, **shape)
    else:
        from sparsebench.errors import ScenarioError

        raise ScenarioError(f"unknown inputs kind {source.kind!r}; expected one of: {', '.join(KINDS)}")
    return [q, k, v]
