"""Result folders: records.jsonl (one flat JSON object per case, appended as each case ends),
results.csv, the scenario copy, environment.json and meta.json (the schema version). Records are
read as the current schema has them (an older folder migrated, a newer one refused) and turned
into DataFrames. The fields themselves are defined in results/schema.py."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from sparsebench.errors import ResultsError
from sparsebench import stats
from sparsebench.results import schema, spread
from sparsebench.results.schema import BASELINE_BACKEND, BASELINE_PATTERN, CASE_KEY, SCHEMA_VERSION

RECORDS = "records.jsonl"
ENVIRONMENT = "environment.json"
META = "meta.json"
HARDWARE = ("host", "device_name")  # where a record ran: with its case key, what merge keeps apart


def atomic_write(path: Path, text: str) -> None:
    """Write a whole file via a temporary file and a rename, so readers never see half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are for sharing
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class RecordWriter:
    """Appends one JSON line per finished case and flushes it to disk at once."""

    def __init__(self, folder: Path, warn=None) -> None:
        self.path = Path(folder) / RECORDS
        _drop_partial_line(self.path, warn)
        self._fh = open(self.path, "a", encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, default=_json_default, allow_nan=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drop_partial_line(path: Path, warn=None) -> None:
    """A record cut short by a kill has no final newline: drop it before appending more."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1
        fh.truncate(keep)
    if warn:
        warn(f"{path}: dropped a truncated last record ({len(data) - keep} bytes)")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def read_records(folder: Path, warn=None) -> list[dict[str, Any]]:
    """Records of a result folder, as this schema version has them (a folder written by an older
    version is migrated: see schema.migrate). A truncated last line (an interrupted write) is
    skipped with a warning; anything else malformed is a ResultsError."""
    folder = Path(folder)
    if not folder.exists():
        raise ResultsError(f"{folder}: no such result folder")
    if not folder.is_dir():
        raise ResultsError(f"{folder}: not a folder (expected a sparsebench result folder)")
    path = folder / RECORDS
    if not path.exists():
        raise ResultsError(f"{folder}: no {RECORDS} here; is this a sparsebench result folder?")
    version = check_schema(folder)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    out: list[dict[str, Any]] = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if no == len(lines):
                if warn:
                    warn(f"{path}:{no}: truncated last record skipped")
                continue
            raise ResultsError(f"{path}:{no}: not a JSON record") from None
        if not isinstance(rec, dict):
            raise ResultsError(f"{path}:{no}: not a JSON object")
        out.append(schema.migrate(rec, _record_version(rec, version, f"{path}:{no}")))
    return out


def _record_version(rec: dict[str, Any], folder_version: int, where: str) -> int:
    """A record's own schema_version where it has one (a resumed folder may hold two), else its
    folder's."""
    version = rec.get("schema_version", folder_version)
    _check_version(version, where)
    return version


def check_schema(folder: Path) -> int:
    """The schema version of a result folder's meta.json (the current one where there is none).
    An older version is read (migrated); a newer one, or none that can be read, is a ResultsError."""
    meta = Path(folder) / META
    if not meta.exists():
        return SCHEMA_VERSION
    try:
        version = json.loads(meta.read_text(encoding="utf-8")).get("schema_version")
    except (json.JSONDecodeError, AttributeError):
        raise ResultsError(f"{meta}: unreadable meta.json") from None
    _check_version(version, str(folder))
    return version


def _check_version(version: Any, where: str) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ResultsError(f"{where}: result schema version {version!r}, this sparsebench reads versions 1 to "
                           f"{SCHEMA_VERSION}")
    if version > SCHEMA_VERSION:
        raise ResultsError(f"{where}: result schema version {version} is newer than this sparsebench reads "
                           f"(1 to {SCHEMA_VERSION}); upgrade sparsebench to read it")


def read_meta(folder: Path, warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """A result folder's meta.json as a dict ({} where there is none; where it is not an object, a
    warning and {}); JSON that cannot be read is a ResultsError, as in ``check_schema``."""
    path = Path(folder) / META
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ResultsError(f"{path}: unreadable meta.json") from None
    if not isinstance(meta, dict):
        if warn:
            warn(f"{path}: not a JSON object; the run's scenario and start time are unknown")
        return {}
    return meta


def read_environment(folder: Path, warn: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """A result folder's environment.json: None where there is none; where it cannot be read (not
    JSON, not an object), a warning naming the file and None."""
    path = Path(folder) / ENVIRONMENT
    if not path.exists():
        return None
    try:
        env = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        why = "not valid JSON" if isinstance(exc, json.JSONDecodeError) else f"unreadable ({exc})"
        if warn:
            warn(f"{path}: {why}; the environment is left out")
        return None
    if not isinstance(env, dict):
        if warn:
            warn(f"{path}: not a JSON object; the environment is left out")
        return None
    return env


def load_frame(folder: Path, warn=None):
    """All records of a folder as a tidy DataFrame (one row per case, rounds merged) with derived
    columns."""
    records = read_records(folder, warn=warn)
    if not records:
        raise ResultsError(f"{Path(folder) / RECORDS}: no records")
    return frame(records)


def frame(records: Iterable[dict[str, Any]]):
    """Records (as read_records returns them, or built in memory) as a DataFrame: rounds merged,
    every case-key column present (a key field a record lacks: its schema default), and the
    derived columns added."""
    import pandas as pd

    rows = [schema.migrate(r, SCHEMA_VERSION) for r in merge_rounds(records)]
    return add_derived(pd.DataFrame.from_records(rows))


def merge_rounds(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per case: the rounds of a scenario with ``rounds: R`` (records with the same
    case_id and a ``round`` field) merged. The case's time is the median of its rounds' medians,
    so a burst of load during one round is outvoted by the others; times_s holds every call,
    round_medians_s each round's median, round_mins_s each round's fastest call, time_iqr_s and noisy the spread of every call, the
    memory and error figures their worst. A round that did not end ok (wrong, error, ...) stands
    for the case as it is."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for i, rec in enumerate(records):
        key = rec.get("case_id") if "round" in rec else ("", i)
        groups.setdefault(key, []).append(rec)
    out: list[dict[str, Any]] = []
    for recs in groups.values():
        if len(recs) == 1 and "round" not in recs[0]:
            out.append(recs[0])
            continue
        if any(r.get("status") == "ok" for r in recs):  # a skip (older runs) is no measurement
            recs = [r for r in recs if r.get("status") != "skipped"]
        bad = [r for r in recs if r.get("status") != "ok"]
        merged = {k: v for k, v in (bad[0] if bad else recs[0]).items() if k != "round"}
        merged["rounds"] = len(recs)
        if not bad:
            meds = [r["time_median_s"] for r in recs]
            every = [t for r in recs for t in (r.get("times_s") or [])]
            merged.update(
                time_median_s=statistics.median(meds),
                time_min_s=min(r["time_min_s"] for r in recs),
                times_s=every,
                round_medians_s=meds,
                round_mins_s=[r["time_min_s"] for r in recs],
            )
            if every:  # spread over every call of every round: rounds that disagree count
                merged.update(time_iqr_s=stats.iqr(every), noisy=spread.noisy(every))
            for k in ("peak_mem_bytes", "max_abs_err", "grad_err"):
                vals = [r[k] for r in recs if r.get(k) is not None]
                merged[k] = max(vals) if vals else None
            for k in ("probe_s", "gemm_tflops", "copy_bytes_per_s"):  # a resumed round measured its own
                vals = [r[k] for r in recs if r.get(k) is not None]
                if vals:
                    merged[k] = statistics.median(vals)
            merged["tflops"] = tflops(merged)
            merged.update(fractions(merged))
        out.append(merged)
    return out


def tflops(rec: dict[str, Any]) -> float | None:
    """Useful TFLOP/s of an ok record: its useful FLOPs over its median time."""
    med, fl = rec.get("time_median_s"), rec.get("flops")
    return fl / med / 1e12 if (med and fl and rec.get("status") == "ok") else None


def fractions(rec: dict[str, Any]) -> dict[str, float | None]:
    """An ok record's share of the yardstick (its gemm_tflops and copy_bytes_per_s): gemm_fraction
    = tflops / gemm_tflops (forward, backward), bandwidth_fraction = kv_cache_bytes per median
    step time / copy_bytes_per_s (decode); None where it does not apply or was not measured."""
    ok = rec.get("status") == "ok"
    tf, gemm = rec.get("tflops"), rec.get("gemm_tflops")
    med, kv, bw = rec.get("time_median_s"), rec.get("kv_cache_bytes"), rec.get("copy_bytes_per_s")
    decode = rec.get("mode") == "decode"
    return {
        "gemm_fraction": tf / gemm if (ok and not decode and tf and gemm) else None,
        "bandwidth_fraction": kv / med / bw if (ok and decode and kv and med and bw) else None,
    }


def add_derived(df):
    """speedup (over dense sdpa on the same device/dtype/mode/shape), ideal_speedup (from nnz)
    and efficiency (their ratio)."""
    import numpy as np

    df = df.copy()
    if df.empty:
        return df
    for c in CASE_KEY:  # a frame made without a key field (one added later: kv_heads) reads as a record does
        if c not in df.columns:
            source = schema.KEY_DEFAULTS_FROM.get(c)
            df[c] = df[source] if source in df.columns else schema.KEY_DEFAULTS[c]
    # the baseline on the same hardware class, its device_name (a merged folder holds the same case
    # on several machines; a Ray or Slurm run may spread a series over several alike)
    df["_hardware"] = df["device_name"].map(_text) if "device_name" in df.columns else ""
    shape = [c for c in CASE_KEY if c not in ("pattern_label", "backend")] + ["_hardware"]
    base = df[(df["pattern"] == BASELINE_PATTERN) & (df["backend"] == BASELINE_BACKEND) & (df["status"] == "ok")]
    base = base[shape + ["time_median_s", "nnz"]].rename(
        columns={"time_median_s": "_base_time", "nnz": "_base_nnz"}
    ).drop_duplicates(subset=shape, keep="last")
    df = df.merge(base, on=shape, how="left").drop(columns=["_hardware"])
    ok = (df["status"] == "ok")
    df["speedup"] = np.where(ok, df["_base_time"] / df["time_median_s"], np.nan)
    df["ideal_speedup"] = df["_base_nnz"] / df["nnz"]
    df["efficiency"] = df["speedup"] / df["ideal_speedup"]
    return df.drop(columns=["_base_time", "_base_nnz"])


def write_meta(folder: Path, info: dict[str, Any]) -> None:
    atomic_write(Path(folder) / META, json.dumps({"schema_version": SCHEMA_VERSION, **info}, indent=2) + "\n")


def write_csv(folder: Path, df) -> None:
    import pandas as pd

    out = df.copy()
    for col in ("params", "times_s", "groups"):
        if col in out:
            out[col] = out[col].map(lambda v: json.dumps(v) if not (isinstance(v, float) and pd.isna(v)) else "")
    atomic_write(Path(folder) / "results.csv", out.to_csv(index=False))


# ------------------------------------------------------------------------------------ hardware
def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


def hardware_of(rec: dict[str, Any]) -> tuple[str, str]:
    """(host, device_name) of a record ("" where it does not say: a record from before the fields)."""
    return tuple(_text(rec.get(c)) for c in HARDWARE)  # type: ignore[return-value]


def hardware_label(rec: dict[str, Any], hosts: int = 1) -> str:
    """A record's hardware as a column name: its device_name (its device where it has none), and
    "@ host" where the records come from more than one host."""
    host, name = hardware_of(rec)
    name = name or _text(rec.get("device"))
    return f"{name} @ {host}" if hosts > 1 and host else name


def hardware_column(df):
    """``df`` with a column "hardware" (hardware_label of each row): compare --by device's columns."""
    df = df.copy()
    rows = df[[c for c in (*HARDWARE, "device") if c in df.columns]].to_dict("records")
    hosts = len({hardware_of(r)[0] for r in rows if hardware_of(r)[0]})
    df["hardware"] = [hardware_label(r, hosts) for r in rows]
    return df


# --------------------------------------------------------------------------------------- merge
@dataclass(frozen=True)
class Merged:
    folder: Path
    records: int
    hardware: tuple[tuple[str, str], ...]  # (host, device_name), in order of appearance
    one_per_case: bool  # no case key on two pieces of hardware: the usual reports apply


def _filled(rec: dict[str, Any], env: dict[str, Any] | None) -> dict[str, Any]:
    """A record from before host and device_name: both read from its folder's environment.json."""
    if rec.get("host") or not env:
        return rec
    device = str(rec.get("device") or "")
    name = env.get("gpu") if device.startswith("cuda") else env.get("cpu") if device == "cpu" else None
    return {**rec, "host": env.get("hostname"), "device_name": rec.get("device_name") or name}


def merge_folders(sources: list[Path], output: Path, warn: Callable[[str], None] | None = None) -> Merged:
    """Combine result folders (other machines, other executors) into ``output``: every record
    (each naming its host and device_name: hardware is a dimension), environment.json with each
    host's own environment under "hosts" and the yardsticks under "host device/dtype", meta.json
    naming the sources, and the first folder's scenario.yaml (each folder's in scenarios/ where
    they differ). The same case (its key and round) on the same hardware in two folders is refused,
    in one line naming both."""
    if len(sources) < 2:
        raise ResultsError("merge needs at least two result folders")
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise ResultsError(f"{output}: output folder exists and is not empty")
    seen: dict[tuple, Path] = {}
    records: list[dict[str, Any]] = []
    hosts: dict[str, dict[str, Any]] = {}
    yardsticks: dict[str, Any] = {}
    scenarios: list[tuple[Path, str]] = []
    metas = []
    for src in sources:
        src = Path(src)
        env = read_environment(src, warn)
        recs = [_filled(r, env) for r in read_records(src, warn=warn)]
        for rec in recs:
            key = (schema.case_key(rec), rec.get("round", 1), hardware_of(rec))
            if key in seen:
                host, name = hardware_of(rec)
                raise ResultsError(
                    f"{src}: case {rec.get('case_id')} on {name or '?'} @ {host or '?'} is also in {seen[key]}; "
                    "merge refuses duplicates (the same case on the same hardware)"
                )
            seen[key] = src
        records.extend(recs)
        if env:
            host = env.get("hostname") or src.name
            hosts.setdefault(host, {k: v for k, v in env.items() if k not in ("hosts", "yardstick")})
            for name, y in (env.get("yardstick") or {}).items():
                yardsticks.setdefault(name if " " in name else f"{host} {name}", y)
            for name, info in (env.get("hosts") or {}).items():
                hosts.setdefault(name, info)
        text = (src / "scenario.yaml").read_text(encoding="utf-8") if (src / "scenario.yaml").is_file() else ""
        scenarios.append((src, text))
        metas.append({"folder": str(src), **{k: v for k, v in read_meta(src, warn).items() if k != "schema_version"}})
    output.mkdir(parents=True, exist_ok=True)
    common = {k: v for k, v in next(iter(hosts.values()), {}).items() if all(h.get(k) == v for h in hosts.values())}
    env_out = {**common, "hosts": hosts, "yardstick": yardsticks, "merged_from": [str(s) for s in sources]}
    atomic_write(output / ENVIRONMENT, json.dumps(env_out, indent=2) + "\n")
    texts = {t for _, t in scenarios}
    atomic_write(output / "scenario.yaml", scenarios[0][1])
    if len(texts) > 1:
        (output / "scenarios").mkdir(exist_ok=True)
        for i, (src, text) in enumerate(scenarios, 1):
            atomic_write(output / "scenarios" / f"{i}-{src.name}.yaml", text)
    write_meta(output, {"scenario": metas[0].get("scenario"), "merged_from": metas})
    with RecordWriter(output) as writer:
        for rec in records:
            writer.append({**rec, "schema_version": SCHEMA_VERSION})
    hardware = tuple(dict.fromkeys(hardware_of(r) for r in records))
    per_case: dict[tuple, set] = {}
    for rec in records:
        per_case.setdefault((schema.case_key(rec), rec.get("round", 1)), set()).add(hardware_of(rec))
    return Merged(output, len(records), hardware, all(len(v) == 1 for v in per_case.values()))
