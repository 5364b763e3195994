"""One fused attention call on 4-D views and its backward, for the block-sparse planner.

Queries are (X, M, L, d) and keys/values (X, M, S, d): any strides with a unit last stride, so
overlapping windows of one key tensor (``as_strided``) and stride-0 broadcasts are read in place.
``mask`` is a boolean (True = allowed) broadcastable to (X, M, L, S). Each call returns the
output and the log-sum-exp of each query row, so that calls over disjoint key sets of the same
queries can be merged exactly (``merge``).

On the CPU this is ATen's flash-attention kernel (``_scaled_dot_product_flash_attention_for_cpu``:
blocked, online softmax, no L x S score matrix in memory). Elsewhere, and where that operator
is missing, it is plain PyTorch (matmul, logsumexp, softmax) with fp32 scores: on CUDA, bf16 and
fp16 operands are multiplied as they are (tensor cores, fp32 sums), elsewhere widened to fp32.
A row without any allowed key gets a zero output and log-sum-exp 0 from both; the planner knows
such rows in advance and sets their log-sum-exp to -inf before merging.
"""

from __future__ import annotations

import math

import torch

from sparsebench.shapes import broadcast_shape

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NEG_INF = float("-inf")


def flash_ok(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in _FLASH_DTYPES and _FLASH is not None and _FLASH_BWD is not None


class Mask:
    """A boolean mask kept once, with its additive form for each dtype made on first use."""

    __slots__ = ("bool", "_add")

    def __init__(self, allowed: torch.Tensor):
        self.bool = allowed
        self._add: dict[torch.dtype, torch.Tensor] = {}

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        m = self._add.get(dtype)
        if m is None:
            zero = torch.zeros((), dtype=dtype, device=self.bool.device)
            m = torch.where(self.bool, zero, torch.tensor(NEG_INF, dtype=dtype, device=self.bool.device))
            if self.bool.numel() <= (1 << 20):  # small shared masks are cached; big ones rebuilt
                self._add[dtype] = m
        return m

    def to(self, device: torch.device) -> "Mask":
        return self if self.bool.device == device else Mask(self.bool.to(device))

    @property
    def windows(self) -> int:
        """Size of the mask's window dimension (1: one mask shared by all windows)."""
        return self.bool.shape[1]

    @property
    def stored_bytes(self) -> int:
        return self.bool.numel() * self.bool.element_size()


class RangeMask(Mask):
    """A (1, 1, L, S) mask that is one key range per row, ``lo[r] <= s <= hi[r]`` (none where
    lo > hi), kept as the ranges: 8 bytes a row instead of S. Kernels that read ranges (the
    native ones) never make the booleans; the others get them built on each use."""

    __slots__ = ("lo", "hi", "keys")

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, keys: int):
        self.lo, self.hi, self.keys = lo, hi, keys
        self._add = {}

    @property
    def bool(self) -> torch.Tensor:  # type: ignore[override]
        s = torch.arange(self.keys, device=self.lo.device)
        return ((s >= self.lo[:, None]) & (s <= self.hi[:, None]))[None, None]

    def to(self, device: torch.device) -> "Mask":
        return self if self.lo.device == device else RangeMask(self.lo.to(device), self.hi.to(device), self.keys)

    @property
    def windows(self) -> int:
        return 1

    @property
    def stored_bytes(self) -> int:
        return self.lo.numel() * self.lo.element_size() + self.hi.numel() * self.hi.element_size()


def forward(q, k, v, mask: Mask | None, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (X, M, L, d) in q.dtype, lse (X, M, L) fp32). ``causal`` is top-left: row t sees keys <= t."""
    if flash_ok(q):
        add = None if mask is None else mask.additive(q.dtype)
        out, lse = _FLASH(q, k, v, 0.0, causal, attn_mask=add, scale=scale)
        return out, lse
    return _math_forward(q, k, v, mask, causal, scale)


def backward(go, q, k, v, out, lse, mask: Mask | None, causal: bool, scale: float):
    """Gradients of one call. ``out`` may be the merged output of several calls and ``go`` the
    output gradient scaled by this call's share exp(lse_call - lse_merged): with ``lse`` the
    call's own log-sum-exp this gives the exact gradient of the merged attention (the softmax
    term uses rowsum(go * out) of the merged output, as split-KV flash attention does)."""
    if flash_ok(q):
        add = None if mask is None else mask.additive(q.dtype)
        return _FLASH_BWD(go, q, k, v, out, lse, 0.0, causal, attn_mask=add, scale=scale)
    return _math_backward(go, q, k, v, out, lse, mask, causal, scale)


_LOW = (torch.bfloat16, torch.float16)
# fp32 score elements per piece of the plain-PyTorch path: a larger call runs by pieces of query
# rows (one call of the dense pattern at n = 32768 would need 64 GiB at once on a GPU)
MATH_ELEMS = 1 << 26
# (device type, dtype) -> whether this torch offers bmm(..., out_dtype=float32) there
_BMM_OUT_DTYPE: dict[tuple[str, torch.dtype], bool] = {}


def _bmm_out_dtype_ok(t: torch.Tensor) -> bool:
    """Probed once per device type and dtype on a tiny product, so that an error of a real call
    (out of memory, say) is raised as it is instead of switching paths."""
    key = (t.device.type, t.dtype)
    ok = _BMM_OUT_DTYPE.get(key)
    if ok is None:
        a = torch.ones(1, 2, 2, dtype=t.dtype, device=t.device)
        try:
            ok = torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            ok = False
        _BMM_OUT_DTYPE[key] = ok
    return ok


def _tensor_cores(t: torch.Tensor) -> bool:
    """CUDA inputs in bf16 / fp16: multiplied as they are (fp32 sums) instead of widened first."""
    return t.is_cuda and t.dtype in _LOW


def _product_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result. Low-precision CUDA operands are multiplied as they are (bmm with
    out_dtype: exact products and fp32 sums, the same values as widening both first up to the
    order of the sums, without the widened copies and on the tensor cores); other operands, or
    where that operator is missing, are widened to fp32."""
    if _tensor_cores(a) and _bmm_out_dtype_ok(a):
        lead = broadcast_shape(a.shape[:-2], b.shape[:-2])
        a3 = a.expand(*lead, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
        b3 = b.expand(*lead, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
        return torch.bmm(a3, b3, out_dtype=torch.float32).view(*lead, a.shape[-2], b.shape[-1])
    return torch.matmul(a.float(), b.float())


def _scores(q, k, mask, causal, scale, row0=0):
    """fp32 scores with -inf where not allowed (made once, then updated in place). ``row0``: the
    first query row's index (a piece of a causal call: row t sees keys <= row0 + t)."""
    s = _product_fp32(q, k.transpose(-1, -2)).mul_(scale)
    if causal:
        L, S = s.shape[-2:]
        s.masked_fill_(torch.ones(L, S, dtype=torch.bool, device=s.device).triu(1 + row0), NEG_INF)
    if mask is not None:
        s.masked_fill_(~mask.bool, NEG_INF)
    return s


def _probs(s, lse):
    """exp(s - lse) in place of the scores."""
    return s.sub_(lse.unsqueeze(-1)).exp_()


def _mm(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """a @ b: in ``like``'s low precision with fp32 sums on CUDA (the probabilities rounded to it,
    as flash attention does), else in fp32."""
    if _tensor_cores(like):
        return torch.matmul(a.to(like.dtype), b.to(like.dtype))
    return torch.matmul(a.float(), b.float())


def _pieces(q, k, causal) -> list[tuple[int, int, int]]:
    """(first row, end row, keys seen) of each piece of query rows, so that no piece's fp32 score
    matrix exceeds MATH_ELEMS (a causal piece sees only the keys before its end)."""
    L, S = q.shape[-2], k.shape[-2]
    lead = math.prod(broadcast_shape(q.shape[:-2], k.shape[:-2]))
    step = max(1, MATH_ELEMS // max(1, lead * S))
    return [(r0, min(L, r0 + step), min(S, r0 + step) if causal else S) for r0 in range(0, L, step)]


def _piece_mask(mask: Mask | None, r0: int, r1: int, s1: int) -> Mask | None:
    if mask is None:
        return None
    b = mask.bool
    if b.dim() >= 2 and b.shape[-2] > 1:
        b = b[..., r0:r1, :]
    if b.dim() >= 1 and b.shape[-1] > 1:
        b = b[..., :s1]
    return Mask(b)


def _math_forward(q, k, v, mask, causal, scale):
    pieces = _pieces(q, k, causal)
    if len(pieces) == 1:
        return _forward_piece(q, k, v, mask, causal, scale, 0)
    lead = broadcast_shape(q.shape[:-2], k.shape[:-2])
    out = q.new_empty(*lead, q.shape[-2], v.shape[-1])
    lse = torch.empty(*lead, q.shape[-2], dtype=torch.float32, device=q.device)
    for r0, r1, s1 in pieces:
        o, piece_lse = _forward_piece(
            q[..., r0:r1, :], k[..., :s1, :], v[..., :s1, :], _piece_mask(mask, r0, r1, s1), causal, scale, r0
        )
        out[..., r0:r1, :] = o
        lse[..., r0:r1] = piece_lse
    return out, lse


def _forward_piece(q, k, v, mask, causal, scale, row0):
    s = _scores(q, k, mask, causal, scale, row0)
    lse = torch.logsumexp(s, dim=-1)
    lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return _mm(_probs(s, lse), v, q).to(q.dtype), lse


def _math_backward(go, q, k, v, out, lse, mask, causal, scale):
    pieces = _pieces(q, k, causal)
    if len(pieces) == 1:
        dq, dk, dv = _backward_piece(go, q, k, v, out, lse, mask, causal, scale, 0)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    lead = broadcast_shape(q.shape[:-2], k.shape[:-2])
    dq = q.new_empty(*lead, *q.shape[-2:])
    dk = torch.zeros(*lead, *k.shape[-2:], dtype=torch.float32, device=k.device)
    dv = torch.zeros(*lead, *v.shape[-2:], dtype=torch.float32, device=v.device)
    for r0, r1, s1 in pieces:
        dq_p, dk_p, dv_p = _backward_piece(
            go[..., r0:r1, :], q[..., r0:r1, :], k[..., :s1, :], v[..., :s1, :], out[..., r0:r1, :],
            lse[..., r0:r1], _piece_mask(mask, r0, r1, s1), causal, scale, r0,
        )  # fmt: skip
        dq[..., r0:r1, :] = dq_p
        dk[..., :s1, :] += dk_p
        dv[..., :s1, :] += dv_p
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _backward_piece(go, q, k, v, out, lse, mask, causal, scale, row0):
    p = _probs(_scores(q, k, mask, causal, scale, row0), lse)
    dv = _mm(p.transpose(-1, -2), go, q)
    dp = _product_fp32(go, v.transpose(-1, -2))
    dsum = (go.float() * out.float()).sum(-1, keepdim=True)
    ds = p.mul_(dp.sub_(dsum)).mul_(scale)
    return _mm(ds, k, q), _mm(ds.transpose(-1, -2), q, q), dv


def merge(out: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, o_lse: torch.Tensor) -> None:
    """In place: (out, lse) <- the attention over the union of both key sets (out's and o's, whose
    row log-sum-exp is ``o_lse``): weights from the row log-sum-exps, then one pass over the outputs
    (out + share * (o - out))."""
    m = torch.maximum(lse, o_lse)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa = torch.exp(lse - m)
    wb = torch.exp(o_lse - m)
    s = wa + wb
    lse.copy_(m + torch.log(s))
    share = torch.where(s > 0, wb / s, torch.zeros_like(s))  # of the new part; the rest stays
    out.lerp_(o.to(out.dtype), share.unsqueeze(-1).to(out.dtype))
