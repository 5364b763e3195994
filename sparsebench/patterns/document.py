"""Packed documents (training on packed sequences: FlexAttention's document mask, FlashAttention's
varlen, xformers' block-diagonal bias): query i attends key j only inside its own document,
causally within it in a causal case, both ways in a bidirectional one.

``doc_lens`` is a list of document lengths laid end to end from position 0: at a sequence length
n the documents are cut at n (the last one truncated), and a list that sums to less than n
repeats. ``doc_lens: {mean: M, seed: S}`` draws the lengths instead, from an exponential
distribution of mean M (at least 1 token each), one after the other from a generator seeded by
S until n is filled: the same n gives the same documents in every backend and every run, and a
longer n the same documents followed by more.

Everything is built from the document boundaries (O(n)): the mask through a document id per
position, the structure as one key range per query (``Ranges``), the block layout from it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from dataclasses import dataclass

import torch

from sparsebench.errors import PatternError, ScenarioError
from sparsebench.patterns.base import PATTERNS, Pattern
from sparsebench.patterns.geometry import Intervals, Ranges, Structure

FIELD = "doc_lens"
DRAW_KEYS = ("mean", "seed")
DEFAULT_DRAW = {"mean": 512, "seed": 0}


class Draw(dict):
    """``{mean: M, seed: S}`` as given (a dict, written to the records as one) that a frozen
    pattern can hash."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __repr__(self) -> str:  # as a scenario writes it (``sparsebench list`` shows the default)
        return "{" + ", ".join(f"{k}: {v}" for k, v in self.items()) + "}"


def _err(text: str) -> PatternError:
    return PatternError(f"pattern 'document' parameter '{FIELD}' {text}")


def _length(value, where: str) -> int:
    """One token count: an integer, or a size such as 4k."""
    if isinstance(value, str):
        from sparsebench.units import parse_tokens

        try:
            value = parse_tokens(value)
        except ScenarioError:
            raise _err(f"{where} must be a number of tokens, got {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _err(f"{where} must be a number of tokens, got {value!r}")
    return value


def parse_doc_lens(value) -> tuple[int, ...] | Draw:
    """The parameter as given in a scenario, the API or ``show -p``: a list of lengths (one
    length: a list of one), or {mean, seed}; anything else is one PatternError naming it."""
    if isinstance(value, dict):
        unknown = [k for k in value if k not in DRAW_KEYS]
        if unknown:
            from sparsebench.registry import unknown_choice

            raise _err(unknown_choice("key", unknown[0], DRAW_KEYS).replace("unknown key", "has an unknown key"))
        if "mean" not in value:
            raise _err("needs a mean: {mean: M, seed: S} draws lengths of mean M")
        mean = value["mean"]
        if isinstance(mean, str):
            mean = _length(mean, "mean")
        if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not math.isfinite(mean) or mean < 1:
            raise _err(f"mean must be a number of tokens >= 1, got {value['mean']!r}")
        seed = value.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise _err(f"seed must be an integer, got {seed!r}")
        return Draw(mean=int(mean) if float(mean).is_integer() else float(mean), seed=seed)
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise _err(f"must be a non-empty list of document lengths or {{mean: M, seed: S}}, got {value!r}")
    lens = tuple(_length(v, f"entry {i}") for i, v in enumerate(value))
    bad = next((i for i, x in enumerate(lens) if x < 1), None)
    if bad is not None:
        raise _err(f"has length {lens[bad]} at entry {bad}: every document needs at least 1 token")
    return lens


def _drawn(mean: float, seed: int, n: int) -> list[int]:
    """Lengths drawn one after the other (exponential of mean ``mean``, rounded, at least 1)
    until they fill n tokens; the last one is cut at n."""
    rng = random.Random(seed)
    out, total = [], 0
    while total < n:
        x = max(1, round(rng.expovariate(1.0 / mean)))
        x = min(x, n - total)
        out.append(x)
        total += x
    return out


@functools.lru_cache(maxsize=32)
def _starts(spec: tuple, n: int) -> torch.Tensor:
    """(documents + 1,) int64: where each document at length n starts, then n."""
    if spec[0] == "draw":
        lens = torch.tensor(_drawn(spec[1], spec[2], n), dtype=torch.long)
    else:
        one = torch.tensor(spec[1], dtype=torch.long)
        lens = one.repeat(-(-n // int(one.sum())))
    ends = torch.cumsum(lens, 0)
    ends = ends[: int(torch.searchsorted(ends, n)) + 1].clamp(max=n)  # cut at n: the last one truncated
    return torch.cat([torch.zeros(1, dtype=torch.long), ends])


@functools.lru_cache(maxsize=32)
def _doc_id(spec: tuple, n: int) -> torch.Tensor:
    """(n,) int32: the document of each position."""
    starts = _starts(spec, n)
    return torch.repeat_interleave(torch.arange(starts.numel() - 1, dtype=torch.int32), starts.diff())


@PATTERNS.register
@dataclass(frozen=True, kw_only=True)
class Document(Pattern):
    name = "document"
    rule = "j in i's own packed document (causal within it when causal)"
    family = "block"
    bounded_kv = True
    doc_lens: object = dataclasses.field(
        default_factory=lambda: Draw(DEFAULT_DRAW),
        metadata={
            "help": "document lengths laid end to end (cut at n, repeated when shorter), or "
            "{mean: M, seed: S}: seeded exponential lengths of mean M"
        },
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "doc_lens", parse_doc_lens(self.doc_lens))

    def label(self) -> str:
        d = self.doc_lens
        if isinstance(d, Draw):
            return f"document(doc_lens={{mean:{d['mean']},seed:{d['seed']}}})"
        return f"document(doc_lens=[{','.join(str(x) for x in d)}])"

    def params(self):
        d = self.doc_lens
        return {FIELD: dict(d) if isinstance(d, Draw) else list(d)}

    # -- the documents at a length n ----------------------------------------------------------
    def _spec(self) -> tuple:
        d = self.doc_lens
        return ("draw", d["mean"], d["seed"]) if isinstance(d, Draw) else ("list", d)

    def starts(self, n: int) -> torch.Tensor:
        """(documents + 1,) int64: where each document at length n starts, then n."""
        return _starts(self._spec(), n)

    def doc_id(self, n: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """(n,) int32: the document of each position."""
        return _doc_id(self._spec(), n).to(device)

    def _bounds(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n,) first and (n,) last position of each position's document."""
        starts, ids = self.starts(n), _doc_id(self._spec(), n).long()
        return starts[ids], starts[ids + 1] - 1

    def quality_exempt(self, causal: bool) -> str | None:
        return (
            "document: a query attends only its own packed document, which is what packed training means; "
            "the mask is the model's semantics, not an approximation of full attention"
        )

    # -- semantics ----------------------------------------------------------------------------
    def _allowed(self, q, k, n, causal, ids=None):
        if ids is None:
            ids = self.doc_id(n, q.device)
        return ids[q.clamp(0, n - 1)] == ids[k.clamp(0, n - 1)]

    def mask_fn(self, n, causal, device="cpu"):
        # the document ids built here, outside the traced function (FlexAttention's mask_mod)
        ids = self.doc_id(n, device)

        def f(q, k):
            m = self._allowed(q, k, n, causal, ids)
            return m & (k <= q) if causal else m

        return f

    def key_intervals(self, n, block, causal):
        first, last = self._bounds(n)
        nb = -(-n // block)
        qb = torch.arange(nb)
        end = torch.clamp(qb * block + block - 1, max=n - 1)
        return Intervals(qb, first[qb * block], end if causal else last[end])

    def structure(self, n, causal):
        first, last = self._bounds(n)
        return Structure(n, causal, (Ranges(first, last),))

    def keys_per_query(self, n, causal):
        first, last = self._bounds(n)
        i = torch.arange(n)
        return i - first + 1 if causal else last - first + 1

    def kv_retained(self, n):
        """The last document's tokens: the one a decoder continues."""
        starts = self.starts(n)
        return n - int(starts[-2])
