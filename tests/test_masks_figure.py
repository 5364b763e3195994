"""The masks figure shows each pattern at a length the run measured, where its structure is
visible and no two different patterns draw the same; global keys, sinks and random keys are
marked where a pixel is too small (issue 17, finding 1). Read from the figure's own artists
(the image arrays and the marks drawn), and once from its pixels."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from report_fixtures import record

from sparsebench.render import plots
from sparsebench.results.folder import frame

QUICKSTART = (  # scenarios/quickstart.yaml
    ("dense", {}),
    ("sliding_window", {"window": 256}),
    ("longformer", {"window": 256, "global_tokens": [0, 1]}),
    ("strided", {"stride": 64}),
)
BIGBIRD = (("dense", {}), ("bigbird", {"block": 64}), ("longformer", {"window": 256, "global_tokens": [0, 1]}))
LONGFORMER = "longformer(window=256, global_tokens=[0, 1])"  # report_fixtures.record's label


def run_frame(patterns, sizes):
    return frame([record(p, "sdpa", n, 1e-3, params=q) for p, q in patterns for n in sizes])


def panels(fig) -> dict:
    """label -> (image array, marks: {gid: data of each mark drawn})."""
    out = {}
    for ax in fig.axes:
        gid = ax.get_gid() or ""
        if not gid.startswith("mask:"):
            continue
        img = np.asarray(ax.get_images()[0].get_array())
        marks = {}
        for ln in ax.get_lines():
            if (ln.get_gid() or "").startswith("mark:"):
                x, y = ln.get_data()
                marks.setdefault(ln.get_gid(), []).append((tuple(np.ravel(x)), tuple(np.ravel(y))))
        out[gid[5:]] = (img, marks)
    return out


def suptitle(fig) -> str:
    """The figure's title as one line (it is wrapped to the figure's width)."""
    return " ".join(fig._suptitle.get_text().split())


def assert_pairwise_different(drawn: dict) -> None:
    """Every two panels draw different pairs (different marks alone are not enough)."""
    for (a, (ia, _)), (b, (ib, _)) in itertools.combinations(drawn.items(), 2):
        assert not (ia.shape == ib.shape and np.array_equal(ia, ib)), f"{a} and {b} draw the same"


def test_quickstart_patterns_differ_and_global_columns_are_marked():
    fig = plots.fig_masks(run_frame(QUICKSTART, (512, 1024, 2048, 4096)))
    drawn = panels(fig)
    assert list(drawn)[0] == "dense" and len(drawn) == 4
    assert_pairwise_different(drawn)
    assert "n=512" in suptitle(fig)  # the run's smallest length
    _, marks = drawn[LONGFORMER]
    # columns 0 and 1 (one run) marked above the panel and by a line down them
    assert [x for x, _ in marks["mark:keys"]] == [(0.5,)]
    assert [x for x, _ in marks["mark:key_line"]] == [(0.5, 0.5)]
    ax = next(a for a in fig.axes if a.get_gid() == f"mask:{LONGFORMER}")
    assert "keys every query attends: 0-1" in ax.get_xlabel()
    assert not panels(fig)["sliding_window(window=256)"][1]  # nothing to mark there


def test_longformer_and_sliding_window_look_different():
    """In pixels: the panels of longformer and sliding_window differ visibly."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = plots.fig_masks(run_frame(QUICKSTART[1:3], (512,)))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    h = rgba.shape[0]
    crops = []
    for ax in sorted((a for a in fig.axes if a.get_gid()), key=lambda a: a.get_gid()):
        b = ax.get_window_extent()
        crops.append(rgba[int(h - b.y1) : int(h - b.y0), int(b.x0) : int(b.x1), :3].astype(int))
    w = min(c.shape[1] for c in crops)
    rows = min(c.shape[0] for c in crops)
    diff = np.abs(crops[0][:rows, :w] - crops[1][:rows, :w]).max(axis=2)
    assert (diff > 100).sum() > 0.3 * rows  # at least a line the panel's height


@pytest.mark.parametrize(
    "sizes, n",
    [((1024, 2048, 4096), "1k, the run's smallest"), ((256, 512, 1024), "512 (at the run's smallest, n=256,")],
)
def test_bigbird_never_draws_as_dense(sizes, n):
    """At n = 256 a BigBird of 64-token blocks covers every causal pair (as dense does): a run
    that measured 512 too is drawn at 512."""
    fig = plots.fig_masks(run_frame(BIGBIRD + (("sliding_window", {"window": 256}),), sizes))
    drawn = panels(fig)
    assert_pairwise_different(drawn)
    assert f"n={n}" in suptitle(fig)
    img, marks = drawn["bigbird(block=64)"]
    assert not np.array_equal(img, drawn["dense"][0])
    assert marks["mark:keys"]  # its global block, marked
    assert [x for x, _ in drawn[LONGFORMER][1]["mark:key_line"]] == [(0.5, 0.5)]


def test_a_long_run_is_zoomed_and_says_so_and_random_keys_are_dots():
    fig = plots.fig_masks(run_frame((("random", {"keys": 4}), ("sink_window", {"sinks": 4, "window": 64})), (16384,)))
    drawn = panels(fig)
    for ax in (a for a in fig.axes if a.get_gid()):
        assert "zoom: its first 2k tokens" in ax.get_title() and "at n=16k" in ax.get_title()
    assert "each panel zoomed onto its first 2k tokens" in suptitle(fig)
    img, marks = drawn["random(keys=4)"]
    assert img.shape == (512, 512) and marks.keys() == {"mark:random"}
    ks, qs = marks["mark:random"][0]
    assert qs and all(k < q < 2048 for q, k in zip(qs, ks))  # causal random keys inside the zoom
    ax = next(a for a in fig.axes if a.get_gid() == "mask:random(keys=4)")
    assert "random keys (a sample: 6000 of" in ax.get_xlabel()  # ~4 per query of 2048
    assert [x for x, _ in drawn["sink_window(sinks=4, window=64)"][1]["mark:keys"]] == [(1.5,)]


def test_a_zoom_within_a_patterns_reach_widens_until_it_shows_the_sparsity():
    """Over its first 2048 tokens a 2048-token window allows every causal pair, as dense does: its
    panel widens (to 4096 tokens) until it does not, while dense and a 1792-token window keep theirs."""
    fig = plots.fig_masks(
        run_frame((("dense", {}), ("sliding_window", {"window": 2048}), ("sliding_window", {"window": 1792})), (16384,))
    )
    drawn = panels(fig)
    assert_pairwise_different(drawn)
    titles = {a.get_gid()[5:]: a.get_title() for a in fig.axes if a.get_gid()}
    assert "zoom: its first 4k tokens" in titles["sliding_window(window=2048)"]
    assert "zoom: its first 2k tokens" in titles["dense"]
    assert "zoom: its first 2k tokens" in titles["sliding_window(window=1792)"]
    img, _ = drawn["sliding_window(window=2048)"]
    assert img.shape == (512, 512) and img[-1, 0] == 0 and img[-1, -1] > 0  # the last query misses the first keys
    assert "each panel zoomed" not in suptitle(fig)  # two zooms: each panel says its own


def test_a_lone_panels_title_fits_its_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = plots.fig_masks(run_frame((("sliding_window", {"window": 512}),), (16384,)))
    FigureCanvasAgg(fig).draw()
    box = fig._suptitle.get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width


def test_many_key_columns_are_left_to_the_shading_and_named():
    """A fixed pattern's summary columns (one run every stride): marking each would cover the panel."""
    fig = plots.fig_masks(run_frame((("dense", {}), ("fixed", {"stride": 64, "summary": 4})), (2048,)))
    img, marks = panels(fig)["fixed(stride=64, summary=4)"]
    assert not marks
    ax = next(a for a in fig.axes if a.get_gid() == "mask:fixed(stride=64, summary=4)")
    assert "keys every query attends: 128 in 32 runs" in ax.get_xlabel()
    # each run of columns (tokens 60-63, 124-127, ...: cells of 4 tokens 15, 31, ...) shaded in the last row
    assert {15 + 16 * k for k in range(32)} <= set(np.nonzero(img[-1])[0].tolist())


def test_bigbird_beside_dense_alone_is_drawn_where_they_differ():
    fig = plots.fig_masks(run_frame(BIGBIRD[:2], (256, 512)))
    drawn = panels(fig)
    assert_pairwise_different(drawn)
    assert "at n=512 (at the run's smallest, n=256," in suptitle(fig)


def test_a_length_asked_for_is_not_called_the_runs_smallest():
    df = run_frame((("sliding_window", {"window": 64}),), (1024, 2048))
    assert "the run's smallest length" in suptitle(plots.fig_masks(df))
    title = suptitle(plots.fig_masks(df, n=8192))
    assert "n=8k, as asked" in title and "smallest" not in title


def test_a_title_is_never_broken_inside_a_parameter_value():
    from sparsebench.render.masks import MaskPanel, panel_title

    title = panel_title(MaskPanel(label="document(doc_lens={mean:512,seed:1})", n=2048, causal=True, error="x"))
    assert "document(doc_lens={mean:512,seed:1})" in title.split("\n")
