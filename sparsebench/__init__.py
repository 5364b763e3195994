"""sparsebench: benchmark dense against sparse attention.

Library use (``sparsebench.api``; torch is imported on the first call, not by ``import sparsebench``)::

    import sparsebench
    out = sparsebench.attention(q, k, v, pattern="sliding_window", backend="block_sparse", window=256)

    fn = sparsebench.prepare("sliding_window", 4096, window=256, batch=1, heads=8, head_dim=64)
    out = fn(q, k, v)  # the backend's plan is built once, in prepare

    # grouped-query attention: k and v with fewer heads than q (kv_heads divides heads)
    fn = sparsebench.prepare("sliding_window", 4096, window=256, batch=1, heads=32, kv_heads=8, head_dim=64)

    sw = sparsebench.pattern("sliding_window", window=256)  # mask, block layout, nnz, KV retention

    # how far the pattern is from full attention on these inputs: full_rel_err, recall_mean, ...
    sparsebench.quality(q, k, v, pattern="sliding_window", window=256)
"""

from __future__ import annotations

from sparsebench.api import attention, pattern, prepare, quality

__version__ = "0.1.0"

__all__ = ["__version__", "attention", "pattern", "prepare", "quality"]
