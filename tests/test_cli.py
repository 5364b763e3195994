"""The CLI end to end through typer's CliRunner: a complete result folder, list, show, env,
and a --help that does not import the heavy libraries."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from sparsebench.cli.app import app

TINY = """\
name: tiny
seq_lens: [96, 160]
patterns:
  - name: dense
  - name: sliding_window
    params: {window: 32}
  - name: longformer
    params: {window: 16, global_tokens: [0]}
backends: [sdpa, naive, block_sparse]
batch: 1
heads: 2
head_dim: 16
warmup: 1
repeats: 3
tile: 32
"""

REQUIRED = (
    "pattern",
    "params",
    "backend",
    "device",
    "dtype",
    "mode",
    "batch",
    "heads",
    "head_dim",
    "seq_len",
    "causal",
    "status",
    "reason",
    "time_median_s",
    "time_iqr_s",
    "times_s",
    "tflops",
    "peak_mem_bytes",
    "est_mem_bytes",
    "nnz",
    "density",
    "kv_cache_bytes",
    "max_abs_err",
    "setup_s",
    "compile_s",
    "probe_s",
)


@pytest.mark.slow
def test_run_writes_a_complete_result_folder(tmp_path):
    scen = tmp_path / "tiny.yaml"
    scen.write_text(TINY)
    out = tmp_path / "res"
    res = CliRunner().invoke(app, ["run", str(scen), "--output", str(out), "--no-plots"])
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1] == str(out)
    for f in ("records.jsonl", "results.csv", "summary.md", "scenario.yaml", "environment.json", "meta.json"):
        assert (out / f).is_file(), f
    df = pd.read_json(out / "records.jsonl", lines=True)
    # 2 sizes x (dense: sdpa, naive, block_sparse + 2 patterns x naive, block_sparse)
    assert len(df) == 2 * 7
    assert set(REQUIRED) <= set(df.columns)
    assert (df["status"] == "ok").all(), df[["pattern", "backend", "status", "reason"]]
    assert (df["max_abs_err"] < 1e-4).all()
    assert (df["times_s"].map(len) >= 3).all()
    assert (df["probe_s"] > 0).all()  # the machine probe around each case
    sw = df[(df.pattern == "sliding_window") & (df.seq_len == 160)].iloc[0]
    assert sw["nnz"] == sum(min(i + 1, 32) for i in range(160))
    assert sw["kv_cache_bytes"] == 2 * 1 * 2 * 16 * 4 * 32
    env = json.loads((out / "environment.json").read_text())
    assert {"torch", "python", "sparsebench", "cpu", "threads"} <= set(env)
    assert "dense" in (out / "summary.md").read_text()
    assert "## Machine speed" in (out / "summary.md").read_text()
    assert pd.read_csv(out / "results.csv").shape[0] == len(df)


@pytest.mark.slow
def test_run_says_when_its_first_case_builds_the_native_kernels(tmp_path, monkeypatch):
    from sparsebench.backends.block_sparse import native as _native

    scen = tmp_path / "tiny.yaml"
    scen.write_text(
        TINY.replace("seq_lens: [96, 160]", "seq_lens: [96]").replace("[sdpa, naive, block_sparse]", "[sdpa]")
    )
    for built in (False, True):
        monkeypatch.setattr(_native, "built", lambda built=built: built)
        monkeypatch.setattr(_native, "enabled", lambda: True)
        res = CliRunner().invoke(app, ["run", str(scen), "--output", str(tmp_path / f"res{built}"), "--no-plots"])
        assert res.exit_code == 0, res.output
        assert ("builds the native CPU kernels" in res.output) is not built, res.output


def test_run_refuses_a_non_empty_output(tmp_path):
    scen = tmp_path / "tiny.yaml"
    scen.write_text(TINY)
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "x").write_text("x")
    res = CliRunner().invoke(app, ["run", str(scen), "--output", str(tmp_path / "res")])
    assert res.exit_code == 2 and "not empty" in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_failed_case_skips_larger_sizes_and_run_goes_on(tmp_path):
    scen = tmp_path / "t.yaml"
    scen.write_text(
        "name: t\nseq_lens: [96, 4096]\npatterns: [{name: sliding_window, params: {window: 32}}]\n"
        "backends: [naive, block_sparse]\nheads: 2\nhead_dim: 16\nrepeats: 2\nwarmup: 0\n"
        "check: {exact_max_elems: 0, sample_rows: 4}\n"
    )
    out = tmp_path / "r"
    # a memory budget between the small cases and naive at 4096 (its scores alone are 128 MiB)
    res = CliRunner().invoke(
        app, ["run", str(scen), "--output", str(out), "--no-plots", "--in-process", "--max-memory", "100MiB"]
    )
    assert res.exit_code == 0, res.output
    df = pd.read_json(out / "records.jsonl", lines=True)
    big_naive = df[(df.backend == "naive") & (df.seq_len == 4096)]
    assert len(big_naive) == 1
    assert (big_naive["status"] == "skipped").all() and big_naive["reason"].str.contains("memory budget").all()
    assert (df[df.seq_len == 96]["status"] == "ok").all()
    assert (df[(df.backend == "block_sparse") & (df.seq_len == 4096)]["status"] == "ok").all()
    assert (df[(df.backend == "block_sparse")]["check"] == "sampled").all()


def test_list_names_patterns_and_backend_availability():
    res = CliRunner().invoke(app, ["list"])
    assert res.exit_code == 0
    for word in ("sliding_window", "ds_bslongformer", "window", "block_sparse", "available"):
        assert word in res.output


def test_show_json():
    res = CliRunner().invoke(
        app,
        [
            "show",
            "longformer",
            "--seq-len",
            "12",
            "-p",
            "window=3",
            "-p",
            "global_tokens=[0,7]",
            "--tile",
            "4",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["keys_per_query"][5] == 4  # 3 window keys + global token 0
    assert info["nnz"] == sum(info["keys_per_query"])
    assert abs(info["density"] - info["nnz"] / 144) < 1e-12
    assert info["kv_retained"] == 5
    assert len(info["block_layout"]) == 3 and info["block_layout"][0] == [1, 0, 0]


def test_old_names_of_the_tile_size_still_work_with_a_warning(tmp_path):
    res = CliRunner().invoke(app, ["show", "block_local", "--seq-len", "16", "-p", "block=8", "--block", "4", "--json"])
    assert res.exit_code == 0, res.output
    assert "--block is now --tile" in res.output
    assert len(json.loads(res.output.splitlines()[-1])["block_layout"]) == 4
    res = CliRunner().invoke(app, ["show", "dense", "--seq-len", "16", "--block", "4", "--tile", "4"])
    assert res.exit_code == 2 and "give --tile only" in res.output
    path = tmp_path / "old.yaml"
    path.write_text(
        "name: old\nseq_lens: [64]\npatterns: [{name: block_local, params: {block: 16}}]\n"
        "backends: [block_sparse]\nblock: 32\n"
    )
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 0, res.output
    assert "field 'block' is now 'tile'" in res.output and "old.yaml:5" in res.output
    from sparsebench import scenario as sc_mod

    sc, _, source = sc_mod.load(path)
    assert sc.tile == 32 and {c.tile for c in sc_mod.expand(sc, source).cases} == {32}
    path.write_text(path.read_text() + "tile: 32\n")
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 2 and "give 'tile' only" in res.output


def test_show_draws_and_rejects_bad_values():
    res = CliRunner().invoke(app, ["show", "sliding_window", "--seq-len", "8", "-p", "window=3"])
    assert res.exit_code == 0 and "█" in res.output and "keys per query: min 1, mean" in res.output
    res = CliRunner().invoke(app, ["show", "sliding_window", "--seq-len", "8", "-p", "window=30"])
    assert res.exit_code == 2 and res.output.startswith("error:") and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["show", "nope", "--seq-len", "8"])
    assert res.exit_code == 2 and "unknown pattern" in res.output


def test_env(monkeypatch):
    monkeypatch.delenv("SPARSEBENCH_ALLOCATOR", raising=False)
    res = CliRunner().invoke(app, ["env", "--json"])
    assert res.exit_code == 0
    info = json.loads(res.output)
    assert "torch" in info
    # Triton's version (block_sparse's CUDA kernels), or None where it is not installed
    expected = None if importlib.util.find_spec("triton") is None else importlib.metadata.version("triton")
    assert info["triton"] == expected
    # how timed CPU calls allocate: caching unless switched off (or no native extension)
    from sparsebench.backends.block_sparse import native as _native
    from sparsebench.measure.environment import CACHING

    assert info["cpu_allocator"] == (CACHING if _native.enabled() else "system")


def test_help_does_not_import_heavy_modules():
    code = (
        "import sys; from sparsebench.cli.app import app; from typer.testing import CliRunner; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "print(','.join(m for m in ('torch', 'pandas', 'matplotlib', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _run_with_plugin(tmp_path, plugin, fields: str):
    """Records of a small sliding-window scenario (n = 64: checked exactly; n = 300: sampled rows)
    run in-process with a plugin backend; ``fields``: the scenario's backends (and mode)."""
    scen = tmp_path / "s.yaml"
    scen.write_text(
        "name: w\nseq_lens: [64, 300]\npatterns: [{name: sliding_window, params: {window: 8}}]\n"
        + fields
        + "heads: 2\nhead_dim: 16\nrepeats: 2\nblock: 32\n"
        "check: {exact_max_elems: 10000, sample_rows: 8}\n"
    )
    out = tmp_path / "r"
    res = CliRunner().invoke(
        app, ["run", str(scen), "--plugin", str(plugin), "--output", str(out), "--no-plots", "--in-process"]
    )
    assert res.exit_code == 0, res.output
    return pd.read_json(out / "records.jsonl", lines=True)


@pytest.mark.slow
def test_a_fast_but_wrong_backend_is_marked_wrong(tmp_path):
    plugin = tmp_path / "broken.py"
    plugin.write_text(
        "import torch\n"
        "from sparsebench.backends.base import BACKENDS, Backend\n"
        "@BACKENDS.register\n"
        "class Broken(Backend):\n"
        "    name = 'broken_zero'\n"
        "    summary = 'returns zeros'\n"
        "    sparse = True\n"
        "    def prepare(self, p):\n"
        "        return lambda q, k, v: torch.zeros_like(q)\n"
    )
    df = _run_with_plugin(tmp_path, plugin, "backends: [broken_zero, block_sparse]\n")
    broken = df[df.backend == "broken_zero"]
    assert (broken.status == "wrong").all() and broken.reason.str.contains("tolerance").all()
    assert set(broken.check) == {"exact", "sampled"}  # 2*64*64 fits the exact check, 2*300*300 does not
    assert (df[df.backend != "broken_zero"].status == "ok").all()


@pytest.mark.slow
def test_a_backend_with_wrong_gradients_is_marked_wrong_in_backward_mode(tmp_path):
    """Backward mode checks the gradients too: a right output with a wrong key gradient is
    caught exactly at a small n; at a large n only query gradients are sampled (rows), so a
    wrong query gradient is caught there."""
    plugin = tmp_path / "badgrad.py"
    plugin.write_text(
        "import torch\n"
        "from sparsebench.backends.base import BACKENDS, Backend, masked_softmax_attention\n"
        "class Scale(torch.autograd.Function):\n"
        "    @staticmethod\n"
        "    def forward(ctx, t, s):\n"
        "        ctx.s = s\n"
        "        return t.view_as(t)\n"
        "    @staticmethod\n"
        "    def backward(ctx, g):\n"
        "        return (g * ctx.s if ctx.s else None), None\n"
        "def make(which):\n"
        "    class Bad(Backend):\n"
        "        name = 'bad_' + which\n"
        "        summary = 'right output, gradient of ' + which + ' scaled by 1.1'\n"
        "        sparse = True\n"
        "        def prepare(self, p):\n"
        "            mask = p.pattern.mask(p.seq_len, p.causal, p.device)\n"
        "            def fn(q, k, v):\n"
        "                q, k = (Scale.apply(t, 1.1) if n == which else t for n, t in (('q', q), ('k', k)))\n"
        "                return masked_softmax_attention(q, k, v, mask)\n"
        "            return fn\n"
        "    return BACKENDS.register(Bad)\n"
        "make('q'); make('k')\n"
        "@BACKENDS.register\n"
        "class NoGrad(Backend):\n"
        "    name = 'bad_none'\n"
        "    summary = 'right output, no gradient for q'\n"
        "    def prepare(self, p):\n"
        "        mask = p.pattern.mask(p.seq_len, p.causal, p.device)\n"
        "        return lambda q, k, v: masked_softmax_attention(Scale.apply(q, 0.0), k, v, mask)\n"
    )
    df = _run_with_plugin(tmp_path, plugin, "backends: [bad_q, bad_k, bad_none, block_sparse]\nmode: backward\n")
    df = df.set_index(["backend", "seq_len"])
    for be in ("bad_q", "bad_k"):
        assert df.loc[(be, 64), "status"] == "wrong" and "gradient error" in df.loc[(be, 64), "reason"]
        assert df.loc[(be, 64), "max_abs_err"] < 1e-5  # the output itself is right
        assert df.loc[(be, 64), "grad_check"] == "exact" and df.loc[(be, 300), "grad_check"] == "sampled"
    assert df.loc[("bad_q", 300), "status"] == "wrong"
    assert df.loc[("bad_k", 300), "status"] == "ok"  # key gradients are not sampled (see gradient_error)
    for n in (64, 300):  # a missing gradient is a wrong result, and the timing is kept
        rec = df.loc[("bad_none", n)]
        assert rec.status == "wrong" and "no gradient for q" in rec.reason and rec.time_median_s > 0
    ok = df.xs("block_sparse", level="backend")
    assert (ok.status == "ok").all() and (ok.grad_err < 1e-4).all()


EXAMPLE_PLUGIN = Path(__file__).resolve().parent.parent / "examples" / "plugin_example.py"


def _sparsebench(*args, cwd):
    """The command in a fresh process (a plugin registers into that process's registries only)."""
    return subprocess.run(
        [sys.executable, "-m", "sparsebench", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.mark.slow
def test_the_example_plugin_is_listed_and_runs(tmp_path):
    """examples/plugin_example.py (the README's plugin example): its pattern and backend are
    listed, and a scenario with them runs, every case checked against dense attention."""
    res = _sparsebench("list", "--plugin", str(EXAMPLE_PLUGIN), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "dilated_sink" in res.stdout and "row_chunks" in res.stdout
    scen = tmp_path / "plugin.yaml"
    scen.write_text(
        "name: plugin\nseq_lens: [100, 300]\n"
        "patterns: [{name: dilated_sink, params: {sinks: 2, window: 5, dilation: 3}}]\n"
        "backends: [naive, block_sparse, row_chunks]\nheads: 2\nhead_dim: 16\nrepeats: 2\nwarmup: 0\n"
        "tile: 32\n"
    )
    out = tmp_path / "r"
    res = _sparsebench(
        "run",
        str(scen),
        "--plugin",
        str(EXAMPLE_PLUGIN),
        "--output",
        str(out),
        "--no-plots",
        "--in-process",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] == str(out)
    df = pd.read_json(out / "records.jsonl", lines=True)
    assert (df.status == "ok").all(), df[["pattern", "backend", "seq_len", "status", "reason"]]
    df = df[df.pattern == "dilated_sink"]  # (the run adds the dense baseline)
    assert sorted(df.backend) == sorted(["naive", "block_sparse", "row_chunks"] * 2)
    # i attends j < 2 and j = i - 3k (k < 5): the sinks it does not already reach, plus its window keys
    nnz = {
        n: sum(len({j for j in range(2) if j <= i} | {i - 3 * k for k in range(5) if i - 3 * k >= 0}) for i in range(n))
        for n in (100, 300)
    }
    assert {n: set(df[df.seq_len == n].nnz) for n in nnz} == {n: {v} for n, v in nnz.items()}
    assert set(df.kv_cache_bytes[df.seq_len == 300]) == {2 * 1 * 2 * 16 * 4 * (2 + 4 * 3 + 1)}
