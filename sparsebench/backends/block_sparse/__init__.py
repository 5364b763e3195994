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

The rest of sparsebench uses only this module's names: the backend, ``attention_fn``, and the
native module's state, warm-up and caching CPU allocator (at the end).
"""

from __future__ import annotations

import os

import torch

from sparsebench.backends.base import BACKENDS, Backend, Problem
from sparsebench.backends.block_sparse import execute as _execute
from sparsebench.backends.block_sparse import native as _native
from sparsebench.backends.block_sparse import plan as _plan

# On CUDA, the fused Triton kernels where they apply (else plain PyTorch calls of the plan);
# SPARSEBENCH_TRITON=0 turns them off.
TRITON = os.environ.get("SPARSEBENCH_TRITON", "1") != "0"


def _use_triton(p: Problem) -> bool:
    """Whether the problem runs on the Triton kernels (CUDA, Triton installed, a head size,
    dtype and batch * heads they take)."""
    if not (TRITON and p.device.type == "cuda"):
        return False
    from sparsebench.backends.block_sparse import triton as _triton

    return _triton.unavailable(p.device) is None and _triton.supports(p.head_dim, p.dtype, p.batch * p.heads)


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


@BACKENDS.register
class BlockSparse(Backend):
    name = "block_sparse"
    summary = "only the allowed tiles: native C++ kernels on CPU, fused Triton kernels on CUDA"
    sparse = True
    # fp32 on the CPU: the first call builds (once, then from the extension cache) and loads the
    # native kernels of native/; that first-call cost is reported as compile_s
    compiled = True

    def prepare(self, p: Problem):
        if _use_triton(p):
            from sparsebench.backends.block_sparse import triton as _triton

            return _triton.attention_fn(_triton.build(p.pattern, p.seq_len, p.causal, p.head_dim, p.device, p.tile))
        plan = _plan.build(
            p.pattern,
            p.seq_len,
            p.causal,
            groups=p.batch * p.heads,
            head_dim=p.head_dim,
            block=p.tile,
            device=p.device,
            dtype=p.dtype,
        )
        return attention_fn(plan)

    def estimate_bytes(self, p: Problem) -> int:
        """q, k, v and the output, plus what is not proportional to n: each call's output chunk,
        log-sum-exps and gathered keys (bounded by _plan.ROW_BUDGET rows). Merged calls add an
        fp32 accumulator in low precision; backward adds fp32 gradients of q, k, v. The Triton
        kernels: a log-sum-exp per row (their bit masks are a few MiB), with residue bands their
        reordered copies and merge; backward, gradients in the input dtype, a delta per row and its
        chunk."""
        rows = p.batch * p.heads * p.seq_len
        if _use_triton(p):
            from sparsebench.backends.block_sparse import triton as _triton

            extra = rows * 4
            if _triton.residue_bands(p.pattern.structure(p.seq_len, p.causal)):
                # residue bands as parts (_triton.PartsPlan, where chosen): reordered q, k, v and
                # fp32 part outputs merged in place; backward, reordered inputs and fp32 gradients
                extra += (2 if p.mode == "forward" else 5) * p.io_bytes
            if p.mode == "backward":
                extra += 3 * p.io_bytes // 4 + rows * 4 + 3 * _triton.DELTA_ROWS * p.head_dim * 4
            return p.io_bytes + extra
        chunk = 4 * _plan.ROW_BUDGET * p.head_dim * 4
        extra = 0
        if p.elem_bytes != 4:
            extra += rows * p.head_dim * 4  # fp32 accumulator when calls are merged
        if p.mode == "backward":
            extra += 3 * rows * p.head_dim * 4 + p.io_bytes // 4  # fp32 grads, saved output
        return p.io_bytes + chunk + extra


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
