"""Shared test fixtures: ``make_case``, the one place a test builds a ``Case`` by hand.

Markers (registered in pyproject.toml): ``gpu`` for tests that need CUDA (they skip without it),
``slow`` for tests that take more than a few seconds; ``pytest -m "not slow"`` is the quick loop."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from sparsebench.scenario import Case


def new_case(**overrides: Any) -> Case:
    """A small forward case on the CPU (dense pattern, naive backend, 2 heads of 16, n=64), measured briefly
    and checked exactly; ``overrides`` replace any field. ``pattern_label`` follows ``pattern`` unless given."""
    fields: dict[str, Any] = dict(
        scenario="test",
        pattern="dense",
        params={},
        backend="naive",
        device="cpu",
        dtype="fp32",
        mode="forward",
        batch=1,
        heads=2,
        head_dim=16,
        seq_len=64,
        causal=True,
        tile=32,
        warmup=0,
        repeats=2,
        min_time_s=0.0,
        max_repeats=2,
        timeout_s=60.0,
        memory_budget=None,
        check=True,
        exact_max_elems=1 << 20,
        sample_rows=4,
        decode_tokens=16,
    )
    fields.update(overrides)
    fields.setdefault("pattern_label", fields["pattern"])
    return Case(**fields)


@pytest.fixture
def make_case() -> Callable[..., Case]:
    """The case factory: ``make_case(**overrides)`` returns a new small ``Case`` (see ``new_case``)."""
    return new_case
