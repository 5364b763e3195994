"""How concentrated full causal attention is on given q and k: the figures the synthetic
generator's defaults are set against (synthetic.py cites the published ones). Computed on a
sample of query rows, one head at a time, so that no n x n matrix is formed.

``python -m sparsebench.inputs.calibration [N]`` prints them for the random inputs and the
synthetic ones at their defaults (8 heads, head_dim 64, n = 4096 unless N is given)."""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Concentration:
    """Means over the sampled query rows and the heads of full causal attention's probabilities."""

    first_token: float  # the share of a query's attention on key 0
    first_four: float  # on keys 0-3
    window: float  # on the last ``window`` keys (i - window < j <= i)
    sink_window: float  # on keys 0-3 or the last ``window``
    top_share: float  # on the query's ``top`` largest-probability keys (a share of its past)
    sparse: float  # share of a row's entries below 1% of its largest (H2O's sparsity)
    first_token_heads: tuple[float, float]  # the least and the largest head's first-token share
    window_keys: int
    top: float
    rows: int


def measure(q, k, *, window: int = 256, top: float = 0.02, rows: int = 64, first: int = 256) -> Concentration:
    """The concentration of full causal attention (scale 1/sqrt(d)) of q (B, H, n, d) over k
    (B, Hk, n, d), on ``rows`` query rows spread evenly over positions ``first``..n-1."""
    import torch

    b, h, n, d = q.shape
    group = h // k.shape[1]
    pos = torch.linspace(min(first, n - 1), n - 1, rows).round().long().unique()
    j = torch.arange(n)
    allowed = j[None, :] <= pos[:, None]  # (R, n)
    in_window = allowed & (j[None, :] > pos[:, None] - window)
    sums = torch.zeros(6, dtype=torch.float64)
    count = 0
    per_head = []
    for bi in range(b):
        for hi in range(h):
            s = (q[bi, hi, pos].double() @ k[bi, hi // group].double().T) / d**0.5
            p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
            kth = (top * (pos + 1).double()).ceil().long().clamp(min=1)  # per row: the top share of its past
            ordered = p.sort(dim=-1, descending=True).values.cumsum(-1)
            top_mass = ordered.gather(1, (kth - 1)[:, None]).squeeze(1)
            below = ((p < 0.01 * p.max(-1, keepdim=True).values) & allowed).sum(-1).double() / (pos + 1).double()
            sums += torch.stack(
                [
                    p[:, 0].mean(),
                    p[:, :4].sum(-1).mean(),
                    (p * in_window).sum(-1).mean(),
                    (p * (in_window | (j[None, :] < 4))).sum(-1).mean(),
                    top_mass.mean(),
                    below.mean(),
                ]
            )
            per_head.append(float(p[:, 0].mean()))
            count += 1
    m = (sums / count).tolist()
    return Concentration(
        *m, first_token_heads=(min(per_head), max(per_head)), window_keys=window, top=top, rows=len(pos)
    )


def main(argv: list[str]) -> None:
    import statistics

    from sparsebench.inputs import random, synthetic

    n = int(argv[0]) if argv else 4096
    shape = dict(batch=1, heads=8, kv_heads=8, seq_len=n, head_dim=64)
    seeds = (0, 1, 2)
    print(f"n = {n}, 8 heads, head_dim 64, seeds {seeds}: means over 32 query rows from position 256 and the heads")
    print(
        f"{'inputs':<10} {'key 0':>7} {'per head':>11} {'keys 0-3':>8} {'last 256':>8} {'4 + 256':>8} {'top 2%':>7} "
        f"{'<1% max':>8}"
    )
    for name, make in (
        ("random", lambda seed: random.generate(seed=seed, **shape)),
        ("synthetic", lambda seed: synthetic.generate(synthetic.Knobs(), seed=seed, **shape)),
    ):
        got = [measure(*make(seed)[:2], rows=32) for seed in seeds]

        def mean(what):
            return statistics.mean(getattr(c, what) for c in got)

        low, high = min(c.first_token_heads[0] for c in got), max(c.first_token_heads[1] for c in got)
        print(
            f"{name:<10} {mean('first_token'):>7.3f} {low:>5.2f}-{high:<5.2f} {mean('first_four'):>8.3f} "
            f"{mean('window'):>8.3f} {mean('sink_window'):>8.3f} {mean('top_share'):>7.3f} {mean('sparse'):>8.3f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
