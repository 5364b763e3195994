"""Run by tests/test_triton.py in a fresh process with TRITON_INTERPRET=1: the Triton kernels of
block_sparse (forward and backward) on the CPU, every pattern of test_cuda.CASES and one with
rows that have no keys, fp32 and fp16, causal and not, at a length that is not a multiple of the
tile, tiles of 32, 64 and 128 taken whole or by halves, head sizes 16, 32 and 256, residue bands
as parts of their own (dilated windows, strided columns), against float64 dense attention under
the same mask. Prints one line per failure; exits 1 if any. (bf16 products are wrong in Triton's
interpreter, so bf16 is left to tests/test_cuda.py on a GPU.)"""

import os
import sys
from dataclasses import dataclass

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before running"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_cuda import CASES  # noqa: E402

from sparsebench.backends.base import masked_softmax_attention  # noqa: E402
from sparsebench.backends.block_sparse import triton as _triton  # noqa: E402
from sparsebench.patterns.base import PATTERNS, Pattern  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 5e-3}
N, D = 300, 32


@dataclass(frozen=True, kw_only=True)
class Holes(Pattern):
    """Every fifth query attends to nothing (its output and gradients are zero), the others to
    keys not divisible by 3."""

    name = "holes"

    def _allowed(self, q, k, n, causal):
        return (q % 5 != 0) & (k % 3 != 0)


def rel_err(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


def main() -> int:
    failures = 0
    patterns = [(name, PATTERNS.get(name).from_params(params)) for name, params in CASES] + [("holes", Holes())]
    runs = (
        (torch.float32, 64, "half"),
        (torch.float16, 32, "whole"),
        (torch.float32, 128, "half"),
        (torch.float32, 128, "whole"),
    )
    for name, pat in patterns:
        for causal in (True, False):
            mask = pat.mask(N, causal)
            for dtype, block, sub in runs:
                _triton.INTERPRET_SUB = sub
                g = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(1, 2, N, D, generator=g).to(dtype).requires_grad_() for _ in range(3))
                grad = torch.randn(q.shape, generator=g).to(dtype)
                out = _triton.attention_fn(_triton.build(pat, N, causal, D, "cpu", block))(q, k, v)
                out.backward(grad)
                ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
                ref = masked_softmax_attention(*ref_in, mask)
                ref.backward(grad.double())
                errs = {"out": rel_err(out, ref)} | {
                    f"d{x}": rel_err(t.grad, r.grad) for x, t, r in zip("qkv", (q, k, v), ref_in)
                }
                bad = {key: e for key, e in errs.items() if not e <= TOL[dtype]}
                if bad:
                    failures += 1
                    print(f"{pat} causal={causal} {dtype} block={block} sub={sub}: {bad}", flush=True)
    # residue bands as parts of their own, reordered by residue class, merged with the rest
    _triton.PARTS = "always"
    for name, params in (CASES[2], CASES[3]):
        pat = PATTERNS.get(name).from_params(params)
        for causal in (True, False):
            for dtype, block in ((torch.float32, 64), (torch.float16, 32)):
                g = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(1, 2, N, D, generator=g).to(dtype).requires_grad_() for _ in range(3))
                grad = torch.randn(q.shape, generator=g).to(dtype)
                plan = _triton.build(pat, N, causal, D, "cpu", block)
                assert isinstance(plan, _triton.PartsPlan)
                out = _triton.attention_fn(plan)(q, k, v)
                out.backward(grad)
                ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
                ref = masked_softmax_attention(*ref_in, pat.mask(N, causal))
                ref.backward(grad.double())
                errs = [rel_err(out, ref)] + [rel_err(t.grad, r.grad) for t, r in zip((q, k, v), ref_in)]
                if not max(errs) <= TOL[dtype]:
                    failures += 1
                    print(f"{pat} parts causal={causal} {dtype}: errors {errs}", flush=True)
    _triton.PARTS = "auto"
    # other head sizes (16: the smallest product; 256: tiles of 64 at most), fp32, tiles of 128
    for name, params in (CASES[1], CASES[8]):
        pat = PATTERNS.get(name).from_params(params)
        for d in (16, 256):
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, 1, N, d, generator=g).requires_grad_() for _ in range(3))
            grad = torch.randn(q.shape, generator=g)
            out = _triton.attention_fn(_triton.build(pat, N, True, d, "cpu", 128))(q, k, v)
            out.backward(grad)
            ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
            ref = masked_softmax_attention(*ref_in, pat.mask(N, True))
            ref.backward(grad.double())
            errs = [rel_err(out, ref)] + [rel_err(t.grad, r.grad) for t, r in zip((q, k, v), ref_in)]
            if not max(errs) <= TOL[torch.float32]:
                failures += 1
                print(f"{pat} head_dim={d}: errors {errs}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
