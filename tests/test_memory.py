"""Peak memory is measured, not assumed: the textbook materialises its n x n scores, the
block-sparse sliding window does not."""

from __future__ import annotations

import sys

import pytest
from fresh_process import in_fresh_process

from sparsebench.measure.worker import Worker
from sparsebench.scenario import Case

MiB = 2**20


@pytest.fixture
def case(make_case):
    """``case(backend, pattern, params, n)``: one unchecked forward call of 8 heads of 64, large enough that
    peaks show."""

    def build(backend, pattern, params, n=4096) -> Case:
        return make_case(
            scenario="mem",
            pattern=pattern,
            params=params,
            backend=backend,
            heads=8,
            head_dim=64,
            seq_len=n,
            tile=64,
            repeats=1,
            max_repeats=1,
            timeout_s=300,
            check=False,
            exact_max_elems=0,
            sample_rows=8,
        )

    return build


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset needs Linux /proc")
@pytest.mark.slow
def test_naive_shows_its_score_matrix_and_block_sparse_does_not(case):
    worker = Worker()  # a fresh process: no memory left over from other tests
    try:
        naive = worker.run(case("naive", "dense", {}), 300)
        sparse = worker.run(case("block_sparse", "sliding_window", {"window": 256}), 300)
    finally:
        worker.close()
    assert naive.get("status", "ok") == "ok", naive
    assert sparse.get("status", "ok") == "ok", sparse
    scores = 8 * 4096 * 4096 * 4  # 512 MiB of fp32 scores
    print(
        f"\npeak: naive {naive['peak_mem_bytes'] / MiB:.0f} MiB, block_sparse {sparse['peak_mem_bytes'] / MiB:.0f} MiB"
    )
    assert naive["peak_mem_bytes"] >= scores
    assert sparse["peak_mem_bytes"] < scores / 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset needs Linux /proc")
@pytest.mark.parametrize(
    "backend,pattern,params",
    [
        ("naive", "sliding_window", {"window": 256}),
        ("sdpa_masked", "sliding_window", {"window": 256}),
        ("sdpa_masked", "strided", {"stride": 128}),
    ],
)
@pytest.mark.slow
def test_the_masked_backends_estimates_hold_their_measured_peaks(backend, pattern, params, case):
    """--max-memory and limits.memory skip cases by the estimate: the masked backends' estimates
    (score matrices, the mask and its build) must not be far below what the case really takes."""
    from sparsebench.backends.base import BACKENDS
    from sparsebench.measure.harness import make_problem

    c = case(backend, pattern, params, n=2048)
    est = BACKENDS.get(backend)().estimate_bytes(make_problem(c))
    worker = Worker()
    try:
        worker.run(case(backend, pattern, params, n=256), 300)  # a process's one-time setup, not this case's
        rec = worker.run(c, 300)
    finally:
        worker.close()
    assert rec.get("status", "ok") == "ok", rec
    print(f"\n{backend} {pattern}: estimate {est / MiB:.0f} MiB, peak {rec['peak_mem_bytes'] / MiB:.0f} MiB")
    assert 0.8 * rec["peak_mem_bytes"] <= est <= 2.0 * rec["peak_mem_bytes"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset needs Linux /proc")
@pytest.mark.parametrize("compiled", [True, False])
def test_a_compiled_backends_first_call_scratch_is_not_its_peak(monkeypatch, compiled, case):
    """Compilation or autotuning scratch of the first call (a 256 MiB buffer here, as Triton's
    benchmark allocates) counts for a compiled backend's compile_s, not its peak memory."""
    import torch

    from sparsebench.backends.base import BACKENDS, Backend
    from sparsebench.measure import harness

    class FirstCallScratch(Backend):
        name = "scratch"

        def prepare(self, p):
            calls = []

            def fn(q, k, v):
                if not calls:
                    torch.ones(64 * MiB, dtype=torch.float32).sum()  # touched, then freed
                calls.append(1)
                return q.clone()

            return fn

    FirstCallScratch.compiled = compiled
    monkeypatch.setattr(BACKENDS, "get", lambda name: FirstCallScratch)
    rec = harness.run_case(case("scratch", "dense", {}, n=1024))
    if compiled:
        assert rec["peak_mem_bytes"] < 64 * MiB
    else:
        assert rec["peak_mem_bytes"] >= 256 * MiB


_REUSE = """
import json, os, resource
import torch
from sparsebench.backends.block_sparse import native as _native
from sparsebench.measure.memory import freed_memory_reused

MiB = 2**20
if _native.kernel() is None:
    print(json.dumps({"skip": _native.why_not()}))
    raise SystemExit
def fresh_output(keep=None):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 * MiB, dtype=torch.float32).fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    if keep is not None:
        keep.append(t)
    return faults
held = []
with freed_memory_reused("cpu") as on:
    first = fresh_output()
    second = fresh_output(keep=held)
    third = fresh_output()  # the kept block is in use (held): a new one
valid = float(held[0].sum()) == 16 * MiB  # allocated inside, still valid outside
held.clear()
after = [fresh_output() for _ in range(2)]
os.environ["SPARSEBENCH_ALLOCATOR"] = "system"
with freed_memory_reused("cpu") as off:
    pass
print(json.dumps(dict(on=on, first=first, second=second, third=third, valid=valid, after=after, off=off)))
"""


def _in_fresh_process(script: str) -> dict:
    """``in_fresh_process``, skipped where the script says the native extension is not available."""
    res = in_fresh_process(script)
    if "skip" in res:
        pytest.skip(f"the native extension is not available here: {res['skip']}")
    return res


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page faults counted by getrusage")
@pytest.mark.slow
def test_a_case_reuses_a_freed_output_instead_of_faulting_it_in_again():
    """Inside freed_memory_reused a second 64 MiB output takes the first one's pages (glibc maps
    and unmaps such a block: 16384 page faults each time, or 32 with huge pages); outside,
    requests pass through again, and a block allocated inside and freed outside is freed."""
    r = _in_fresh_process(_REUSE)
    first, second, third, after = r["first"], r["second"], r["third"], r["after"]
    assert r["on"] and not r["off"]
    assert first >= 32, first
    assert second * 10 < first, f"{second} page faults for a kept 64 MiB block ({first} for a new one)"
    assert third * 2 > first, third
    assert r["valid"]
    assert min(after) * 2 > first, f"{after} page faults: freed blocks are still kept"


_KEPT_BLOCKS = """
import json, resource
import torch
from sparsebench.backends.block_sparse import native as _native
from sparsebench.measure.memory import PeakMemory, freed_memory_reused

MiB = 2**20
if _native.kernel() is None:
    print(json.dumps({"skip": _native.why_not()}))
    raise SystemExit
def faults_of(nbytes, keep):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    keep.append(torch.ones(nbytes, dtype=torch.uint8))
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
live = []
with PeakMemory("cpu") as pm, freed_memory_reused("cpu"):
    fresh = faults_of(8 * MiB, live)
    faults_of(64 * MiB, live)
    live.clear()  # 72 MiB in use, now kept
    faults_of(32 * MiB, live)  # frees the kept 64 MiB block, not the 8 MiB one
    kept = faults_of(8 * MiB, live)
    live.clear()  # 40 MiB kept
    faults_of(96 * MiB, live)  # frees both first
    live.clear()
print(json.dumps({"fresh": fresh, "kept": kept, "peak": pm.peak_bytes}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page faults and VmHWM are Linux's")
def test_kept_blocks_never_raise_the_resident_memory_above_what_was_in_use():
    """A request that no kept block fits first frees kept blocks of at least its size: the
    smallest one that large, else the largest ones (or all), so the peak reads as without the
    cache, and blocks of other sizes stay kept (in a fresh process: see _in_fresh_process)."""
    res = _in_fresh_process(_KEPT_BLOCKS)
    fresh, kept, peak = res["fresh"], res["kept"], res["peak"]
    assert kept * 10 < fresh, f"{kept} page faults for the kept 8 MiB block ({fresh} for a new one)"
    assert 88 * MiB <= peak < 128 * MiB, peak / MiB  # 136 MiB if nothing were freed


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_onednn_buffers_are_freed_through_the_caching_allocator(monkeypatch, dtype):
    """oneDNN takes and frees its buffers through the CPU allocator's raw interface (bf16
    matmuls, SDPA's backward): they must come back to the allocator that gave them."""
    import torch
    import torch.nn.functional as F

    from sparsebench.backends.block_sparse import native as _native
    from sparsebench.measure.memory import freed_memory_reused

    if _native.kernel() is None:
        pytest.skip(f"the native extension is not available here: {_native.why_not()}")
    monkeypatch.delenv("SPARSEBENCH_ALLOCATOR", raising=False)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    q, k, v = (torch.randn(1, 4, 512, 64, dtype=dt, requires_grad=True) for _ in range(3))
    a = torch.randn(1024, 1024, dtype=dt)
    with freed_memory_reused("cpu"):
        for _ in range(2):
            (a @ a).sum()
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        kept = a @ a  # taken inside, freed outside
    del kept
    assert torch.isfinite(q.grad.float()).all()


def test_without_the_native_module_nothing_changes_and_nothing_is_built(monkeypatch):
    """Where the native module is not there (no compiler, SPARSEBENCH_NATIVE=0) the caching
    allocator is not in force, and the warm-up loads and builds nothing where the kernels are not
    built yet (building them is the first CPU case's cost)."""
    from sparsebench.backends import block_sparse
    from sparsebench.backends.block_sparse import native as _native
    from sparsebench.measure.memory import freed_memory_reused

    monkeypatch.delenv("SPARSEBENCH_ALLOCATOR", raising=False)
    monkeypatch.setattr(_native, "kernel", lambda: None)
    assert block_sparse.cache_cpu_allocations(True) is False
    with freed_memory_reused("cpu") as on:
        assert on is False

    def no_build():
        raise AssertionError("the warm-up must not build the native kernels")

    monkeypatch.setattr(_native, "kernel", no_build)
    monkeypatch.setattr(_native, "built", lambda: False)
    assert block_sparse.native_loaded() is False
    block_sparse.warm_up()  # nothing to warm: returns without building


def test_masks_and_plans_do_not_import_sympy():
    """torch.broadcast_shapes imports sympy on first use (about 35 MiB resident): the first case
    of every worker process measured it as its own peak. Masks, plans and the attention calls
    broadcast shapes in plain Python (sparsebench.shapes)."""
    import subprocess

    script = (
        "import sys, torch\n"
        "from sparsebench.patterns.base import PATTERNS\n"
        "from sparsebench.backends.block_sparse import attention_fn\n"
        "from sparsebench.backends.block_sparse import plan as _plan\n"
        "for name, params in [('sliding_window', {'window': 16}), ('random', {'keys': 4}),\n"
        "                     ('longformer', {'window': 8, 'global_tokens': [0]})]:\n"
        "    pat = PATTERNS.get(name)(**params)\n"
        "    pat.mask(64, True)\n"
        "    plan = _plan.build(pat, 64, True, groups=2, head_dim=32, block=16, device=torch.device('cpu'),\n"
        "                       dtype=torch.float32)\n"
        "    q = torch.randn(1, 2, 64, 32)\n"
        "    attention_fn(plan)(q, q, q)\n"
        "print('sympy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("a,b", [((2, 1), (1, 3)), ((), (4,)), ((5, 1, 3), (4, 1)), ((1, 8), (3, 1)), ((0, 1), (1, 5))])
def test_broadcast_shape_matches_torch(a, b):
    import torch

    from sparsebench.shapes import broadcast_shape

    assert broadcast_shape(a, b) == tuple(torch.broadcast_shapes(a, b))
    with pytest.raises(ValueError, match="do not broadcast"):
        broadcast_shape((2,), (3,))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset needs Linux /proc")
@pytest.mark.slow
def test_a_workers_first_case_does_not_carry_the_process_one_time_costs(case):
    """The first case of a worker process used to measure the process's one-time costs as its
    own peak (first attention calls, loading the native kernels, sympy: 10 and 42 MiB instead
    of 4 and 8 at n = 512); the worker pays them before its first case (harness.warm_process)."""
    worker = Worker()
    try:
        peaks = {}
        for backend, pattern, params in (
            ("sdpa", "dense", {}),
            ("block_sparse", "sliding_window", {"window": 64}),
            ("sdpa_masked", "sliding_window", {"window": 64}),
        ):
            first, second = (worker.run(case(backend, pattern, params, n=512), 300) for _ in range(2))
            assert first.get("status", "ok") == "ok" and second.get("status", "ok") == "ok", (first, second)
            peaks[backend] = (first["peak_mem_bytes"] / MiB, second["peak_mem_bytes"] / MiB)
    finally:
        worker.close()
    print(f"\nfirst / second case peak, MiB: {peaks}")
    for backend, (first, second) in peaks.items():
        assert first <= second + 3, (backend, first, second)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset needs Linux /proc")
def test_what_a_first_call_leaves_resident_is_no_peak():
    """PeakMemory.one_time: memory the block leaves resident (a compiler's modules and caches,
    heap kept after a process's first backward pass) is the process's, not the case's: the peak
    after it is measured above it; with keep_peak the setup's own peak (less that residue) still
    counts. Before, a process's first flex case carried 140-155 MiB of torch.compile."""
    import torch

    from sparsebench.measure.memory import PeakMemory

    kept = []
    with PeakMemory("cpu") as pm:
        with pm.one_time():
            kept.append(torch.ones(64 * MiB // 4))  # 64 MiB that stay (a compiler's caches)
        torch.ones(8 * MiB // 4).sum()  # the case's own: 8 MiB
    assert 6 * MiB <= pm.peak_bytes < 32 * MiB, pm.peak_bytes / MiB

    with PeakMemory("cpu") as pm:
        setup = torch.ones(48 * MiB // 4)  # setup's peak: 48 MiB, freed before the steady calls
        del setup
        with pm.one_time(keep_peak=True):
            kept.append(torch.ones(64 * MiB // 4))
        torch.ones(8 * MiB // 4).sum()
    assert 44 * MiB <= pm.peak_bytes < 80 * MiB, pm.peak_bytes / MiB


_PINNED = """
import ctypes, json
from sparsebench.measure.memory import _status_kib, freed_memory_reused

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
MiB = 2**20
def resident_after_free(first):
    libc.free(libc.malloc(first))  # a mapped block freed: glibc's default raises its threshold to it
    p = libc.malloc(4 * MiB)
    ctypes.memset(p, 1, 4 * MiB)
    before = _status_kib("VmRSS")
    libc.free(p)
    return before - _status_kib("VmRSS")
unpinned = resident_after_free(8 * MiB)
with freed_memory_reused("cpu"):
    pinned = resident_after_free(16 * MiB)
print(json.dumps(dict(unpinned=unpinned, pinned=pinned)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc/self/status")
def test_a_case_frees_its_large_blocks_whatever_was_freed_before():
    """Inside freed_memory_reused a freed block of 4 MiB leaves the resident set even after a larger
    mapped block was freed; with glibc's default (before) it stayed resident in its heap, which
    made a case's peak depend on which blocks earlier cases had freed."""
    import json
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "SPARSEBENCH_ALLOCATOR"))}
    out = subprocess.run([sys.executable, "-c", _PINNED], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["unpinned"] < 1024, r  # glibc's default: the 4 MiB stay resident (the test's premise)
    assert r["pinned"] >= 4000, r  # KiB: the whole block left the resident set
