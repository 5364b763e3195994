"""Issue 21's CPU targets for block_sparse on content-selected patterns, as ratios measured in one
process: dense SDPA (is_causal) against selection + kernel for moba (chunk 512, topk 4), quest
(page 64, budget 2048) and topk_keys (2048 keys, index_dim 32), fp32, batch 1, 8 heads of 64.

    speedup = dense median / (selection + kernel) median; ideal = causal dense nnz / selection nnz;
    efficiency = speedup / ideal; select share = selection median / (selection + kernel) median;
    each by wall-clock time and by the process's CPU time (see ``median_time``).

The selections are the ones block_sparse's call makes (``fn.select``: topk_keys' native token
selection, moba's and quest's native unit selection) where sparsebench has the patterns, else this
script's stand-ins: simple, correct selections by the issue's definitions (moba's gate, quest's
bound, topk_keys' seeded projection), made blockwise over queries so that no n x n tensor
exists. Also moba's time exponent over n (selection included) and topk_keys'.

    PYTHONPATH=. python scripts/dynamic_targets.py [--n 32768] [--exponent 8192,16384,32768,65536,131072]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsebench.backends.block_sparse import selected as _selected

BLOCK_ROWS = 512  # query rows per block of a stand-in selection


@dataclass(frozen=True)
class Sel:
    n: int
    unit: int
    index: torch.Tensor


def _with_own(chosen: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Chosen unit ids (-1: none; all before the row's own unit) ascending, then the own unit,
    then the -1 padding (int32)."""
    big = torch.iinfo(torch.int64).max
    chosen = torch.where(chosen >= 0, chosen, big).sort(-1).values
    ids = torch.cat([chosen, own.expand(*chosen.shape[:-1], 1)], -1)
    missing = (chosen == big).sum(-1, keepdim=True)  # move the own unit before the padding
    slot = torch.arange(ids.shape[-1])
    place = torch.where(
        slot < ids.shape[-1] - 1 - missing, slot, torch.where(slot == ids.shape[-1] - 1, slot - missing, slot + 1)
    )
    out = torch.empty_like(ids).scatter_(-1, place.expand_as(ids), ids)
    return torch.where(out == big, -1, out).to(torch.int32)


def _unit_select(scores: torch.Tensor, unit: int, slots: int) -> Sel:
    """Own unit plus the slots - 1 best earlier units by ``scores`` (B, H, n, units)."""
    n, units = scores.shape[-2:]
    own = torch.arange(n) // unit
    take = min(slots, units) - 1
    if take == 0:
        return Sel(n, unit, own.expand(*scores.shape[:2], n)[..., None].to(torch.int32).contiguous())
    scores.masked_fill_(torch.arange(units)[None, :] >= own[:, None], float("-inf"))
    top = scores.topk(take, dim=-1)
    chosen = torch.where(torch.isfinite(top.values), top.indices, -1)
    return Sel(n, unit, _with_own(chosen, own[:, None]))


def moba_select(q, k, chunk: int, topk: int) -> Sel:
    """The gate q . mean(K over the chunk), n x n / chunk scores (no n x n)."""
    B, H, n, d = q.shape
    units = math.ceil(n / chunk)
    means = torch.stack([k[:, :, u * chunk : (u + 1) * chunk].float().mean(2) for u in range(units)], 2)
    means = means.repeat_interleave(H // k.shape[1], 1)
    return _unit_select(q.float() @ means.transpose(-1, -2), chunk, topk)


def quest_select(q, k, page: int, budget: int) -> Sel:
    """The bound sum_d max(q_d min_d, q_d max_d) over each page's min and max keys, as two
    products (max_d where q_d > 0, min_d where q_d < 0), n x n / page scores."""
    B, H, n, d = q.shape
    units = math.ceil(n / page)
    kf = k.float().repeat_interleave(H // k.shape[1], 1)
    lo = torch.stack([kf[:, :, u * page : (u + 1) * page].amin(2) for u in range(units)], 2)
    hi = torch.stack([kf[:, :, u * page : (u + 1) * page].amax(2) for u in range(units)], 2)
    qf = q.float()
    bound = qf.clamp(min=0) @ hi.transpose(-1, -2) + qf.clamp(max=0) @ lo.transpose(-1, -2)
    return _unit_select(bound, page, max(1, budget // page))


def topk_select(q, k, keys: int, index_dim: int = 32, seed: int = 0) -> Sel:
    """Itself plus the ``keys`` earlier keys with the highest indexer score: q and k projected by
    one seeded Gaussian projection, the blockwise native selection (selected.select_top_keys)."""
    proj = torch.randn(q.shape[-1], index_dim, generator=torch.Generator().manual_seed(seed))
    return Sel(q.shape[2], 1, _selected.select_top_keys(q.float() @ proj, k.float() @ proj, keys))


def nnz(sel) -> int:
    """Allowed pairs of a selection (all heads), counted per unit without a mask, by rows."""
    total = 0
    for r0 in range(0, sel.n, BLOCK_ROWS):
        idx = sel.index[:, :, r0 : r0 + BLOCK_ROWS].long()
        i = torch.arange(r0, r0 + idx.shape[2])[:, None]
        ulen = torch.clamp(sel.n - idx * sel.unit, max=sel.unit)
        seen = torch.clamp(i - idx * sel.unit + 1, min=0)
        total += int(torch.where(idx >= 0, torch.minimum(ulen, seen), 0).sum())
    return total


def median_time(fn, repeats: int) -> tuple[float, float]:
    """Medians of the wall-clock time and of this process's CPU time (all its threads) of a call,
    after one untimed call. On a machine that others share, CPU-time ratios stay near what a
    quiet machine's wall-clock ratios read (both sides use every core); wall-clock ones do not."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def selector(name: str, params: dict, head_dim: int = 64):
    """The selection block_sparse's call makes (its ``fn.select``: the native kernels for an
    indexer's token selection and for a unit selection whose score they know, else the pattern's
    own) where sparsebench has the pattern, else this script's stand-in."""
    from sparsebench.patterns.base import PATTERNS

    try:
        pattern = PATTERNS.get(name).from_params(params)
    except Exception:  # noqa: BLE001 - not registered yet: the stand-in
        own = {"moba": moba_select, "quest": quest_select, "topk_keys": topk_select}[name]
        return (lambda q, k: own(q, k, *params.values())), "stand-in"
    native = _selected.native_selector(pattern, head_dim, "cpu")
    return (native, "block_sparse native") if native is not None else (pattern.select, "sparsebench")


CASES = {
    "moba": {"chunk": 512, "topk": 4},
    "quest": {"page_size": 64, "token_budget": 2048},
    "topk_keys": {"keys": 2048, "index_dim": 32},
}


def inputs(n: int, heads: int = 8, d: int = 64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, heads, n, d, generator=g) for _ in range(3)]


def one(name: str, n: int, repeats: int, dense: tuple[float, float] | None = None) -> dict:
    """Ratios of one pattern at n, by wall-clock time and by CPU time."""
    q, k, v = inputs(n)
    select, source = selector(name, CASES[name])
    with torch.no_grad():
        if dense is None:
            dense = median_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeats)
        sel = select(q, k)
        ideal = 8 * n * (n + 1) / 2 / nnz(sel)
        t_select = median_time(lambda: select(q, k), repeats)
        t_kernel = median_time(lambda: _selected.attend(sel, q, k, v), repeats)
        t_call = median_time(lambda: _selected.attend(select(q, k), q, k, v), repeats)
    out = dict(pattern=name, n=n, source=source, ideal=ideal, dense=dense)
    for clock, at in (("wall", 0), ("cpu", 1)):
        speedup = dense[at] / t_call[at]
        out[clock] = dict(
            dense_s=dense[at], select_s=t_select[at], kernel_s=t_kernel[at], call_s=t_call[at], speedup=speedup,
            efficiency=speedup / ideal, select_share=t_select[at] / t_call[at],
        )  # fmt: skip
    return out


def exponent(name: str, sizes: list[int], repeats: int) -> dict[str, float]:
    """Least-squares slope of log(time) on log(n), selection included, by each clock."""
    times: dict[str, list[float]] = {"wall": [], "cpu": []}
    for n in sizes:
        q, k, v = inputs(n)
        select, _ = selector(name, CASES[name])
        with torch.no_grad():
            wall, cpu = median_time(lambda: _selected.attend(select(q, k), q, k, v), repeats)
        times["wall"].append(wall)
        times["cpu"].append(cpu)
        print(f"  {name} n={n}: {wall:.3f} s wall, {cpu:.3f} s CPU (selection + kernel)", flush=True)
    x = [math.log(n) for n in sizes]
    mx = statistics.mean(x)
    slopes = {}
    for clock, ts in times.items():
        y = [math.log(t) for t in ts]
        my = statistics.mean(y)
        slopes[clock] = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
    return slopes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--patterns", default="moba,quest,topk_keys")
    ap.add_argument("--exponent", default="8192,16384,32768,65536,131072", help="moba's sizes ('' to skip)")
    ap.add_argument("--topk-exponent", default="8192,16384,32768", help="topk_keys' sizes ('' to skip)")
    args = ap.parse_args()
    why = _selected.native_missing()
    if why:
        raise SystemExit(why)
    print(f"threads {torch.get_num_threads()}, fp32, batch 1, 8 heads, head_dim 64, causal", flush=True)
    dense = None
    for name in filter(None, args.patterns.split(",")):
        r = one(name, args.n, args.repeats, dense)
        dense = r["dense"]
        for clock in ("wall", "cpu"):
            c = r[clock]
            print(
                f"{name} n={r['n']} ({r['source']} selection), {clock}: dense {c['dense_s']:.3f} s, call "
                f"{c['call_s']:.3f} s (select {c['select_s']:.3f} s, kernel {c['kernel_s']:.3f} s); speedup "
                f"{c['speedup']:.2f}, ideal {r['ideal']:.2f}, efficiency {c['efficiency']:.2f}, select share "
                f"{c['select_share']:.2f}",
                flush=True,
            )
    for name, sizes in (("moba", args.exponent), ("topk_keys", args.topk_exponent)):
        if sizes:
            ns = [int(s) for s in sizes.split(",")]
            slopes = exponent(name, ns, args.repeats)
            print(f"{name} time exponent {ns[0]}..{ns[-1]}: {slopes['wall']:.2f} wall, {slopes['cpu']:.2f} CPU")


if __name__ == "__main__":
    main()
