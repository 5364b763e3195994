"""Inputs that look like a model's (sparsebench/inputs): the random kind is today's seeded
normals, the synthetic generator builds in each property it claims (rotary embeddings as Llama
applies them, locality, sinks, heavy hitters, heads that differ, grouped-query heads) and its
defaults match the published figures it cites; a scenario's ``inputs:`` (one kind or a list, a
dimension of the sweep with its own baseline), a recorded file's shape rules, bad input as one
line naming the field, and records that name their inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from sparsebench.cli.app import app
from sparsebench.errors import ScenarioError
from sparsebench.inputs import Source, calibration, file, make, synthetic
from sparsebench.measure import harness
from sparsebench.scenario import expand, parse

SHAPE = dict(batch=1, heads=4, kv_heads=2, seq_len=512, head_dim=32)


def scenario_text(extra: str = "", **fields) -> str:
    base = dict(name="t", seq_lens="[128, 256]", patterns="[{name: sliding_window, params: {window: 32}}]")
    base.update(backends="[naive]", heads="4", head_dim="16")
    base.update({k: str(v) for k, v in fields.items()})
    return "".join(f"{k}: {v}\n" for k, v in base.items()) + extra


def plan_of(text: str, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return expand(parse(text, str(path)), str(path))


def validate(text: str, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return CliRunner().invoke(app, ["validate", str(path)])


# ---------------------------------------------------------------------------------- random


def test_the_random_kind_is_the_seeded_normals_every_run_measured(make_case):
    case = make_case(heads=4, kv_heads=2, seq_len=96)
    p = harness.make_problem(case)
    q, k, v = harness.inputs(p, case=case)
    g = torch.Generator().manual_seed(0)  # the tensors before inputs had kinds: q, k, v in this order
    for got, heads in zip((q, k, v), (4, 2, 2)):
        assert torch.equal(got, torch.randn((1, heads, 96, 16), generator=g))
    assert case.inputs == "random" and case.inputs_seed == 0


def test_the_case_names_the_inputs_the_harness_builds(make_case):
    plain = make_case(heads=4, kv_heads=2, seq_len=128)
    case = make_case(heads=4, kv_heads=2, seq_len=128, inputs="synthetic", inputs_seed=3)
    p = harness.make_problem(case)
    q, k, v = harness.inputs(p, case=case)
    expected = synthetic.generate(synthetic.Knobs(), seed=3, batch=1, heads=4, kv_heads=2, seq_len=128, head_dim=16)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), expected))
    assert not torch.equal(q, harness.inputs(p, case=plain)[0])
    knobbed = make_case(inputs="synthetic(sinks=3)", inputs_knobs={"sinks": 3})
    assert Source.of_case(knobbed) == Source(kind="synthetic", seed=0, knobs={"sinks": 3})
    assert Source.of_case(knobbed).label() == "synthetic(sinks=3)"


# ---------------------------------------------------------------------------------- synthetic


def test_synthetic_inputs_are_seeded_shaped_and_in_the_asked_dtype():
    a = synthetic.generate(synthetic.Knobs(), seed=1, **SHAPE)
    b = synthetic.generate(synthetic.Knobs(), seed=1, **SHAPE)
    c = synthetic.generate(synthetic.Knobs(), seed=2, **SHAPE)
    assert [t.shape for t in a] == [(1, 4, 512, 32), (1, 2, 512, 32), (1, 2, 512, 32)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
    half = make(Source(kind="synthetic", seed=1), dtype=torch.bfloat16, device="cpu", **SHAPE)
    assert all(t.dtype == torch.bfloat16 for t in half) and torch.allclose(half[1].float(), a[1], rtol=1e-2, atol=0.1)


def test_rotary_is_llamas_rotation_of_each_coordinate_pair():
    x = torch.randn(2, 7, 8, dtype=torch.float64).float()
    got = synthetic.rotary(x, 500.0, start=3)
    # independent reference: coordinates (p, p + d/2) as a complex number times exp(i (3 + t) theta^(-2p/d))
    z = torch.complex(x[..., :4].double(), x[..., 4:].double())
    ang = torch.arange(3, 10, dtype=torch.float64)[:, None] * 500.0 ** (-torch.arange(4, dtype=torch.float64) * 2 / 8)
    w = z * torch.exp(1j * ang)
    assert torch.allclose(got, torch.cat([w.real, w.imag], -1).float(), atol=1e-5)
    # a rotation: norms kept, and the score of two rotated vectors depends on their distance only
    assert torch.allclose(got.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    u = torch.randn(8)
    r = synthetic.rotary(u.expand(1, 20, 8).clone(), 10000.0)[0]
    assert math.isclose(float(r[2] @ r[5]), float(r[10] @ r[13]), rel_tol=1e-4)


def attention_rows(q, k, rows):
    """Full causal attention probabilities of the given query rows, (heads, rows, n), float64."""
    group = q.shape[1] // k.shape[1]
    kk = k[0].repeat_interleave(group, 0).double()
    s = q[0][:, rows].double() @ kk.transpose(1, 2) / q.shape[-1] ** 0.5
    j = torch.arange(q.shape[2])
    return torch.softmax(s.masked_fill(j[None, None, :] > rows[None, :, None], float("-inf")), -1)


ROWS = torch.arange(256, 512, 16)
OFF = dict(locality=0.0, sinks=0, heavy_hitters=0.0, head_spread=0.0)


def generated(**knobs):
    return synthetic.generate(synthetic.Knobs(**knobs), seed=0, **SHAPE)


def test_sinks_draw_attention_to_the_first_keys_and_only_with_the_knob():
    q, k, _ = generated(**{**OFF, "sinks": 2, "sink_strength": 8.0})
    p = attention_rows(q, k, ROWS)
    assert float(p[..., :2].sum(-1).mean()) > 0.5  # two of 257-497 keys take most of it
    q0, k0, _ = generated(**OFF)
    assert float(attention_rows(q0, k0, ROWS)[..., :2].sum(-1).mean()) < 0.05


def test_locality_makes_near_keys_outweigh_far_ones():
    def near_over_far(**knobs):  # a near key's mean probability over a far key's
        q, k, _ = generated(**{**OFF, **knobs})
        p = attention_rows(q, k, ROWS)
        dist = ROWS[:, None] - torch.arange(512)[None, :]
        near, far = (dist >= 0) & (dist < 16), dist > 128
        return float((p * near).sum() / near.sum()) / float((p * far).sum() / far.sum())

    assert near_over_far(locality=6.0, locality_span=8.0) > 4 > 1.5 > near_over_far()


def test_heavy_hitters_are_a_few_keys_most_queries_attend():
    def top_column_share(**knobs):
        q, k, _ = generated(**{**OFF, **knobs})
        p = attention_rows(q, k, ROWS)
        column = p.sum(1)  # per head, the mass each key receives over the rows
        return float((column.topk(5, dim=-1).values.sum(-1) / column.sum(-1)).mean())  # 1% of the keys

    assert top_column_share(heavy_hitters=0.01, heavy_strength=6.0) > 0.3 > 0.1 > top_column_share()


def test_heads_differ_by_head_spread_and_grouped_heads_share_their_kv_heads_structure():
    def first_share_per_head(spread):
        q, k, _ = generated(**{**OFF, "sinks": 1, "sink_strength": 6.0, "head_spread": spread})
        return attention_rows(q, k, ROWS)[..., 0].mean(-1)

    same, varied = first_share_per_head(0.0), first_share_per_head(0.6)
    assert float(same.max() - same.min()) < 0.1 < float(varied.max() - varied.min())
    # grouped-query attention: the sink is a key of KV head h // 2, every query head of the group finds it
    q, k, _ = generated(**{**OFF, "sinks": 1, "sink_strength": 6.0})
    assert k[0, :, 0].norm(dim=-1).min() > 2 * k[0, :, 1:].norm(dim=-1).max(-1).values.max() / 2
    assert bool((attention_rows(q, k, ROWS)[..., 0].mean(-1) > 0.3).all())


def test_bad_knobs_are_refused_by_name():
    with pytest.raises(ValueError, match="heavy_hitters"):
        synthetic.Knobs(heavy_hitters=2.0)
    with pytest.raises(ValueError, match="sinks"):
        synthetic.Knobs(sinks=1.5)
    with pytest.raises(ValueError, match="theta"):
        synthetic.Knobs(theta=1.0)


def test_the_default_knobs_match_the_published_figures_and_random_inputs_do_not():
    shape = dict(batch=1, heads=8, kv_heads=8, seq_len=4096, head_dim=64)
    c = calibration.measure(*synthetic.generate(synthetic.Knobs(), seed=1, **shape)[:2], rows=16)
    # StreamingLLM fig. 12 (Llama-2-7B, 4096 tokens): 0.6-0.9 on the first token in most layers;
    # H2O sec. 3.1 (OPT): over 95% of the entries below 1% of their row's largest
    assert 0.5 < c.first_token < 0.9 and c.sparse > 0.95
    r = calibration.measure(*synthetic.generate(synthetic.Knobs(**OFF), seed=1, **shape)[:2], rows=16)
    assert r.first_token < 0.01 and r.sparse < 0.5 and c.sink_window > 3 * r.sink_window


# ---------------------------------------------------------------------------------- scenario


def test_inputs_default_to_random_and_a_list_is_a_dimension_with_its_own_baselines(tmp_path):
    plain = plan_of(scenario_text(), tmp_path)
    fields = {(c.inputs, c.inputs_seed, c.inputs_file, c.inputs_layer) for c in plain.cases}
    assert fields == {("random", 0, None, None)}
    plan = plan_of(scenario_text(inputs="[random, {kind: synthetic, seed: 2, sinks: 2}]"), tmp_path)
    assert len(plan.cases) == 2 * len(plain.cases)
    for label in ("random", "synthetic(seed=2, sinks=2)"):
        cases = [c for c in plan.cases if c.inputs == label]
        assert {(c.pattern, c.backend, c.seq_len) for c in cases} == {
            (p, b, n) for p, b in (("dense", "sdpa"), ("sliding_window", "naive")) for n in (128, 256)
        }
    syn = next(c for c in plan.cases if c.inputs.startswith("synthetic"))
    assert (syn.inputs_seed, syn.inputs_knobs) == (2, {"sinks": 2}) and len({c.case_id for c in plan.cases}) == 8
    assert any("each a dimension of the sweep" in note for note in plan.notes)


def test_decode_runs_random_inputs_only_and_says_so(tmp_path):
    plan = plan_of(scenario_text(inputs="[random, synthetic]", mode="decode"), tmp_path)
    skipped = [c for c in plan.cases if c.skip_reason]
    assert skipped and all(c.inputs == "synthetic" and "random inputs only" in c.skip_reason for c in skipped)
    assert all(not c.skip_reason for c in plan.cases if c.inputs == "random")


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ("{kind: weird}", "field 'inputs[0].kind'"),
        ("{kind: synthetic, sink: 2}", "unknown key 'sink' for kind synthetic (did you mean 'sinks'?)"),
        ("{kind: synthetic, heavy_hitters: 3}", "heavy_hitters is a share of the positions"),
        ("{kind: file}", "kind file needs path"),
        ("{kind: file, path: none.safetensors}", "none.safetensors: no such file"),
        ("{kind: random, path: x.safetensors}", "path belongs to kind file"),
        ("[synthetic, {kind: synthetic, seed: 0}]", "names the inputs synthetic twice"),
    ],
)
def test_bad_inputs_are_one_line_naming_the_field(tmp_path, inputs, message):
    res = validate(scenario_text(inputs=inputs), tmp_path)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output and "field 'inputs" in res.output


def test_a_model_scenario_refuses_other_inputs(tmp_path):
    text = "name: m\nseq_lens: [256]\nmodel: gpt2\nbackends: [naive]\ninputs: synthetic\n"
    with pytest.raises(ScenarioError, match="field 'inputs': a model scenario runs on random inputs"):
        parse(text, str(tmp_path / "m.yaml"))


# ---------------------------------------------------------------------------------- file


def write_recording(path, layers=(0, 3), tokens=200, heads=4, kv_heads=2, head_dim=16):
    g = torch.Generator().manual_seed(5)
    tensors = {
        layer: tuple(torch.randn((1, h, tokens, head_dim), generator=g) for h in (heads, kv_heads, kv_heads))
        for layer in layers
    }
    file.write(str(path), tensors, {"model": "toy", "tokens": str(tokens)})
    return tensors


def test_a_file_gives_one_inputs_per_layer_and_lengths_beyond_it_are_skipped(tmp_path):
    tensors = write_recording(tmp_path / "qkv.safetensors")
    plan = plan_of(scenario_text(kv_heads=2, inputs="{kind: file, path: qkv.safetensors}"), tmp_path)
    assert {c.inputs for c in plan.cases} == {"file:qkv#layer0", "file:qkv#layer3"}
    case = next(c for c in plan.cases if c.inputs == "file:qkv#layer3" and c.seq_len == 128 and c.backend == "naive")
    assert case.inputs_file == str((tmp_path / "qkv.safetensors").resolve()) and case.inputs_layer == 3
    assert case.inputs_seed is None and case.skip_reason is None
    q, k, v = harness.inputs(harness.make_problem(case), case=case)
    assert all(torch.equal(a, b[:, :, :128]) for a, b in zip((q, k, v), tensors[3]))  # the first n tokens
    assert all("holds 200 tokens, fewer than n = 256" in c.skip_reason for c in plan.cases if c.seq_len == 256)
    one = plan_of(scenario_text(kv_heads=2, inputs="{kind: file, path: qkv.safetensors, layers: [3]}"), tmp_path)
    assert {c.inputs for c in one.cases} == {"file:qkv#layer3"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "field 'inputs[0].path': qkv.safetensors holds q, k and v of 4 heads over 2 KV heads of head_dim 16; "
             "the scenario's kv_heads is 4: set kv_heads: 2"),
        ({"kv_heads": 2, "head_dim": 32}, "field 'head_dim': qkv.safetensors holds"),
        ({"kv_heads": 2, "inputs": "{kind: file, path: qkv.safetensors, layers: [1]}"}, "holds no layer 1"),
        ({"kv_heads": 2, "batch": 2}, "field 'batch': qkv.safetensors holds a batch of 1"),
        ({"kv_heads": 2, "inputs": "{kind: file, path: qkv.safetensors, seed: 1}"}, "kind file has no seed"),
    ],
)  # fmt: skip
def test_a_file_whose_shape_does_not_fit_is_refused_naming_the_value_to_set(tmp_path, fields, message):
    write_recording(tmp_path / "qkv.safetensors")
    fields = {"inputs": "{kind: file, path: qkv.safetensors}", **fields}
    res = validate(scenario_text(**fields), tmp_path)
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output


def test_a_file_that_is_not_a_recording_is_one_line(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    res = validate(scenario_text(inputs="{kind: file, path: junk.safetensors}"), tmp_path)
    assert res.exit_code == 2 and "junk.safetensors: not a safetensors file" in res.output, res.output


# ---------------------------------------------------------------------------------- records


@pytest.mark.slow
def test_a_run_records_which_inputs_each_case_used(tmp_path):
    write_recording(tmp_path / "qkv.safetensors", layers=(2,), tokens=64)
    text = scenario_text(
        seq_lens="[64]",
        kv_heads=2,
        repeats=1,
        warmup=0,
        inputs="[random, {kind: synthetic, seed: 4}, {kind: file, path: qkv.safetensors}]",
    )
    (tmp_path / "s.yaml").write_text(text)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(tmp_path / "s.yaml"), "--output", str(out), "--no-plots", "--in-process"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    got = {(r["inputs"], r["inputs_seed"], r["inputs_file"], r["inputs_layer"]) for r in recs}
    path = str((tmp_path / "qkv.safetensors").resolve())
    assert got == {("random", 0, None, None), ("synthetic(seed=4)", 4, None, None), ("file:qkv#layer2", None, path, 2)}
    assert {r["status"] for r in recs} == {"ok"} and len(recs) == 6  # dense sdpa and the window, per inputs
