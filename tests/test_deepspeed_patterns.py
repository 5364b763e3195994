"""DeepSpeed SparsityConfig layouts (ds_* patterns): block layouts derived by hand from
DeepSpeed 0.14's make_layout, consistency of mask / keys per query / tile layouts for sequences
that are not a multiple of the block, and parameter errors."""

from __future__ import annotations

import pytest
import torch

from sparsebench.errors import PatternError
from sparsebench.patterns.base import PATTERNS
from sparsebench.patterns.geometry import scanned_layout

BI, UNI = "bidirectional", "unidirectional"


def make(name, **params):
    return PATTERNS.get(name).from_params(params)


def layout(name, nb, attention, **params):
    """Head-0 layout of nb blocks (block=1 so that n = nb), with causal matching attention."""
    pat = make(name, block=1, attention=attention, **params)
    causal = attention == UNI
    pat.check(nb, causal)
    return pat.ds_layout(nb, causal)


def T(*rows: str) -> torch.Tensor:
    return torch.tensor([[int(ch) for ch in row] for row in rows], dtype=torch.int64)


# -- (1) block layouts against DeepSpeed's algorithm, worked out by hand --------------------------

FIXED_BI = T("11110001", "11110001", "11110001", "11110001", "00011111", "00011111", "00011111", "00011111")
FIXED_UNI = T("10000000", "11000000", "11100000", "11110000", "00011000", "00011100", "00011110", "00011111")


def test_fixed_windows_and_last_block_global():
    assert torch.equal(layout("ds_fixed", 8, BI, num_local_blocks=4, num_global_blocks=1), FIXED_BI)
    assert torch.equal(layout("ds_fixed", 8, UNI, num_local_blocks=4, num_global_blocks=1), FIXED_UNI)
    # auto follows causality
    pat = make("ds_fixed", block=1, num_local_blocks=4, num_global_blocks=1)
    assert torch.equal(pat.ds_layout(8, False), FIXED_BI) and torch.equal(pat.ds_layout(8, True), FIXED_UNI)


def test_fixed_horizontal_global():
    got = layout("ds_fixed", 8, BI, num_local_blocks=4, num_global_blocks=1, horizontal_global_attention=True)
    want = FIXED_BI.clone()
    want[3] = 1
    want[7] = 1
    assert torch.equal(got, want)


def test_fixed_short_last_window():
    # windows [0..3], [4, 5]: the short one takes min(4 + 3, 6 - 1) = block 5 as its global
    want = T("111101", "111101", "111101", "111101", "000111", "000111")
    assert torch.equal(layout("ds_fixed", 6, BI, num_local_blocks=4, num_global_blocks=1), want)


def test_fixed_two_global_blocks_unidirectional():
    # global blocks 2,3 and 6,7 are seen from the first global row on (DeepSpeed sets
    # layout[i:, i:i+g]), so row 2 sees block 3 and row 6 sees block 7
    want = T("10000000", "11000000", "11110000", "11110000", "00111000", "00111100", "00111111", "00111111")
    assert torch.equal(layout("ds_fixed", 8, UNI, num_local_blocks=4, num_global_blocks=2), want)


def test_variable_local_windows_repeat_last_size():
    # windows [0], [1,2], then size 2 repeats: [3,4], [5,6], [7]; global blocks 0 and 5
    kw = dict(local_window_blocks=[1, 2], global_block_indices=[0, 5])
    bi = T("10000100", "11100100", "11100100", "10011100", "10011100", "10000110", "10000110", "10000101")
    uni = T("10000000", "11000000", "11100000", "10010000", "10011000", "10000100", "10000110", "10000101")
    assert torch.equal(layout("ds_variable", 8, BI, **kw), bi)
    assert torch.equal(layout("ds_variable", 8, UNI, **kw), uni)


def test_variable_global_span_horizontal():
    kw = dict(global_block_indices=[2], global_block_end_indices=[4], horizontal_global_attention=True)
    want = T("11110000", "11110000", "11111111", "11111111", "00111111", "00111111", "00111111", "00111111")
    assert torch.equal(layout("ds_variable", 8, BI, **kw), want)


def test_variable_random_blocks():
    kw = dict(local_window_blocks=[1], global_block_indices=[], num_random_blocks=3)
    pat = make("ds_variable", block=1, attention=UNI, **kw)
    lay = pat.ds_layout(32, True)
    off = lay - torch.eye(32, dtype=torch.int64)
    assert torch.all(torch.diagonal(lay) == 1)
    # three distinct random blocks per row, the own block possibly among them
    assert torch.all((off.sum(1) >= 2) & (off.sum(1) <= 3))
    # DeepSpeed draws Variable's random blocks from the whole row even when unidirectional
    assert torch.triu(lay, 1).sum() > 0
    assert torch.equal(lay, make("ds_variable", block=1, attention=UNI, **kw).ds_layout(32, True))
    assert not torch.equal(lay, make("ds_variable", block=1, attention=UNI, seed=1, **kw).ds_layout(32, True))


BAND3 = T("110000", "111000", "011100", "001110", "000111", "000011")
BIGBIRD_BI = T("111111", "111000", "111100", "101110", "100111", "100011")


def test_bigbird_window_and_global():
    kw = dict(num_random_blocks=0, num_sliding_window_blocks=3, num_global_blocks=1)
    assert torch.equal(layout("ds_bigbird", 6, BI, **kw), BIGBIRD_BI)
    assert torch.equal(layout("ds_bigbird", 6, UNI, **kw), torch.tril(BIGBIRD_BI))


@pytest.mark.parametrize("attention", [BI, UNI])
def test_bigbird_random_count(attention):
    nb = 40
    pat = make(
        "ds_bigbird",
        block=1,
        attention=attention,
        num_random_blocks=2,
        num_sliding_window_blocks=1,
        num_global_blocks=0,
    )
    lay = pat.ds_layout(nb, attention == UNI)
    assert torch.all(torch.diagonal(lay) == 1)
    off = (lay - torch.eye(nb, dtype=torch.int64)).sum(1)
    rows = torch.arange(nb)
    # 2 distinct random blocks per row (fewer where the row has fewer candidates)
    cand = rows + 1 if attention == UNI else torch.full((nb,), nb)
    assert torch.all(off <= torch.clamp(cand - 1, max=2)) and torch.all(off >= torch.clamp(cand, max=2) - 1)
    if attention == UNI:
        assert torch.triu(lay, 1).sum() == 0
    else:
        assert torch.triu(lay, 1).sum() > 0


def test_bslongformer():
    assert torch.equal(layout("ds_bslongformer", 6, BI, num_sliding_window_blocks=3), BIGBIRD_BI)
    assert torch.equal(layout("ds_bslongformer", 6, UNI, num_sliding_window_blocks=3), torch.tril(BIGBIRD_BI))
    kw = dict(num_sliding_window_blocks=3, global_block_indices=[2], global_block_end_indices=[4])
    bi = T("111100", "111100", "111111", "111111", "001111", "001111")
    assert torch.equal(layout("ds_bslongformer", 6, BI, **kw), bi)
    assert torch.equal(layout("ds_bslongformer", 6, UNI, **kw), torch.tril(bi))
    # global indices beyond the sequence are skipped, as in DeepSpeed
    far = layout("ds_bslongformer", 6, BI, num_sliding_window_blocks=3, global_block_indices=[9])
    assert torch.equal(far, BAND3)


def test_sliding_window():
    assert torch.equal(layout("ds_sliding_window", 6, BI, num_sliding_window_blocks=3), BAND3)
    assert torch.equal(layout("ds_sliding_window", 6, UNI, num_sliding_window_blocks=3), torch.tril(BAND3))
    uni5 = T("100000", "110000", "111000", "011100", "001110", "000111")
    assert torch.equal(layout("ds_sliding_window", 6, UNI, num_sliding_window_blocks=5), uni5)


# -- (2) mask, keys per query and tile layouts agree, n not a multiple of block -------------------

CONFIGS = [
    ("ds_fixed", {}),
    ("ds_fixed", {"num_local_blocks": 2, "num_global_blocks": 1, "attention": BI, "horizontal_global_attention": True}),
    ("ds_fixed", {"num_local_blocks": 4, "num_global_blocks": 2, "attention": UNI}),
    ("ds_variable", {"local_window_blocks": [1, 2], "num_random_blocks": 1}),
    ("ds_variable", {"global_block_indices": [1], "global_block_end_indices": [3], "attention": BI}),
    ("ds_bigbird", {"num_random_blocks": 1}),
    ("ds_bigbird", {"num_random_blocks": 2, "num_sliding_window_blocks": 4, "num_global_blocks": 2, "attention": BI}),
    ("ds_bslongformer", {"global_block_indices": [0, 3]}),
    ("ds_sliding_window", {}),
    ("ds_sliding_window", {"num_sliding_window_blocks": 4, "attention": BI}),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name,params", CONFIGS)
@pytest.mark.parametrize("n", [70, 100])
def test_consistency(name, params, n, causal):
    pat = make(name, block=16, **params)
    pat.check(n, causal)
    m = pat.mask(n, causal)
    # the token mask is the block layout expanded (short last block), then cut j <= i if causal
    nbp = pat.ds_layout(n, causal).shape[0]
    assert nbp == -(-n // 16)
    blocks = torch.arange(n) // 16
    expect = pat.ds_layout(n, causal).bool()[blocks[:, None], blocks[None, :]]
    assert torch.equal(m, expect & torch.ones(n, n, dtype=torch.bool).tril() if causal else expect)
    assert torch.equal(pat.keys_per_query(n, causal), m.sum(1))
    assert pat.nnz(n, causal) == int(m.sum())
    for b in (8, 16, 64, 7):
        L = pat.block_layout(n, b, causal)
        nb = L.num_blocks
        mp = torch.zeros(nb * b, nb * b, dtype=torch.bool)
        mp[:n, :n] = m
        assert torch.equal(mp.view(nb, b, nb, b).any(3).any(1).to(torch.int8), L.dense())
        assert int(L.count.sum()) == int(m.sum())
        # the block-level fast path equals the framework's token-level scan (which also checks
        # that key_intervals is a superset of the allowed keys)
        ref = scanned_layout(pat, n, b, causal)
        for field in ("crow", "col", "full", "count"):
            assert torch.equal(getattr(L, field), getattr(ref, field)), field


def test_sliding_window_kv_retained():
    pat = make("ds_sliding_window", block=4, num_sliding_window_blocks=3)
    total = 60
    m = pat.mask(total, True)
    for n in range(1, total):
        needed = m[n - 1 :, :n].any(0).nonzero()
        assert pat.kv_retained(n) == n - int(needed.min())


# -- (3) bad parameters --------------------------------------------------------------------------

BAD = [
    ("ds_fixed", {"num_local_blocks": 4, "num_global_blocks": 3}, "num_local_blocks"),
    ("ds_fixed", {"num_local_blocks": 0}, "num_local_blocks"),
    ("ds_fixed", {"attention": "causal"}, "attention"),
    ("ds_fixed", {"attention": UNI, "horizontal_global_attention": True}, "horizontal_global_attention"),
    ("ds_fixed", {"num_different_global_patterns": 5}, "num_different_global_patterns"),
    ("ds_fixed", {"num_heads": 8}, "num_heads"),
    ("ds_fixed", {"block": 0}, "block"),
    ("ds_variable", {"local_window_blocks": []}, "local_window_blocks"),
    ("ds_variable", {"local_window_blocks": [2, 0]}, "local_window_blocks"),
    ("ds_variable", {"global_block_indices": [-1]}, "global_block_indices"),
    ("ds_variable", {"global_block_indices": [0, 4], "global_block_end_indices": [2]}, "global_block_end_indices"),
    ("ds_variable", {"global_block_indices": [3], "global_block_end_indices": [3]}, "global_block_end_indices"),
    ("ds_variable", {"num_random_blocks": -1}, "num_random_blocks"),
    ("ds_bigbird", {"num_global_blocks": -1}, "num_global_blocks"),
    ("ds_bigbird", {"num_sliding_window_blocks": 0}, "num_sliding_window_blocks"),
    ("ds_bslongformer", {"global_block_indices": [2, 1], "global_block_end_indices": [1, 3]}, "end_indices"),
    ("ds_sliding_window", {"num_sliding_window_blocks": 0}, "num_sliding_window_blocks"),
]

# (name, params, n, causal, parameter named): fine alone, impossible for this sequence
BAD_FOR_N = [
    ("ds_fixed", {"block": 128}, 70, False, "block"),
    ("ds_fixed", {"horizontal_global_attention": True}, 64, True, "horizontal_global_attention"),
    ("ds_fixed", {"num_local_blocks": 8, "num_global_blocks": 8}, 64, False, "num_global_blocks"),
    ("ds_variable", {"num_random_blocks": 9}, 64, False, "num_random_blocks"),
    ("ds_bigbird", {"num_sliding_window_blocks": 7}, 64, False, "num_sliding_window_blocks"),
    ("ds_bigbird", {"num_random_blocks": 5}, 64, True, "num_random_blocks"),
    ("ds_bigbird", {"num_global_blocks": 5}, 64, False, "num_global_blocks"),
    ("ds_bslongformer", {"num_sliding_window_blocks": 5}, 64, False, "num_sliding_window_blocks"),
    ("ds_sliding_window", {"num_sliding_window_blocks": 5}, 64, True, "num_sliding_window_blocks"),
]


@pytest.mark.parametrize("name,params,word", BAD)
def test_bad_params(name, params, word):
    with pytest.raises(PatternError, match=word) as err:
        PATTERNS.get(name).from_params(params).check(256, False)
    assert name in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name,params,n,causal,word", BAD_FOR_N)
def test_bad_for_length(name, params, n, causal, word):
    pat = PATTERNS.get(name).from_params(params)
    pat.check(n * 8, False)  # a longer bidirectional case is fine
    with pytest.raises(PatternError, match=word) as err:
        pat.check(n, causal)
    assert name in str(err.value)
