"""Run one model-stack case: every attention layer of a model at context n, on one backend.

The model (a preset or a config, read by sparsebench.kv.config) is grouped by layer type as the
KV planner groups it (``planner.layer_groups``): full attention runs ``dense``, a sliding layer
``sliding_window(W)``, a chunked layer ``block_local(C)``; the all-dense twin
(``ModelSpec.all_full``) runs every attention layer dense. Layers of one type compute the same
thing at the same cost, so each group is measured once, as any case is (``harness.run_case``:
timed, peak memory, checked against dense attention under its mask), and its time multiplied by
its layer count. An MLA layer runs in its expanded form (per-head keys and values of head_dim,
as a prefill computes them); its KV bytes are the latent's. A state layer (linear attention,
Mamba) is not attention: it is not timed, and the record says so.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

from sparsebench.scenario import ALL_DENSE, Case, plural, read_model, scale_heads

# A stack's record sums its groups' times and memory, not their outputs: the quality against
# full attention of each group's pattern belongs to that pattern's own cases (a group's figures
# are not computed: a stack record has no place for them).
QUALITY_NOTE = "model stack: quality against full attention is measured per pattern, in pattern cases"


def model_of(case: Case):
    """The ModelSpec the case runs: heads scaled as the scenario asked; the twin all full."""
    spec = scale_heads(read_model(str(case.model_source)), case.heads_scale or 1.0)
    return spec.all_full() if case.stack == ALL_DENSE else spec


def _sub_case(case: Case, pattern) -> Case:
    """The case of one layer group: the stack's shape with the group's pattern."""
    return dataclasses.replace(
        case,
        pattern=pattern.name,
        params=pattern.params(),
        pattern_label=pattern.label(),
        model=None,
        model_source=None,
        stack=None,
        heads_scale=None,
    )


def _groups(case: Case, spec) -> list[tuple[Any, Case | None]]:
    """(planner group, its case or None for a state layer), in the model's order."""
    from sparsebench.kv.planner import layer_groups

    return [(g, None if g.pattern is None else _sub_case(case, g.pattern)) for g in layer_groups(spec)]


def _static_groups(case: Case, spec) -> list[dict[str, Any]]:
    """Each group's shape and cache, before anything is measured."""
    from sparsebench.kv.planner import group_bytes

    sizes = group_bytes(spec, None, case.seq_len, case.batch, case.dtype)
    out = []
    for g, size in zip(_groups(case, spec), sizes):
        group, sub = g
        out.append(
            {
                "type": group.type,
                "layers": group.layers,
                "pattern": None if sub is None else sub.pattern_label,
                "pattern_name": None if sub is None else sub.pattern,
                "params": None if sub is None else sub.params,
                "timed": sub is not None,
                "time_per_layer_s": None,
                "time_s": None,
                "peak_mem_bytes": None,
                "max_abs_err": None,
                "cache": size.cache,
                "retained_tokens": size.retained_tokens,
                "kv_bytes": size.bytes,
            }
        )
    return out


def by_type(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The record's ``groups``: one JSON object, each group under its layer type (a model has one
    group per type), in the model's order."""
    return {g["type"]: g for g in groups}


def note(case: Case, spec) -> str:
    """What a reader must know about how the stack was timed."""
    counts = spec.counts()
    timed = sum(n for t, n in counts.items() if t in _attention_types())
    parts = [f"{timed} attention layers in {len([t for t in counts if t in _attention_types()])} groups, each group "
             "timed once and multiplied by its layers"]  # fmt: skip
    for t, n in counts.items():
        if t not in _attention_types():
            parts.append(f"{n} {t} layers keep a fixed state: not attention, not timed")
    if spec.mla:
        parts.append(
            f"MLA layers timed expanded (per-head keys and values of head_dim {spec.head_dim}, as a prefill "
            f"computes them); their KV bytes are the latent's ({spec.latent} values a token)"
        )
    kvh = case.kv_heads
    if kvh != spec.heads:
        parts.append(f"{spec.heads} query heads over {plural(kvh, 'KV head')} (grouped-query attention)")
    if (case.heads_scale or 1) != 1:
        parts.append(f"heads scaled by {case.heads_scale:g} from the model's")
    return "; ".join(parts)


def _attention_types() -> tuple[str, ...]:
    from sparsebench.kv.config import ATTENTION_TYPES

    return ATTENTION_TYPES


def _problem(sub: Case):
    from sparsebench.measure.harness import make_problem

    return make_problem(sub)


def static_fields(case: Case) -> dict[str, Any]:
    """The record's figures that need no measurement: FLOPs of the whole stack, the largest
    group's memory estimate (the layers run one after another), the KV cache of every layer."""
    from sparsebench.backends.base import BACKENDS
    from sparsebench.kv.planner import kv_bytes
    from sparsebench.measure.harness import flops

    spec = model_of(case)
    backend = BACKENDS.get(case.backend)()
    total_flops, est = 0.0, 0
    for group, sub in _groups(case, spec):
        if sub is None:
            continue
        p = _problem(sub)
        total_flops += group.layers * flops(p, p.pattern.nnz(case.seq_len, True))
        est = max(est, int(backend.estimate_bytes(p)))
    attention = sum(g.layers for g, sub in _groups(case, spec) if sub is not None)
    return {
        "kv_retained": None,
        "kv_cache_bytes": None,
        "nnz": None,
        "density": None,
        "flops": total_flops,
        "est_mem_bytes": est,
        "layers": attention,
        "state_layers": spec.layers - attention,
        "groups": by_type(_static_groups(case, spec)),
        "stack_kv_bytes": kv_bytes(spec, None, case.seq_len, case.batch, case.dtype),
        "stack_note": note(case, spec),
    }


def unsupported(case: Case) -> str | None:
    """Why the backend cannot run some layer group of the stack here, or None."""
    import torch

    from sparsebench.backends.base import BACKENDS

    backend = BACKENDS.get(case.backend)
    why = backend.unavailable(torch.device(case.device))
    if why:
        return why
    spec = model_of(case)
    for group, sub in _groups(case, spec):
        if sub is None:
            continue
        why = backend().unsupported(_problem(sub))
        if why:
            return f"its {spec.type_label(group.type)} layers: {why}"
    return None


def run_stack_case(case: Case) -> dict[str, Any]:
    """Measure every layer group of the stack (``harness.run_case``) and sum them, each group's
    times multiplied by its layers. Returns the record's measured fields, ``groups`` with each
    group's share; a group that is wrong makes the stack wrong, naming the group."""
    from sparsebench import stats
    from sparsebench.measure import harness
    from sparsebench.results import spread

    spec = model_of(case)
    groups = _static_groups(case, spec)
    measured: list[tuple[int, dict[str, Any]]] = []  # (layers, fields)
    status, reason = "ok", ""
    for row, (group, sub) in zip(groups, _groups(case, spec)):
        if sub is None:
            continue
        got = harness.run_case(sub, quality=False)  # a stack records none (QUALITY_NOTE)
        row.update(
            time_per_layer_s=got["time_median_s"],
            time_s=group.layers * got["time_median_s"],
            peak_mem_bytes=got["peak_mem_bytes"],
            max_abs_err=got["max_abs_err"],
        )
        if got.get("status", "ok") != "ok" and status == "ok":
            status, reason = got["status"], f"its {spec.type_label(group.type)} layers: {got.get('reason', '')}"
        measured.append((group.layers, got))
    calls = min(len(f["times_s"]) for _, f in measured)
    times = [sum(n * f["times_s"][i] for n, f in measured) for i in range(calls)]
    errs = [f["max_abs_err"] for _, f in measured if f["max_abs_err"] is not None]
    grad_errs = [f["grad_err"] for _, f in measured if f.get("grad_err") is not None]
    checks = {f["check"] for _, f in measured}
    out: dict[str, Any] = {
        "time_median_s": sum(n * f["time_median_s"] for n, f in measured),
        "time_min_s": sum(n * f["time_min_s"] for n, f in measured),
        "time_iqr_s": stats.iqr(times),
        "times_s": times,
        "noisy": any(f["noisy"] for _, f in measured) or spread.noisy(times),
        "peak_mem_bytes": max(f["peak_mem_bytes"] for _, f in measured),
        "max_abs_err": max(errs) if errs else None,
        "check": "none" if checks == {"none"} else ("sampled" if "sampled" in checks else "exact"),
        "grad_err": max(grad_errs) if grad_errs else None,
        "grad_check": next((f["grad_check"] for _, f in measured if f.get("grad_check")), None),
        "setup_s": sum(f["setup_s"] for _, f in measured),
        "first_call_s": sum(f["first_call_s"] for _, f in measured),
        "compile_s": sum(f["compile_s"] for _, f in measured),
        "probe_s": statistics.mean(f["probe_s"] for _, f in measured),
        "groups": by_type(groups),
        "stack_note": note(case, spec),
        "quality_note": QUALITY_NOTE,
    }
    if status != "ok":
        out.update(status=status, reason=reason)
    return out
