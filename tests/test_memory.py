"""Peak memory is measured, not assumed: the textbook materialises its n x n scores, the
block-sparse sliding window does not."""

from __future__ import annotations

import sys

import pytest

from sparsebench.scenario import Case
from sparsebench.worker import Worker

MiB = 2**20


def case(backend, pattern, params, n=4096):
    return Case(scenario="mem", pattern=pattern, params=params, pattern_label=pattern, backend=backend, device="cpu",
                dtype="fp32", mode="forward", batch=1, heads=8, head_dim=64, seq_len=n, causal=True, block=64,
                warmup=0, repeats=1, min_time_s=0.0, max_repeats=1, timeout_s=300, memory_budget=None, check=False,
                exact_max_elems=0, sample_rows=8)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset needs Linux /proc")
def test_naive_shows_its_score_matrix_and_block_sparse_does_not():
    worker = Worker()  # a fresh process: no memory left over from other tests
    try:
        naive = worker.run(case("naive", "dense", {}), 300)
        sparse = worker.run(case("block_sparse", "sliding_window", {"window": 256}), 300)
    finally:
        worker.close()
    assert naive.get("status", "ok") == "ok", naive
    assert sparse.get("status", "ok") == "ok", sparse
    scores = 8 * 4096 * 4096 * 4  # 512 MiB of fp32 scores
    print(f"\npeak: naive {naive['peak_mem_bytes'] / MiB:.0f} MiB, block_sparse {sparse['peak_mem_bytes'] / MiB:.0f} MiB")
    assert naive["peak_mem_bytes"] >= scores
    assert sparse["peak_mem_bytes"] < scores / 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset needs Linux /proc")
@pytest.mark.parametrize("compiled", [True, False])
def test_a_compiled_backends_first_call_scratch_is_not_its_peak(monkeypatch, compiled):
    """Compilation or autotuning scratch of the first call (a 256 MiB buffer here, as Triton's
    benchmark allocates) counts for a compiled backend's compile_s, not its peak memory."""
    import torch

    from sparsebench import harness
    from sparsebench.backends.base import BACKENDS, Backend

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
