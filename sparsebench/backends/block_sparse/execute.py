"""Running a plan (``plan.py``): its calls forward, merged exactly through their log-sum-exps, and
backward, each call with its share of the output gradient.

A call runs on the native kernels (``native/``) where they apply (CPU: windows whose mask is one
key range per row, key tables; fp32, and bf16 / fp16 on AVX-512), else on ATen's CPU flash
attention (``attend.py``; plain PyTorch on other devices). Calls that cover the same query rows
are merged through their log-sum-exp (by the native kernels in place, else by ``attend.merge``).
The backward pass runs each call's backward with its share of the output gradient (native for
windows: key gradients of overlapping windows summed per thread, then added once).
"""

from __future__ import annotations

import torch

from sparsebench.backends.block_sparse import attend as _attend
from sparsebench.backends.block_sparse import native as _native
from sparsebench.backends.block_sparse import plan as _plan
from sparsebench.backends.block_sparse.plan import Call, Plan
from sparsebench.backends.block_sparse.views import Gather, Strided

# Backward on ATen: key rows per piece of a call; ATen's backward returns key gradients per window
# (overlapping windows: several times the size of K), so pieces keep them in cache.
BACKWARD_KEY_ROWS = 1 << 13
NEG_INF = float("-inf")
_NOTHING = torch.empty(0)


def _write(call: Call, out, lse, call_out, call_lse) -> None:
    """A call's output rows and log-sum-exps into ``out`` and ``lse``: written where the call
    is the first to cover its rows, else merged with what is there."""
    if isinstance(call.q, Gather):
        if call.first or lse is None:
            call.q.write(out, call_out)
            if lse is not None:
                call.q.write(lse, call_lse)
            return
        out_rows, lse_rows = call.q.data(out), call.q.rows(lse)
        _attend.merge(out_rows, lse_rows, call_out, call_lse)
        call.q.write(out, out_rows)
        call.q.write(lse, lse_rows)
        return
    out_rows = call.q.data(out)
    if call.first or lse is None:
        out_rows.copy_(call_out)
        if lse is not None:
            call.q.rows(lse).copy_(call_lse)
        return
    _attend.merge(out_rows, call.q.rows(lse), call_out, call_lse)


def _native_ok(call: Call, qs: torch.Tensor) -> bool:
    """Whether a key-table call runs on the native kernels: fp32, or bf16 / fp16 on the blocked
    (AVX-512) ones."""
    if call.table is None or qs.device.type != "cpu" or _native.kernel() is None:
        return False
    return qs.dtype == torch.float32 or _blocked(call, qs)


def _blocked(call: Call, qs: torch.Tensor) -> bool:
    """Whether a key-table call runs on the cache-blocked kernel (planned with chunk bounds)."""
    return call.bounds is not None and _native_window(qs)


def _whole(plan: Plan) -> Call | None:
    """The call, when a plan is one ATen call over all rows of each sequence, in order."""
    if len(plan.calls) != 1 or plan.multi or plan.init:
        return None
    call = plan.calls[0]
    q = call.q
    ok = isinstance(q, Strided) and q.windows == 1 and q.offset == 0 and q.row_stride == 1 and q.length == plan.n
    return call if ok and call.table is None and call.ranges is None and call.empty is None else None


def _native_window(qs: torch.Tensor) -> bool:
    """Whether window calls run on the native kernel: on a CPU with AVX-512, head_dim a multiple
    of 32, fp32, bf16 or fp16 (widened to fp32 as loaded; fp32 output and gradients); set
    _plan.NATIVE_WINDOWS = False to compare with ATen's kernel."""
    if not (_plan.NATIVE_WINDOWS and qs.device.type == "cpu" and qs.dtype in _plan.NATIVE_DTYPES):
        return False
    if qs.shape[-1] % 32 != 0:
        return False
    mod = _native.kernel()
    return mod is not None and bool(mod.has_window())


def _runnable(call: Call, qs: torch.Tensor):
    """The call, or (a key table without the native kernel) pieces small enough to gather."""
    if call.table is None or _native_ok(call, qs):
        yield 0, call
        return
    yield from call.pieces(max(1, 8 * _plan.ROW_BUDGET // max(1, qs.shape[0] * call.k.length)))


def run_forward(plan: Plan, q, k, v, keep: bool = False):
    """(out (B, H, n, d), merged lse (B*H, n) or None, per-call lse list if ``keep``). ``out``
    is fp32 when calls are merged, else q.dtype."""
    B, H, n, d = q.shape
    seqs = B * H
    qs, ks, vs = (t.reshape(seqs, n, d).contiguous() for t in (q, k, v))
    whole = _whole(plan)
    if whole is not None:  # one call computes every row in order: its output is the output
        q_rows, k_rows, v_rows = whole.q.data(qs), whole.k.data(ks), whole.k.data(vs)
        call_out, call_lse = _attend.forward(q_rows, k_rows, v_rows, whole.mask, whole.causal, plan.scale)
        if call_out.is_contiguous():
            return call_out.view(B, H, n, d), None, [call_lse]
        out = torch.empty(B, H, n, d, dtype=q.dtype, device=q.device)
        out.view(seqs, 1, n, d).copy_(call_out)
        return out, None, [call_lse]
    # fp32 when calls are merged, or when the native kernel (fp32 output) serves low precision
    native_low = (
        q.dtype != torch.float32
        and _native_window(qs)
        and any(c.ranges is not None or _native_ok(c, qs) for c in plan.calls)
    )
    out_dtype = torch.float32 if plan.multi or native_low else q.dtype
    out = (torch.zeros if plan.init else torch.empty)(seqs, n, d, dtype=out_dtype, device=q.device)
    lse = None
    if plan.multi:
        lse = torch.full((seqs, n), NEG_INF, device=q.device) if plan.init else torch.empty(seqs, n, device=q.device)
    saved: list[torch.Tensor] = []
    for call in plan.calls:
        parts = []
        for _, piece in _runnable(call, qs):
            # native kernels write their rows in place: the first writer of the rows as they are,
            # later calls (windows, gathered keys) merged with them through the log-sum-exps
            inplace = isinstance(piece.q, Strided) and out.dtype == torch.float32
            merge = False
            if _native_ok(piece, qs):
                into = out.narrow(1, piece.q.offset, piece.table.shape[0]) if inplace and piece.first else _NOTHING
                if _blocked(piece, qs):
                    call_out, call_lse = _native.kernel().table_forward_blocked(
                        qs, ks, vs, piece.table, piece.bounds, piece.q.offset, plan.scale, into
                    )  # fmt: skip
                else:
                    call_out, call_lse = _native.kernel().table_forward(
                        qs, ks, vs, piece.table, piece.q.offset, plan.scale, into
                    )  # fmt: skip
                call_out, call_lse = call_out.unsqueeze(2), call_lse.unsqueeze(2)
            elif piece.ranges is not None and _native_window(qs):
                q_rows = piece.q.data(qs)
                merge = inplace and not piece.first and lse is not None
                into = piece.q.data(out) if inplace and (piece.first or merge) else _NOTHING
                lse_in = piece.q.rows(lse) if merge else _NOTHING
                if isinstance(piece.k, Gather):  # keys gathered while packed, no gathered copy
                    idx = piece.k.native_index()
                    call_out, call_lse = _native.kernel().gather_forward(
                        q_rows, ks, vs, idx, *piece.ranges, plan.scale, into, lse_in
                    )  # fmt: skip
                else:
                    k_rows, v_rows = piece.k.data(ks), piece.k.data(vs)
                    call_out, call_lse = _native.kernel().window_forward(
                        q_rows, k_rows, v_rows, *piece.ranges, plan.scale, into, lse_in
                    )  # fmt: skip
            else:
                into = _NOTHING
                q_rows, k_rows, v_rows = piece.q.data(qs), piece.k.data(ks), piece.k.data(vs)
                call_out, call_lse = _attend.forward(q_rows, k_rows, v_rows, piece.mask, piece.causal, plan.scale)
            if piece.empty is not None:
                call_lse = call_lse.masked_fill(piece.empty, NEG_INF)
            if not into.numel():
                _write(piece, out, lse, call_out, call_lse)
            elif lse is not None and not merge:  # written in place: only the log-sum-exps to keep
                piece.q.rows(lse).copy_(call_lse)
            parts.append(call_lse)
        if keep:
            saved.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return out.view(B, H, n, d), lse, saved


def _native_window_backward(call, call_lse, lse, qs, ks, vs, outs, douts, dq, dk, dv, scale) -> None:
    """A window call's gradients from the native kernel, the key gradients added straight into dk
    and dv: through views of K and V, or (gathered keys) at the rows of the call's index.
    ``call_lse``: the call's own log-sum-exps, ``lse``: the merged ones (None: not merged)."""
    dout_rows = call.q.data(douts)
    call_lse_kernel = call_lse if call.empty is None else call_lse.masked_fill(call.empty, 0.0)
    # merged calls: the kernel scales each row's output gradient by this call's share, exp(lse - merged lse)
    merged_lse = call.q.rows(lse) if lse is not None else _NOTHING
    q_rows, out_rows = call.q.data(qs), call.q.data(outs)
    # gathered query rows: their gradients into a buffer of the call's rows, then added at the index
    if isinstance(call.q, Strided):
        dq_rows = call.q.data(dq)
    else:
        dq_rows = torch.zeros(dout_rows.shape, dtype=torch.float32, device=dout_rows.device)
    if isinstance(call.k, Strided):
        k_rows, v_rows, idx = call.k.data(ks), call.k.data(vs), _NOTHING
        dk_rows, dv_rows = call.k.data(dk), call.k.data(dv)
    else:  # key rows read and their gradients added where they lie: no gathered copies
        k_rows, v_rows, dk_rows, dv_rows, idx = ks, vs, dk, dv, call.k.native_index()
    _native.kernel().window_backward(
        q_rows, k_rows, v_rows, *call.ranges, scale, dout_rows, out_rows, call_lse_kernel, dq_rows, dk_rows, dv_rows,
        idx, merged_lse,
    )  # fmt: skip
    if not isinstance(call.q, Strided):
        call.q.add_into(dq, dq_rows)


def run_backward(plan: Plan, q, k, v, out, lse, saved, dout):
    """Gradients (dq, dk, dv) of the plan's attention; ``out`` is the merged output (q.dtype)."""
    B, H, n, d = q.shape
    seqs = B * H
    qs, ks, vs = (t.reshape(seqs, n, d).contiguous() for t in (q, k, v))
    outs = out.reshape(seqs, n, d).contiguous()
    douts = dout.reshape(seqs, n, d).contiguous()
    grads = [torch.zeros(seqs, n, d, dtype=torch.float32, device=q.device) for _ in range(3)]
    dq, dk, dv = grads
    for call, call_lse in zip(plan.calls, saved):
        native = _native_ok(call, qs)
        if call.ranges is not None and _native_window(qs):
            _native_window_backward(call, call_lse, lse, qs, ks, vs, outs, douts, dq, dk, dv, plan.scale)
            continue
        windows = call.q.windows
        step = windows if windows == 1 or native else max(1, BACKWARD_KEY_ROWS // max(1, seqs * call.k.length))
        for m0, piece in call.pieces(step):
            piece_lse = call_lse if piece is call else call_lse[:, m0 : m0 + piece.q.windows]
            dout_rows = piece.q.data(douts)
            if lse is not None:
                merged_lse = piece.q.rows(lse)
                share = torch.where(
                    torch.isfinite(merged_lse), torch.exp(piece_lse - merged_lse), torch.zeros_like(merged_lse)
                )  # fmt: skip
                dout_rows = (dout_rows.float() * share.unsqueeze(-1)).to(q.dtype)
            if native:
                args = (
                    plan.scale, dout_rows.reshape(seqs, -1, d).float().contiguous(),
                    piece.q.data(outs).reshape(seqs, -1, d).float().contiguous(),
                    piece_lse.reshape(seqs, -1).contiguous(), dq, dk, dv,
                )  # fmt: skip
                if _blocked(piece, qs):
                    bounds = piece.bounds
                    _native.kernel().table_backward_blocked(qs, ks, vs, piece.table, bounds, piece.q.offset, *args)
                else:
                    _native.kernel().table_backward(qs, ks, vs, piece.table, piece.q.offset, *args)
                continue
            q_rows, k_rows, v_rows = piece.q.data(qs), piece.k.data(ks), piece.k.data(vs)
            piece_lse_kernel = piece_lse if piece.empty is None else piece_lse.masked_fill(piece.empty, 0.0)
            dq_piece, dk_piece, dv_piece = _attend.backward(
                dout_rows, q_rows, k_rows, v_rows, piece.q.data(outs), piece_lse_kernel, piece.mask, piece.causal,
                plan.scale,
            )  # fmt: skip
            piece.q.add_into(dq, dq_piece)
            piece.k.add_into(dk, dk_piece)
            piece.k.add_into(dv, dv_piece)
    return tuple(g.view(B, H, n, d).to(q.dtype) for g in grads)
