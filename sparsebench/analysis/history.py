"""One scenario's result folders over time, as asv shows a benchmark's history: the folders in
order, each case's time in each folder with its interval, and the steps (a case that got slower or
faster beyond the threshold and the noise between one folder and the next). Data only:
``render.history`` draws it.

Order: by commit date (environment.json's ``git_commit_date``, else ``sparsebench_commit_date``),
then by the run's start time (meta.json's ``started``); a folder without a commit date goes by its
start time, one with neither keeps its place on the command line, after the others.

Statistics are ``analysis.noise``'s: a case's time in one folder has the 95% interval of its samples
with the folder's pooled noise; a step is judged by ``judge_step`` on the ratio new / old of two
consecutive folders, each case of a pair at its level under Holm's control at FAMILY_ALPHA over the m
cases compared in that pair (``compare.case_levels``), the noise pooled over both folders. pandas is
imported (by ``load_frame``) only when folders are read."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from sparsebench.analysis.compare import FAMILY_ALPHA, case_levels, env_differences, judge_ratio
from sparsebench.analysis.noise import Interval, Noise, Spread, time_interval
from sparsebench.analysis.scaling import case_label, finite_or_none, plain_value
from sparsebench.errors import ResultsError
from sparsebench.results.schema import CASE_KEY, KEY_DEFAULTS, SERIES_KEY

TIME_LEVEL = 0.95  # the interval of a case's time in one folder
SLOWER, FASTER = "slower", "faster"


# ----------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class Folder:
    """One result folder as history places it: its commit and when it ran."""

    path: str
    name: str  # the folder's own name
    label: str  # short: the commit's first 7 hex digits (#k for repeated runs), else the name
    scenario: str | None
    commit: str | None
    commit_date: str | None  # ISO 8601, as environment.json records it
    commit_source: str | None  # "git_commit" or "sparsebench_commit": whose commit and date these are
    started: str | None  # meta.json's "started"

    def date_text(self) -> str:
        """The day of the commit (else of the run), for a step's line; "" when neither is known."""
        return (self.commit_date or self.started or "")[:10]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "name": self.name,
            "path": self.path,
            "scenario": self.scenario,
            "commit": self.commit,
            "commit_date": self.commit_date,
            "commit_source": self.commit_source,
            "started": self.started,
        }


@dataclass(frozen=True)
class Point:
    """A case in one folder: its median time with its interval, or why there is none (its status,
    or "absent" where the folder did not measure the case)."""

    status: str
    time: float | None = None
    interval: Interval | None = None

    @property
    def ok(self) -> bool:
        return self.time is not None

    def to_dict(self) -> dict[str, Any]:
        iv = self.interval
        return {
            "status": self.status,
            "time_median_s": self.time,
            "low_s": iv.low if iv else None,
            "high_s": finite_or_none(iv.high) if iv else None,
        }


@dataclass(frozen=True)
class CaseHistory:
    key: tuple  # values of CASE_KEY
    label: str  # "strided(stride=64) · block_sparse, n=4096"
    points: tuple[Point, ...]  # one per folder, in the history's order

    @property
    def series(self) -> tuple:
        row = dict(zip(CASE_KEY, self.key))
        return tuple(row[c] for c in SERIES_KEY)

    @property
    def seq_len(self) -> Any:
        return dict(zip(CASE_KEY, self.key))["seq_len"]


@dataclass(frozen=True)
class Step:
    """A case that changed between folder ``index - 1`` and folder ``index`` (where it appeared):
    the ratio new / old with its interval at the pair's family-wise level."""

    key: tuple
    label: str
    index: int
    direction: str  # SLOWER or FASTER
    ratio: float
    interval: Interval

    def to_dict(self, folders: Sequence[Folder]) -> dict[str, Any]:
        return {
            "case": self.label,
            **dict(zip(CASE_KEY, self.key)),
            "direction": self.direction,
            "ratio": self.ratio,
            "low": self.interval.low,
            "high": finite_or_none(self.interval.high),
            "level": self.interval.level,
            "at": folders[self.index].label,
            "after": folders[self.index - 1].label,
            "date": folders[self.index].date_text() or None,
        }


@dataclass(frozen=True)
class History:
    scenario: str | None
    folders: tuple[Folder, ...]
    cases: tuple[CaseHistory, ...]
    steps: tuple[Step, ...]
    threshold: float
    order: str  # how the folders were ordered, in words
    shown_dims: tuple[str, ...] = ()  # case-key columns that vary (named in the labels)
    compared: tuple[int, ...] = ()  # per pair (folder i-1, i), i >= 1: cases judged for a step
    noise: tuple[float, ...] = ()  # per pair: the typical sd of a case's log-time samples, pooled
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def step_at(self, key: tuple, index: int) -> Step | None:
        for s in self.steps:
            if s.key == key and s.index == index:
                return s
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "order": self.order,
            "threshold": self.threshold,
            "time_level": TIME_LEVEL,
            "family_alpha": FAMILY_ALPHA,
            "folders": [f.to_dict() for f in self.folders],
            "compared": [
                {"after": self.folders[i].label, "at": self.folders[i + 1].label, "cases": m, "noise_sd": sd}
                for i, (m, sd) in enumerate(zip(self.compared, self.noise))
            ],
            "cases": [
                {
                    "case": c.label,
                    **dict(zip(CASE_KEY, c.key)),
                    "points": [{"folder": f.label, **p.to_dict()} for f, p in zip(self.folders, c.points)],
                }
                for c in self.cases
            ],
            "steps": [s.to_dict(self.folders) for s in self.steps],
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class Run:
    """A folder with what was read from it: its records (one per case, rounds merged) by case key
    and its environment.json."""

    folder: Folder
    records: dict[tuple, dict[str, Any]]
    env: dict[str, Any] | None = None


# ----------------------------------------------------------------------------------------------
# the step rule


def judge_step(
    old: dict[str, Any], new: dict[str, Any], noise: Noise, threshold: float, level: float, spread: Spread | None = None
) -> tuple[str, float, Interval] | None:
    """(SLOWER or FASTER, ratio new / old, its interval) where compare would call the case slower
    or faster (``compare.judge_ratio``: the whole ``level`` interval beyond the threshold, the
    machine-speed probe steady); None otherwise (within the threshold or the noise, withheld, or
    a case without a time or samples on either side)."""
    a, b = finite_or_none(old.get("time_median_s")), finite_or_none(new.get("time_median_s"))
    if old.get("status") != "ok" or new.get("status") != "ok" or not a or not b or a <= 0 or b <= 0:
        return None
    ratio = b / a
    verdict, iv, _ = judge_ratio(old, new, ratio, threshold, noise, level, "median", spread)
    if iv is None or verdict not in (SLOWER, FASTER):
        return None
    return verdict, ratio, iv


def comparable(rec: dict[str, Any] | None) -> bool:
    """A record a step can be judged on: ok, with a positive time."""
    return bool(rec) and rec.get("status") == "ok" and (finite_or_none(rec.get("time_median_s")) or 0) > 0


# ----------------------------------------------------------------------------------------------
# building


def history_of(paths: Sequence[Path], threshold: float, warn: Callable[[str], None] | None = None) -> History:
    """Read the folders, refuse a mix of scenarios, order them and line their cases up."""
    seen: dict[Path, str] = {}
    for p in paths:
        r = Path(p).resolve()
        if r in seen:
            raise ResultsError(f"{p}: given twice (also as {seen[r]})")
        seen[r] = str(p)
    runs = [read_run(p, warn) for p in paths]
    check_one_scenario(runs)
    runs, order = order_runs(runs)
    return build(runs, threshold, order)


def read_run(path: Path, warn: Callable[[str], None] | None = None) -> Run:
    """A result folder's records (load_frame: migrated, rounds merged), environment and meta."""
    from sparsebench.results.folder import load_frame, read_environment, read_meta

    path = Path(path)
    df = load_frame(path, warn=warn)  # a folder that is not a result folder: ResultsError
    env = read_environment(path, warn)
    meta = read_meta(path, warn)
    records: dict[tuple, dict[str, Any]] = {}
    dups = 0
    for rec in df.to_dict("records"):
        rec = {k: plain_value(v) if not isinstance(v, (list, tuple, dict)) else v for k, v in rec.items()}
        key = case_key(rec)
        dups += key in records
        records[key] = rec  # a case measured twice in one folder: the last record stands
    if dups and warn:
        warn(f"{path}: {dups} case(s) recorded twice; the last record of each is used")
    scenario = meta.get("scenario") or next((r.get("scenario") for r in records.values() if r.get("scenario")), None)
    return Run(folder_info(path, env, meta, scenario), records, env)


def folder_info(path: Path, env: dict[str, Any] | None, meta: dict[str, Any], scenario: str | None) -> Folder:
    """The folder's commit: the one of the folder the run started in where it has a date, else
    sparsebench's own; its label is set when the history is ordered."""
    env = env or {}
    commit, date, source = None, None, None
    for name in ("git_commit", "sparsebench_commit"):
        c, d = _text(env.get(name)), _text(env.get(f"{name}_date"))
        if c and d and parse_time(d) is not None:
            commit, date, source = c, d, name
            break
    if commit is None:  # no date: the commit still names the column
        commit = _text(env.get("git_commit")) or _text(env.get("sparsebench_commit"))
        source = "git_commit" if _text(env.get("git_commit")) else ("sparsebench_commit" if commit else None)
    path = Path(path)
    return Folder(
        path=str(path),
        name=path.resolve().name or str(path),
        label=path.resolve().name or str(path),
        scenario=_text(scenario),
        commit=commit,
        commit_date=date,
        commit_source=source,
        started=_text(meta.get("started")),
    )


def check_one_scenario(runs: Sequence[Run]) -> None:
    """A history is of one scenario: folders of several are a ResultsError naming them all. A
    folder that names no scenario goes with any."""
    by: dict[str, list[str]] = {}
    for r in runs:
        if r.folder.scenario:
            by.setdefault(r.folder.scenario, []).append(r.folder.path)
    if len(by) > 1:
        parts = "; ".join(f"{s}: {', '.join(p)}" for s, p in by.items())
        raise ResultsError(f"the folders are runs of {len(by)} scenarios ({parts}); history lines up one scenario")


def parse_time(text: Any) -> _dt.datetime | None:
    """An ISO 8601 time as an aware datetime (one without an offset is local time, as meta.json's
    "started" is written); None where it is missing or unreadable."""
    if not isinstance(text, str) or not text.strip():
        return None
    s = text.strip()
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    try:
        t = _dt.datetime.fromisoformat(s)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.astimezone()


def order_runs(runs: Sequence[Run]) -> tuple[list[Run], str]:
    """The runs by commit date, then start time; a run without a commit date by its start time,
    one with neither after the others in the order given. Returns them labelled, with a sentence
    saying how they were ordered."""
    earliest = _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)

    def key(item: tuple[int, Run]) -> tuple:
        i, r = item
        commit, started = parse_time(r.folder.commit_date), parse_time(r.folder.started)
        when = commit or started
        return (when is None, when or earliest, started or when or earliest, i)

    ordered = _labelled([r for _, r in sorted(enumerate(runs), key=key)])
    dated = [r.folder for r in ordered if r.folder.commit_date]
    by_start = [r.folder for r in ordered if not r.folder.commit_date and parse_time(r.folder.started)]
    neither = [r.folder for r in ordered if not r.folder.commit_date and not parse_time(r.folder.started)]

    def listed(folders: list[Folder]) -> str:
        return ", ".join(f.label for f in folders)

    if dated:
        text = "ordered by commit date, then start time"
        own = [f for f in dated if f.commit_source == "sparsebench_commit"]
        if own:
            text += f" (for {listed(own)}: sparsebench's own commit, the run's folder had none with a date)"
        if by_start:
            text += f"; without a commit date, by start time: {listed(by_start)}"
    elif by_start:
        text = "ordered by start time (no folder records a commit date)"
    else:
        text = "in the order given (no folder records a commit date or a start time)"
    if neither and (dated or by_start):
        text += f"; with neither, last in the order given: {listed(neither)}"
    return ordered, text


def _labelled(runs: list[Run]) -> list[Run]:
    """Each folder's label: its commit's first 7 hex digits (with #1, #2, ... where several
    folders ran one commit), else its name (made unique with #k)."""
    bases = [r.folder.commit[:7] if r.folder.commit else r.folder.name for r in runs]
    seen: dict[str, int] = {}
    out = []
    for r, b in zip(runs, bases):
        label = b
        if bases.count(b) > 1:
            seen[b] = seen.get(b, 0) + 1
            label = f"{b}#{seen[b]}"
        out.append(Run(replace(r.folder, label=label), r.records, r.env))
    return out


def build(runs: Sequence[Run], threshold: float, order: str = "in the order given") -> History:
    """The history of ``runs`` (already in order): every case any of them measured, its time and
    interval per folder, and the steps between consecutive folders."""
    keys: list[tuple] = []
    seen: set[tuple] = set()
    for r in runs:
        for k in r.records:
            if k not in seen:
                seen.add(k)
                keys.append(k)
    series_order: dict[tuple, int] = {}
    for k in keys:
        series_order.setdefault(_series(k), len(series_order))
    keys.sort(key=lambda k: (series_order[_series(k)], _sortable(dict(zip(CASE_KEY, k))["seq_len"])))
    shown = tuple(_varying(keys))
    labels = {k: case_label(k, [c for c in shown if c not in ("pattern_label", "backend")]) for k in keys}

    noises = [Noise.of(r.records.values()) for r in runs]
    cases = []
    for k in keys:
        points = []
        for r, noise in zip(runs, noises):
            points.append(_point(r.records.get(k), noise))
        cases.append(CaseHistory(k, labels[k], tuple(points)))

    steps: list[Step] = []
    compared: list[int] = []
    pooled: list[float] = []
    for i in range(1, len(runs)):
        old, new = runs[i - 1], runs[i]
        pair = [k for k in keys if comparable(old.records.get(k)) and comparable(new.records.get(k))]
        noise = Noise.of([*old.records.values(), *new.records.values()])
        # compare's rule: with enough cases, the noise is how their ratios scatter
        spread = Spread.of(new.records[k]["time_median_s"] / old.records[k]["time_median_s"] for k in pair)
        compared.append(len(pair))
        pooled.append(spread.sd if spread is not None else noise.sd)
        if not pair:
            continue
        ratios = {k: new.records[k]["time_median_s"] / old.records[k]["time_median_s"] for k in pair}
        levels = case_levels(old.records, new.records, ratios, threshold, noise, "median", spread)
        for k in pair:
            found = judge_step(old.records[k], new.records[k], noise, threshold, levels[k], spread)
            if found:
                direction, ratio, iv = found
                steps.append(Step(k, labels[k], i, direction, ratio, iv))

    scenario = next((r.folder.scenario for r in runs if r.folder.scenario), None)
    return History(
        scenario=scenario,
        folders=tuple(r.folder for r in runs),
        cases=tuple(cases),
        steps=tuple(steps),
        threshold=threshold,
        order=order,
        shown_dims=shown,
        compared=tuple(compared),
        noise=tuple(pooled),
        warnings=tuple(env_warnings(runs)),
    )


def _point(rec: dict[str, Any] | None, noise: Noise) -> Point:
    if rec is None:
        return Point("absent")
    status = str(rec.get("status") or "unknown")
    t = finite_or_none(rec.get("time_median_s"))
    if status != "ok" or not t or t <= 0:
        return Point(status if status != "ok" else "no time")
    return Point(status, t, time_interval(rec, t, noise, TIME_LEVEL))


def env_warnings(runs: Sequence[Run]) -> list[str]:
    """What differs between the folders' environments (machine, versions, the SPARSEBENCH_*
    switches), folder by folder, as compare says it; and folders without environment.json."""
    return env_differences([(r.folder.label, r.env) for r in runs])


# ----------------------------------------------------------------------------------------------
# helpers


def case_key(rec: dict[str, Any]) -> tuple:
    return tuple(plain_value(rec.get(c, KEY_DEFAULTS[c])) for c in CASE_KEY)


def _series(key: tuple) -> tuple:
    row = dict(zip(CASE_KEY, key))
    return tuple(row[c] for c in SERIES_KEY)


def _varying(keys: Sequence[tuple]) -> list[str]:
    """Case-key columns (other than pattern and backend, always named) that take several values."""
    return [c for i, c in enumerate(CASE_KEY) if len({str(k[i]) for k in keys}) > 1]


def _sortable(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def _text(v: Any) -> str | None:
    return str(v).strip() or None if v is not None else None
