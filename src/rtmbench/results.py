"""The results store: one CSV file per gate run, merged into a history and compared run to run.

A run file (``run-<run id>.csv``) has one row per measured metric (:data:`COLUMNS`). Files are
written atomically under unique names, so workers and machines can share one results folder.
Perf rows keep their per-round times (seconds per batch, a JSON list) so a comparison can tell a
real slowdown from run-to-run noise (one-sided Mann–Whitney U test).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import RtmbenchError
from .fsutil import atomic_path

KEY = ["model", "backend", "precision", "batch", "metric"]
COLUMNS = ["run_id", "time", "commit", "hostname", "model", "weights_sha256", "backend", "backend_version",
           "device", "versions", "precision", "batch", "metric", "value", "target", "verdict", "detail",
           "round_times"]
_TEXT = ["run_id", "commit", "hostname", "model", "weights_sha256", "backend", "backend_version", "device",
         "versions", "precision", "metric", "verdict", "detail", "round_times"]
THROUGHPUT_METRIC = "images/s"
FAST_BUT_WRONG = "fast but wrong"  # how a perf verdict's detail starts when its timed calls gave wrong outputs
DEFAULT_ACCURACY_TOLERANCE = 0.005
ACROSS_MACHINES = "worse (other machine)"  # slower than a baseline row from another machine
VERDICTS = ("ok", "REGRESSED", ACROSS_MACHINES, "suspicious gain", "new", "missing")


class NoBaseline(RtmbenchError):
    """The baseline spec names no run (e.g. ``last`` with no earlier run stored)."""


# ------------------------------------------------------------------ writing


DIRTY = "-dirty"  # appended, as git describe --dirty does, when tracked files differ from the commit


def _git_commit(repo_dir: Path) -> str | None:
    """HEAD of the checkout at ``repo_dir``, with :data:`DIRTY` when its tracked files were
    changed since (results then came from code no commit holds); None outside git."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=repo_dir, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    if not (head := git("rev-parse", "HEAD")):
        return None
    return head + DIRTY if git("status", "--porcelain", "--untracked-files=no") else head


def short_commit(commit: str | None) -> str:
    """A commit as reports show it: 12 hex digits, and :data:`DIRTY` if it has it."""
    if not commit:
        return "unknown"
    return commit[:12] + (DIRTY if commit.endswith(DIRTY) else "")


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """Who/where/when of one gate run; ``versions`` holds driver/SDK/package versions."""

    run_id: str
    time: dt.datetime
    commit: str | None
    hostname: str
    device: str
    versions: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def new(cls, device: str | None = None, versions: Mapping | None = None,
            repo_dir: str | Path | None = None, now: dt.datetime | None = None) -> RunInfo:
        """A fresh run: id = UTC timestamp + random suffix; commit of ``repo_dir`` (default: this
        package's checkout); device and versions default to the host CPU and package versions."""
        from .hostinfo import cpu_name, package_versions

        now = (now or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
        run_id = f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{secrets.token_hex(4)}"
        repo = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parent
        return cls(run_id, now, _git_commit(repo), socket.gethostname(), device or cpu_name(),
                   dict(package_versions() if versions is None else versions))


def _round_times_from_benchmark(benchmark_json: str | Path | None) -> dict[str, list[float]]:
    """Per-round times by case id (the test's parameter id) from a pytest-benchmark JSON."""
    if benchmark_json is None:
        return {}
    data = json.loads(Path(benchmark_json).read_text())
    return {b.get("param") or b["name"].partition("[")[2].rstrip("]"): list(b["stats"]["data"])
            for b in data.get("benchmarks", []) if b.get("stats", {}).get("data")}


def _case_id(row: Mapping) -> str:
    return f"{row['model']}-{row['backend']}-{row['precision']}-bs{row['batch']}"


def to_frame(run_info: RunInfo, rows: Iterable[Mapping], benchmark_json: str | Path | None = None) -> pd.DataFrame:
    """The run's rows as a results table (:data:`COLUMNS`).

    ``rows`` are verdict rows (``Verdict.as_row()``: model, backend, precision, batch, metric,
    measured, target, verdict, detail) optionally with ``round_times`` (seconds per batch),
    ``device``, ``weights_sha256``, ``backend_version`` and ``versions``. Perf rows without
    ``round_times`` take them from ``benchmark_json`` (matched by case id)."""
    bench_times = _round_times_from_benchmark(benchmark_json)
    records = []
    for r in rows:
        versions = {**run_info.versions, **(r.get("versions") or {})}
        times = r.get("round_times")
        if times is None and r["metric"] == THROUGHPUT_METRIC:
            times = bench_times.get(_case_id(r))
        records.append({
            "run_id": run_info.run_id, "time": run_info.time.isoformat(), "commit": run_info.commit,
            "hostname": run_info.hostname, "model": r["model"], "weights_sha256": r.get("weights_sha256"),
            "backend": r["backend"], "backend_version": r.get("backend_version", versions.get(r["backend"])),
            "device": r.get("device") or run_info.device, "versions": json.dumps(versions, sort_keys=True),
            "precision": r["precision"], "batch": int(r["batch"]), "metric": r["metric"],
            "value": float(r.get("measured", r.get("value"))), "target": r.get("target"),
            "verdict": r.get("verdict"), "detail": r.get("detail", ""),
            "round_times": None if times is None else [float(t) for t in times]})
    return _typed(pd.DataFrame.from_records(records, columns=COLUMNS))


def write_run(results_dir: str | Path, run_info: RunInfo, rows: Iterable[Mapping],
              benchmark_json: str | Path | None = None) -> Path:
    """Write the run's rows to ``results_dir/run-<run id>.csv`` atomically (and copy the
    pytest-benchmark JSON beside it as ``run-<run id>.benchmark.json``); returns the CSV path."""
    results_dir = Path(results_dir)
    frame = to_frame(run_info, rows, benchmark_json)
    out = results_dir / f"run-{run_info.run_id}.csv"
    with atomic_path(out) as tmp:
        frame.assign(round_times=frame["round_times"].map(_round_times_json)).to_csv(tmp, index=False)
    if benchmark_json is not None:
        with atomic_path(results_dir / f"run-{run_info.run_id}.benchmark.json") as tmp:
            shutil.copyfile(benchmark_json, tmp)
    return out


# ------------------------------------------------------------------ reading


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    for c in _TEXT:  # missing text → None (not NaN)
        frame[c] = frame[c].astype(object).where(frame[c].notna(), None)
    frame["time"] = pd.to_datetime(frame["time"], utc=True, format="ISO8601")
    frame["batch"] = frame["batch"].astype(int)
    frame["value"] = frame["value"].astype(float)
    frame["target"] = pd.to_numeric(frame["target"], errors="coerce").astype(float)
    return frame


def _run_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob("run-*.csv"))
        elif p.is_file():
            files.append(p)
        else:
            raise RtmbenchError(f"{p}: no such results file or folder")
    return files


def _read_one(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype={c: str for c in _TEXT}, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as exc:
        raise RtmbenchError(f"{path}: not a readable results file ({exc})") from None
    if missing := [c for c in COLUMNS if c not in frame.columns]:
        raise RtmbenchError(f"{path}: not a results file (no column {', '.join(missing)})")
    if frame.empty:  # every run stored has rows: this one was cut short or emptied
        raise RtmbenchError(f"{path}: not a results file (a header and no rows)")
    try:
        frame = _typed(frame[COLUMNS])
        frame["round_times"] = frame["round_times"].map(_round_times_list)
        return frame
    except (ValueError, TypeError) as exc:
        raise RtmbenchError(f"{path}: not a results file (a value of the wrong type: {exc})") from None


def _round_times_json(times: list[float] | None) -> str | None:
    return None if times is None else json.dumps(times)


def _round_times_list(cell: str | None) -> list[float] | None:
    """A ``round_times`` cell as stored (a JSON list) back to the list of floats it was."""
    if cell is None:
        return None
    times = json.loads(cell)
    if not isinstance(times, list) or not all(isinstance(t, (int, float)) for t in times):
        raise ValueError(f"round_times is not a list of numbers: {cell[:40]!r}")
    return [float(t) for t in times]


def _sorted(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frame = pd.concat(frames, ignore_index=True)
    return frame.sort_values(["time", "run_id"], kind="stable", ignore_index=True)


def load_results(paths_or_dirs: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """All run files under the given files/folders (folders: ``run-*.csv`` recursively) as one
    table sorted by time. An unreadable file is an error that names it."""
    files = _run_files(paths_or_dirs)
    if not files:
        raise RtmbenchError(f"no results files (run-*.csv) in {', '.join(map(str, _as_list(paths_or_dirs)))}")
    return _sorted([_read_one(f) for f in files])


def load_readable_results(paths_or_dirs: str | Path | Sequence[str | Path]) -> tuple[pd.DataFrame | None, list[str]]:
    """Like :func:`load_results`, but files that cannot be read are passed over: returns the
    table of the readable ones (None if there are none) and one line per unreadable file."""
    frames, unreadable = [], []
    for f in _run_files(paths_or_dirs):
        try:
            frames.append(_read_one(f))
        except RtmbenchError as exc:
            unreadable.append(str(exc))
    return (_sorted(frames) if frames else None), unreadable


def _as_list(x) -> list:
    return [x] if isinstance(x, (str, Path)) else list(x)


def runs(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run (run_id, time, commit, hostname, device), oldest first."""
    return (frame.groupby("run_id", sort=False).agg(time=("time", "first"), commit=("commit", "first"),
                                                      hostname=("hostname", "first"), device=("device", "first"))
            .reset_index().sort_values(["time", "run_id"], ignore_index=True))


def round_times(cell: list[float] | None) -> np.ndarray | None:
    """A ``round_times`` cell (list of seconds, or None) as an array; None when empty."""
    return np.asarray(cell, dtype=float) if cell else None


# ------------------------------------------------------------------ baseline


@dataclasses.dataclass(frozen=True)
class Baseline:
    """The rows a comparison is made against, each with its own run's id and versions, and the
    unreadable results files passed over finding them."""

    rows: pd.DataFrame
    unreadable: list[str] = dataclasses.field(default_factory=list)

    @property
    def run_ids(self) -> list[str]:
        """The runs the rows come from, oldest first."""
        return runs(self.rows)["run_id"].tolist()


def find_baseline(results: str | Path | Sequence[str | Path], spec: str, current_run_id: str | None = None,
                  skip_unreadable: bool = False, history: pd.DataFrame | None = None) -> Baseline:
    """The rows ``spec`` names: ``last``, for each key the run ``current_run_id`` measured, its
    latest row from an earlier run in ``results`` (:func:`_last_rows`); a run id (or unique
    prefix) in ``results``, or a path to a results file/folder: that run (the path's latest run).
    With ``skip_unreadable``, unreadable files in ``results`` are passed over and listed in
    :attr:`Baseline.unreadable`; a path given as ``spec`` must be readable. Raises
    :class:`NoBaseline` when nothing matches. ``history``: the table of ``results`` as the caller
    already read it (its unreadable files passed over), so that it is not read again."""
    spec_path = Path(spec)
    if spec != "last" and spec_path.exists():  # the path's latest run other than the current one
        frame = load_results(spec_path)
        frame = frame[frame["run_id"] != current_run_id]
        if frame.empty:
            raise NoBaseline(f"baseline {spec!r}: no run in it but the current one")
        return Baseline(frame[frame["run_id"] == runs(frame)["run_id"].iloc[-1]])
    where = ", ".join(map(str, _as_list(results)))
    if history is not None:
        frame, unreadable = history, []
    elif all(Path(p).exists() for p in _as_list(results)):
        frame, unreadable = load_readable_results(results)
    else:
        frame, unreadable = None, []
    if unreadable and not skip_unreadable:
        raise RtmbenchError(unreadable[0])
    order = runs(frame) if frame is not None else pd.DataFrame({"run_id": []})
    where += "".join(f"; passed over {line}" for line in unreadable)
    if spec == "last":
        return Baseline(_last_rows(frame, order, current_run_id, where), unreadable)
    matches = [r for r in order["run_id"] if r.startswith(spec) and r != current_run_id]
    if len(matches) != 1:
        raise NoBaseline(f"baseline {spec!r}: {'no' if not matches else 'more than one'} run id or path "
                         f"matches in {where}")
    return Baseline(frame[frame["run_id"] == matches[0]], unreadable)


def _last_rows(frame: pd.DataFrame | None, order: pd.DataFrame, current_run_id: str | None,
               where: str) -> pd.DataFrame:
    """``last``: for each key the run ``current_run_id`` measured, its latest valid row from the
    runs before it in ``frame`` (``order``: their :func:`runs`) on the same machine, else on
    another (a shared results folder of a fleet), whichever run that is, so an accuracy run is
    compared with the previous accuracy run, not with a perf run in between. Rows that were no
    valid measurement (:func:`_valid_measurements`) are never a baseline. A current run not
    stored (or None) comes after every stored run, and the latest one's keys and machine stand in
    for its own (that run is the baseline)."""
    position = order.index[order["run_id"] == current_run_id]
    earlier = order["run_id"].iloc[:position[0]] if len(position) else order["run_id"]
    if earlier.empty:
        raise NoBaseline(f"no run before {current_run_id or 'this one'} in {where}")
    measured_by = current_run_id if len(position) else earlier.iloc[-1]
    current = frame[frame["run_id"] == measured_by]
    keys = current[KEY].drop_duplicates()
    candidates = _valid_measurements(frame[frame["run_id"].isin(earlier)])
    here = _on_machine_of(candidates["versions"], current["versions"].iloc[0])
    rows = (pd.concat([_latest_per_key(candidates[here]), _latest_per_key(candidates[~here])])
            .drop_duplicates(KEY, keep="first").merge(keys, on=KEY)
            .sort_values(["time", "run_id"], ignore_index=True))  # in time: the latest run's provenance last
    if rows.empty:
        raise NoBaseline(f"no run before {current_run_id} measured any of its {len(keys)} metrics in {where}")
    return rows


def _valid_measurements(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows that measured what they say: not INVALID (timed too briefly) and not a perf
    figure of wrong outputs (FAIL, ``fast but wrong``): a baseline of either would excuse a real
    drop or call a false one."""
    wrong = frame["verdict"].eq("FAIL") & frame["detail"].fillna("").str.startswith(FAST_BUT_WRONG)
    return frame[frame["verdict"].ne("INVALID") & ~wrong]


def _on_machine_of(versions: pd.Series, current: str) -> pd.Series:
    """Whether each ``versions`` cell names the machine fingerprint ``current`` names."""
    from .hostinfo import fingerprint_changes

    mine = json.loads(current or "{}")
    same = {v: not fingerprint_changes(json.loads(v or "{}"), mine) for v in versions.unique()}
    return versions.map(same).astype(bool)


# ------------------------------------------------------------------ comparing


def accuracy_tolerances(thresholds, frame: pd.DataFrame) -> dict[tuple, float]:
    """{(model, backend, precision, metric): floor tolerance} from a :class:`Thresholds` for the
    accuracy rows of ``frame`` that a rule covers (pass to :func:`compare`)."""
    out = {}
    keys = frame[["model", "backend", "precision", "metric"]].drop_duplicates()
    for model, backend, precision, metric in keys.itertuples(index=False):
        try:
            rule = thresholds.accuracy_rule(model, backend, precision)
        except RtmbenchError:
            continue
        floor = getattr(rule, full_set_metric(metric), None) if rule is not None else None
        if floor is not None and hasattr(floor, "tolerance"):
            out[(model, backend, precision, metric)] = floor.tolerance
    return out


def _tolerance(tolerances: Mapping | float | None, row) -> float:
    if tolerances is None:
        return DEFAULT_ACCURACY_TOLERANCE
    if not isinstance(tolerances, Mapping):
        return float(tolerances)
    for key in ((row.model, row.backend, row.precision, row.metric), row.metric):
        if key in tolerances:
            return float(tolerances[key])
    return DEFAULT_ACCURACY_TOLERANCE


def _latest_per_key(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["time", "run_id"], kind="stable").drop_duplicates(KEY, keep="last")


def is_accuracy(metric: str) -> bool:
    return metric.startswith("mAP")


SUBSET = " on {images} images"  # an accuracy metric measured on a --max-images subset: 'mAP on 64 images'


def subset_metric(metric: str, images: int) -> str:
    """The name ``metric`` is stored under when measured on the first ``images`` images only: another
    measurement than the full set's, compared only with its like."""
    return metric + SUBSET.format(images=images)


def full_set_metric(name: str) -> str:
    """The metric a (possibly :func:`subset_metric`) name measures: its thresholds rule's key."""
    return name.split(SUBSET.split("{")[0], 1)[0]


def _compare_accuracy(row, tol: float) -> tuple[str, str]:
    if pd.isna(row.current) or pd.isna(row.baseline):  # COCOeval's -1: no ground truth in that range
        return "ok", f"not compared: {row.baseline} → {row.current} (NaN: nothing to measure in one of the runs)"
    delta = row.current - row.baseline
    if delta < -tol:
        return "REGRESSED", f"{row.metric} fell {-delta:.4f} > tolerance {tol:.4f}"
    if delta > 2 * tol:
        return "suspicious gain", f"{row.metric} rose {delta:.4f} > 2 × tolerance {tol:.4f}: check the data/model"
    return "ok", f"change {delta:+.4f} within tolerance {tol:.4f}"


def _compare_throughput(row, perf_drop: float, alpha: float) -> tuple[str, str]:
    from scipy.stats import mannwhitneyu

    rel = row.current / row.baseline - 1
    base, cur = round_times(row.round_times_baseline), round_times(row.round_times_current)
    change = f"median images/s {rel:+.1%}"
    if base is None or cur is None or len(base) < 2 or len(cur) < 2:
        if rel < -perf_drop:
            return "REGRESSED", f"{change} beyond -{perf_drop:.0%} (no per-round times: relative drop only)"
        return "ok", f"{change} within -{perf_drop:.0%} (no per-round times: relative drop only)"
    # One-sided: are the current per-round times stochastically larger (slower)?
    u, p = mannwhitneyu(cur, base, alternative="greater")
    test = f"Mann–Whitney U={u:.0f}, p={p:.2g}, n={len(cur)}/{len(base)} rounds"
    if rel < -perf_drop and p < alpha:
        return "REGRESSED", f"{change} beyond -{perf_drop:.0%} and significant ({test} < {alpha:g})"
    if rel < -perf_drop:
        return "ok", f"{change} beyond -{perf_drop:.0%} but not significant vs run-to-run noise ({test} ≥ {alpha:g})"
    return "ok", f"{change} within -{perf_drop:.0%} ({test})"


def _judge(row, accuracy_tolerance, perf_drop: float, alpha: float) -> tuple[str, str]:
    """The verdict and reason of one merged row of :func:`compare`."""
    if row.side == "left_only":
        return "missing", "in the baseline, not measured in this run"
    if row.side == "right_only":
        return "new", "not in the baseline"
    if is_accuracy(row.metric):
        verdict, reason = _compare_accuracy(row, _tolerance(accuracy_tolerance, row))
    elif row.metric == THROUGHPUT_METRIC:
        verdict, reason = _compare_throughput(row, perf_drop, alpha)
    else:
        verdict, reason = "ok", "not compared (informational metric)"
    if row.device_baseline != row.device_current:
        reason += f" [device changed: {row.device_baseline} → {row.device_current}]"
    return verdict, reason


def _other_machine(row) -> str:
    """The machine fields in which the run of the row's baseline differs from the current one's
    ('' when none does, or one side has no row)."""
    from .hostinfo import fingerprint_changes

    if row.side != "both":
        return ""
    before, after = (json.loads(v or "{}") for v in (row.versions_baseline, row.versions_current))
    return "; ".join(fingerprint_changes(before, after))


def compare(current: pd.DataFrame, baseline: pd.DataFrame, accuracy_tolerance: Mapping | float | None = None,
            perf_drop: float = 0.05, alpha: float = 0.01, across_machines: bool = False) -> pd.DataFrame:
    """One row per (model, backend, precision, batch, metric): baseline, current, delta,
    rel_delta, verdict (:data:`VERDICTS`), reason and other_machine. Each side uses its latest
    row per key.

    ``accuracy_tolerance``: a float, or a dict keyed by (model, backend, precision, metric) or by
    metric (see :func:`accuracy_tolerances`); default 0.005. Accuracy regresses when it drops by
    more than the tolerance and is a suspicious gain above 2× it. Throughput regresses when the
    median drops by more than ``perf_drop`` and a one-sided Mann–Whitney U test on the per-round
    times gives p < ``alpha``. A baseline row from a machine with another fingerprint (its run's
    ``versions``; ``other_machine`` says how it differs) is compared, but a throughput regression
    against it is :data:`ACROSS_MACHINES`, which fails nothing, unless ``across_machines``; an
    accuracy regression is one on any machine."""
    cols = KEY + ["value", "round_times", "device", "versions"]
    merged = pd.merge(_latest_per_key(baseline)[cols], _latest_per_key(current)[cols], on=KEY, how="outer",
                      suffixes=("_baseline", "_current"), indicator="side")
    merged = merged.rename(columns={"value_baseline": "baseline", "value_current": "current"})
    verdicts, reasons, machines = [], [], []
    for row in merged.itertuples(index=False):
        verdict, reason = _judge(row, accuracy_tolerance, perf_drop, alpha)
        if other := _other_machine(row):
            reason += f" [other machine: {other}]"
            # speed is the machine's as much as the engine's; accuracy is the engine's alone
            slower = verdict == "REGRESSED" and row.metric == THROUGHPUT_METRIC
            verdict = ACROSS_MACHINES if slower and not across_machines else verdict
        verdicts.append(verdict)
        reasons.append(reason)
        machines.append(other)
    merged["delta"] = merged["current"] - merged["baseline"]
    merged["rel_delta"] = merged["delta"] / merged["baseline"]
    merged["verdict"], merged["reason"], merged["other_machine"] = verdicts, reasons, machines
    out = merged[KEY + ["baseline", "current", "delta", "rel_delta", "verdict", "reason", "other_machine"]]
    return out.sort_values(KEY, ignore_index=True)


def other_machine_note(comparison: pd.DataFrame, across_machines: bool) -> str | None:
    """The line that says why images/s drops against baseline rows from another machine were not
    called regressions (see :func:`compare`); None when no such row was compared or ``across_machines``."""
    elsewhere = comparison[comparison["other_machine"] != ""]
    moved = sorted(set(elsewhere.loc[elsewhere["metric"] == THROUGHPUT_METRIC, "other_machine"]))
    if across_machines or not moved:
        return None
    return (f"the baseline ran on another machine ({' | '.join(moved)}): images/s differences are shown, not "
            f"called regressions (--compare-across-machines to gate on them)")


def has_regression(comparison: pd.DataFrame) -> bool:
    """Whether any row of a :func:`compare` table REGRESSED."""
    return bool((comparison["verdict"] == "REGRESSED").any())
