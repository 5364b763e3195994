"""Decode mode: prefill a KV cache with ``context`` tokens, then generate ``tokens`` single
tokens one at a time under a pattern's cache policy, timing each step.

Cache policies (one class each):

* ``DenseCache`` keeps every token (preallocated for the final length). Dense attention reads
  a contiguous prefix; unbounded sparse patterns (strided, fixed, random, bigbird, ...) keep
  everything too but attend only their own keys, gathered by index.
* ``RingCache`` serves patterns with ``bounded_kv``: a few *pinned* slots that are never
  evicted (sink_window's sinks, longformer's global tokens) plus a ring of the newest R other
  tokens (R = window for sliding_window / sink_window / longformer, b for block_local,
  (W-1)D+1 for dilated_window, ``kv_retained`` for any other bounded pattern).

The prompt's keys and values are prefilled chunk by chunk (``prefill_chunk``: 2 MiB of them at a
time, as a chunked prefill writes them), so that the decoder never holds more than its cache and one
chunk: a ring's peak memory stays flat in the context length, a dense cache's grows like it, as
their KV bytes do. The keys and values come from a ``KVSource``: ``SeededKV`` draws each chunk
from a generator seeded by the chunk's index (the same chunk again gives the same values; chunks
that a ring would overwrite are not drawn at all), ``TensorKV`` serves given tensors (tests). The
check against full attention streams the keys again, chunk by chunk, with an online softmax.

Which cached slots a step attends is planned before the clock starts (like a mask, it is not
what is measured): the plan evaluates ``pattern.allowed`` for the step's position on the
positions the slots hold. The plan also checks that the ring still holds every key the
pattern allows; where it does not (a longformer global token among the generated positions
needs every earlier key) the cache falls back to ``DenseCache`` and says so in
``cache_policy``. A timed step writes the new K/V into its slot and runs one query of attention
over the planned slots on the case's backend (``decode_steps``: sdpa, sdpa_masked, naive,
block_sparse, flex; what each does is said there), after that backend's untimed per-position
preparation (a mask row, a BlockMask).

Grouped-query attention: the cache holds ``kv_heads`` heads (the keys and values of the
source), the queries ``heads``; query head h reads KV head h // (heads / kv_heads). The
reference repeats each KV head for its group (``repeat_interleave``), apart from any backend.

Timing (``measure_decode``): a step is tens of microseconds of latency-bound work, so the
clock is easily dominated by the machine rather than the step. The steps run on one intra-op
thread (see the note above ``reference_rows``), after a first step timed apart (a compiling
backend's compilation: ``compile_s``, never a step's time), a warm-up of at least ``warmup`` steps and
``warmup_s`` seconds, and each generated position is stepped ``repeats`` times back to back
(a step is idempotent: the same slot gets the same K/V and the same slots are read), with
``repeats`` chosen so that the timed steps add up to about ``min_time_s``. ``times_s`` holds
every timed step; the median of them is the per-token latency.

Content-selected patterns (moba, quest, topk_keys) keep the whole cache and choose their keys
in each step, inside the clock (``Incremental``: moba's chunk means and quest's page bounds made
once a unit's last key is written, topk_keys' indexer projection of each key as it is written,
then one query's scores over them); the step reads only the keys chosen (per batch and head),
and the check is full attention under each step's own choice.

Random patterns (random, bigbird) depend on the total length n; decoding uses the final
length ``context + tokens`` as the pattern's n for every position, and the reference does too.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager

import torch

from sparsebench import stats
from sparsebench.errors import BackendUnavailable, ScenarioError
from sparsebench.measure import slowdown
from sparsebench.measure.device import intra_op_threads, sync
from sparsebench.patterns.selection import content_selected
from sparsebench.units import torch_dtype

if TYPE_CHECKING:
    from sparsebench.patterns.base import Pattern

# The prefill and the streamed reference handle the keys and values a chunk at a time: the
# decoder's transient memory beyond its cache. A chunk holds PREFILL_CHUNK_BYTES of K and V
# (prefill_chunk gives its positions): 256 positions at 8 heads x 128 dims in fp32. Larger
# chunks left more freed memory resident (RSS) with glibc's malloc, so that a ring's peak crept
# up with the context: 1K positions measured 22.5 MiB at 1K and 26.4 MiB at 16K tokens of
# context for a 4 MiB ring, 256 positions 11.3 MiB at both.
PREFILL_CHUNK_BYTES = 2 << 20
PREFILL_CHUNK = 256  # positions per chunk of a TensorKV (given tensors) unless told
# Timing defaults (see measure_decode): warm up for at least this long, aim for about
# MIN_TIME_S of timed steps per case, and never step one position more than MAX_REPEATS times.
WARMUP_S = 0.05
MIN_TIME_S = 0.5
MAX_REPEATS = 32


@dataclass(frozen=True)
class Step:
    """What one decode step does: the slot its K/V go to, and the slots it attends (a slice
    when they are contiguous, else an index tensor on the cache's device)."""

    slot: int
    keys: slice | torch.Tensor


class DenseCache:
    """Every position p lives in slot p."""

    policy = "dense"

    def __init__(self, n_total: int, batch: int, heads: int, head_dim: int, dtype, device) -> None:
        self._allocate((batch, heads, n_total, head_dim), dtype, device)

    def _allocate(self, shape: tuple[int, int, int, int], dtype, device) -> None:
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def size(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def describe(self) -> str:
        return f"{self.policy}({self.size})"

    def slot_of(self, pos: torch.Tensor) -> torch.Tensor:
        return pos

    def kept_after(self, context: int) -> torch.Tensor:
        """Positions < context still cached after prefill."""
        return torch.arange(context)

    def prefill(self, source: "KVSource", context: int) -> None:
        """Write the kept positions < context, one chunk of ``source`` at a time (a chunk whose
        positions are all overwritten later is never drawn)."""
        pos = self.kept_after(context)
        chunk = source.chunk
        for c in torch.unique(torch.div(pos, chunk, rounding_mode="floor")).tolist():
            start = c * chunk
            part = pos[(pos >= start) & (pos < start + chunk)]
            k, v = source.span(start, min(context, start + chunk))
            # runs of consecutive positions into consecutive slots, copied without a gathered copy
            slots = self.slot_of(part)
            breaks = torch.nonzero((part.diff() != 1) | (slots.diff() != 1)).flatten() + 1
            for run_pos, run_slot in zip(part.tensor_split(breaks), slots.tensor_split(breaks)):
                p0, s0, m = int(run_pos[0]) - start, int(run_slot[0]), run_pos.numel()
                self.k[:, :, s0 : s0 + m].copy_(k[:, :, p0 : p0 + m])
                self.v[:, :, s0 : s0 + m].copy_(v[:, :, p0 : p0 + m])


class RingCache(DenseCache):
    """Pinned positions keep their own slots; other positions share a ring of ``ring`` slots."""

    policy = "ring"

    def __init__(self, pinned, ring: int, n_total: int, batch: int, heads: int, head_dim: int, dtype, device):
        self.pinned = torch.tensor(sorted({p for p in pinned if 0 <= p < n_total}), dtype=torch.long)
        self.ring = max(1, min(ring, n_total - self.pinned.numel()))
        self._allocate((batch, heads, self.pinned.numel() + self.ring, head_dim), dtype, device)

    def describe(self) -> str:
        return f"ring(pinned={self.pinned.numel()}, ring={self.ring})"

    def _rank(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        before = torch.searchsorted(self.pinned, pos)  # pinned positions < pos
        is_pinned = torch.isin(pos, self.pinned)
        return is_pinned, before, pos - before  # rank among the unpinned positions

    def slot_of(self, pos: torch.Tensor) -> torch.Tensor:
        is_pinned, before, rank = self._rank(pos)
        return torch.where(is_pinned, before, self.pinned.numel() + rank % self.ring)

    def kept_after(self, context: int) -> torch.Tensor:
        # the newest `ring` unpinned positions lie within the last ring + pinned positions
        pinned = self.pinned[self.pinned < context]
        pos = torch.arange(max(0, context - self.ring - self.pinned.numel()), context)
        is_pinned, _, rank = self._rank(pos)
        unpinned = context - pinned.numel()
        recent = pos[~is_pinned & (rank >= unpinned - self.ring)]
        return torch.cat([pinned, recent]).sort().values


def ring_spec(pattern: "Pattern", context: int, n_total: int) -> tuple[list[int], int] | None:
    """(pinned positions, ring length) for a bounded pattern, None for a pattern that needs
    every key."""
    if not getattr(pattern, "bounded_kv", False):
        return None
    name = pattern.name
    if name == "sliding_window":
        return [], pattern.window
    if name == "sink_window":
        return list(range(pattern.sinks)), pattern.window
    if name == "longformer":
        g = sorted(set(pattern.global_tokens))
        if any(context <= t < n_total for t in g):
            return None  # a global query among the generated tokens attends every earlier key
        return g, pattern.window
    if name == "block_local":
        return [], pattern.block
    if name == "dilated_window":
        return [], (pattern.window - 1) * pattern.dilation + 1
    return [], int(pattern.kv_retained(n_total))


def _as_keys(idx: torch.Tensor, device) -> slice | torch.Tensor:
    n = idx.numel()
    if n and int(idx[-1]) - int(idx[0]) == n - 1:  # sorted and distinct, so contiguous
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx.to(device)


def plan(cache: DenseCache, pattern: "Pattern", context: int, n_total: int, want: torch.Tensor) -> list[Step] | None:
    """The steps for positions context..n_total-1, or None if the cache misses a key the
    pattern allows (``want[i]`` = keys row i of the reference attends)."""
    held = torch.full((cache.size,), -1, dtype=torch.long)
    kept = cache.kept_after(context)
    held[cache.slot_of(kept)] = kept
    steps = []
    for i, t in enumerate(range(context, n_total)):
        slot = int(cache.slot_of(torch.tensor([t]))[0])
        held[slot] = t
        ok = (held >= 0) & pattern.allowed(torch.tensor([t]), held.clamp(min=0), n_total, True)
        idx = torch.nonzero(ok).flatten()
        if idx.numel() != int(want[i]):
            return None
        steps.append(Step(slot, _as_keys(idx, cache.k.device)))
    return steps


def prefill_chunk(batch: int, heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Positions per chunk: PREFILL_CHUNK_BYTES of keys and values (at least one position)."""
    per_position = 2 * batch * heads * head_dim * torch.empty((), dtype=dtype).element_size()
    return max(1, PREFILL_CHUNK_BYTES // per_position)


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return torch_dtype(dtype, "decode dtype")


# Why decode steps run on one intra-op thread by default (``device.intra_op_threads``): a step is
# one query row, two matrix-vector products and a softmax over the cached keys, a few small ops
# bound by memory latency, not by arithmetic. ATen splits each op over its OpenMP threads and
# joins them at a barrier; on a shared machine (here 2 cores under load) a worker the OS has
# descheduled holds that barrier for a whole scheduler slice, so a 50 us step reads 8-12 ms. One
# thread measures the step and not the scheduler. (A second thread could add a little memory
# bandwidth to a very long dense cache; stable numbers are worth more. ``None`` keeps torch's.)


@dataclass(frozen=True)
class TensorKV:
    """Given keys and values (B, H, N, D) of every position, served ``chunk`` positions at a time."""

    k: torch.Tensor
    v: torch.Tensor
    chunk: int = PREFILL_CHUNK

    @property
    def positions(self) -> int:
        return self.k.shape[2]

    def span(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, :, start:stop], self.v[:, :, start:stop]


@dataclass(frozen=True)
class SeededKV:
    """Random keys and values, drawn ``chunk`` positions at a time: chunk c from a generator
    seeded by (seed, c), so that drawing a chunk again gives the same values and no more than
    the chunks asked for is ever held."""

    batch: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    seed: int
    positions: int
    chunk: int = PREFILL_CHUNK

    def _draw(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        # the CPU generator keeps 32 bits of its seed: one distinct seed per chunk, one stream per seed
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + c) % 2**32)
        shape = (self.batch, self.heads, self.chunk, self.head_dim)
        k = torch.randn(shape, generator=g).to(self.device, self.dtype)
        return k, torch.randn(shape, generator=g).to(self.device, self.dtype)

    def span(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        for c in range(start // self.chunk, -(-stop // self.chunk)):
            k, v = self._draw(c)
            lo, hi = max(start - c * self.chunk, 0), min(stop - c * self.chunk, self.chunk)
            parts.append((k[:, :, lo:hi], v[:, :, lo:hi]))
        if len(parts) == 1:  # a copy of the part asked for, not a view that keeps the whole chunk alive
            k, v = parts[0]
            return (k, v) if k.shape[2] == self.chunk else (k.clone(), v.clone())
        return torch.cat([k for k, _ in parts], dim=2), torch.cat([v for _, v in parts], dim=2)


KVSource = TensorKV | SeededKV


def reference_rows(q: torch.Tensor, source: KVSource, mask_of) -> torch.Tensor:
    """Full masked attention (fp32) of the query rows ``q`` (B, H, T, D) over every key of
    ``source``, where ``mask_of(start, stop)`` is the (T, stop - start) mask of keys start..stop-1;
    streamed one chunk of keys at a time (an online softmax), skipping chunks no row attends.
    A source with fewer heads than ``q`` (grouped-query attention) has each of its heads repeated
    for the H / heads query heads of its group."""
    b, h, t, d = q.shape
    qf = q.float() * d**-0.5
    top = torch.full((b, h, t, 1), float("-inf"), device=q.device)
    total = torch.zeros(b, h, t, 1, device=q.device)
    acc = torch.zeros(b, h, t, d, device=q.device)
    for start in range(0, source.positions, source.chunk):
        stop = min(source.positions, start + source.chunk)
        mask = mask_of(start, stop).to(q.device)
        if not bool(mask.any()):
            continue
        k, v = source.span(start, stop)
        if k.shape[1] != h:  # grouped-query: query head i reads KV head i // group
            k, v = (x.repeat_interleave(h // k.shape[1], dim=1) for x in (k, v))
        scores = (qf @ k.float().transpose(-1, -2)).masked_fill(~mask, float("-inf"))
        new_top = torch.maximum(top, scores.amax(dim=-1, keepdim=True))
        shift = torch.where(torch.isinf(new_top), torch.zeros_like(new_top), new_top)  # a row with no key yet
        p = torch.exp(scores - shift)
        scale = torch.exp(top - shift)
        total = total * scale + p.sum(dim=-1, keepdim=True)
        acc = acc * scale + p @ v.float()
        top = new_top
    return acc / total


class Decoder:
    """A prefilled cache for ``pattern`` and the plan of its decode steps on ``backend``.

    ``source``: the keys and values of every position (context + tokens of them), with
    ``kv_heads`` heads; ``q``: (B, H, tokens, D), the queries of the generated positions (H a
    multiple of kv_heads). Prefill (untimed) writes the first ``context`` keys/values chunk by
    chunk; ``prepare(i)`` does the backend's untimed work for position ``context + i``;
    ``step(i)`` generates it: it writes that position's K/V into its slot and attends
    ``q[:, :, i]`` over the planned slots on the backend, leaving the result in
    ``out[:, :, i]``. Besides its cache the decoder holds only the generated positions' K/V
    (``tokens`` of them).
    """

    def __init__(
        self, pattern: "Pattern", context: int, q: torch.Tensor, source: KVSource, backend: str = "sdpa"
    ) -> None:
        self.pattern = pattern
        self.context = context
        self.tokens = q.shape[2]
        self.n_total = context + self.tokens
        if source.positions != self.n_total:
            raise ScenarioError(f"decode: k/v must hold {self.n_total} positions, got {source.positions}")
        self.q, self.source = q, source
        self.k, self.v = source.span(context, self.n_total)  # the generated positions' keys and values
        b, h, _, d = self.k.shape  # h: the KV heads
        if q.shape[1] % h:
            raise ScenarioError(f"decode: {q.shape[1]} query heads are not a multiple of {h} KV heads")
        self.note = ""
        self.cache: DenseCache | None = None
        # a content-selected pattern keeps every key and chooses in each (timed) step: no plan
        self.selector = None
        if content_selected(pattern):
            self.cache = DenseCache(self.n_total, b, h, d, self.k.dtype, self.k.device)
            self.steps = [Step(t, torch.empty(0, dtype=torch.long)) for t in range(context, self.n_total)]
            self.cache.prefill(source, context)
            self.selector = pattern.incremental(self.cache.k, q.shape[1], context)
            self.out = torch.zeros_like(q)
            from sparsebench.measure import decode_steps

            self.attend = decode_steps.make(backend, self)
            return
        want = torch.zeros(self.tokens, dtype=torch.long)  # keys each generated row attends
        for start in range(0, self.n_total, source.chunk):
            want += self.mask_of(start, min(self.n_total, start + source.chunk)).sum(dim=1)
        steps = None
        spec = ring_spec(pattern, context, self.n_total)
        if spec is None and getattr(pattern, "bounded_kv", False):
            self.note = " (a ring would drop keys this pattern attends)"
        if spec is not None:
            ring = RingCache(spec[0], spec[1], self.n_total, b, h, d, self.k.dtype, self.k.device)
            steps = plan(ring, pattern, context, self.n_total, want)
            if steps is None:
                self.note = " (a ring would drop keys this pattern attends)"
            else:
                self.cache = ring
        if self.cache is None:
            self.cache = DenseCache(self.n_total, b, h, d, self.k.dtype, self.k.device)
            steps = plan(self.cache, pattern, context, self.n_total, want)
            if steps is None:  # cannot happen: this cache holds every earlier key
                raise RuntimeError(f"decode plan for {pattern.label()} misses keys of a full cache")
        self.steps: list[Step] = steps
        self.cache.prefill(source, context)
        self.out = torch.zeros_like(q)
        from sparsebench.measure import decode_steps

        self.attend = decode_steps.make(backend, self)

    def mask_of(self, start: int, stop: int) -> torch.Tensor:
        """(tokens, stop - start): may generated row i attend key j, for start <= j < stop?
        A content-selected pattern: (batch, heads, tokens, stop - start), the keys each step
        selected (all steps must have run)."""
        if self.selector is not None:
            b, h = self.q.shape[:2]
            m = torch.zeros(b, h, self.tokens, self.n_total, dtype=torch.bool, device=self.q.device)
            for i, st in enumerate(self.steps):
                m[:, :, i].scatter_(-1, st.keys, True)
            return m[..., start:stop]
        rows = torch.arange(self.context, self.n_total)
        return self.pattern.allowed(rows[:, None], torch.arange(start, stop)[None, :], self.n_total, True)

    @property
    def policy(self) -> str:
        return self.cache.describe() + self.note

    @property
    def backend(self) -> str:
        return self.attend.backend

    def prepare(self, i: int) -> None:
        """The backend's untimed work for position i (idempotent); none for a content-selected
        pattern, whose step selects its keys and prepares for them inside the clock."""
        if self.selector is None:
            self.attend.prepare(i)

    def step(self, i: int) -> None:
        st, c = self.steps[i], self.cache
        if self.selector is None:
            self.attend.prepare(i)  # done before the clock where timed (_timed_step): then a no-op
        c.k[:, :, st.slot : st.slot + 1].copy_(self.k[:, :, i : i + 1])
        c.v[:, :, st.slot : st.slot + 1].copy_(self.v[:, :, i : i + 1])
        if self.selector is not None:  # the selection is the step's own work, timed with it
            self.selector.wrote(st.slot)
            self.steps[i] = Step(st.slot, self.selector.select(self.q[:, :, i : i + 1], st.slot))
            self.attend.renew(i)
        self.out[:, :, i : i + 1] = self.attend(i)

    def reference(self) -> torch.Tensor:
        """Full masked attention (fp32) of the generated rows over the whole sequence."""
        return reference_rows(self.q, self.source, self.mask_of)


def measure_decode(
    pattern: "Pattern",
    context: int,
    *,
    tokens: int = 32,
    batch: int = 1,
    heads: int = 8,
    kv_heads: int | None = None,
    head_dim: int = 64,
    dtype: Any = torch.float32,
    device: str | torch.device = "cpu",
    warmup: int = 4,
    causal: bool = True,
    seed: int = 0,
    threads: int | None = 1,
    warmup_s: float = WARMUP_S,
    min_time_s: float = MIN_TIME_S,
    max_repeats: int = MAX_REPEATS,
    backend: str = "sdpa",
    first_call: Callable[[], ContextManager[Any]] | None = None,
) -> dict[str, Any]:
    """Time ``tokens`` single-token decode steps on ``backend`` after a prefill of ``context``
    tokens; the cache holds ``kv_heads`` heads (None: ``heads``), the queries ``heads``.

    Timing: on the CPU the steps run with ``threads`` intra-op threads (1 by default, restored
    afterwards; ``None`` leaves torch's setting). The first step is timed apart (first_call_s;
    for a compiling backend its extra over the median step is compile_s), inside ``first_call()``
    where given (the harness keeps its one-time memory out of the peak). Warm-up then runs at
    least ``warmup`` steps and at least ``warmup_s`` seconds; each position is then stepped
    ``repeats`` times back to back (1 <= repeats <= ``max_repeats``, about ``min_time_s`` of
    timed steps in all).

    Returns record fields: time_median_s / time_iqr_s / time_min_s / times_s (per token: every
    timed step, ``tokens * repeats`` of them), decode_repeats, decode_threads,
    first_call_s, compile_s, cache_bytes_measured (nbytes of the K/V tensors allocated),
    kv_cache_bytes (analytic, one layer: 2 x batch x kv_heads x head_dim x bytes x
    kv_retained(context + tokens)), kv_retained,
    cache_tokens, cache_policy, decode_tokens, max_abs_err (against full masked attention of
    the same rows), and on CUDA peak_mem_bytes (allocator peak from the decoder's construction,
    its cache and chunked prefill, to the last step; the queries are allocated before). On the
    CPU the harness measures the whole call; the prompt's keys and values are never held at once
    (one chunk of ``prefill_chunk`` positions at a time), so either peak is the cache plus a chunk.
    """
    kv_heads = heads if kv_heads is None else kv_heads
    for what, value in (
        ("context", context),
        ("tokens", tokens),
        ("batch", batch),
        ("heads", heads),
        ("kv_heads", kv_heads),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ScenarioError(f"decode {what} must be a positive integer, got {value!r}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ScenarioError(f"decode head_dim must be a positive integer, got {head_dim!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ScenarioError(f"decode warmup must be an integer >= 0, got {warmup!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ScenarioError(f"decode threads must be a positive integer or None, got {threads!r}")
    if isinstance(max_repeats, bool) or not isinstance(max_repeats, int) or max_repeats < 1:
        raise ScenarioError(f"decode max_repeats must be a positive integer, got {max_repeats!r}")
    for what, value in (("warmup_s", warmup_s), ("min_time_s", min_time_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
            raise ScenarioError(f"decode {what} must be a finite number >= 0, got {value!r}")
    if heads % kv_heads:
        raise ScenarioError(f"decode kv_heads must divide heads: {heads} query heads over {kv_heads} KV heads")
    if not causal:
        raise ScenarioError("decode mode needs causal: true (a generated token cannot attend keys after it)")
    dtype = _resolve_dtype(dtype)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("decode on cuda: CUDA is not available here")
    n_total = context + tokens
    pattern.check(n_total, True)

    # inputs: the queries of the generated positions; the keys and values of every position are
    # drawn a chunk at a time, as the prefill and the reference ask for them
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tokens, head_dim, generator=g).to(device, dtype)
    chunk = prefill_chunk(batch, kv_heads, head_dim, dtype)
    source = SeededKV(batch, kv_heads, head_dim, dtype, device, seed, n_total, chunk)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dec = Decoder(pattern, context, q, source, backend)
    compiled = dec.attend.compiled
    with intra_op_threads(threads, device):
        used_threads = torch.get_num_threads() if device.type == "cpu" else None
        # the first step apart: a compiling backend compiles here (on the steps' threads)
        with first_call() if first_call else contextlib.nullcontext():
            first = _timed_step(dec, 0, device)
        if compiled and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # compilation scratch is no step's
        times, repeats = _time_steps(dec, tokens, device, warmup, warmup_s, min_time_s, max_repeats)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    err = float((dec.out.float() - dec.reference()).abs().max())
    retained = int(pattern.kv_retained(n_total))
    if getattr(pattern, "bounded_kv", False) and type(dec.cache) is DenseCache:
        retained = n_total  # a ring would drop keys a generated query needs: the whole cache is kept
    median = statistics.median(times)
    record: dict[str, Any] = {
        "time_median_s": median,
        "time_iqr_s": stats.iqr(times),
        "time_min_s": min(times),
        "times_s": times,
        "first_call_s": first,
        "compile_s": max(0.0, first - median) if compiled else 0.0,
        "decode_tokens": tokens,
        "decode_repeats": repeats,
        "decode_threads": used_threads,
        "cache_policy": dec.policy,
        "cache_tokens": dec.cache.size,
        "cache_bytes_measured": int(dec.cache.nbytes),
        "kv_retained": retained,
        "kv_cache_bytes": 2 * batch * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size() * retained,
        "max_abs_err": err,
    }
    if peak is not None:
        record["peak_mem_bytes"] = int(peak)
    return record


def _timed_step(dec: Decoder, i: int, device: torch.device, f: float = 1.0) -> float:
    dec.prepare(i)  # the backend's per-position work (a mask row, a BlockMask): before the clock
    sync(device)
    t0 = time.perf_counter()
    dec.step(i)
    sync(device)
    slowdown.stretch(t0, f)  # SPARSEBENCH_TEST_SLOWDOWN: 1.0 unless set
    return time.perf_counter() - t0


def _time_steps(
    dec: Decoder, tokens: int, device: torch.device, warmup: int, warmup_s: float, min_time_s: float, max_repeats: int
) -> tuple[list[float], int]:
    """Warm up, pick the repeat count, then time every position ``repeats`` times in a row.

    Stepping a position again right away is idempotent (its K/V go to the same slot, the same
    slots are read, ``out`` gets the same row), so the repeats leave the decoded tokens as a
    single pass would, and the correctness check still holds."""
    warm: list[float] = []
    start = time.perf_counter()
    while len(warm) < warmup or (time.perf_counter() - start < warmup_s and len(warm) < 10_000):
        warm.append(_timed_step(dec, 0, device))  # step 0 is idempotent: same slot, same keys
    repeats = 1
    if warm and min_time_s > 0:
        # the fastest of the last few warm-up steps: what a step costs once warm
        est = max(min(warm[-5:]), 1e-7)
        repeats = max(1, min(max_repeats, math.ceil(min_time_s / (tokens * est))))
    times = []
    f = slowdown.factor()
    for i in range(tokens):
        for _ in range(repeats):
            times.append(_timed_step(dec, i, device, f))
    return times, repeats
