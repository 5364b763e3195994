"""``sparsebench capture`` (sparsebench/inputs/capture.py) on small randomly initialised
Llama-style models built here from a config (one with as many KV heads as query heads, one with
grouped-query attention), saved to a temporary folder: the file holds the chosen layers in the
model's shapes, q and k after the model's own rotary embedding, v as projected; a scenario runs on
it and its records name their source; bad input is one line."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from sparsebench.cli.app import app
from sparsebench.errors import ScenarioError, SparsebenchError
from sparsebench.inputs import capture, file

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

pytestmark = pytest.mark.slow  # importing transformers and running a model take seconds

TOKENS = 48


def tiny_llama(folder, kv_heads: int):
    """A 2-layer Llama (hidden 64, 4 heads of 16) with random weights, saved to ``folder``."""
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(str(folder))
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    ids = root / "ids.txt"
    ids.write_text(" ".join(str((7 * i) % 97) for i in range(TOKENS + 10)))
    return {
        "mha": (root / "mha", tiny_llama(root / "mha", 4)),
        "gqa": (root / "gqa", tiny_llama(root / "gqa", 2)),
        "ids": ids,
    }


def run_capture(folder, ids, out, *more):
    return CliRunner().invoke(app, ["capture", str(folder), "--ids", str(ids), "--out", str(out), *more])


def test_capture_keeps_the_chosen_layers_in_the_models_shapes(models, tmp_path):
    folder, _ = models["gqa"]
    out = tmp_path / "qkv.safetensors"
    res = run_capture(folder, models["ids"], out, "--layers", "1", "--tokens", str(TOKENS))
    assert res.exit_code == 0, res.output
    assert "4 heads over 2 KV heads of head_dim 16" in res.output
    c = file.inspect(str(out))
    assert c.layers == (1,) and (c.batch, c.heads, c.kv_heads, c.tokens, c.head_dim) == (1, 4, 2, TOKENS, 16)
    assert c.metadata["format"] == file.FORMAT and c.metadata["model"] == "gqa" and c.metadata["layers"] == "1"
    assert c.metadata["tokens"] == str(TOKENS) and len(c.metadata["text_sha256"]) == 64
    every = tmp_path / "all.safetensors"
    assert run_capture(folder, models["ids"], every).exit_code == 0
    assert file.inspect(str(every)).layers == (0, 1) and file.inspect(str(every)).tokens == TOKENS + 10


def test_captured_q_and_k_are_the_models_own_after_its_rotary_embedding(models, tmp_path):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    folder, model = models["mha"]
    out = tmp_path / "qkv.safetensors"
    assert run_capture(folder, models["ids"], out, "--layers", "0", "--tokens", str(TOKENS)).exit_code == 0
    ids = torch.tensor([[int(x) for x in models["ids"].read_text().split()][:TOKENS]])
    with torch.no_grad():  # layer 0's projections of its input, by hand
        hidden = model.model.embed_tokens(ids)
        attn = model.model.layers[0].self_attn
        x = model.model.layers[0].input_layernorm(hidden)
        pre = [proj(x).view(1, TOKENS, -1, 16).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)]
        cos, sin = model.model.rotary_emb(hidden, torch.arange(TOKENS)[None])
        q_rot, k_rot = apply_rotary_pos_emb(pre[0], pre[1], cos, sin)
    q, k, v = file.read(str(out), 0, batch=1, heads=4, kv_heads=4, seq_len=TOKENS, head_dim=16)
    assert torch.allclose(q, q_rot, atol=1e-5) and torch.allclose(k, k_rot, atol=1e-5)
    assert torch.allclose(v, pre[2], atol=1e-5)
    # post-rotary, not the projections: equal at position 0 (no rotation), different after it
    assert torch.allclose(q[:, :, 0], pre[0][:, :, 0], atol=1e-5)
    assert not torch.allclose(q[:, :, 1:], pre[0][:, :, 1:], atol=1e-3)


def test_a_scenario_runs_on_a_capture_and_its_records_name_the_source(models, tmp_path):
    folder, _ = models["gqa"]
    out = tmp_path / "qkv.safetensors"
    assert run_capture(folder, models["ids"], out, "--layers", "0,1", "--tokens", "32").exit_code == 0
    scen = tmp_path / "s.yaml"
    scen.write_text(
        "name: captured\nseq_lens: [16, 32, 64]\npatterns: [{name: sliding_window, params: {window: 8}}]\n"
        "backends: [naive]\nheads: 4\nkv_heads: 2\nhead_dim: 16\nrepeats: 1\nwarmup: 0\n"
        "inputs: {kind: file, path: qkv.safetensors, layers: [1]}\n"
    )
    res = CliRunner().invoke(app, ["run", str(scen), "--output", str(tmp_path / "r"), "--no-plots", "--in-process"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in (tmp_path / "r" / "records.jsonl").read_text().splitlines()]
    assert {r["inputs"] for r in recs} == {"file:qkv#layer1"}
    assert {r["inputs_file"] for r in recs} == {str(out.resolve())} and {r["inputs_layer"] for r in recs} == {1}
    ran = [r for r in recs if r["status"] == "ok"]
    assert {r["seq_len"] for r in ran} == {16, 32} and all(r["max_abs_err"] < 1e-4 for r in ran)
    assert {r["reason"] for r in recs if r["seq_len"] == 64} == {"qkv.safetensors holds 32 tokens, fewer than n = 64"}


def test_bad_capture_input_is_one_line(models, tmp_path):
    folder, _ = models["mha"]
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    res = CliRunner().invoke(app, ["capture", str(folder), "--text", str(text)])
    assert res.exit_code == 2 and "has no tokenizer" in res.output and "--ids FILE" in res.output, res.output
    res = run_capture(folder, models["ids"], tmp_path / "x.safetensors", "--layers", "0,5")
    assert res.exit_code == 2 and "--layers 5: the model has 2 layers (0-1)" in res.output, res.output
    res = run_capture(folder, models["ids"], tmp_path / "x.safetensors", "--tokens", "500")
    assert res.exit_code == 2 and "gives 58 tokens; --tokens 500 asks for more" in res.output, res.output
    res = run_capture(tmp_path, models["ids"], tmp_path / "x.safetensors")
    assert res.exit_code == 2 and "not a Hugging Face model folder" in res.output, res.output
    assert "Traceback" not in res.output


def test_without_transformers_capture_names_the_extra(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    folder, _ = models["mha"]
    with pytest.raises(SparsebenchError, match=r"install the \[hf\] extra: pip install -e '\.\[hf\]'"):
        capture.capture(folder, capture.Tokens([1, 2, 3], "ids.txt", "0" * 64), None, folder / "x.safetensors")
    with pytest.raises(ScenarioError, match="give the input as --text FILE"):
        capture.read_tokens(folder, text=None, ids=None, tokens=None)
