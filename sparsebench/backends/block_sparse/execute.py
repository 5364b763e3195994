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

from sparsebench.backends.block_sparse import attend as _attend, native as _native, plan as _plan
from sparsebench.backends.block_sparse.plan import Call, Plan
from sparsebench.backends.block_sparse.views import Gather, Strided

# Backward on ATen: key rows per piece of a call; ATen's backward returns key gradients per window
# (overlapping windows: several times the size of K), so pieces keep them in cache.
BACKWARD_KEY_ROWS = 1 << 13
NEG_INF = float("-inf")
_NOTHING = torch.empty(0)


def _write(call: Call, out, lse, o, l) -> None:
    if isinstance(call.q, Gather):
        if call.first or lse is None:
            call.q.write(out, o)
            if lse is not None:
                call.q.write(lse, l)
            return
        ov, lv = call.q.data(out), call.q.rows(lse)
        _attend.merge(ov, lv, o, l)
        call.q.write(out, ov)
        call.q.write(lse, lv)
        return
    ov = call.q.data(out)
    if call.first or lse is None:
        ov.copy_(o)
        if lse is not None:
            call.q.rows(lse).copy_(l)
        return
    _attend.merge(ov, call.q.rows(lse), o, l)


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
    c = plan.calls[0]
    ok = isinstance(c.q, Strided) and c.q.M == 1 and c.q.offset == 0 and c.q.sr == 1 and c.q.R == plan.n
    return c if ok and c.table is None and c.ranges is None and c.empty is None else None


def _native_window(qs: torch.Tensor) -> bool:
    """Whether window calls run on the native kernel: on a CPU with AVX-512, head_dim a multiple
    of 32, fp32, bf16 or fp16 (widened to fp32 as loaded; fp32 output and gradients); set
    _plan.NATIVE_WINDOWS = False to compare with ATen's kernel."""
    if not (_plan.NATIVE_WINDOWS and qs.device.type == "cpu" and qs.dtype in _plan.NATIVE_DTYPES and qs.shape[-1] % 32 == 0):
        return False
    mod = _native.kernel()
    return mod is not None and bool(mod.has_window())


def _runnable(call: Call, qs: torch.Tensor):
    """The call, or (a key table without the native kernel) pieces small enough to gather."""
    if call.table is None or _native_ok(call, qs):
        yield 0, call
        return
    yield from call.pieces(max(1, 8 * _plan.ROW_BUDGET // max(1, qs.shape[0] * call.k.R)))


def run_forward(plan: Plan, q, k, v, keep: bool = False):
    """(out (B, H, n, d), merged lse (B*H, n) or None, per-call lse list if ``keep``). ``out``
    is fp32 when calls are merged, else q.dtype."""
    B, H, n, d = q.shape
    G = B * H
    qs, ks, vs = (t.reshape(G, n, d).contiguous() for t in (q, k, v))
    whole = _whole(plan)
    if whole is not None:  # one call computes every row in order: its output is the output
        o, l = _attend.forward(whole.q.data(qs), whole.k.data(ks), whole.k.data(vs), whole.mask, whole.causal, plan.scale)
        if o.is_contiguous():
            return o.view(B, H, n, d), None, [l]
        out = torch.empty(B, H, n, d, dtype=q.dtype, device=q.device)
        out.view(G, 1, n, d).copy_(o)
        return out, None, [l]
    # fp32 when calls are merged, or when the native kernel (fp32 output) serves low precision
    native_low = q.dtype != torch.float32 and _native_window(qs) and any(
        c.ranges is not None or _native_ok(c, qs) for c in plan.calls
    )
    acc = torch.float32 if plan.multi or native_low else q.dtype
    out = (torch.zeros if plan.init else torch.empty)(G, n, d, dtype=acc, device=q.device)
    lse = None
    if plan.multi:
        lse = torch.full((G, n), NEG_INF, device=q.device) if plan.init else torch.empty(G, n, device=q.device)
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
                    o, l = _native.kernel().table_forward_blocked(
                        qs, ks, vs, piece.table, piece.bounds, piece.q.offset, plan.scale, into
                    )  # fmt: skip
                else:
                    o, l = _native.kernel().table_forward(qs, ks, vs, piece.table, piece.q.offset, plan.scale, into)
                o, l = o.unsqueeze(2), l.unsqueeze(2)
            elif piece.ranges is not None and _native_window(qs):
                qv = piece.q.data(qs)
                merge = inplace and not piece.first and lse is not None
                into = piece.q.data(out) if inplace and (piece.first or merge) else _NOTHING
                lse_in = piece.q.rows(lse) if merge else _NOTHING
                if isinstance(piece.k, Gather):  # keys gathered while packed, no gathered copy
                    idx = piece.k.native_index()
                    o, l = _native.kernel().gather_forward(qv, ks, vs, idx, *piece.ranges, plan.scale, into, lse_in)
                else:
                    kv, vv = piece.k.data(ks), piece.k.data(vs)
                    o, l = _native.kernel().window_forward(qv, kv, vv, *piece.ranges, plan.scale, into, lse_in)
            else:
                into = _NOTHING
                o, l = _attend.forward(piece.q.data(qs), piece.k.data(ks), piece.k.data(vs), piece.mask, piece.causal, plan.scale)
            if piece.empty is not None:
                l = l.masked_fill(piece.empty, NEG_INF)
            if not into.numel():
                _write(piece, out, lse, o, l)
            elif lse is not None and not merge:  # written in place: only the log-sum-exps to keep
                piece.q.rows(lse).copy_(l)
            parts.append(l)
        if keep:
            saved.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return out.view(B, H, n, d), lse, saved


def _native_window_backward(call, lw, lse, qs, ks, vs, os_, dos, gq, gk, gv, scale) -> None:
    """A window call's gradients from the native kernel, the key gradients added straight into gk
    and gv: through views of K and V, or (gathered keys) at the rows of the call's index."""
    go = call.q.data(dos)
    lk = lw if call.empty is None else lw.masked_fill(call.empty, 0.0)
    # merged calls: the kernel scales each row's go by this call's share, exp(lse - merged lse)
    lm = call.q.rows(lse) if lse is not None else _NOTHING
    qv, ov = call.q.data(qs), call.q.data(os_)
    # gathered query rows: their gradients into a buffer of the call's rows, then added at the index
    dqv = call.q.data(gq) if isinstance(call.q, Strided) else torch.zeros(go.shape, dtype=torch.float32, device=go.device)
    if isinstance(call.k, Strided):
        k, v, dk, dv, idx = call.k.data(ks), call.k.data(vs), call.k.data(gk), call.k.data(gv), _NOTHING
    else:  # key rows read and their gradients added where they lie: no gathered copies
        k, v, dk, dv, idx = ks, vs, gk, gv, call.k.native_index()
    _native.kernel().window_backward(qv, k, v, *call.ranges, scale, go, ov, lk, dqv, dk, dv, idx, lm)
    if not isinstance(call.q, Strided):
        call.q.add_into(gq, dqv)


def run_backward(plan: Plan, q, k, v, out, lse, saved, dout):
    """Gradients (dq, dk, dv) of the plan's attention; ``out`` is the merged output (q.dtype)."""
    B, H, n, d = q.shape
    G = B * H
    qs, ks, vs = (t.reshape(G, n, d).contiguous() for t in (q, k, v))
    os_ = out.reshape(G, n, d).contiguous()
    dos = dout.reshape(G, n, d).contiguous()
    grads = [torch.zeros(G, n, d, dtype=torch.float32, device=q.device) for _ in range(3)]
    gq, gk, gv = grads
    for whole, lw in zip(plan.calls, saved):
        native = _native_ok(whole, qs)
        if whole.ranges is not None and _native_window(qs):
            _native_window_backward(whole, lw, lse, qs, ks, vs, os_, dos, gq, gk, gv, plan.scale)
            continue
        M = whole.q.M
        step = M if M == 1 or native else max(1, BACKWARD_KEY_ROWS // max(1, G * whole.k.R))
        for m0, call in whole.pieces(step):
            l = lw if call is whole else lw[:, m0 : m0 + call.q.M]
            go = call.q.data(dos)
            if lse is not None:
                lm = call.q.rows(lse)
                w = torch.where(torch.isfinite(lm), torch.exp(l - lm), torch.zeros_like(lm))
                go = (go.float() * w.unsqueeze(-1)).to(q.dtype)
            if native:
                args = (
                    plan.scale, go.reshape(G, -1, d).float().contiguous(),
                    call.q.data(os_).reshape(G, -1, d).float().contiguous(), l.reshape(G, -1).contiguous(), gq, gk, gv,
                )  # fmt: skip
                if _blocked(call, qs):
                    _native.kernel().table_backward_blocked(qs, ks, vs, call.table, call.bounds, call.q.offset, *args)
                else:
                    _native.kernel().table_backward(qs, ks, vs, call.table, call.q.offset, *args)
                continue
            qv, kv, vv = call.q.data(qs), call.k.data(ks), call.k.data(vs)
            lk = l if call.empty is None else l.masked_fill(call.empty, 0.0)
            dq_c, dk_c, dv_c = _attend.backward(go, qv, kv, vv, call.q.data(os_), lk, call.mask, call.causal, plan.scale)
            call.q.add_into(gq, dq_c)
            call.k.add_into(gk, dk_c)
            call.k.add_into(gv, dv_c)
    return tuple(g.view(B, H, n, d).to(q.dtype) for g in grads)
