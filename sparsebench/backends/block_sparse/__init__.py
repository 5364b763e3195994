"""Block-sparse attention: only the pattern's allowed pairs, up to block granularity, are
computed, by fused attention calls on views of q, k and v.

The package, one job per module:

* ``plan.py``: ``prepare`` turns the pattern into a plan (``plan.build``, setup work): a
  structured pattern (``Pattern.structure``) becomes diagonal bands read as overlapping key
  windows of one ``as_strided`` view (no gather, no copy), block bands, key columns, query rows
  and key tables; any other pattern is planned from its block layout (its diagonal run of full
  tiles as a block band, the remaining tiles gathered). ``views.py``: the views of q, k and v
  that a call's operands are.
* ``execute.py``: runs a plan. Each call is one fused attention kernel that also returns the
  log-sum-exp of its rows, so calls over different keys of the same queries merge exactly: on
  the CPU the native kernels of ``native/`` (key windows and key tables; fp32, and bf16 / fp16 on
  AVX-512), otherwise ATen's CPU flash attention (``attend.py``), or plain PyTorch on other
  devices (on CUDA that is correct but not fused: slower than dense flash attention and than
  ``flex``). The output is written in place, chunk by chunk: memory beyond q, k, v and the
  output is a few MiB of per-call temporaries, whatever n. Backward runs each call's backward
  with its share of the output gradient. Any sequence length works; fp32, bf16 and fp16.
* ``triton.py``: on CUDA with Triton (head sizes that are powers of two, 16 to 256) the plan is
  instead the pattern's block layout, run by fused Triton kernels: one online softmax per query
  block over its tiles, bit masks for partial tiles, FlashAttention-2 backward; residue bands
  (strided columns) run as parts of their own on the sequence reordered by residue class.

* ``selected.py``: content-selected patterns (moba, quest, topk_keys: keys chosen from q and k
  by each call) on the CPU's native kernels, the pattern's selection inside the timed call:
  units of keys (chunks, pages) MoBA's way (each unit attends the query rows that chose it, one
  dense block, merged through the log-sum-exps; forward only), single keys as per-head key
  tables (forward and backward). ``triton_selected.py``: the same patterns on CUDA with Triton
  (forward and backward): units MoBA's way (per key unit the query rows that chose it, gathered;
  or, SPARSEBENCH_TRITON_UNITS=union, per query block the union of the units its rows chose with
  a bit mask per row), single keys gathered through the selection's ids. Checked under Triton's
  CPU interpreter; not yet timed on a GPU.

The rest of sparsebench uses only this module's names: the backend, ``attention_fn``, and the
native module's state, warm-up and caching CPU allocator (at the end).
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from sparsebench.backends.base import BACKENDS, Backend, Problem
from sparsebench.backends.block_sparse import execute as _execute
from sparsebench.backends.block_sparse import native as _native
from sparsebench.backends.block_sparse import plan as _plan
from sparsebench.backends.block_sparse import selected as _selected

# On CUDA, the fused Triton kernels where they apply (else plain PyTorch calls of the plan);
# SPARSEBENCH_TRITON=0 turns them off.
TRITON = os.environ.get("SPARSEBENCH_TRITON", "1") != "0"


def _use_triton(p: Problem) -> bool:
    """Whether the problem runs on the Triton kernels (CUDA, Triton installed, a head size,
    dtype and batch * heads they take)."""
    if not (TRITON and p.device.type == "cuda"):
        return False
    from sparsebench.backends.block_sparse import triton as _triton

    # each call covers batch * kv_heads sequences (grouped-query attention runs by groups: ``grouped``)
    return _triton.unavailable(p.device) is None and _triton.supports(p.head_dim, p.dtype, p.batch * p.kv_heads)


def _selected_on_triton(p: Problem) -> bool:
    """Whether a content-selected problem runs on the Triton kernels of ``triton_selected.py``:
    on CUDA with Triton installed (SPARSEBENCH_TRITON not 0); otherwise the native CPU kernels of
    ``selected.py`` (which decline other devices)."""
    if not (TRITON and p.device.type == "cuda"):
        return False
    from sparsebench.backends.block_sparse import triton as _triton

    return _triton.unavailable(p.device) is None


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan):
        out, lse, saved = _execute.run_forward(plan, q, k, v, keep=True)
        out = out.to(q.dtype)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, *([lse] if lse is not None else []), *saved)
        ctx.has_lse = lse is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, *rest = ctx.saved_tensors
        lse = rest.pop(0) if ctx.has_lse else None
        dq, dk, dv = _execute.run_backward(ctx.plan, q, k, v, out, lse, rest, dout)
        return dq, dk, dv, None


def attention_fn(plan: _plan.Plan):
    """fn(q, k, v) for a plan: differentiable when the inputs need gradients."""

    def fn(q, k, v):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _Attention.apply(q, k, v, plan)
        out, _, _ = _execute.run_forward(plan, q, k, v)
        return out.to(q.dtype)

    fn.plan = plan  # type: ignore[attr-defined]
    return fn


def grouped(fn, group: int):
    """fn(q, k, v) for grouped-query inputs: q (B, H, n, d), k and v (B, H / group, n, d), query
    head h reading key/value head h // group. The query heads g, g + group, g + 2 group, ...
    (``q[:, g::group]``) pair head by head with k and v, so ``fn`` (planned for B * H / group
    sequences) runs once per g on those query heads and on k and v as they are: the shared key
    and value rows are read in place, never repeated. Each run's output is copied into its heads
    of the output (differentiable: autograd sums the key and value gradients of the runs)."""
    if group == 1:
        return fn

    def call(q, k, v):
        B, H, n, d = q.shape
        out = torch.empty(B, H, n, d, dtype=q.dtype, device=q.device)
        by_group = out.view(B, H // group, group, n, d)
        for g in range(group):
            by_group[:, :, g].copy_(fn(q[:, g::group], k, v))
        return out

    call.plan = getattr(fn, "plan", None)  # type: ignore[attr-defined]
    return call


@BACKENDS.register
class BlockSparse(Backend):
    name = "block_sparse"
    summary = "only the allowed tiles: native C++ kernels on CPU, fused Triton kernels on CUDA"
    sparse = True
    # fp32 on the CPU: the first call builds (once, then from the extension cache) and loads the
    # native kernels of native/; that first-call cost is reported as compile_s
    compiled = True

    def unsupported(self, p: Problem) -> str | None:
        if _selected.content_selected(p.pattern):
            if _selected_on_triton(p):
                from sparsebench.backends.block_sparse import triton_selected as _tsel

                return _tsel.unsupported(p)
            return _selected.unsupported(p)
        return super().unsupported(p)

    def prepare(self, p: Problem):
        """The plan for batch * kv_heads sequences; grouped-query inputs run it once per group
        (``grouped``) on the shared k and v. Content-selected patterns (keys chosen from q and k
        per call) run their selection and then the native kernels of ``selected.py`` (CPU) or the
        Triton kernels of ``triton_selected.py`` (CUDA) per call."""
        if _selected.content_selected(p.pattern):
            if _selected_on_triton(p):
                from sparsebench.backends.block_sparse import triton_selected as _tsel

                return _tsel.prepare(p)
            return _selected.prepare(p)
        if _use_triton(p):
            from sparsebench.backends.block_sparse import triton as _triton

            plan = _triton.build(p.pattern, p.seq_len, p.causal, p.head_dim, p.device, p.tile)
            return grouped(_triton.attention_fn(plan), p.group)
        plan = _plan.build(
            p.pattern,
            p.seq_len,
            p.causal,
            groups=p.batch * p.kv_heads,
            head_dim=p.head_dim,
            block=p.tile,
            device=p.device,
            dtype=p.dtype,
        )
        return grouped(attention_fn(plan), p.group)

    def estimate_bytes(self, p: Problem) -> int:
        """Peak memory of a call: q, k, v and the output, with what the plan holds and what its
        calls allocate (``plan_bytes``: planned on the CPU as ``prepare`` plans it). The Triton
        kernels: a log-sum-exp per row (their bit masks are a few MiB), with residue bands their
        reordered copies and merge; backward, gradients in the input dtype, a delta per row and
        its chunk. Grouped-query inputs (``grouped``): the whole q, k, v and output, and one
        group's run (its copy of the group's query heads, its output and temporaries); backward
        also the saved outputs of every group, the output gradient, the gradients of q, k, v and
        autograd's full-size gradients of the slices (measured: 0.83x-0.90x of the peak, bigbird
        and longformer, 16 query heads over 4, n = 2048). Content-selected patterns:
        ``selected.estimate_bytes`` (CPU), ``triton_selected.estimate_bytes`` (CUDA)."""
        if _selected.content_selected(p.pattern):
            if _selected_on_triton(p):
                from sparsebench.backends.block_sparse import triton_selected as _tsel

                return _tsel.estimate_bytes(p)
            return _selected.estimate_bytes(p)
        if p.group > 1:
            one = self.estimate_bytes(replace(p, heads=p.kv_heads))  # one group's run, k and v included
            # backward: the groups' saved outputs, the output gradient, q's gradient, and per group the
            # full-size gradient autograd makes for a slice of q (and of the output) before adding it
            extra = 5 * p.q_bytes + p.kv_bytes if p.mode == "backward" else 0
            return p.io_bytes + one - p.kv_bytes + extra
        if _use_triton(p):
            from sparsebench.backends.block_sparse import triton as _triton

            rows = p.batch * p.heads * p.seq_len
            extra = rows * 4
            if _triton.residue_bands(p.pattern.structure(p.seq_len, p.causal)):
                # residue bands as parts (_triton.PartsPlan, where chosen): reordered q, k, v and
                # fp32 part outputs merged in place; backward, reordered inputs and fp32 gradients
                extra += (2 if p.mode == "forward" else 5) * p.io_bytes
            if p.mode == "backward":
                extra += 3 * p.io_bytes // 4 + rows * 4 + 3 * _triton.DELTA_ROWS * p.head_dim * 4
            return p.io_bytes + extra
        key = (type(p.pattern).__name__, p.pattern.label(), p.seq_len, p.causal, p.batch, p.heads, p.head_dim)
        key += (p.tile, p.dtype, p.mode, torch.get_num_threads())
        if key not in _ESTIMATES:  # planning a long sequence takes seconds: once per process
            plan = _plan.build(
                p.pattern, p.seq_len, p.causal, groups=p.batch * p.heads, head_dim=p.head_dim, block=p.tile,
                device=torch.device("cpu"), dtype=p.dtype,
            )  # fmt: skip
            _ESTIMATES[key] = plan_bytes(plan, p)
        return _ESTIMATES[key]


_ESTIMATES: dict[tuple, int] = {}


def _tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _held_bytes(plan: _plan.Plan) -> int:
    """What the plan keeps for its calls: masks (or their row ranges), rows without keys, key
    tables and their chunk bounds, gathered rows' indices (and their int32 copies for the native
    kernels)."""
    total = 0
    for call in plan.calls:
        mask = call.mask
        if isinstance(mask, _plan.RangeMask):
            total += mask.stored_bytes
        elif mask is not None:
            total += _tensor_bytes(mask.bool)
        total += _tensor_bytes(call.empty, call.table, call.bounds, *(call.ranges or ()))
        for view in (call.q, call.k):
            if isinstance(view, _plan.Gather):
                total += _tensor_bytes(view.index) * 3 // 2  # int64 index and its int32 copy
    return total


def plan_bytes(plan: _plan.Plan, p: Problem) -> int:
    """Peak bytes of running ``plan`` on the CPU (``execute.py``) for problem ``p``: q, k, v and
    the output (and in backward mode the output gradient, fp32 gradients of q, k and v and their
    copies in the input dtype), what the plan holds, the merged fp32 output and log-sum-exps
    where calls merge or the native kernels (fp32 output) serve a low precision, the per-thread
    packed key tiles of the native kernels, and the largest temporaries of one call: gathered
    operands, its output rows, the additive mask, and backward its gradients."""
    seqs, n, d, e = p.batch * p.heads, p.seq_len, p.head_dim, p.elem_bytes
    probe = torch.empty(0, 0, d, dtype=p.dtype)  # what the executor's kernel choices look at
    window_native = _execute._native_window(probe)
    whole = _execute._whole(plan) is not None

    def native(call) -> bool:
        return _execute._native_ok(call, probe) or (call.ranges is not None and window_native)

    native_low = e != 4 and window_native and any(native(c) for c in plan.calls)
    out_fp32 = e == 4 or plan.multi or native_low
    backward = p.mode == "backward"
    held = p.io_bytes + _held_bytes(plan)
    if not whole and out_fp32 and e != 4:
        held += seqs * n * d * 4  # the fp32 output the calls write (then copied to the input dtype)
    if plan.multi:
        held += seqs * n * 4  # merged log-sum-exps
    if backward:
        held += seqs * n * d * (e + 3 * 4 + (3 * e if e != 4 else 0))  # dout; fp32 dq, dk, dv; their copies
        held += seqs * sum(c.q.windows * c.q.length for c in plan.calls) * 4  # each call's saved log-sum-exps
    packed = 0  # native kernels: per thread, the keys of a run of windows packed in fp32 tiles
    worst = 0
    for call in plan.calls:
        for _, piece in _execute._runnable(call, probe):
            q_rows = seqs * piece.q.windows * piece.q.length
            shared = isinstance(piece.k, _plan.Gather) and piece.k.shared
            k_rows = seqs * piece.k.length * (1 if shared else piece.k.windows)
            q_gathered, k_gathered = isinstance(piece.q, _plan.Gather), isinstance(piece.k, _plan.Gather)
            tmp = q_rows * 4  # the call's log-sum-exps
            if native(piece):
                k = piece.k
                run = (k.windows - 1) * k.window_stride + k.length if isinstance(k, _plan.Strided) else k.length
                packed = max(packed, min(run, n + k.length) * d * 4)
                if q_gathered:  # its rows copied in, its output apart, merged through a copy of out's rows
                    tmp += q_rows * d * (e + 4 + 4 + (4 if backward else 0))  # backward: its dq rows
                elif not out_fp32:
                    tmp += q_rows * d * 4
                if backward and not (piece.ranges is not None and window_native):  # key tables
                    # the output gradient scaled by the call's share; fp32 copies of it and of the output
                    tmp += (q_rows * d * (4 + e) if plan.multi else 0) + (2 * q_rows * d * 4 if e != 4 else 0)
            else:  # ATen's flash attention on (gathered) operands
                tmp += (q_rows * d * e if q_gathered else 0) + (2 * k_rows * d * e if k_gathered else 0)
                tmp += q_rows * d * e  # its output
                if piece.mask is not None:
                    tmp += piece.mask.bool.numel() * e  # the additive mask
                if not whole and (q_gathered or e != 4):
                    tmp += q_rows * d * 4  # out's rows, or the output widened, to merge
                if backward:
                    tmp += (q_rows + 2 * k_rows) * d * e  # dq, dk, dv of the call
                    if plan.multi:
                        tmp += q_rows * d * (4 + e)
            worst = max(worst, tmp)
    threads = torch.get_num_threads()
    return held + worst + threads * packed * (4 if backward else 1)


# ------------------------------------------------------------------------------------------
# what the rest of sparsebench uses of block_sparse: the native CPU module's state, its warm-up
# and its caching CPU allocator (native/allocator.cpp)


def native_enabled() -> bool:
    """Whether the native CPU kernels can be used here: a C++ compiler, not switched off
    (SPARSEBENCH_NATIVE=0), no failed build of this version cached. Cheap: builds nothing."""
    return _native.enabled()


def native_built() -> bool:
    """Whether the native CPU kernels are loaded or already built in the extension cache, so
    that their first use does not wait for a build."""
    return _native.built()


def native_loaded() -> bool:
    """Load the native CPU kernels where they are enabled and already built: whether they are
    loaded. Never builds them (that is the first CPU case's cost)."""
    return _native.enabled() and _native.built() and _native.kernel() is not None


def warm_up() -> None:
    """Run the native CPU kernels once on a tiny problem (a causal sliding window; head size
    32, the window kernel's smallest), so that their one-time costs (their OpenMP threads, the
    first allocations) fall before a measured case. Does nothing unless ``native_loaded()``:
    builds nothing."""
    if not native_loaded():
        return
    from sparsebench.patterns.base import PATTERNS

    pattern = PATTERNS.get("sliding_window")(window=16)
    cpu = torch.device("cpu")
    plan = _plan.build(pattern, 64, True, groups=2, head_dim=32, block=16, device=cpu, dtype=torch.float32)
    x = torch.ones(1, 2, 64, 32)  # not randn: the global random state stays as it was
    with torch.no_grad():
        attention_fn(plan)(x, x, x)


def cache_cpu_allocations(on: bool) -> bool:
    """Switch the caching CPU allocator of the native module on or off (see
    ``sparsebench.measure.memory.freed_memory_reused``): on, freed blocks of 1 MiB or more are
    kept for the next request of the same size (already on: the kept blocks are freed); off,
    requests pass through and the kept blocks are freed. Returns whether the allocator is
    there (False, and nothing changes, without the native module: no compiler,
    SPARSEBENCH_NATIVE=0). Loads the module, building it on first use."""
    mod = _native.kernel()
    if mod is None:
        return False
    mod.cache_cpu_allocations(on)
    return True
