"""Fabricated records with quality figures against full attention (issue 20), for the quality
render tests and for a look at the figure: no benchmark is run, the figures are made up but
shaped like real ones (on random inputs a pattern's recall is about each query's share of the
keys it attends; on synthetic inputs, whose attention is concentrated, far more).

Series (causal, cpu, fp32, forward, B=1 H=8 D=64, n = 1024 .. 8192), for each inputs kind:
* dense · sdpa (the baseline)
* sliding_window(window=256), sink_window(sinks=4, window=252), strided(stride=64),
  bigbird(block=64, ...) on block_sparse and flex
* document(doc_lens=...) on block_sparse: exempt, with its note
"""

from __future__ import annotations

import math
from typing import Any

from report_fixtures import dense_time, nnz_dense, record

SIZES = (1024, 2048, 4096, 8192)
EXEMPT_NOTE = "document: its mask is the model's semantics (packed documents), not an approximation of full attention"
# pattern label -> (pattern, params, keys per query, recall on synthetic inputs at 1K, and its fall per doubling)
PATTERNS = {
    "sliding_window(window=256)": ("sliding_window", {"window": 256}, 256, 0.86, 0.03),
    "sink_window(sinks=4, window=252)": ("sink_window", {"sinks": 4, "window": 252}, 256, 0.93, 0.015),
    "strided(stride=64)": ("strided", {"stride": 64}, None, 0.80, 0.02),
    "bigbird(block=64, window_blocks=3, global_blocks=1, random_blocks=2)": ("bigbird", {"block": 64}, 384, 0.90, 0.02),
}
EFFICIENCY = {"block_sparse": 0.55, "flex": 0.35}


def nnz_of(keys: int | None, n: int) -> int:
    """Allowed pairs of a causal pattern with ``keys`` keys per query (strided: n/64 + 64)."""
    k = keys if keys is not None else 64 + n // 64
    k = min(k, n)
    return k * (k + 1) // 2 + (n - k) * k


def row_share(keys: int | None, n: int) -> float:
    """The mean over causal queries of the share of their keys a pattern with ``keys`` keys per
    query attends: what its recall is on random inputs, whose attention is nearly uniform."""
    total = 0.0
    for i in range(n):
        k = keys if keys is not None else 64 + i // 64
        total += min(k, i + 1) / (i + 1)
    return total / n


def quality_records(
    inputs: tuple[str, ...] = ("random",), sizes=SIZES, mode: str = "forward", exempt: bool = True
) -> list[dict[str, Any]]:
    out = []
    for kind in inputs:
        for n in sizes:
            d = dense_time(n)
            extra_dense = {"inputs": kind, "mode": mode}
            out.append(record("dense", "sdpa", n, d, mem=1e6, **extra_dense))
            for label, (pattern, params, keys, syn, fall) in PATTERNS.items():
                nnz = nnz_of(keys, n)
                share = row_share(keys, n)
                steps = math.log2(n / sizes[0])
                recall = share if kind == "random" else max(share, syn - fall * steps)
                recall = min(recall, 1.0)
                for backend, eff in EFFICIENCY.items():
                    q = {
                        "inputs": kind,
                        "mode": mode,
                        "nnz": nnz,
                        "density": nnz / (n * n),
                        "recall_mean": recall,
                        "recall_min": recall * 0.6,
                        "full_rel_err": 0.95 * math.sqrt(1 - recall) + (0.002 if backend == "flex" else 0.0),
                        "quality_rows": n,
                        "quality_note": None,
                    }
                    if mode == "backward":
                        q["full_grad_rel_err"] = 1.3 * math.sqrt(1 - recall)
                    time = d * nnz / nnz_dense(n) / eff
                    out.append(record(pattern, backend, n, time, params=params, label=label, mem=1e6, **q))
            if exempt:
                out.append(
                    record(
                        "document",
                        "block_sparse",
                        n,
                        d * 0.3,
                        params={"doc_lens": [n // 2, n // 2]},
                        label="document(doc_lens=[...])",
                        mem=1e6,
                        inputs=kind,
                        mode=mode,
                        quality_note=EXEMPT_NOTE,
                    )
                )
    return out
