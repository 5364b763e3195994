"""Content-selected patterns (moba, quest, topk_keys) on block_sparse's native CPU kernels.

Their keys are chosen from q and k by each call: ``prepare`` gives a callable that selects and
then runs the kernel, both inside the timed call, and offers ``fn.select(q, k)`` (the selection
alone, as the call makes it) and ``fn.selected(q, k, v) -> (out, selection)`` so that a check
uses the selection the call made. The selection is native where the kernels know the pattern's
score: an indexer's token selection (topk_keys: ``select_top_keys``), a unit selection by moba's
gate or Quest's bound (``select_top_units``); both give the pattern's own keys (``pattern.select``,
fp32) without the reference's score blocks and sorts. The selection is ``index``
(batch, heads, n, slots) int32: per query head and row the ids of its selected units (unit u
covers keys u * unit .. (u + 1) * unit - 1, seen up to the query's own position), ascending, -1
padding at the end.

* Units of more than one token (moba's chunks, quest's pages), MoBA's own way, without
  per-token gathers: each key unit attends the query rows that chose it, gathered, as one dense
  block against the unit's keys packed once (shared by the query heads of a grouped-query
  group); the query's own unit is the causal diagonal; partial results merged exactly through
  their log-sum-exps (native ``unit_forward``). Forward only.
* Single tokens (topk_keys): per-token key tables, one per query head, on the cache-blocked
  key-table kernels of the random pattern (native ``table_forward_selected``, with a backward).

Memory beyond q, k, v and the output: the selection itself, an fp32 output and log-sum-exp per
row, per thread a unit's packed keys and its gathered rows; key tables also each row's chunk
bounds (and, in a low precision, the fp32 output converted). No n x n tensor.
"""

from __future__ import annotations

import math

import torch

from sparsebench.backends.block_sparse import native as _native
from sparsebench.backends.block_sparse.plan import KEY_CHUNK_BYTES
from sparsebench.patterns.selection import Selection, selecting_call

# Query rows per work item of the unit kernel (a multiple of the unit): the key units chosen by
# any of its rows are packed once per item, so more rows share each packing. An item's rows choose
# from every earlier unit, so with a fixed item size each item packs about all of its past and the
# packing grows as n^2 / rows: items grow with n instead (about 4 per thread over the run), from
# UNIT_QUERY_ROWS up to UNIT_MAX_ROWS rows (a thread's buffers hold an item's gathered rows).
UNIT_QUERY_ROWS = 2048
UNIT_MAX_ROWS = 16384
# Head sizes the native kernels take (the key-table kernels are unrolled for these).
HEAD_DIMS = (32, 64, 128)
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def content_selected(pattern) -> bool:
    """Whether a pattern chooses its keys from q and k per call (moba, quest, topk_keys)."""
    return bool(getattr(pattern, "content_selected", False))


def unsupported(p) -> str | None:
    """Why block_sparse cannot run this content-selected problem here, in one line, else None."""
    name = p.pattern.name
    if p.device.type != "cpu":
        return "content-selected patterns run on the CPU kernels only"
    if p.dtype not in NATIVE_DTYPES:
        return f"content-selected patterns need fp32, bf16 or fp16, not {p.dtype}"
    if p.head_dim not in HEAD_DIMS:
        return f"content-selected patterns need head_dim 32, 64 or 128 on the native kernels, not {p.head_dim}"
    if not p.causal:
        return f"pattern {name!r} is causal only"
    why = native_missing()
    if why is not None:
        return why
    if p.mode == "backward" and not _token_level(p.pattern):
        return f"no backward pass for {name!r} on block_sparse (the unit kernel is forward only)"
    return None


def native_missing() -> str | None:
    """Why the native AVX-512 kernels are not there (the content-selected path needs them)."""
    if not _native.enabled():
        return "content-selected patterns need the native CPU kernels (no C++ compiler, or SPARSEBENCH_NATIVE=0)"
    if _native.capability() != "AVX512":
        return "content-selected patterns need the native kernels' AVX-512 build (this CPU has none)"
    return None


def _token_level(pattern) -> bool:
    """Whether the pattern selects single keys (topk_keys), not units of several (moba, quest)."""
    return unit_size(pattern) == 1


def unit_rows(unit: int, n: int, work_items: int, threads: int) -> int:
    """Query rows per work item of the unit kernel, in whole units (one at least): as many as
    make about 4 items per thread over the ``work_items`` sequences, within UNIT_QUERY_ROWS to
    UNIT_MAX_ROWS, and fewer while there would be less than 4 items per thread."""
    want = min(UNIT_MAX_ROWS, max(UNIT_QUERY_ROWS, n * work_items // (4 * threads)))
    rows = unit * max(1, want // unit)
    while rows > unit and work_items * math.ceil(n / rows) < 4 * threads:
        rows -= unit
    return rows


def attend_units(selection, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, n, d), lse (B, H, n)), fp32: attention under a unit selection (native)."""
    B, H, n, d = q.shape
    q, k, v = (t.contiguous() for t in (q, k, v))
    index = selection.index.to(torch.int32).contiguous()
    rows = unit_rows(selection.unit, n, B * k.shape[1], torch.get_num_threads())
    return _native.kernel().unit_forward(q, k, v, index, selection.unit, rows, 1.0 / math.sqrt(d))


def key_chunk(head_dim: int) -> int:
    """Keys per chunk of the blocked key-table kernel: K and V rows of ~1 MiB in fp32, which stay
    in L2 while every query takes its keys from them (as plan.py's key tables)."""
    return max(64, KEY_CHUNK_BYTES // (2 * 4 * head_dim))


def chunk_bounds(index: torch.Tensor, n: int, chunk: int) -> torch.Tensor:
    """(G, n, chunks + 1) int32: where each row's keys (ascending, -1 padding at the end) of
    each chunk of ``chunk`` key rows begin; the last bound is the row's number of keys (native:
    a few binary searches per row)."""
    return _native.kernel().table_bounds(index, n, chunk)


def select_top_keys(qi: torch.Tensor, ki: torch.Tensor, keys: int) -> torch.Tensor:
    """topk_keys' selection from its indexer's projections, without a score matrix: qi (B, H, n,
    e) and ki (B, H_kv, n, e) (query head h reads ki's head h // (H / H_kv); e a multiple of 16);
    per query head and row i, its earlier keys j < i with the ``keys`` highest scores qi_i . ki_j
    (all of them when there are fewer; of equal scores the earlier key first), then i itself:
    (B, H, n, min(keys, n - 1) + 1) int32, ascending, -1 padding. Native: 64 query rows at a time
    (register blocks of 8) against one L2-sized segment of ki, packed in 32-key tiles, after
    another, each tile's scores going straight into per-row candidate lists against a threshold
    from a sample (a row the sample misled is scored again; a list past 2 * keys is cut to its
    exact best); the keys-th score of a list by bisection, not a sort. block_sparse's topk_keys
    call selects with it (``native_token_selector``); it gives the same keys as ``pattern.select``."""
    keys = max(1, min(keys, qi.shape[2] - 1))
    return _native.kernel().select_top_keys(qi.float().contiguous(), ki.float().contiguous(), keys)


class _Tables(torch.autograd.Function):
    """Per-token key tables (topk_keys): forward and backward on the native blocked kernels."""

    @staticmethod
    def forward(ctx, q, k, v, index, bounds):
        B, H, n, d = q.shape
        group = H // k.shape[1]
        qs, ks, vs = (t.reshape(-1, n, d).contiguous() for t in (q, k, v))
        out, lse = _native.kernel().table_forward_selected(qs, ks, vs, index, bounds, group, 1.0 / math.sqrt(d))
        ctx.save_for_backward(q, k, v, index, bounds, out, lse)
        return out.view(B, H, n, d).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, index, bounds, out, lse = ctx.saved_tensors
        B, H, n, d = q.shape
        group = H // k.shape[1]
        qs, ks, vs = (t.reshape(-1, n, d).contiguous() for t in (q, k, v))
        go = dout.reshape(-1, n, d).float().contiguous()
        dq = torch.zeros(qs.shape, dtype=torch.float32)
        dk, dv = (torch.zeros(ks.shape, dtype=torch.float32) for _ in range(2))
        _native.kernel().table_backward_selected(
            qs, ks, vs, index, bounds, group, 1.0 / math.sqrt(d), go, out, lse, dq, dk, dv
        )  # fmt: skip
        return dq.view(q.shape).to(q.dtype), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype), None, None


def attend_tokens(selection, q, k, v) -> torch.Tensor:
    """Attention under a token selection (unit 1), in q's dtype; differentiable."""
    B, H, n, d = q.shape
    index = selection.index.to(torch.int32).reshape(B * H, n, -1).contiguous()
    bounds = chunk_bounds(index, n, key_chunk(d))
    return _Tables.apply(q, k, v, index, bounds)


def attend(selection, q, k, v) -> torch.Tensor:
    """Attention under a selection, in q's dtype: token tables for unit 1, else the unit kernel."""
    if selection.unit == 1:
        return attend_tokens(selection, q, k, v)
    return attend_units(selection, q, k, v)[0].to(q.dtype)


# The native token selection's work items: query rows per pass over the keys (SEL_ROWS in
# native.cpp), each row's candidate list holding at most 2 * keys + 64 (score, position) pairs.
SELECT_ROWS = 64


def _indexer(pattern, head_dim: int, device) -> torch.Tensor | None:
    """The projection the native token selection takes for ``pattern``: a pattern that selects
    single keys (unit 1) by an indexer projection (``projection(head_dim, device)``, its columns a
    multiple of 16) of its ``keys`` best, on a CPU with the native AVX-512 kernels; else None."""
    if not (_token_level(pattern) and hasattr(pattern, "projection") and hasattr(pattern, "keys")):
        return None
    if torch.device(device).type != "cpu" or native_missing() is not None or int(pattern.keys) < 1:
        return None
    project = pattern.projection(head_dim, device)
    return None if project.shape[1] % 16 else project


def native_token_selector(pattern, head_dim: int, device):
    """A token-level pattern's selection by the native kernel (``select_top_keys``), the same
    keys as ``pattern.select``, where ``_indexer`` has its projection; None otherwise
    (``pattern.select`` then)."""
    project = _indexer(pattern, head_dim, device)
    if project is None:
        return None
    keys = int(pattern.keys)

    def select(q, k):
        n = q.shape[2]
        if n < 2:  # no earlier key: the kernel's table keeps one slot more than the pattern's
            return pattern.select(q, k)
        with torch.no_grad():
            index = select_top_keys(q.detach().float() @ project, k.detach().float() @ project, keys)
        return Selection(n=n, unit=1, index=index)

    return select


# The scores the native unit selection computes (select_top_units' kind), by the pattern's
# ``score_kind``, with the summaries (``summary``) each is computed from.
UNIT_SCORES = {"dot": "mean", "bound": "minmax"}
# Kept units up to which a row's best are kept in a running sorted list (UNIT_LIST_MAX in native.cpp;
# more: the kept units' least score by bisection), query rows scored together (UNIT_RB) and units per
# packed tile of summaries (UNIT_LANES).
UNIT_LIST_MAX, UNIT_RB, UNIT_LANES = 8, 8, 16


def select_top_units(q: torch.Tensor, summaries, unit: int, earlier: int, kind: str) -> torch.Tensor:
    """moba's and quest's selection without a score matrix: q (B, H, n, d); ``summaries`` of the
    n // unit whole units of keys (``unit_summaries``: means (B, H_kv, n // unit, d) for ``kind``
    "dot", q . mean; (min, max) for "bound", sum_d max(q_d min_d, q_d max_d)), query head h reading
    kv head h // (H / H_kv). Per query head and row i, own unit u_i = i // unit: the ``earlier``
    units u < u_i with the highest scores (all of them when fewer; of equal scores the lower unit),
    ascending, then u_i, then -1 padding: (B, H, n, min(earlier, ceil(n / unit) - 1) + 1) int32, as
    ``select_units`` gives it. Native: 8 query rows at a time scored against the units' summaries
    packed in tiles of 16 (register blocks), each row's scores then ranked: a running list for up
    to 8 kept units, else the kept units' least score by bisection and one pass keeping those above
    it and the lowest equal ones (no sort); the scores are sums in the order of the head dimension,
    Quest's two apart, then added (as torch's products on this CPU round them, not promised)."""
    if kind == "dot":
        s0, s1 = summaries, torch.empty(0)
    else:
        s0, s1 = (t.contiguous() for t in summaries)
    return _native.kernel().select_top_units(q.float().contiguous(), s0.contiguous(), s1, unit, earlier, kind)


def _unit_scored(pattern, device) -> bool:
    """Whether the native unit selection computes ``pattern``'s score: a pattern of units of more
    than one token whose ``score_kind`` and ``summary`` it knows, on a CPU with the native kernels."""
    kind = getattr(pattern, "score_kind", None)
    if kind not in UNIT_SCORES or getattr(pattern, "summary", None) != UNIT_SCORES[kind]:
        return False
    if unit_size(pattern) < 2 or not hasattr(pattern, "earlier_units"):
        return False
    return torch.device(device).type == "cpu" and _native.enabled()


def native_unit_selector(pattern, head_dim: int, device):
    """A unit pattern's selection by the native kernel (``select_top_units``: moba's gate, Quest's
    bound), the same units as ``pattern.select``, where ``_unit_scored``; None otherwise
    (``pattern.select`` then). The summaries are torch's (``unit_summaries``: one pass over k)."""
    from sparsebench.patterns.selection import unit_summaries

    if not _unit_scored(pattern, device) or _native.kernel() is None:
        return None
    unit, earlier, kind = int(pattern.unit), int(pattern.earlier_units), pattern.score_kind

    def select(q, k):
        with torch.no_grad():
            summaries = unit_summaries(k, unit, pattern.summary)
            index = select_top_units(q.detach(), summaries, unit, earlier, kind)
        return Selection(n=q.shape[2], unit=unit, index=index)

    return select


def native_selector(pattern, head_dim: int, device):
    """The native selection of ``pattern`` (``native_token_selector``, else
    ``native_unit_selector``), or None where the kernels do not compute it."""
    return native_token_selector(pattern, head_dim, device) or native_unit_selector(pattern, head_dim, device)


def prepare(p):
    """fn(q, k, v) for a content-selected problem: the selection, then the kernel (both timed),
    with ``fn.select(q, k) -> Selection`` (the selection the call makes: the native one for an
    indexer's token selection or a unit selection whose score the kernels know, else the
    pattern's own) and ``fn.selected(q, k, v) -> (out, selection)`` for the check."""
    pattern = p.pattern
    select = native_selector(pattern, p.head_dim, p.device)
    return selecting_call(pattern, lambda q, k, v, selection: attend(selection, q, k, v), select)


def estimate_bytes(p) -> int:
    """Peak bytes of a call: q, k, v and the output; the selection (int32 ids per query head and
    row: ``slots(p)``), the fp32 output and a log-sum-exp per row (the output converted in a low
    precision); key tables also their chunk bounds, and in backward the fp32 output gradient and
    gradients with their copies in the input dtype; per thread a unit's packed keys and rows."""
    pattern = p.pattern
    seqs, n, d, e = p.batch * p.heads, p.seq_len, p.head_dim, p.elem_bytes
    slots = selection_slots(pattern, n)
    rows = seqs * n
    # the selection's own temporaries (its score blocks and ranking, or the native selection's),
    # freed before the kernel runs: the call's peak is the larger of selecting and attending, over
    # what both hold
    project = _indexer(pattern, d, p.device)
    if project is not None:
        selecting = native_select_bytes(p, project.shape[1])
    elif _unit_scored(pattern, p.device):
        selecting = native_unit_select_bytes(p)
    else:
        selecting = pattern.select_bytes(p.batch, p.heads, n, d, p.elem_bytes) - rows * slots * 4
    held = p.io_bytes + rows * slots * 4 + rows * 4  # the selection; lse
    held += rows * d * 4 if e != 4 else 0  # the fp32 output before it is converted
    if _token_level(pattern):
        held += rows * (math.ceil(n / key_chunk(d)) + 1) * 4  # chunk bounds
        if p.mode == "backward":
            kv_rows = p.batch * p.kv_heads * n
            held += rows * d * 4 * 2 + (rows + 2 * kv_rows) * d * 4  # fp32 dout and saved out; dq, dk, dv
            held += (p.q_bytes + p.kv_bytes) if e != 4 else 0  # their copies in the input dtype
        return held + selecting
    unit, threads = unit_size(pattern), torch.get_num_threads()
    rows = unit_rows(unit, n, p.batch * p.kv_heads, threads) * p.group  # a work item's query rows
    # per thread: a unit's packed keys; the gathered rows that chose it (at most all of the item's),
    # their outputs, and their bookkeeping (pairs, ranges, log-sum-exps)
    per_thread = (min(unit, n) + 64) * d * 4 + rows * (d * (e + 4) + 5 * 4)
    # the fp32 output (in a low precision) is made by the kernel, after the selection's temporaries
    # are freed: it counts on the kernel's side only
    out32 = seqs * n * d * 4 if e != 4 else 0
    return held - out32 + max(selecting, out32 + threads * per_thread)


def native_select_bytes(p, index_dim: int) -> int:
    """Peak bytes of the native token selection beyond q, k and the index it returns: the fp32
    projections of q and k, fp32 copies of q or k in a low precision (one at a time, freed after
    its product), k's projection packed in 32-key tiles, and per thread the candidate lists of a
    work item's rows (fp32 score and int32 position, 2 * keys + 64 of each per row) and scratch."""
    n, d = p.seq_len, p.head_dim
    q_rows, k_rows = p.batch * p.heads * n, p.batch * p.kv_heads * n
    packed = p.batch * p.kv_heads * math.ceil(n / 32) * 32 * index_dim * 4
    total = (q_rows + k_rows) * index_dim * 4 + packed
    total += q_rows * d * 4 if p.elem_bytes != 4 else 0
    cap = 2 * min(int(p.pattern.keys), max(1, n - 1)) + 64
    return total + torch.get_num_threads() * (SELECT_ROWS * cap * 8 + (2 * cap + 32) * 4)


def native_unit_select_bytes(p) -> int:
    """Peak bytes of the native unit selection beyond q, k and the index it returns: the units'
    fp32 summaries (torch's, and packed in tiles of 16 units: moba's means, Quest's min and max),
    an fp32 copy of k while they are made and of q while it selects (in a low precision), and per
    thread 8 rows' scores against every unit, their query rows, the bisection's keys of a row's
    scores (or the partial sort's (score, unit) pairs) and the kept units' list."""
    pattern, n, d = p.pattern, p.seq_len, p.head_dim
    unit = unit_size(pattern)
    full, parts = n // unit, 2 if pattern.summary == "minmax" else 1
    tiles = math.ceil(full / UNIT_LANES)
    summaries = p.batch * p.kv_heads * parts * (full + tiles * UNIT_LANES) * d * 4
    copies = max(p.q_bytes, p.kv_bytes // 2) * 4 // p.elem_bytes if p.elem_bytes != 4 else 0
    earlier = int(pattern.earlier_units)
    per_thread = UNIT_RB * (tiles * UNIT_LANES + 2 * d) * 4 + earlier * 8 + tiles * UNIT_LANES * 4 * 3 + 128
    return summaries + copies + torch.get_num_threads() * per_thread


def unit_size(pattern) -> int:
    """Tokens per selected unit: moba's chunk, quest's page, 1 for topk_keys."""
    for name in ("chunk", "page_size"):
        if hasattr(pattern, name):
            return int(getattr(pattern, name))
    return 1


def selection_slots(pattern, n: int) -> int:
    """Slots per row of the pattern's selection (its last dimension): moba topk units, quest
    token_budget / page_size pages (its own one at least), topk_keys keys + 1 (itself)."""
    if hasattr(pattern, "topk"):
        return min(int(pattern.topk), math.ceil(n / unit_size(pattern)))
    if hasattr(pattern, "token_budget"):
        page = unit_size(pattern)
        return min(max(1, math.ceil(int(pattern.token_budget) / page)) + 1, math.ceil(n / page))
    return min(int(getattr(pattern, "keys", n)) + 1, n)
