"""The record schema, defined once: every field of a record (name, type, unit, meaning), which of
them identify a case (the case key), the statuses, the baseline, the schema version and how a
record written by an older version is read.

A record is one flat JSON object per case in records.jsonl. The runner, the harness and decode
fill the fields named here and nothing else (``check_names`` refuses any other name: a typo is a
programming error, not a new column). Reading adds two kinds of column that are not stored:
``merged`` ones (the rounds of a case merged into one row) and ``derived`` ones (computed over a
whole frame: the speedup over the baseline). This module is data: it imports nothing of sparsebench.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

# 2: the block_sparse tile size is the field ``tile`` (version 1 called it ``block``).
# 3: ``kv_heads`` (key/value heads, grouped-query attention) joins the case key; a record of an
#    older version had as many key/value heads as query heads, and reads kv_heads = heads.
# 4: ``inputs`` (which q, k and v a case ran on: random, synthetic or a recorded file) joins the
#    case key; a record of an older version ran on seeded random normals, and reads "random".
SCHEMA_VERSION = 4

STATUSES = ("ok", "wrong", "oom", "timeout", "error", "skipped", "crashed")
BASELINE_BACKEND = "sdpa"
BASELINE_PATTERN = "dense"
DECODE = "decode"  # the mode of a decode case (a KV-cache decoder, no attention backend)

# Where a column lives.
RECORD = "record"  # written to records.jsonl
MERGED = "merged"  # added when the rounds of a case are merged into one row (results.csv, tables)
DERIVED = "derived"  # computed over a whole frame (results.csv, tables)


@dataclass(frozen=True)
class Field:
    """One column. ``type`` is its JSON type ("str", "int", "float", "bool", "list[float]",
    "object"); ``unit`` is empty where it has none; ``always``: every record has it (null where it
    does not apply), otherwise only the records it applies to; ``key``: it changes what is
    measured, so it is part of the case key, and ``default`` is what a record lacking it (one
    written before the field joined the key) is read with."""

    name: str
    type: str
    unit: str
    meaning: str
    where: str = RECORD
    always: bool = True
    key: bool = False
    default: Any = None
    from_case: bool = False  # copied from the Case that was measured
    # a key field that an older record lacks reads this other field's value (kv_heads: heads)
    default_from: str | None = None


FIELDS: tuple[Field, ...] = (
    # identity: what was measured (from the Case)
    Field("schema_version", "int", "", "the record schema version the record was written with"),
    Field("scenario", "str", "", "the scenario's name", from_case=True),
    Field("case_id", "str", "", "the case key as text; the rounds of one case share it", from_case=True),
    Field("pattern", "str", "", "the pattern's registered name", from_case=True),
    Field("pattern_label", "str", "", "the pattern with its parameters, as tables and plots name it",
          key=True, from_case=True),
    Field("params", "object", "", "the pattern's parameters", from_case=True),
    Field("backend", "str", "", "the attention implementation", key=True, from_case=True),
    Field("device", "str", "", "cpu or cuda", key=True, from_case=True),
    Field("dtype", "str", "", "fp32, fp16 or bf16", key=True, from_case=True),
    Field("mode", "str", "", "forward, backward or decode", key=True, from_case=True),
    Field("batch", "int", "", "batch size", key=True, from_case=True),
    Field("heads", "int", "", "attention heads (query heads)", key=True, from_case=True),
    Field("kv_heads", "int", "", "key/value heads: heads / kv_heads query heads share each (grouped-query "
          "attention); equal to heads without it", key=True, from_case=True, default_from="heads"),
    Field("head_dim", "int", "", "dimension of a head", key=True, from_case=True),
    Field("seq_len", "int", "tokens", "sequence length n (the context in decode mode)", key=True, from_case=True),
    Field("causal", "bool", "", "causal (true) or bidirectional attention, as the case ran: the scenario's, unless "
          "the pattern's own parameter sets it (a ds_* pattern's attention=bidirectional)", key=True, from_case=True),
    Field("inputs", "str", "", "the q, k and v the case ran on, as a label: random (seeded normals), synthetic "
          "(the generator of sparsebench.inputs, with its knobs) or file:NAME#layerL (recorded tensors)",
          key=True, from_case=True, default="random"),
    Field("inputs_seed", "int", "", "the seed of random or synthetic inputs (null for a file)", from_case=True),
    Field("inputs_file", "str", "", "kind file: the safetensors file the inputs were read from", from_case=True),
    Field("inputs_layer", "int", "", "kind file: the model layer the inputs were recorded at", from_case=True),
    Field("tile", "int", "tokens", "block_sparse's tile size (null for the other backends); version 1: block",
          from_case=True),
    Field("round", "int", "", "which round of a scenario with rounds: R (only then)", always=False),
    # static: needs no measurement
    Field("kv_retained", "int", "tokens", "keys a query may still need, so a KV cache keeps"),
    Field("kv_cache_bytes", "int", "bytes", "KV cache of one layer: 2 x batch x kv_heads x head_dim x bytes x kv_retained"),
    Field("nnz", "int", "", "allowed (query, key) pairs of the mask (null in decode mode)"),
    Field("density", "float", "", "nnz / n^2 (null in decode mode)"),
    Field("flops", "float", "FLOP", "useful FLOPs of one call, from nnz (null in decode mode)"),
    Field("est_mem_bytes", "int", "bytes", "analytic memory estimate, checked against the memory budget"),
    # outcome
    Field("status", "str", "", "one of " + ", ".join(STATUSES)),
    Field("reason", "str", "", "why the status is not ok (empty when ok)"),
    # measured (harness; decode fills the times too)
    Field("time_median_s", "float", "s", "median time of a call (decode: of a generated token)"),
    Field("time_iqr_s", "float", "s", "interquartile range of the times"),
    Field("time_min_s", "float", "s", "fastest call"),
    Field("times_s", "list[float]", "s", "every timed call, raw"),
    Field("tflops", "float", "TFLOP/s", "useful FLOPs only, over the median time"),
    Field("peak_mem_bytes", "int", "bytes",
          "measured peak: CUDA allocator peak, or the process's peak RSS reset per case on Linux"),
    Field("max_abs_err", "float", "", "largest absolute difference from fp32 dense attention under the same mask"),
    Field("setup_s", "float", "s", "mask or layout build, before any call"),
    Field("select_s", "float", "s",
          "a content-selected pattern (moba, quest, topk_keys): the median time of its selection alone "
          "(pattern.select(q, k)), which the timed call includes; null for a pattern fixed by positions"),
    Field("first_call_s", "float", "s",
          "the first call: compilation, autotuning, loading native kernels, first touch of fresh memory",
          always=False),
    Field("compile_s", "float", "s",
          "first_call_s beyond the steady median, for backends that compile or build on first use; 0 for the others"),
    Field("noisy", "bool", "", "time_iqr_s / time_median_s above 10%"),
    Field("check", "str", "", "how the output was checked: exact, sampled or none"),
    Field("grad_err", "float", "",
          "backward mode: the largest gradient error relative to the largest reference gradient"),
    Field("grad_check", "str", "", "backward mode: how the gradients were checked: exact or sampled"),
    # quality against full attention (issue: what a pattern gives up): the case's output against
    # full attention with the case's causality on the same inputs, computed once, untimed
    Field("full_rel_err", "float", "",
          "||O - O_full||_F / ||O_full||_F over the whole output (or the quality_rows sampled rows): the case's "
          "output against full attention (dense, the case's causality) on the same inputs"),
    Field("recall_mean", "float", "",
          "the share of full attention's softmax mass that falls on the keys the case attended, averaged over "
          "batch, heads and queries (1: nothing of full attention is lost)"),
    Field("recall_min", "float", "", "the least query's recall (the worst row over batch, heads and queries)"),
    Field("quality_rows", "int", "", "query rows the quality figures cover (n when exact, else the sampled rows)"),
    Field("full_grad_rel_err", "float", "",
          "backward mode: the query gradient's ||dQ - dQ_full||_F / ||dQ_full||_F against full attention"),
    Field("quality_note", "str", "",
          "why the quality figures are empty: a pattern whose mask is the model's semantics (document, prefix_lm, "
          "a bidirectional layout) is no approximation of full attention; or a mode without them"),
    Field("probe_s", "float", "s", "a fixed matmul timed around the case: how the machine's speed moved",
          always=False),
    # the yardstick (measure/yardstick.py): the machine's own rates, measured once per run per
    # device and dtype (environment.json: "yardstick"), and the case's share of them
    Field("gemm_tflops", "float", "TFLOP/s",
          "the device's own torch GEMM rate for the dtype: the best of a few square matmuls, measured "
          "once per run with the threads of the forward and backward cases"),
    Field("copy_bytes_per_s", "float", "bytes/s",
          "the device's copy bandwidth: bytes read + written per second by a large tensor copy "
          "(STREAM's copy), on the CPU with the threads of the decode steps"),
    Field("gemm_fraction", "float", "",
          "forward and backward: tflops / gemm_tflops, the share of the machine's own GEMM rate that the "
          "useful FLOPs reach (the yardstick is the library's, so a kernel can exceed 1)"),
    Field("bandwidth_fraction", "float", "",
          "decode: kv_cache_bytes / time_median_s / copy_bytes_per_s, the KV cache a step reads per "
          "second as a share of the copy bandwidth (a pattern that attends only some of the keys it "
          "keeps reads less than that; can exceed 1)"),
    # decode mode only
    Field("decode_tokens", "int", "tokens", "tokens generated one at a time", always=False),
    Field("decode_repeats", "int", "", "how often each generated position is stepped", always=False),
    Field("decode_threads", "int", "", "intra-op threads of the steps (null on CUDA)", always=False),
    Field("cache_policy", "str", "", "the KV cache: dense(N) or ring(pinned=P, ring=R)", always=False),
    Field("cache_tokens", "int", "tokens", "slots the KV cache holds", always=False),
    Field("cache_bytes_measured", "int", "bytes", "bytes of the K/V tensors allocated", always=False),
    Field("timestamp", "str", "", "when the case ended (local time, ISO 8601)"),
    # where it ran (a run spread over machines: executors, merge)
    Field("host", "str", "", "the machine the case ran on (its host name)"),
    Field("device_name", "str", "", "the device the case ran on: the GPU's name, or the CPU's model"),
    Field("executor", "str", "", "what ran the case: local (local xN: N workers at once), ray or slurm"),
    Field("retries", "int", "", "1 where the engine lost the case's worker, node or job and ran the case again "
          "elsewhere (the record is the retry's; lost twice: crashed), else 0"),
    # model stacks (a scenario's model: or model_file:, measure/stack.py); null in other records
    Field("model", "str", "", "the model whose attention stack the case runs (null for a pattern case)",
          from_case=True),
    Field("stack", "str", "", "shipped (each layer with its own attention) or all-dense (its twin: every "
          "attention layer full)", from_case=True),
    Field("heads_scale", "float", "", "the model's query and KV heads were scaled by this to run (1: as shipped)",
          from_case=True),
    Field("layers", "int", "", "attention layers the stack's time covers (each group timed once, multiplied)"),
    Field("state_layers", "int", "", "layers keeping a fixed state (linear attention, Mamba): not attention, "
          "not timed"),
    Field("groups", "object", "", "each layer group under its layer type: type, layers, pattern (its label; "
          "pattern_name, params), timed, time_per_layer_s, time_s (layers x time per layer), peak_mem_bytes, "
          "max_abs_err, cache, retained_tokens, kv_bytes"),
    Field("stack_kv_bytes", "int", "bytes", "the KV cache of every layer of the stack after n tokens (MLA: the "
          "latent; states counted where the config sizes them), with the heads as run"),
    Field("stack_note", "str", "", "how the stack was timed: groups multiplied, state layers, MLA expanded, GQA"),
    # merged: the rounds of a case as one row
    Field("rounds", "int", "", "rounds merged into the row", where=MERGED, always=False),
    Field("round_medians_s", "list[float]", "s", "each round's median", where=MERGED, always=False),
    Field("round_mins_s", "list[float]", "s", "each round's fastest call", where=MERGED, always=False),
    # derived over the frame
    Field("speedup", "float", "x", "baseline time / time, the baseline on the same device, dtype, mode and shape",
          where=DERIVED),
    Field("ideal_speedup", "float", "x", "baseline nnz / nnz: the speedup the sparsity alone would give",
          where=DERIVED),
    Field("efficiency", "float", "", "speedup / ideal_speedup", where=DERIVED),
)

BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in FIELDS if f.where == RECORD)

# The columns that identify a case: two records with equal keys measure the same thing. The tile
# size is not among them: it is a setting of one backend (null for the others, so the baseline
# would not share it), a scenario has one, and comparing two runs with different tiles is how a
# tile is tuned.
CASE_KEY: tuple[str, ...] = tuple(f.name for f in FIELDS if f.key)
KEY_DEFAULTS: dict[str, Any] = {f.name: f.default for f in FIELDS if f.key}
# Key fields whose default is another field of the same record: {field: the field it reads}.
KEY_DEFAULTS_FROM: dict[str, str] = {f.name: f.default_from for f in FIELDS if f.key and f.default_from}
# A series is a line on a plot: a case key without the sequence length.
SERIES_KEY: tuple[str, ...] = tuple(c for c in CASE_KEY if c != "seq_len")

# Renamed record fields, by the version that renamed them: {version: {old: new}}.
RENAMED = {2: {"block": "tile"}}


def check_names(names: Iterable[str]) -> None:
    """Refuse a record field the schema does not name (a programming error: a typo or a field
    added without its schema entry)."""
    unknown = sorted(set(names) - set(RECORD_FIELDS))
    if unknown:
        raise KeyError(f"record fields not in the record schema (sparsebench/results/schema.py): {unknown}")


def identity(case: Any) -> dict[str, Any]:
    """The fields of a record that come from its Case (a sparsebench.scenario.Case), in schema order."""
    rec: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
    for f in FIELDS:
        if f.from_case:
            rec[f.name] = getattr(case, f.name)
    return rec


def complete(rec: dict[str, Any]) -> dict[str, Any]:
    """Give every field a record always has, and it lacks, null; refuse unknown fields."""
    for f in FIELDS:
        if f.where == RECORD and f.always:
            rec.setdefault(f.name, None)
    check_names(rec)
    return rec


def migrate(rec: dict[str, Any], version: int) -> dict[str, Any]:
    """A record written by schema ``version`` (<= SCHEMA_VERSION) as this version reads it:
    renamed fields under their new names and key fields it lacks given their defaults, so that a
    stored baseline keeps pairing with new runs."""
    if version < SCHEMA_VERSION:
        rec = dict(rec)
        for v in range(version + 1, SCHEMA_VERSION + 1):
            for old, new in RENAMED.get(v, {}).items():
                if old in rec:
                    value = rec.pop(old)
                    rec.setdefault(new, value)
        if "schema_version" in rec:
            rec["schema_version"] = SCHEMA_VERSION
    lacking = [name for name in KEY_DEFAULTS if name not in rec]
    if lacking:
        rec = {**rec, **{name: key_value(rec, name) for name in lacking}}
        if "case_id" in rec:  # the key as text, with the fields it gained (a resumed run finds its cases)
            rec["case_id"] = case_id(case_key(rec))
    return rec


def case_id(key: tuple) -> str:
    """The case key as text (a record's ``case_id``)."""
    return "|".join(str(x) for x in key)


def key_value(rec: dict[str, Any], name: str) -> Any:
    """A key field of a record, or what a record lacking it is read with: its default, or the
    value of the field it defaults to (kv_heads: heads)."""
    if name in rec:
        return rec[name]
    other = KEY_DEFAULTS_FROM.get(name)
    return rec.get(other, KEY_DEFAULTS[name]) if other else KEY_DEFAULTS[name]


def case_key(rec: dict[str, Any]) -> tuple:
    return tuple(key_value(rec, c) for c in CASE_KEY)


def series_key(rec: dict[str, Any]) -> tuple:
    return tuple(key_value(rec, c) for c in SERIES_KEY)
