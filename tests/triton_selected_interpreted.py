"""Run by tests/test_triton.py in a fresh process with TRITON_INTERPRET=1: block_sparse's Triton
kernels for content-selected patterns (triton_selected.py), forward and backward, on the CPU: moba
and quest in both unit orders (key-major and union) and topk_keys, at a length that is not a
multiple of the tiles, fp32 and fp16, grouped-query attention (4 query heads over 2 key/value
heads), rows with one key (every query's first one; patterns where every row of a unit start, or
every row, has only itself), a union wider than 32 units (several bit-mask words per row), head
sizes 16 and 256, against float64 dense attention under the selection the call made
(``selection.mask``). The backend's callable is used (``prepare(p)``, ``fn.selected``), so the
check judges the selection the call handed back. Prints one line per case and one per failure;
exits 1 if any. (bf16 products are wrong in Triton's interpreter, so bf16 is left to
tests/test_cuda.py on a GPU.)"""

import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before running"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_cuda import SELECTED_CASES  # noqa: E402

from sparsebench.backends.base import Problem, masked_softmax_attention  # noqa: E402
from sparsebench.backends.block_sparse import triton_selected as _tsel  # noqa: E402
from sparsebench.patterns.base import PATTERNS  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 5e-3}
N = 300

CASES = [
    # (pattern, params, dtypes, heads, kv_heads, head_dim)
    *((name, params, (torch.float32, torch.float16), 4, 2, 32) for name, params in SELECTED_CASES),
    ("quest", {"page_size": 4, "token_budget": 64}, (torch.float32,), 2, 1, 32),  # unions of up to 64 pages
    ("quest", {"page_size": 16, "token_budget": 16}, (torch.float32,), 2, 2, 32),  # own page only
    ("moba", {"chunk": 1, "topk": 1}, (torch.float32,), 1, 1, 32),  # every row: itself only
    ("moba", {"chunk": 64, "topk": 2}, (torch.float32,), 1, 1, 16),
    ("moba", {"chunk": 40, "topk": 2}, (torch.float32,), 1, 1, 256),
    ("topk_keys", {"keys": 7}, (torch.float32,), 1, 1, 256),
]


def rel_err(got, ref):
    """Largest error relative to the largest reference value; absolute where the reference is all
    zero (the gradients of q and k when every row has one key: its probability is 1 whatever
    the scores)."""
    top = ref.abs().max().item()
    return ((got.double() - ref).abs().max() / (top if top > 0 else 1.0)).item()


def check(name, params, dtype, heads, kv_heads, d) -> list[str]:
    pat = PATTERNS.get(name).from_params(params)
    p = Problem(pat, N, True, 1, heads, d, dtype, torch.device("cpu"), mode="backward", kv_heads=kv_heads)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, N, d, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(1, kv_heads, N, d, generator=g).to(dtype).requires_grad_() for _ in range(2))
    grad = torch.randn(q.shape, generator=g).to(dtype)
    out, selection = _tsel.prepare(p).selected(q, k, v)
    out.backward(grad)
    mask = selection.mask()
    keys = mask.sum(-1)
    assert int(keys.min()) == 1, "every case has rows with one key"
    group = heads // kv_heads
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    kr, vr = (t.repeat_interleave(group, 1) for t in ref_in[1:])
    ref = masked_softmax_attention(ref_in[0], kr, vr, mask)
    ref.backward(grad.double())
    errs = {"out": rel_err(out, ref)} | {f"d{x}": rel_err(t.grad, r.grad) for x, t, r in zip("qkv", (q, k, v), ref_in)}
    wrong = []
    if out.dtype != dtype or any(t.grad.dtype != dtype for t in (q, k, v)):
        wrong.append("dtype")
    wrong += [f"{key} {e:.2e}" for key, e in errs.items() if not e <= TOL[dtype]]
    return wrong, max(errs.values())


def main() -> int:
    failures = 0
    for name, params, dtypes, heads, kv_heads, d in CASES:
        token = name == "topk_keys" or params.get("chunk") == 1
        for order, dtype in ((o, t) for o in (("-",) if token else _tsel.UNIT_ORDERS) for t in dtypes):
            _tsel.UNIT_ORDER = "keys" if token else order
            t0 = time.perf_counter()
            wrong, worst = check(name, params, dtype, heads, kv_heads, d)
            label = f"{name} {params} {dtype} heads {heads}/{kv_heads} head_dim {d}" + ("" if token else f" {order}")
            verdict = "ok" if not wrong else "FAILED " + ", ".join(wrong)
            print(f"{label}: {verdict} (largest error {worst:.1e}; {time.perf_counter() - t0:.1f} s)", flush=True)
            failures += bool(wrong)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
