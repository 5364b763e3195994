"""Each pattern against its formula (the README's pattern table), written independently here as
plain Python on (i, j); analytic counts against counted ones; layouts against the mask."""

from __future__ import annotations

import time

import pytest
import torch

from sparsebench.errors import PatternError, ScenarioError
from sparsebench.patterns.base import PATTERNS
from sparsebench.patterns.random_keys import random_table


def window(i, j, W, causal):
    return (i - W < j <= i) if causal else abs(i - j) < W


FORMULAS = {
    "dense": ({}, lambda i, j, n, c, p: True),
    "sliding_window": ({"window": 5}, lambda i, j, n, c, p: window(i, j, p["window"], c)),
    "dilated_window": (
        {"window": 3, "dilation": 4},
        lambda i, j, n, c, p: any(
            j == i - k * p["dilation"] or (not c and j == i + k * p["dilation"]) for k in range(p["window"])
        ),
    ),
    "strided": (
        {"stride": 6},
        lambda i, j, n, c, p: (
            (max(0, i - p["stride"]) <= j <= i if c else abs(i - j) <= p["stride"]) or (i - j) % p["stride"] == 0
        ),
    ),
    "fixed": (
        {"stride": 7, "summary": 2},
        lambda i, j, n, c, p: j // p["stride"] == i // p["stride"] or j % p["stride"] >= p["stride"] - p["summary"],
    ),
    "block_local": ({"block": 6}, lambda i, j, n, c, p: i // p["block"] == j // p["block"]),
    "longformer": (
        {"window": 4, "global_tokens": [0, 9]},
        lambda i, j, n, c, p: window(i, j, p["window"], c) or j in p["global_tokens"] or i in p["global_tokens"],
    ),
    "sink_window": ({"sinks": 3, "window": 4}, lambda i, j, n, c, p: j < p["sinks"] or window(i, j, p["window"], c)),
    "bigbird": (
        {"block": 4, "window_blocks": 3, "global_blocks": 1, "random_blocks": 0},
        lambda i, j, n, c, p: abs(i // 4 - j // 4) <= 1 or i // 4 < 1 or j // 4 < 1,
    ),
}


@pytest.mark.parametrize("name", sorted(FORMULAS))
@pytest.mark.parametrize("n", [13, 29, 50])
@pytest.mark.parametrize("causal", [True, False])
def test_mask_matches_formula(name, n, causal):
    params, rule = FORMULAS[name]
    pat = PATTERNS.get(name).from_params(params)
    mask = pat.mask(n, causal)
    for i in range(n):
        for j in range(n):
            want = rule(i, j, n, causal, pat.params() | params) and (j <= i or not causal)
            assert bool(mask[i, j]) == want, (name, i, j)


@pytest.mark.parametrize("causal", [True, False])
def test_random_pattern_semantics(causal):
    n, R = 41, 4
    pat = PATTERNS.get("random").from_params({"keys": R, "seed": 3})
    mask = pat.mask(n, causal)
    table = random_table(R, 3, n, causal)
    for i in range(n):
        keys = set(torch.nonzero(mask[i]).flatten().tolist())
        candidates = i if causal else n - 1
        assert i in keys
        assert len(keys) == 1 + min(R, candidates)
        assert keys - {i} == set(x for x in table[i].tolist() if x >= 0)
        if causal:
            assert max(keys) <= i
    other = PATTERNS.get("random").from_params({"keys": R, "seed": 4}).mask(n, causal)
    assert not torch.equal(mask, other), "the seed must change the keys"


def _all_patterns():
    out = [(name, params) for name, (params, _) in FORMULAS.items()]
    out += [("random", {"keys": 3, "seed": 1}), ("bigbird", {"block": 8, "random_blocks": 2, "seed": 2})]
    return out


@pytest.mark.parametrize("name,params", _all_patterns() + [("ds_fixed", {"block": 8}), ("ds_bigbird", {"block": 8})])
@pytest.mark.parametrize("causal", [True, False])
def test_mask_built_in_bands_equals_the_whole_grid_rule(monkeypatch, name, params, causal):
    """Pattern.mask builds a band of rows at a time (small temporaries); random scatters its key
    table: either way the mask is allowed() evaluated on the whole n x n grid."""
    from sparsebench.patterns import base

    n = 53
    pat = PATTERNS.get(name).from_params(params)
    idx = torch.arange(n)
    whole = pat.allowed(idx[:, None], idx[None, :], n, causal)
    for chunk in (1, 3 * n + 1, base.MASK_CHUNK_ELEMENTS):  # one row, 3 rows, all rows per band
        monkeypatch.setattr(base, "MASK_CHUNK_ELEMENTS", chunk)
        assert torch.equal(pat.mask(n, causal), whole), (name, chunk)


@pytest.mark.parametrize("name,params", _all_patterns())
@pytest.mark.parametrize("n", [37, 101])
@pytest.mark.parametrize("causal", [True, False])
def test_counts_and_layout_agree_with_mask(name, params, n, causal):
    pat = PATTERNS.get(name).from_params(params)
    mask = pat.mask(n, causal)
    assert torch.equal(pat.keys_per_query(n, causal), mask.sum(1))
    assert pat.nnz(n, causal) == int(mask.sum())
    for b in (8, 16, 64):
        layout = pat.block_layout(n, b, causal)
        nb = layout.num_blocks
        padded = torch.zeros(nb * b, nb * b, dtype=torch.bool)
        padded[:n, :n] = mask
        tiles = padded.view(nb, b, nb, b)
        assert torch.equal(tiles.any(3).any(1).to(torch.int8), layout.dense())
        # full tiles really are full; counts are exact
        rows = layout.row_of_tiles()
        for t in range(layout.nnz_blocks):
            qb, kb = int(rows[t]), int(layout.col[t])
            tile = mask[qb * b : (qb + 1) * b, kb * b : (kb + 1) * b]
            assert int(tile.sum()) == int(layout.count[t])
            assert bool(layout.full[t]) == bool(tile.all())


def test_seeds_question_four_pairs_at_position_500():
    """Token i (1-indexed, i > 3) attends token 1, itself and the two preceding tokens:
    4 key-value pairs at position 500, whatever the sequence length."""
    for n in (500, 777, 4096, 65536):
        for name, params in (
            ("sink_window", {"sinks": 1, "window": 3}),
            ("longformer", {"window": 3, "global_tokens": [0]}),
        ):
            pat = PATTERNS.get(name).from_params(params)
            kpq = pat.keys_per_query(n, True)
            assert int(kpq[499]) == 4, (name, n)
            row = pat.rows(torch.tensor([499]), n, True)[0]
            assert torch.nonzero(row).flatten().tolist() == [0, 497, 498, 499]
            assert pat.kv_retained(n) == 4


def test_kv_retention():
    n = 10_000
    get = lambda name, **p: PATTERNS.get(name).from_params(p)  # noqa: E731
    assert get("sliding_window", window=256).kv_retained(n) == 256
    assert get("sink_window", sinks=4, window=256).kv_retained(n) == 260
    assert get("block_local", block=128).kv_retained(n) == 128
    assert get("dilated_window", window=4, dilation=3).kv_retained(n) == 10
    for name, p in (("dense", {}), ("strided", {"stride": 64}), ("fixed", {"stride": 64}), ("random", {"keys": 8})):
        assert get(name, **p).kv_retained(n) == n


def test_sliding_window_retention_is_what_a_decoder_needs():
    """Keys needed by any query at or after n, among keys <= n: exactly kv_retained."""
    pat = PATTERNS.get("sliding_window").from_params({"window": 7})
    n = 40
    m = pat.mask(80, True)
    needed = m[n:, : n + 1].any(0).sum()
    assert int(needed) == pat.kv_retained(n)


def test_every_pattern_module_registered_something():
    names = PATTERNS.names()
    for expected in (
        "dense",
        "sliding_window",
        "dilated_window",
        "strided",
        "fixed",
        "block_local",
        "longformer",
        "sink_window",
        "random",
        "bigbird",
        "ds_fixed",
        "ds_variable",
        "ds_bigbird",
        "ds_bslongformer",
        "ds_sliding_window",
    ):
        assert expected in names


def test_unknown_pattern_lists_choices():
    with pytest.raises(ScenarioError, match="unknown pattern 'sliding_windw'.*did you mean 'sliding_window'"):
        PATTERNS.get("sliding_windw")


@pytest.mark.parametrize(
    "name,params,n,match",
    [
        ("sliding_window", {"window": 0}, 10, "must be >= 1"),
        ("sliding_window", {"window": 100}, 10, "larger than the sequence length 10"),
        ("sliding_window", {"windw": 3}, 10, "did you mean 'window'"),
        ("sliding_window", {}, 10, "needs parameter"),
        ("sliding_window", {"window": "big"}, 10, "must be an integer"),
        ("longformer", {"window": 4, "global_tokens": [50]}, 10, "outside a sequence of 10"),
        ("fixed", {"stride": 4, "summary": 5}, 10, "must be <= stride"),
    ],
)
def test_bad_parameters(name, params, n, match):
    with pytest.raises(PatternError, match=match):
        PATTERNS.get(name).from_params(params).check(n, True)


def test_layout_cost_is_proportional_to_blocks_not_n_squared():
    """A sliding window over 262,144 tokens: the n x n mask would be 64 GiB of bools."""
    pat = PATTERNS.get("sliding_window").from_params({"window": 256})
    n = 1 << 18
    t0 = time.perf_counter()
    layout = pat.block_layout(n, 128, True)
    elapsed = time.perf_counter() - t0
    assert layout.nnz_blocks == 3 * (n // 128) - 3  # rows 0 and 1 have 1 and 2 tiles
    assert elapsed < 30
    assert pat.nnz(n, True) == sum(min(i + 1, 256) for i in range(n))


def test_geometry_names_still_found_in_base_with_a_warning():
    from sparsebench.patterns import base, geometry

    with pytest.warns(DeprecationWarning, match="sparsebench.patterns.geometry.band"):
        assert base.band is geometry.band
    with pytest.raises(AttributeError):
        base.no_such_name  # noqa: B018
