"""sparsebench: benchmark dense against sparse attention.

Library use::

    import sparsebench
    out = sparsebench.attention(q, k, v, pattern="sliding_window", backend="block_sparse", window=256)
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "attention"]


def attention(q, k, v, pattern: str = "dense", backend: str = "block_sparse", causal: bool = True,
              tile: int = 64, **params):
    """Attention of q, k, v (batch, heads, n, head_dim) under a named pattern, computed by a
    named backend. Raises sparsebench.errors.SparsebenchError for bad names or parameters."""
    import torch

    from sparsebench.backends.base import BACKENDS, Problem
    from sparsebench.errors import ScenarioError
    from sparsebench.patterns.base import PATTERNS

    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ScenarioError(f"q, k, v must share one (batch, heads, n, head_dim) shape; got {tuple(q.shape)}, "
                            f"{tuple(k.shape)}, {tuple(v.shape)}")
    pat = PATTERNS.get(pattern).from_params(params)
    n = q.shape[2]
    pat.check(n, causal)
    be = BACKENDS.get(backend)
    why = be.unavailable(q.device)
    p = Problem(pat, n, causal, q.shape[0], q.shape[1], q.shape[3], q.dtype, q.device,
                mode="backward" if torch.is_grad_enabled() and q.requires_grad else "forward", tile=tile)
    why = why or be().unsupported(p)
    if why:
        from sparsebench.errors import BackendUnavailable

        raise BackendUnavailable(why)
    return be().prepare(p)(q, k, v)
