"""KV-cache accounting (sparsebench.kv.planner) and the ``sparsebench kv`` command."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import typer
from typer.testing import CliRunner

from sparsebench.cli.kv import register
from sparsebench.errors import ScenarioError
from sparsebench.kv import planner as kvcache
from sparsebench.kv.planner import (
    ModelSpec,
    dtype_bytes,
    kv_bytes,
    kv_table,
    load_model_file,
    load_preset,
    make_pattern,
    max_batch,
    max_context,
)

GiB, MiB = 2**30, 2**20
LLAMA8 = load_preset("llama-3.1-8b")
DENSE = make_pattern("dense")
SW4096 = make_pattern("sliding_window", {"window": 4096})


# -- accounting ---------------------------------------------------------------------------------


def test_llama_8b_128k_dense_is_16_gib():
    assert (LLAMA8.layers, LLAMA8.kv_heads, LLAMA8.head_dim) == (32, 8, 128)
    expected = 2 * 32 * 8 * 128 * 2 * 131072
    assert kv_bytes(LLAMA8, DENSE, 131072, dtype="fp16") == expected == 16 * GiB


def test_sliding_window_bounds_the_cache():
    assert kv_bytes(LLAMA8, SW4096, 131072) == 512 * MiB
    assert kv_bytes(LLAMA8, SW4096, 1_000_000) == 512 * MiB
    assert kv_bytes(LLAMA8, SW4096, 1024) == 128 * MiB  # shorter than the window: keeps n


def test_retention_per_pattern():
    n = 131072
    sink = make_pattern("sink_window", {"sinks": 4, "window": 4096})
    lf = make_pattern("longformer", {"window": 4096, "global_tokens": [0, 7]})
    strided = make_pattern("strided", {"stride": 128})
    per_token = 2 * 32 * 8 * 128 * 2
    assert kv_bytes(LLAMA8, sink, n) == per_token * 4100
    assert kv_bytes(LLAMA8, lf, n) == per_token * 4098
    assert kv_bytes(LLAMA8, strided, n) == kv_bytes(LLAMA8, DENSE, n)  # cuts compute, not cache


def test_grouped_query_attention_counts_kv_heads():
    mha = ModelSpec("mha", layers=32, heads=32, kv_heads=32, head_dim=128)
    assert kv_bytes(mha, DENSE, 8192) == 4 * kv_bytes(LLAMA8, DENSE, 8192)
    falcon = load_preset("falcon-7b")  # multi-query: one KV head
    assert falcon.kv_heads == 1 and falcon.attention == "MQA"
    assert kv_bytes(falcon, DENSE, 2048) == 2 * 32 * 1 * 64 * 2 * 2048
    assert LLAMA8.attention == "GQA 4:1"
    assert load_preset("llama-3.1-70b").kv_heads == 8
    assert kv_bytes(load_preset("llama-3.1-70b"), DENSE, 131072) == 40 * GiB


def test_dtypes_and_batch():
    assert [dtype_bytes(d) for d in ("fp32", "fp16", "bf16", "fp8", "int8", "int4")] == [4, 2, 2, 1, 1, 0.5]
    base = kv_bytes(LLAMA8, DENSE, 4096, dtype="fp16")
    assert kv_bytes(LLAMA8, DENSE, 4096, dtype="fp32") == 2 * base
    assert kv_bytes(LLAMA8, DENSE, 4096, dtype="int4") == base // 4
    assert kv_bytes(LLAMA8, DENSE, 4096, dtype="bfloat16") == base
    assert kv_bytes(LLAMA8, DENSE, 4096, batch=3) == 3 * base
    one = ModelSpec("tiny", layers=1, heads=1, kv_heads=1, head_dim=1)
    assert kv_bytes(one, DENSE, 1, dtype="int4") == 1  # 2 nibbles = one byte
    assert kv_bytes(one, make_pattern("sliding_window", {"window": 1}), 1, dtype="int4") == 1
    with pytest.raises(ScenarioError, match="unknown KV-cache dtype 'fp12'.*fp32"):
        kv_bytes(LLAMA8, DENSE, 1, dtype="fp12")


def test_paging_rounds_up_to_whole_pages():
    per_token = 2 * 32 * 8 * 128 * 2
    assert kv_bytes(LLAMA8, DENSE, 1000, page=256) == per_token * 1024
    assert kv_bytes(LLAMA8, DENSE, 1024, page=256) == per_token * 1024
    sw = make_pattern("sliding_window", {"window": 100})
    assert kv_bytes(LLAMA8, sw, 10_000, page=64) == per_token * 128
    with pytest.raises(ScenarioError, match="page"):
        kv_bytes(LLAMA8, DENSE, 1000, page=0)


def test_model_default_uses_the_models_own_window():
    mistral = load_preset("mistral-7b")
    assert mistral.sliding_window == 4096
    assert kv_bytes(mistral, None, 32768) == kv_bytes(mistral, SW4096, 32768)
    assert kv_bytes(LLAMA8, None, 32768) == kv_bytes(LLAMA8, DENSE, 32768)
    rows = kv_table(mistral, 32768, [SW4096])
    assert [r.pattern for r in rows] == ["model default", "dense", "sliding_window"]
    assert rows[0].label == "sliding_window(window=4096)" and rows[0].vs_dense == pytest.approx(1 / 8)
    assert rows[1].retained_tokens == 32768  # "dense" is full attention, not the model's window


def test_presets():
    for name in ("llama-3.1-8b", "llama-3.1-70b", "mistral-7b", "qwen2.5-7b", "gpt2"):
        assert name in kvcache.PRESETS
    for name in kvcache.PRESETS:
        spec = load_preset(name)
        assert spec.name == name and spec.heads % spec.kv_heads == 0
    qwen = load_preset("qwen2.5-7b")
    assert (qwen.layers, qwen.kv_heads, qwen.head_dim) == (28, 4, 128)
    gpt2 = load_preset("gpt2")
    assert (gpt2.layers, gpt2.heads, gpt2.kv_heads, gpt2.head_dim) == (12, 12, 12, 64)
    with pytest.raises(ScenarioError, match="unknown model preset 'llama-8b'.*llama-3.1-8b"):
        load_preset("llama-8b")


# -- model files --------------------------------------------------------------------------------


def _write(tmp_path, text, name="m.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_model_file(tmp_path):
    spec = load_model_file(_write(tmp_path, "name: mine\nlayers: 4\nheads: 8\nkv_heads: 2\nhead_dim: 64\n"))
    assert spec == ModelSpec("mine", 4, 8, 2, 64)
    spec = load_model_file(_write(tmp_path, "layers: 4\nheads: 8\nhead_dim: 64\n", "plain.yaml"))
    assert spec.name == "plain" and spec.kv_heads == 8  # kv_heads defaults to heads (MHA)


@pytest.mark.parametrize(
    "text, match",
    [
        (
            "layers: 4\nheads: 8\nhead_dim: 64\nkv_head: 2\n",
            r"m\.yaml: unknown field 'kv_head' \(did you mean 'kv_heads'",
        ),
        ("layers: 4\nheads: 8\n", r"m\.yaml: missing field 'head_dim'"),
        ("layers: four\nheads: 8\nhead_dim: 64\n", r"m\.yaml: field 'layers' must be a positive integer, got 'four'"),
        (
            "layers: 4\nheads: 8\nkv_heads: 3\nhead_dim: 64\n",
            r"m\.yaml: heads \(8\) must be a multiple of kv_heads \(3\)",
        ),
        ("layers: [4\n", r"m\.yaml: not valid YAML at line"),
        ("- 4\n", r"m\.yaml: expected a mapping"),
    ],
)
def test_model_file_errors_name_file_and_field(tmp_path, text, match):
    with pytest.raises(ScenarioError, match=match):
        load_model_file(_write(tmp_path, text))


def test_model_file_missing(tmp_path):
    with pytest.raises(ScenarioError, match="nope.yaml: cannot read model file"):
        load_model_file(tmp_path / "nope.yaml")


def test_hugging_face_config_json(tmp_path):
    config = {
        "_name_or_path": "mistralai/Mistral-7B-v0.1",
        "model_type": "mistral",
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "sliding_window": 4096,
        "rope_theta": 10000.0,
    }
    spec = load_model_file(_write(tmp_path, json.dumps(config), "config.json"))
    assert spec.name == "mistral-7b-v0.1"
    assert dataclasses.replace(spec, name="mistral-7b") == load_preset("mistral-7b")


# -- budgets ------------------------------------------------------------------------------------


def test_max_context():
    budget = 24 * GiB
    longest = max_context(LLAMA8, DENSE, budget)
    assert longest == 24 * GiB // (2 * 32 * 8 * 128 * 2) == 196608
    assert kv_bytes(LLAMA8, DENSE, longest) <= budget < kv_bytes(LLAMA8, DENSE, longest + 1)
    assert max_context(LLAMA8, DENSE, budget, batch=2) == 98304
    assert max_context(LLAMA8, DENSE, budget, dtype="int4") == 4 * 196608
    # a bounded cache that fits fits at any length
    assert max_context(LLAMA8, SW4096, budget) is None
    # ... unless even the bounded cache is too big: then the context is the limit
    assert max_context(LLAMA8, SW4096, 256 * MiB) == 2048
    assert max_context(LLAMA8, DENSE, 1000) == 0  # not one token
    odd = max_context(LLAMA8, DENSE, budget, page=1000)
    assert odd % 1000 == 0 and kv_bytes(LLAMA8, DENSE, odd, page=1000) <= budget


def test_max_batch():
    budget = 24 * GiB
    assert max_batch(LLAMA8, DENSE, 131072, budget) == 1
    assert max_batch(LLAMA8, SW4096, 131072, budget) == 48
    assert max_batch(LLAMA8, DENSE, 131072, 8 * GiB) == 0
    assert max_batch(LLAMA8, DENSE, 131072, budget, dtype="int4") == 6
    b = max_batch(LLAMA8, DENSE, 5000, budget, page=16)
    assert kv_bytes(LLAMA8, DENSE, 5000, batch=b, page=16) <= budget < kv_bytes(LLAMA8, DENSE, 5000, b + 1, page=16)


def test_kv_table_default_set():
    rows = kv_table(LLAMA8, 131072, budget=24 * GiB)
    assert [r.pattern for r in rows] == ["dense", "sliding_window", "sink_window", "strided", "longformer"]
    dense, sw = rows[0], rows[1]
    assert dense.bytes == 16 * GiB and dense.vs_dense == 1.0 and not dense.bounded
    assert dense.max_context == 196608 and not dense.context_unbounded and dense.max_batch == 1
    assert sw.bytes == 512 * MiB and sw.vs_dense == 1 / 32 and sw.bounded
    assert sw.max_context is None and sw.context_unbounded and sw.max_batch == 48
    json.dumps([r.to_dict() for r in rows])
    assert kv_table(LLAMA8, 1024)[0].max_batch is None  # no budget, no fit columns


# -- the CLI ------------------------------------------------------------------------------------


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """sparsebench (test app)."""

    register(app)
    return app


def _run(*args: str):
    return CliRunner().invoke(_app(), ["kv", *args])


def test_cli_table():
    res = _run("--model", "llama-3.1-8b", "--context", "128k", "--pattern", "sliding_window", "-p", "window=4096")
    assert res.exit_code == 0, res.output
    assert "16.00 GiB" in res.output and "512.00 MiB" in res.output
    assert "3.1%" in res.output and "GQA 4:1" in res.output
    assert "strided" not in res.output  # with --pattern only that one (plus dense)


def test_cli_default_set_with_budget():
    res = _run("--model", "llama-3.1-8b", "--context", "131072", "--budget", "24GiB")
    assert res.exit_code == 0, res.output
    for name in ("dense", "sliding_window", "sink_window", "strided", "longformer", "unbounded", "192k"):
        assert name in res.output


def test_cli_json():
    res = _run("--model", "llama-3.1-8b", "--context", "128k", "--budget", "24GiB", "--json", "--batch", "1")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["context"] == 131072 and doc["dtype"] == "fp16" and doc["budget_bytes"] == 24 * GiB
    assert doc["model"]["kv_heads"] == 8
    by = {r["pattern"]: r for r in doc["rows"]}
    assert by["dense"]["bytes"] == 16 * GiB and by["dense"]["max_context"] == 196608
    assert by["sliding_window"]["bytes"] == 512 * MiB
    assert by["sliding_window"]["context_unbounded"] is True and by["sliding_window"]["max_batch"] == 48


def test_cli_yaml_params_and_model_file(tmp_path):
    path = _write(tmp_path, "name: mine\nlayers: 2\nheads: 4\nkv_heads: 1\nhead_dim: 16\n")
    res = _run(
        "--model-file", str(path), "--context", "1k", "--pattern", "longformer",
        "-p", "window=64", "-p", "global_tokens=[0,7]", "--dtype", "fp32", "--page", "16", "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    lf = doc["rows"][1]
    assert lf["params"] == {"window": 64, "global_tokens": [0, 7]}
    assert lf["retained_tokens"] == 80  # 66 rounded up to pages of 16
    assert lf["bytes"] == 2 * 2 * 1 * 16 * 4 * 80


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "llama-8b", "--context", "1k"], "unknown model preset 'llama-8b'"),
        (["--context", "1k"], "give exactly one of --model"),
        (["--model", "gpt2", "--model-file", "x.yaml", "--context", "1k"], "give exactly one of --model"),
        (["--model", "gpt2", "--context", "lots"], "invalid token count 'lots'"),
        (["--model", "gpt2", "--context", "1k", "--budget", "24G"], "ambiguous unit"),
        (["--model", "gpt2", "--context", "1k", "--dtype", "fp12"], "unknown KV-cache dtype"),
        (["--model", "gpt2", "--context", "1k", "-p", "window=4"], "-p/--param needs --pattern"),
        (["--model", "gpt2", "--context", "1k", "--pattern", "slidng_window"], "did you mean 'sliding_window'"),
        (["--model", "gpt2", "--context", "1k", "--pattern", "sliding_window", "-p", "window"], "key=value"),
        (["--model", "gpt2", "--context", "1k", "--pattern", "sliding_window", "-p", "size=4"], "parameter"),
        (["--model", "gpt2", "--context", "1k", "--pattern", "sliding_window"], "needs parameter(s): window"),
        (["--model", "gpt2", "--context", "1k", "--page", "0"], "--page must be at least 1"),
    ],
)
def test_cli_errors_one_line_exit_2(args, message):
    res = _run(*args)
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: ") and message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.output


def test_cli_kv_module_does_not_import_torch():
    code = "import sys, sparsebench.cli.kv, sparsebench.kv.planner; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
