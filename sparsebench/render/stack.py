"""A model scenario's own reports: the model's attention stack as shipped against its all-dense
twin at each n (time, peak memory, KV cache, the saving) and each layer group's share at the
largest n, as tables, and the data of the figure of the three against n (``pairs``; drawn by
``render.plots.fig_model_stack``). The generic reports see a stack case as one series; the masks
figure draws the stack's layer patterns (``layer_rows``). pandas is imported inside the functions."""

from __future__ import annotations

import json
import math
from typing import Any

from sparsebench.scenario import ALL_DENSE, SHIPPED

# what a row of the stack tables and a panel row of the figure share besides the model
SHAPE = ("backend", "device", "dtype", "mode", "batch", "heads", "head_dim")
CAPTION = (
    "A model's whole attention stack (every attention layer at n, each layer group timed once and"
    " multiplied by its layers) against n, log-log: the model as shipped (solid) and its all-dense twin,"
    " the same stack with every attention layer full (dashed), left the time of one forward pass through the stack,"
    " middle its measured peak memory, right the KV cache every layer keeps after n tokens; the gap"
    " between a solid line and its dashed twin is what the model's layer design saves."
)


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _groups(v: Any) -> list[dict[str, Any]]:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return []
    if isinstance(v, dict):  # the record's form: each group under its layer type
        v = list(v.values())
    return [g for g in v if isinstance(g, dict)] if isinstance(v, list) else []


def stack_records(df):
    """The stack cases of a frame (an empty frame when it has none)."""
    if df is None or "model" not in getattr(df, "columns", ()) or "stack" not in df.columns:
        return df.iloc[0:0] if df is not None else None
    return df[df["model"].notna() & df["stack"].notna()]


def layer_rows(df):
    """``df`` with each stack case replaced by one row per timed layer group (its pattern, its
    parameters, its label), so that the masks figure draws the patterns a stack ran."""
    import pandas as pd

    stacks = stack_records(df)
    if stacks is None or stacks.empty:
        return df
    rows = []
    for _, r in stacks.iterrows():
        for g in _groups(r.get("groups")):
            if g.get("timed") and g.get("pattern_name"):
                rows.append(
                    {
                        **{k: r[k] for k in ("seq_len", "backend", "status") if k in r},
                        "pattern": g["pattern_name"],
                        "params": g.get("params") or {},
                        "pattern_label": g["pattern"],
                        "causal": True,
                    }
                )
    rest = df.drop(index=stacks.index)
    return pd.concat([rest, pd.DataFrame(rows)], ignore_index=True) if rows else rest


def pairs(df) -> list[tuple[dict[str, Any], Any, Any]]:
    """(shape, shipped rows, all-dense rows) per model and shape, rows ok and sorted by n."""
    stacks = stack_records(df)
    if stacks is None or stacks.empty:
        return []
    stacks = stacks[stacks["status"] == "ok"]
    out = []
    for key, sub in stacks.groupby(["model", *SHAPE], sort=True, dropna=False):
        shape = dict(zip(["model", *SHAPE], key))
        shipped = sub[sub["stack"] == SHIPPED].sort_values("seq_len")
        dense = sub[sub["stack"] == ALL_DENSE].sort_values("seq_len")
        if len(shipped) or len(dense):
            out.append((shape, shipped, dense))
    return out


def _at(rows, n: int, col: str) -> float | None:
    hit = rows[rows["seq_len"] == n]
    return _num(hit[col].iloc[0]) if len(hit) and col in hit else None


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or not a else f"{b / a:.2f}x"


def tables(df) -> list:
    """The stack tables (render.tables.TableSpec): per model and shape, the shipped stack and
    its twin at each n, then each layer group at the largest n both ran."""
    from sparsebench.render.tables import TableSpec
    from sparsebench.units import format_bytes, format_time

    out = []
    for shape, shipped, dense in pairs(df):
        title = (
            f"{shape['model']} as shipped against all-dense · {shape['backend']} · {shape['dtype']} · "
            f"{shape['mode']} · B={shape['batch']} H={shape['heads']} D={shape['head_dim']}"
        )
        sizes = sorted(set(shipped["seq_len"]) | set(dense["seq_len"]))
        rows = []
        for n in sizes:
            t_s, t_d = _at(shipped, n, "time_median_s"), _at(dense, n, "time_median_s")
            m_s, m_d = _at(shipped, n, "peak_mem_bytes"), _at(dense, n, "peak_mem_bytes")
            k_s, k_d = _at(shipped, n, "stack_kv_bytes"), _at(dense, n, "stack_kv_bytes")
            rows.append(
                (
                    str(int(n)),
                    format_time(t_s) if t_s is not None else "-",
                    format_time(t_d) if t_d is not None else "-",
                    _ratio(t_s, t_d),
                    format_bytes(m_s) if m_s is not None else "-",
                    format_bytes(m_d) if m_d is not None else "-",
                    format_bytes(k_s) if k_s is not None else "-",
                    format_bytes(k_d) if k_d is not None else "-",
                    _ratio(k_s, k_d),
                )
            )
        notes = [str(shipped["stack_note"].iloc[0])] if len(shipped) and "stack_note" in shipped else []
        notes.append("time: one forward pass through every attention layer; saving: all-dense / shipped")
        out.append(
            TableSpec(
                title=title,
                columns=(
                    "n",
                    "shipped",
                    "all-dense",
                    "time saving",
                    "peak shipped",
                    "peak all-dense",
                    "KV shipped",
                    "KV all-dense",
                    "KV saving",
                ),  # fmt: skip
                rows=tuple(rows),
                note="; ".join(notes),
            )
        )
        both = [n for n in sizes if _at(shipped, n, "time_median_s") is not None] or sizes
        n = max(both)
        grows = []
        for name, rows_ in ((SHIPPED, shipped), (ALL_DENSE, dense)):
            hit = rows_[rows_["seq_len"] == n]
            if not len(hit):
                continue
            total = _num(hit["time_median_s"].iloc[0])
            for g in _groups(hit["groups"].iloc[0]):
                t = _num(g.get("time_s"))
                grows.append(
                    (
                        name,
                        str(g.get("type", "")),
                        str(g.get("layers", "")),
                        str(g.get("pattern") or "not attention (a fixed state)"),
                        format_time(_num(g.get("time_per_layer_s"))) if g.get("timed") else "not timed",
                        format_time(t) if t is not None else "-",
                        f"{100 * t / total:.0f}%" if t is not None and total else "-",
                        format_bytes(g["kv_bytes"]) if g.get("kv_bytes") is not None else "not counted",
                    )
                )
        if grows:
            out.append(
                TableSpec(
                    title=f"{shape['model']} layer groups at n={int(n)} · {shape['backend']}",
                    columns=("stack", "layers of type", "layers", "pattern", "per layer", "group", "share", "KV"),
                    rows=tuple(grows),
                    note="each group timed once (one layer) and multiplied by its layers",
                    wrap=(3,),
                )
            )
    return out


def markdown(df) -> str:
    """summary.md's section on the model stacks ('' when the run has none)."""
    from sparsebench.render.tables import markdown_section

    specs = tables(df)
    if not specs:
        return ""
    parts = ["## Model stacks: as shipped against all-dense", ""]
    for t in specs:
        parts += markdown_section(t)
    return "\n".join(parts)


def renderables(df) -> list:
    """The stack tables for the terminal (rich)."""
    from sparsebench.render.tables import rich_table

    return [rich_table(t) for t in tables(df)]
