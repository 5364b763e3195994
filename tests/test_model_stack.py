"""Issue 19, model scenarios: a model's attention stack as one case. ``model:`` (a preset) or
``model_file:`` (a config) instead of ``patterns:``; every attention layer group runs with the
pattern sparsebench.kv reads from the config, checked as every case is, timed once and multiplied
by its layers; state layers are not timed and the record says so; an all-dense twin runs beside
it; the reports set the two side by side. The expected KV bytes are worked out by hand here."""

from __future__ import annotations

import json
import textwrap

import pytest
from typer.testing import CliRunner

from sparsebench import scenario as sc_mod
from sparsebench.cli.app import app
from sparsebench.errors import ScenarioError

# naive: no native build; 128 tokens is gpt-oss-20b's window, its smallest length
GPT_OSS = """\
name: stack
seq_lens: [128, 256]
model: gpt-oss-20b
heads_scale: 0.125
backends: [naive]
warmup: 0
repeats: 2
"""


def write(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def plan_of(path):
    sc, _, source = sc_mod.load(path)
    return sc_mod.expand(sc, source)


def hf_config(tmp_path, name="config.json", **keys):
    """A small Hugging Face config.json: 4 layers, 4 query heads over 2 KV heads of 16."""
    data = {
        "model_type": "tiny",
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        **keys,
    }
    folder = tmp_path / "tiny-model"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps(data))
    return folder / name


# -- the scenario -------------------------------------------------------------------------------


def test_a_preset_expands_into_its_stack_and_its_all_dense_twin(tmp_path):
    plan = plan_of(write(tmp_path, GPT_OSS))
    assert [(c.seq_len, c.pattern_label, c.stack) for c in plan.cases] == [
        (128, "gpt-oss-20b", "shipped"),
        (128, "gpt-oss-20b all-dense", "all-dense"),
        (256, "gpt-oss-20b", "shipped"),
        (256, "gpt-oss-20b all-dense", "all-dense"),
    ]
    c = plan.cases[0]
    # 64 query heads x 0.125; head_dim from the model; a model's decoder is causal
    assert (c.model, c.heads, c.head_dim, c.causal, c.heads_scale) == ("gpt-oss-20b", 8, 64, True, 0.125)
    assert c.model_source == "preset:gpt-oss-20b"
    assert any("1 KV head" in n for n in plan.notes)  # 8 KV heads x 0.125, said
    assert len({c.case_id for c in plan.cases}) == 4


def test_a_model_file_is_read_beside_the_scenario_and_its_window_skips_the_lengths_it_exceeds(tmp_path):
    hf_config(tmp_path, layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=64)
    path = write(tmp_path, "name: f\nseq_lens: [32, 64]\nmodel_file: tiny-model/config.json\nbackends: [naive]\n")
    plan = plan_of(path)
    assert plan.cases[0].model == "tiny-model" and plan.cases[0].heads == 4
    skipped = {c.seq_len: c.skip_reason for c in plan.cases}
    assert skipped[64] is None and "sliding 64" in skipped[32]


def test_a_list_of_models_runs_each(tmp_path):
    text = GPT_OSS.replace("model: gpt-oss-20b", "model: [gpt-oss-20b, gemma-3-27b]").replace("[128, 256]", "[1024]")
    plan = plan_of(write(tmp_path, text))
    assert [(c.model, c.stack, c.heads, c.head_dim) for c in plan.cases] == [
        ("gpt-oss-20b", "shipped", 8, 64),
        ("gpt-oss-20b", "all-dense", 8, 64),
        ("gemma-3-27b", "shipped", 4, 128),
        ("gemma-3-27b", "all-dense", 4, 128),
    ]


def test_a_model_whose_layers_are_all_full_is_its_own_twin(tmp_path):
    text = GPT_OSS.replace("gpt-oss-20b", "llama-3.1-8b").replace("[128, 256]", "[64]")
    plan = plan_of(write(tmp_path, text))
    assert [c.stack for c in plan.cases] == ["shipped"]
    assert any("its own all-dense twin" in n for n in plan.notes)


@pytest.mark.parametrize(
    "change, field, words",
    [
        (("model: gpt-oss-20b", "model: gpt-oss-20b\npatterns: [dense]"), "model", "not both"),
        (("model: gpt-oss-20b\n", ""), "patterns", "name a model instead"),
        (("model: gpt-oss-20b", "model: gpt-oss-21b"), "model", "gpt-oss-20b"),  # did you mean
        (("model: gpt-oss-20b", "model: gpt-oss-20b\nmodel_file: c.json"), "model_file", "not both"),
        (("heads_scale: 0.125", "heads_scale: 0.1"), "heads_scale", "not a whole number"),
        (("heads_scale: 0.125", "heads_scale: 0.125\nheads: 4"), "heads", "comes from the model"),
        (("heads_scale: 0.125", "heads_scale: 0.125\nmode: decode"), "mode", "decode"),
        (("heads_scale: 0.125", "heads_scale: 0.125\ncausal: false"), "causal", "causal"),
        (("[128, 256]", "[64]"), "model", "sliding 128"),  # the 128 window fits no length
    ],
)
def test_bad_model_input_is_one_line_naming_the_field(tmp_path, change, field, words):
    path = write(tmp_path, GPT_OSS.replace(*change))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [x for x in result.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1, result.output
    assert f"field '{field}'" in lines[0] and words in lines[0], lines[0]


def test_a_config_kv_refuses_is_refused_naming_model_file(tmp_path):
    # sliding layers without a sliding_window: sparsebench.kv refuses the config
    hf_config(tmp_path, layer_types=["sliding_attention", "full_attention"] * 2)
    path = write(tmp_path, "name: f\nseq_lens: [64]\nmodel_file: tiny-model/config.json\nbackends: [naive]\n")
    with pytest.raises(ScenarioError, match=r"field 'model_file'.*sliding_window"):
        plan_of(path)


# -- measuring a stack --------------------------------------------------------------------------


def _case(tmp_path, text, n, stack="shipped"):
    plan = plan_of(write(tmp_path, text))
    return next(c for c in plan.cases if c.seq_len == n and c.stack == stack)


def test_each_layer_group_is_timed_once_checked_and_multiplied(tmp_path):
    from sparsebench.measure import stack
    from sparsebench.measure.worker import execute

    case = _case(tmp_path, GPT_OSS, 256)
    static = stack.static_fields(case)
    rec = execute(case)
    assert rec.get("status", "ok") == "ok", rec
    groups = list(rec["groups"].values())  # one object: each group under its layer type, in the model's order
    assert [(g["type"], g["layers"], g["pattern"]) for g in groups] == [
        ("sliding_attention", 12, "sliding_window(window=128)"),
        ("full_attention", 12, "dense"),
    ]
    for g in groups:
        assert g["time_s"] == pytest.approx(g["layers"] * g["time_per_layer_s"])
        assert g["max_abs_err"] is not None and g["max_abs_err"] < 1e-4  # checked against dense under its mask
    assert rec["time_median_s"] == pytest.approx(sum(g["time_s"] for g in groups))
    assert rec["check"] == "exact" and len(rec["times_s"]) == 2
    # KV bytes by hand: 1 KV head x 64 x 2 (K and V) x 4 bytes = 512 B a token and layer;
    # 12 sliding layers keep 128 tokens, 12 full layers 256
    assert static["stack_kv_bytes"] == 12 * 128 * 512 + 12 * 256 * 512
    assert [g["kv_bytes"] for g in static["groups"].values()] == [12 * 128 * 512, 12 * 256 * 512]
    assert static["layers"] == 24 and static["state_layers"] == 0
    # FLOPs of the whole stack: 4 x heads x nnz x head_dim per layer
    dense_nnz, window_nnz = 256 * 257 // 2, sum(min(i + 1, 128) for i in range(256))
    assert static["flops"] == 4 * 8 * 64 * (12 * dense_nnz + 12 * window_nnz)
    assert "each group timed once and multiplied" in rec["stack_note"] and "1 KV head" in rec["stack_note"]

    twin = execute(_case(tmp_path, GPT_OSS, 256, "all-dense"))
    twin_groups = [(g["type"], g["layers"], g["pattern"]) for g in twin["groups"].values()]
    assert twin_groups == [("full_attention", 24, "dense")]
    assert stack.static_fields(_case(tmp_path, GPT_OSS, 256, "all-dense"))["stack_kv_bytes"] == 24 * 256 * 512


def test_state_layers_are_not_timed_and_the_record_says_so(tmp_path):
    from sparsebench.measure.worker import execute

    # Qwen3-Next's layout: full attention every 2nd layer, linear attention between
    hf_config(tmp_path, full_attention_interval=2)
    text = "name: f\nseq_lens: [64]\nmodel_file: tiny-model/config.json\nbackends: [naive]\nrepeats: 1\nwarmup: 0\n"
    case = _case(tmp_path, text, 64)
    rec = execute(case)
    assert rec.get("status", "ok") == "ok", rec
    linear = rec["groups"]["linear_attention"]
    assert linear["timed"] is False and linear["time_s"] is None and linear["layers"] == 2
    assert "2 linear_attention layers keep a fixed state: not attention, not timed" in rec["stack_note"]
    full = rec["groups"]["full_attention"]
    assert rec["time_median_s"] == pytest.approx(full["time_s"])


def test_mla_layers_run_expanded_with_the_latent_s_kv_bytes(tmp_path):
    from sparsebench.measure import stack
    from sparsebench.measure.worker import execute

    hf_config(tmp_path, num_key_value_heads=4, head_dim=None, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8)
    text = "name: f\nseq_lens: [64]\nmodel_file: tiny-model/config.json\nbackends: [naive]\nrepeats: 1\nwarmup: 0\n"
    case = _case(tmp_path, text, 64)
    assert case.head_dim == 16  # qk_nope + qk_rope: the expanded per-head keys
    rec = execute(case)
    assert rec.get("status", "ok") == "ok", rec
    # the latent: (32 + 8) values a token and layer, 4 bytes each, 4 layers of 64 tokens
    assert stack.static_fields(case)["stack_kv_bytes"] == 4 * 64 * 40 * 4
    assert "MLA layers timed expanded" in rec["stack_note"]


def test_a_wrong_layer_group_makes_the_stack_wrong_naming_it(tmp_path, monkeypatch):
    from sparsebench.measure import harness, stack

    real = harness.run_case

    def broken(sub, **kw):
        got = real(sub, **kw)
        if sub.pattern == "sliding_window":
            got.update(status="wrong", reason="max abs error 1 above the fp32 tolerance")
        return got

    monkeypatch.setattr(harness, "run_case", broken)
    rec = stack.run_stack_case(_case(tmp_path, GPT_OSS, 128))
    assert rec["status"] == "wrong" and rec["reason"].startswith("its sliding 128 layers:")


def test_a_stack_spends_no_time_on_quality_figures_it_does_not_record(tmp_path, monkeypatch):
    from sparsebench.measure import harness, stack

    def refuse(*args, **kw):
        raise AssertionError("a layer group computed its quality against full attention")

    monkeypatch.setattr(harness, "case_quality", refuse)
    rec = stack.run_stack_case(_case(tmp_path, GPT_OSS, 128))
    assert rec.get("status", "ok") == "ok" and rec["quality_note"] == stack.QUALITY_NOTE


# -- a run and its reports ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack_run(tmp_path_factory):
    """A whole run of GPT_OSS in this process, with its reports (no plots: the figure is drawn
    by the tests that look at it)."""
    from sparsebench.measure import runner
    from sparsebench.render.summary import finalize

    tmp = tmp_path_factory.mktemp("stack-run")
    path = write(tmp, GPT_OSS)
    plan = plan_of(path)
    result = runner.run(plan, tmp / "out", scenario_text=path.read_text(), isolate=False)
    finalize(result.folder, result.records, plots=False)
    return result


def test_a_run_records_the_stack_and_its_twin(stack_run):
    recs = stack_run.records
    assert [r["status"] for r in recs] == ["ok"] * 4
    for r in recs:
        assert r["model"] == "gpt-oss-20b" and r["heads_scale"] == 0.125 and r["stack"] in ("shipped", "all-dense")
        assert r["stack_kv_bytes"] > 0 and r["groups"] and r["kv_cache_bytes"] is None
    by = {(r["seq_len"], r["stack"]): r for r in recs}
    assert by[(256, "shipped")]["stack_kv_bytes"] < by[(256, "all-dense")]["stack_kv_bytes"]


def test_the_summary_sets_the_model_as_shipped_against_its_twin(stack_run):
    text = (stack_run.folder / "summary.md").read_text()
    section = text.split("## Model stacks: as shipped against all-dense", 1)[1].split("\n## ", 1)[0]
    assert "| 256 |" in section and "KV saving" in section
    assert "| 1.33x |" in section  # KV at 256: 24 x 256 tokens against 12 x 128 + 12 x 256
    assert "layer groups at n=256" in section and "sliding_window(window=128)" in section
    # the stacks are not set against a dense sdpa baseline they never shared a size with
    assert "no common sizes with the baseline" not in text


def test_the_model_stack_figure_draws_shipped_and_twin(stack_run):
    from sparsebench.render.plots import fig_model_stack, figure_caption
    from sparsebench.results.folder import frame

    fig = fig_model_stack(frame(stack_run.records))
    gids = {line.get_gid() for ax in fig.axes for line in ax.get_lines()}
    for col in ("time_median_s", "peak_mem_bytes", "stack_kv_bytes"):
        assert {f"stack:gpt-oss-20b:as shipped:{col}", f"stack:gpt-oss-20b:all-dense:{col}"} <= gids
    kv = next(ax for ax in fig.axes if any(str(ln.get_gid()).endswith("stack_kv_bytes") for ln in ax.get_lines()))
    ys = {ln.get_gid(): list(ln.get_ydata()) for ln in kv.get_lines()}
    assert ys["stack:gpt-oss-20b:as shipped:stack_kv_bytes"] == [12 * 128 * 512 * 2, 12 * 128 * 512 + 12 * 256 * 512]
    assert "all-dense" in figure_caption("model_stack")


def test_the_masks_figure_draws_the_patterns_of_the_stack_s_layers(stack_run):
    from sparsebench.render.masks import mask_panels
    from sparsebench.results.folder import frame

    panels = mask_panels(frame(stack_run.records))
    assert [p.label for p in panels] == ["dense", "sliding_window(window=128)"]
    assert not any(p.error for p in panels)
