"""Measure one case: build inputs, prepare the backend (setup, timed apart), warm up (the first
call timed apart as compilation for compiled backends), time repeated calls with device syncs,
measure peak memory (on the CPU all of it with freed blocks kept for the next call, as a caching
allocator does), check the output against dense attention under the same mask, and, untimed,
set it against full attention (its quality: ``case_quality``)."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from sparsebench import quality_figures, stats
from sparsebench.backends.base import BACKENDS, Problem, masked_softmax_attention
from sparsebench.measure import slowdown
from sparsebench.measure.device import TORCH_DTYPES, sync
from sparsebench.measure.memory import PeakMemory, freed_memory_reused
from sparsebench.patterns.base import PATTERNS
from sparsebench.patterns.selection import content_selected
from sparsebench.results import spread
from sparsebench.scenario import Case

TOLERANCE = {"fp32": 2e-4, "fp16": 2e-2, "bf16": 6e-2}
# backward mode: the largest gradient error relative to the largest reference gradient
GRAD_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 6e-2}


@dataclass(frozen=True)
class Measurement:
    """Raw per-call times; everything else is derived (cf. torch.utils.benchmark)."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def iqr(self) -> float:
        return stats.iqr(self.times)

    @property
    def noisy(self) -> bool:
        return spread.noisy(self.times)


def time_calls(call: Callable[[], Any], device, *, repeats: int, min_time_s: float, max_repeats: int) -> Measurement:
    """Time ``call`` (synced before and after) ``repeats`` times, and more while the total is
    under ``min_time_s`` (up to ``max_repeats``). ``SPARSEBENCH_TEST_SLOWDOWN`` stretches each."""
    times: list[float] = []
    total = 0.0
    f = slowdown.factor()
    while len(times) < repeats or (total < min_time_s and len(times) < max_repeats):
        sync(device)
        t0 = time.perf_counter()
        call()
        sync(device)
        slowdown.stretch(t0, f)
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
    return Measurement(tuple(times))


def probe(device: torch.device, rounds: int = 3) -> float:
    """Seconds for a fixed matmul workload on ``device`` (the fastest of ``rounds``): taken before
    and after each case, it shows how the machine's speed moved between cases (other tenants,
    clocks), which a ratio of two cases measured at different times silently includes. A few
    milliseconds of large products: short enough to cost little, long enough that one stalled
    thread does not dominate it; the fastest round, as a burst of load only ever adds time. The
    products write into one preallocated output: the probe times the machine, not the allocator
    (a fresh 1 MiB output each time is a mapping of its own, faulted in, once memory.py pins
    glibc's mmap threshold)."""
    size = 2048 if device.type == "cuda" else 512
    a = torch.randn(size, size, device=device)
    out = torch.empty_like(a)
    times = []
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, a, out=out)
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


_warmed = False


def warm_process() -> None:
    """Pay this process's one-time costs before its first case is measured: the first CPU
    attention calls (oneDNN and thread-pool buffers) and, where they are already built, loading
    and first running the native kernels (the library, its threads, the caching allocator
    installed). The first case of a worker would otherwise carry them in its peak memory (the
    README's "Performance on a CPU" gives the figures). A backend's own (a compiler's modules)
    are loaded before its first case (``load_backend``); building the kernels, compiling (flex,
    Triton) and autotuning stay the first call's cost, and what that call leaves resident is
    kept out of the peak (``PeakMemory.one_time``)."""
    global _warmed
    if _warmed:
        return
    _warmed = True
    try:
        _warm()
    except Exception:  # noqa: BLE001 - best effort: a case must not fail for its warm-up
        pass
    # What exists now (torch's modules, this process's imports) lives as long as the process:
    # out of the garbage collector's way, the full collections before each memory measurement
    # take milliseconds instead of a tenth of a second each (a third of a short run's time).
    gc.freeze()


def _warm() -> None:
    import torch.nn.functional as F

    from sparsebench.backends import block_sparse

    q = torch.ones(1, 2, 64, 16)  # not randn: the global random state stays as it was
    mask = torch.ones(64, 64, dtype=torch.bool).tril()
    with torch.no_grad():
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    if block_sparse.native_loaded():  # where already built: loading them builds nothing
        # the kernels' own first use: their OpenMP threads, and the caching allocator installed
        with freed_memory_reused("cpu"):
            block_sparse.warm_up()


_loaded: set[tuple[type, str]] = set()


def load_backend(backend, device: torch.device) -> None:
    """The backend's one-time costs in this process (``Backend.load``: the modules its prepare
    imports), paid once per device before its first case is measured."""
    key = (type(backend), str(device))
    if key not in _loaded:
        _loaded.add(key)
        type(backend).load(device)
        gc.collect()


def make_problem(case: Case) -> Problem:
    pattern = PATTERNS.get(case.pattern).from_params(case.params)
    return Problem(
        pattern=pattern,
        seq_len=case.seq_len,
        causal=case.causal,
        batch=case.batch,
        heads=case.heads,
        head_dim=case.head_dim,
        dtype=TORCH_DTYPES[case.dtype],
        device=torch.device(case.device),
        mode=case.mode,
        tile=case.tile,
        kv_heads=case.kv_heads,
    )


def inputs(p: Problem, seed: int = 0, requires_grad: bool = False, case: Case | None = None):
    """q (batch, heads, n, head_dim), k and v (batch, kv_heads, n, head_dim): the inputs ``case``
    names (sparsebench.inputs: random, synthetic or a recorded file); without a case, seeded
    normals (``seed``), the random kind."""
    from sparsebench.inputs import Source, make

    source = Source.of_case(case) if case is not None else Source(kind="random", seed=seed)
    shape = dict(batch=p.batch, heads=p.heads, kv_heads=p.kv_heads, seq_len=p.seq_len, head_dim=p.head_dim)
    return [t.requires_grad_(requires_grad) for t in make(source, **shape, dtype=p.dtype, device=p.device)]


def _repeated(q, k, v):
    """fp32 copies of k and v repeated for every query head (query head h reads key/value head
    h // group): the reference's own grouped-query attention, independent of any backend's."""
    group = q.shape[1] // k.shape[1]
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def _check_rows(p: Problem, exact_max_elems: int, sample_rows: int, seed: int, device) -> torch.Tensor | None:
    """None when batch*heads*n*n fits ``exact_max_elems`` (everything is checked), else the query
    rows to check: the first, the last and ``sample_rows`` seeded random ones
    (``quality_figures.sampled_rows``)."""
    n = p.seq_len
    if p.batch * p.heads * n * n <= exact_max_elems:
        return None
    return quality_figures.sampled_rows(n, sample_rows, seed, device)


def attended(p: Problem, rows: torch.Tensor | None = None, selection: Any = None, device=None) -> torch.Tensor:
    """The keys the case attended, as a bool mask that broadcasts to (batch, heads, rows, n): of
    every query (``rows`` None, only for small n) or of the given query rows. A pattern fixed by
    positions answers from its mask, (n, n) or (rows, n); a content-selected pattern's keys are
    the ``selection`` its call made (handed back by the backend), whose ``mask(rows)`` answers
    per batch and head."""
    if selection is not None:
        return selection.mask(rows)
    if rows is None:
        return p.pattern.mask(p.seq_len, p.causal, device=device if device is not None else p.device)
    return p.pattern.rows(rows, p.seq_len, p.causal)


def reference_error(
    p: Problem, q, k, v, out, *, exact_max_elems: int, sample_rows: int, selection: Any = None
) -> tuple[float, str]:
    """Max abs error of ``out`` against fp32 dense attention under the pattern's mask: the whole
    output where batch*heads*n*n fits ``exact_max_elems``, else ``sample_rows`` query rows
    (first, last and seeded random ones). Grouped-query k and v are repeated for the reference
    (``k.repeat_interleave(group, dim=1)``), never run through a backend's own grouped path."""
    qf, kf, vf = (t.detach().float() for t in (q, k, v))
    kf, vf = _repeated(qf, kf, vf)
    rows = _check_rows(p, exact_max_elems, sample_rows, 1, q.device)
    if rows is None:
        ref = masked_softmax_attention(qf, kf, vf, attended(p, None, selection, q.device))
        return float((out.detach().float() - ref).abs().max()), "exact"
    mask = attended(p, rows, selection)
    ref = masked_softmax_attention(qf[:, :, rows], kf, vf, mask)
    return float((out.detach()[:, :, rows].float() - ref).abs().max()), "sampled"


def gradient_error(
    p: Problem, q, k, v, grad, grads, *, exact_max_elems: int, sample_rows: int, selection: Any = None
) -> tuple[float, str]:
    """Largest error of the backend's gradients ``grads`` (of q, k and v, for output gradient
    ``grad``) relative to the largest gradient of fp32 dense attention under the pattern's mask:
    all three where batch*heads*n*n fits ``exact_max_elems``, else the query gradient of
    ``sample_rows`` rows (a row's query gradient depends on that row alone; key and value
    gradients sum over every query, so they are checked only exactly). Grouped-query k and v
    are repeated for the reference (their gradients summed over each group by autograd)."""
    qf, kf, vf = (t.detach().float() for t in (q, k, v))
    gf = grad.float()
    rows = _check_rows(p, exact_max_elems, sample_rows, 2, q.device)
    if rows is None:
        ins = [t.clone().requires_grad_(True) for t in (qf, kf, vf)]
        mask = attended(p, None, selection, q.device)
        masked_softmax_attention(ins[0], *_repeated(*ins), mask).backward(gf)
        pairs, how = list(zip(grads, (t.grad for t in ins))), "exact"
    else:
        qr = qf[:, :, rows].clone().requires_grad_(True)
        mask = attended(p, rows, selection)
        masked_softmax_attention(qr, *_repeated(qr, kf, vf), mask).backward(gf[:, :, rows])
        pairs, how = [(grads[0][:, :, rows], qr.grad)], "sampled"
    err = max(float((got.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)) for got, ref in pairs)
    return err, how


def case_quality(case: Case, p: Problem, q, k, v, out, *, grad=None, selection: Any = None) -> dict[str, Any]:
    """The case's quality against full attention (``sparsebench.quality_figures``): its output
    ``out`` (and, with the output gradient ``grad``, the query gradient of its last timed call,
    ``q.grad``) against full attention with the case's causality, on the rows its forward check
    covers (every row where that is exact, else the same sampled rows). Null, with the reason in
    ``quality_note``, for a pattern whose mask is the model's semantics (``quality_exempt``) and
    for a case that is not checked (a later round)."""
    why = p.pattern.quality_exempt(p.causal)
    if why:
        return quality_figures.not_measured(why)
    if not case.check:
        return quality_figures.not_measured("not measured: the case was not checked (a later round, or check disabled)")
    rows = _check_rows(p, case.exact_max_elems, case.sample_rows, 1, q.device)  # the forward check's rows
    dq = None if grad is None else q.grad
    return quality_figures.measure(
        q, k, v, causal=p.causal, attended=lambda r: attended(p, r, selection), out=out, rows=rows,
        grad=None if dq is None else grad, dq=dq,
    ).fields()  # fmt: skip


# timed runs of a content-selected pattern's selection alone (select_s, their median)
SELECT_REPEATS = 3


def select_time(p: Problem, q, k, fn=None) -> float:
    """Median seconds of the selection alone: the backend's ``fn.select(q, k)`` where its call
    offers one (the selection that call makes), else ``pattern.select(q, k)``; what choosing the
    keys costs of the timed call, which includes it. Untimed by the case's own clock and outside
    its peak window."""
    select = getattr(fn, "select", None) or p.pattern.select
    select(q, k)  # its first call's one-time costs are no part of the figure
    return time_calls(
        lambda: select(q, k), p.device, repeats=SELECT_REPEATS, min_time_s=0.0, max_repeats=SELECT_REPEATS
    ).median


def checked_call(p: Problem, fn, q, k, v) -> tuple[torch.Tensor, Any]:
    """The untimed call whose output is checked, and the selection it made: a backend's
    ``fn.selected(q, k, v) -> (out, selection)`` where it offers one (so the check judges the keys
    the call chose, near-ties and all), else ``pattern.select(q, k)`` made here for a
    content-selected pattern, and None for a pattern fixed by positions."""
    with torch.no_grad():
        if not content_selected(p.pattern):
            return fn(q, k, v), None
        selected = getattr(fn, "selected", None)
        if selected is not None:
            return selected(q, k, v)
        return fn(q, k, v), p.pattern.select(q, k)


def flops(p: Problem, nnz: int) -> float:
    """Useful FLOPs of one call: per query head (grouped-query attention computes as many)."""
    fwd = 4.0 * p.batch * p.heads * nnz * p.head_dim
    return fwd * 2.5 if p.mode == "backward" else fwd


def run_case(case: Case, quality: bool = True) -> dict[str, Any]:
    """Measure one case in this process. Returns the measured record fields (the caller adds
    identity fields), its quality against full attention among them (``case_quality``, after the
    timed calls and outside the peak memory; ``quality=False``: not computed, for a caller that
    records no such figures, as a model stack's layer groups). Exceptions propagate; the runner
    turns them into statuses."""
    p = make_problem(case)
    backend = BACKENDS.get(case.backend)()
    load_backend(backend, p.device)
    fields: dict[str, Any] = {}
    before = probe(p.device)
    with PeakMemory(p.device) as pm, freed_memory_reused(p.device):
        backward = case.mode == "backward"
        q, k, v = inputs(p, requires_grad=backward, case=case)
        t0 = time.perf_counter()
        fn = backend.prepare(p)
        sync(p.device)
        fields["setup_s"] = time.perf_counter() - t0

        if backward:
            grad = torch.randn_like(q)

            def call():
                q.grad = k.grad = v.grad = None
                fn(q, k, v).backward(grad)
        else:

            def call():
                with torch.no_grad():
                    return fn(q, k, v)

        # the first call's one-time costs are no case's peak: what it leaves resident (compiled
        # code, the compiler's caches, heap kept after a process's first backward pass) and, for
        # a compiled backend, its scratch and the setup before it (compile_s)
        with pm.one_time(keep_peak=not backend.compiled):
            t0 = time.perf_counter()
            call()
            sync(p.device)
            first = time.perf_counter() - t0
            if backward:
                q.grad = k.grad = v.grad = None  # the case's own: the next calls make them again
        for _ in range(case.warmup):  # untimed calls after the first (which is timed apart)
            call()
        m = time_calls(call, p.device, repeats=case.repeats, min_time_s=case.min_time_s, max_repeats=case.max_repeats)
    fields["compile_s"] = max(0.0, first - m.median) if backend.compiled else 0.0
    fields["first_call_s"] = first
    fields["select_s"] = select_time(p, q, k, fn) if content_selected(p.pattern) else None
    # the untimed check call; ``selection``: the keys it chose (a content-selected pattern's, None
    # for a pattern fixed by positions), for the same-mask check and the quality figures. A case
    # that is not checked (a later round) makes no such call: nothing would read its output, and
    # a round would cost one call more than it times
    out = selection = None
    grad_err = grad_how = None
    if case.check:
        out, selection = checked_call(p, fn, q, k, v)
        err, how = reference_error(
            p, q, k, v, out, exact_max_elems=case.exact_max_elems, sample_rows=case.sample_rows, selection=selection
        )
        if backward:  # the gradients of the last timed call
            missing = [name for name, t in (("q", q), ("k", k), ("v", v)) if t.grad is None]
            if missing:
                grad_how = "no gradient for " + ", ".join(missing)
            else:
                grad_err, grad_how = gradient_error(
                    p, q, k, v, grad, (q.grad, k.grad, v.grad),
                    exact_max_elems=case.exact_max_elems, sample_rows=case.sample_rows, selection=selection,
                )  # fmt: skip
    else:
        err, how = None, "none"
    fields.update(
        time_median_s=m.median,
        time_iqr_s=m.iqr,
        time_min_s=min(m.times),
        times_s=list(m.times),
        noisy=m.noisy,
        peak_mem_bytes=pm.peak_bytes,
        max_abs_err=err,
        check=how,
        grad_err=grad_err,
        grad_check=grad_how,
        probe_s=(before + probe(p.device)) / 2,
    )
    # once per case: untimed, after the peak memory window and the probe
    if quality:
        fields.update(case_quality(case, p, q, k, v, out, grad=grad if backward else None, selection=selection))
    return judge(fields, case.dtype)


def judge(fields: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Mark a result outside the dtype's tolerance as wrong."""
    err = fields.get("max_abs_err")
    if err is not None and not (err <= TOLERANCE[dtype]):
        fields["status"] = "wrong"
        fields["reason"] = f"max abs error {err:.3g} above the {dtype} tolerance {TOLERANCE[dtype]:g}"
        return fields
    gerr = fields.get("grad_err")
    if str(fields.get("grad_check")).startswith("no gradient"):
        fields["status"] = "wrong"
        fields["reason"] = f"the backend gave {fields['grad_check']}"
    elif gerr is not None and not (gerr <= GRAD_TOLERANCE[dtype]):
        fields["status"] = "wrong"
        fields["reason"] = (
            f"gradient error {gerr:.3g} (relative to the largest gradient) above the {dtype} "
            f"tolerance {GRAD_TOLERANCE[dtype]:g}"
        )
    return fields
