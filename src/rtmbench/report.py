"""Human-readable summaries of gate verdicts."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

SUMMARY_COLUMNS = ("model", "backend", "precision", "batch", "metric", "measured", "target", "margin", "verdict")


def _fmt(value: float | None, signed: bool = False) -> str:
    """mAP-like values with 4 decimals, throughputs with 1."""
    if value is None:
        return "-"
    digits = 4 if abs(value) < 10 else 1
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def summary_lines(rows: Sequence[dict], not_run: Sequence[tuple[str, str]] = ()) -> list[str]:
    """The end-of-run table (one row per gated number), notes on rows that did not pass, then
    what was not run and why: one line per reason (a missing SDK skips many items at once)."""
    table = [SUMMARY_COLUMNS] + [
        (r["model"], r["backend"], r["precision"], str(r["batch"]), r["metric"], _fmt(r["measured"]),
         _fmt(r["target"]), _fmt(r["margin"], signed=True), r["verdict"]) for r in rows]
    lines = []
    if rows:
        widths = [max(len(row[i]) for row in table) for i in range(len(SUMMARY_COLUMNS))]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
        lines += [f"  {r['model']} {r['backend']} {r['precision']} {r['metric']}: {r['verdict']}: {r['detail']}"
                  for r in rows if r["verdict"] != "pass"]
    if not_run:
        items_by_reason: dict[str, list[str]] = {}
        for what, why in not_run:
            items_by_reason.setdefault(why, []).append(what)
        lines.append("not run:")
        lines += [f"  {items[0]}: {why}" if len(items) == 1 else f"  {why} ({len(items)} items)"
                  for why, items in items_by_reason.items()]
    return lines


# ------------------------------------------------------------------ results history (rtmbench.results)

ENGINE = ["model", "backend", "precision", "device"]
CASE = ENGINE + ["batch", "metric"]
LATEST_COLUMNS = ("model", "backend", "precision", "device", "batch", "metric", "value", "target", "verdict", "run",
                  "age")
RUN_COLUMNS = ("run", "run_id", "time", "commit", "hostname", "measured")
PROVENANCE_COLUMNS = ("field", "baseline", "current")
COMPARISON_COLUMNS = ("model", "backend", "precision", "batch", "metric", "baseline", "current", "delta",
                      "rel_delta", "verdict", "reason")


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float):
        return _fmt(value)
    return str(value)


def markdown_table(frame, columns: Sequence[str]) -> str:
    """A GitHub-flavoured markdown table of ``frame``'s ``columns`` (pipes escaped)."""
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    rows = [line(columns), line(["---"] * len(columns))]
    rows += [line([_cell(v) for v in rec]) for rec in frame[list(columns)].itertuples(index=False)]
    return "\n".join(rows)


def scope_history(results, last_runs: int | None = None, since=None):
    """The rows of ``results`` from runs at or after ``since`` (a UTC timestamp), of which the
    last ``last_runs``. Raises :class:`RtmbenchError` when no run is left."""
    from .errors import RtmbenchError
    from .results import runs

    if last_runs is not None and last_runs < 1:
        raise RtmbenchError(f"the number of runs to report must be at least 1, not {last_runs}")
    order = runs(results)
    if since is not None:
        order = order[order["time"] >= since]
    if last_runs is not None:
        order = order.tail(last_runs)
    if order.empty:
        scope = [f"since {since}"] * (since is not None) + [f"the last {last_runs} runs"] * (last_runs is not None)
        raise RtmbenchError(f"no run in the history matches the scope ({', '.join(scope) or 'all runs'})")
    return results[results["run_id"].isin(order["run_id"])]


def _run_numbers(results) -> dict[str, int]:
    """{run id: its number in the history, 1 = oldest}."""
    from .results import runs

    return {run_id: i for i, run_id in enumerate(runs(results)["run_id"], start=1)}


def _age(delta) -> str:
    """A duration as the one unit a person reads (``40 min``, ``5 h``, ``3 d``)."""
    hours = delta.total_seconds() / 3600
    if hours < 1:
        return f"{max(0, round(hours * 60))} min"
    return f"{hours:.0f} h" if hours < 48 else f"{hours / 24:.0f} d"


def _now(now):
    import pandas as pd

    return pd.Timestamp.now(tz="UTC") if now is None else now


def latest_verdicts(results, now):
    """The latest row of every case (:data:`CASE`) in ``results``, with the number of the run it
    comes from (``run``, ``#3``) and its age at ``now``; FAILed cases first."""
    numbers = _run_numbers(results)
    latest = results.sort_values(["time", "run_id"], kind="stable").drop_duplicates(CASE, keep="last")
    latest = latest.assign(run=latest["run_id"].map(lambda r: f"#{numbers[r]}"),
                           age=latest["time"].map(lambda t: _age(now - t)),
                           passed=latest["verdict"] != "FAIL")
    return latest.sort_values(["passed", *CASE], kind="stable", ignore_index=True)


def run_table(results):
    """One row per run: its number, id, time, commit, host and what it measured."""
    from .results import runs, short_commit

    table = runs(results)
    metrics = results.groupby("run_id")["metric"].agg(lambda m: ", ".join(sorted(m.unique(), reverse=True)))
    engines = results.drop_duplicates(["run_id", *ENGINE]).groupby("run_id").size()
    measured = metrics + engines.map(lambda n: f" on {n} engine" + ("s" if n > 1 else ""))
    return table.assign(run=[f"#{i}" for i in range(1, len(table) + 1)],
                        time=table["time"].dt.strftime("%Y-%m-%d %H:%M"),
                        commit=table["commit"].map(short_commit),
                        measured=table["run_id"].map(measured))


# ------------------------------------------------------------------ what changed


def provenance(rows) -> dict[str, str | None]:
    """What a run's ``rows`` were made with: harness commit, device, the ``versions`` column
    (driver, CUDA, SDK, packages; None = not installed), each backend's own version (overrides
    its package's) and each model's weights sha256 (first 12 hex digits)."""
    import json

    from .results import short_commit

    # rows of several runs (a baseline composed by ``last``): the latest run's commit and versions
    fields = {"harness commit": short_commit(rows["commit"].iloc[-1]),
              "device": ", ".join(sorted(rows["device"].dropna().unique()))}
    for versions in rows["versions"].dropna().unique():
        fields.update(json.loads(versions))
    fields.update({b: v for b, v in zip(rows["backend"], rows["backend_version"]) if v is not None})
    fields.update({f"weights {m}": w[:12] for m, w in zip(rows["model"], rows["weights_sha256"]) if w is not None})
    return fields


def changed_fields(before: dict, after: dict) -> list[tuple[str, str | None, str | None]]:
    """(field, before, after) for every field both sides know and whose value differs."""
    return [(k, before[k], after[k]) for k in after if k in before and before[k] != after[k]]


@dataclasses.dataclass(frozen=True)
class WhatChanged:
    """Between a baseline run and the current run: the provenance fields that differ
    (:data:`PROVENANCE_COLUMNS`), the metric comparison (:func:`rtmbench.results.compare`),
    regressions first, and notes on it (one line each)."""

    baseline_run: str
    current_run: str
    provenance: pd.DataFrame
    comparison: pd.DataFrame
    notes: tuple[str, ...] = ()


def what_changed(baseline, current, comparison, notes: Sequence[str] = ()) -> WhatChanged:
    """:class:`WhatChanged` from the ``baseline`` and ``current`` runs' rows, their comparison and notes on it."""
    import pandas as pd

    from .results import ACROSS_MACHINES

    changes = changed_fields(provenance(baseline), provenance(current))
    # Comparison verdicts in reading order: what needs a look first.
    order = ("REGRESSED", ACROSS_MACHINES, "suspicious gain", "missing", "new", "ok")
    rank = {verdict: i for i, verdict in enumerate(order)}
    return WhatChanged(describe_runs(baseline), describe_runs(current),
                       pd.DataFrame(changes, columns=list(PROVENANCE_COLUMNS)),
                       comparison.sort_values("verdict", key=lambda v: v.map(rank), kind="stable",
                                              ignore_index=True), tuple(notes))


def describe_runs(rows) -> str:
    """The runs ``rows`` come from, oldest first: ``ID (date UTC)``, comma-separated."""
    from .results import runs

    return ", ".join(f"{r.run_id} ({r.time:%Y-%m-%d %H:%M} UTC)" for r in runs(rows).itertuples())


# ------------------------------------------------------------------ markdown


def _latest_run(results):
    from .results import runs

    return runs(results).iloc[-1]


def markdown_summary(results, changes: WhatChanged | None = None, now=None) -> str:
    """Markdown for CI logs: the latest run's header, the latest verdict of every case in
    ``results`` (ages at ``now``, default: the current time), then what changed if given."""
    from .results import short_commit

    run = _latest_run(results)
    commit = short_commit(run["commit"])
    parts = [f"### rtmbench run {run['run_id']} (latest of {results['run_id'].nunique()})",
             f"{run['time']:%Y-%m-%d %H:%M UTC} · commit {commit} · {run['hostname']} · {run['device']}", "",
             "#### latest verdict of every case (failures first)", "",
             markdown_table(latest_verdicts(results, _now(now)), LATEST_COLUMNS)]
    if changes is not None:
        parts += ["", markdown_what_changed(changes)]
    return "\n".join(parts) + "\n"


def markdown_what_changed(changes: WhatChanged) -> str:
    """The differing provenance fields, then the metric comparison, as markdown."""
    head = f"#### what changed: {changes.baseline_run} → {changes.current_run}\n\n"
    head += "".join(f"{note}\n\n" for note in changes.notes)
    fields = (markdown_table(changes.provenance, PROVENANCE_COLUMNS) if len(changes.provenance)
              else "no provenance field differs")
    return head + fields + "\n\n" + markdown_comparison(changes.comparison)


def markdown_comparison(comparison) -> str:
    """The :func:`rtmbench.results.compare` table as markdown, regressions counted first."""
    counts = comparison["verdict"].value_counts()
    head = ", ".join(f"{n} {v}" for v, n in counts.items())
    table = markdown_table(_formatted(comparison), COMPARISON_COLUMNS)
    return f"#### comparison with the baseline ({head})\n\n" + table


def _formatted(comparison):
    """Signed deltas and percentages as text."""
    return comparison.assign(
        delta=comparison["delta"].map(lambda x: "-" if x != x else _fmt(x, signed=True)),
        rel_delta=comparison["rel_delta"].map(lambda x: "-" if x != x else f"{x:+.1%}"))


# ------------------------------------------------------------------ history plots

PLOT_WIDTH_INCHES = 10  # every plot: the same width on the page


def _figure(**kwargs):
    """A matplotlib Figure on the Agg canvas (no pyplot: no global backend or figure state),
    laid out to fit its labels inside its fixed size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> str:
    import base64
    import io

    from matplotlib.text import Text

    for text in fig.findobj(Text):  # names are shown as written: `$x$` in a device name is no formula
        text.set_parse_math(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode()


def _slug(*parts) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", "-".join(map(str, parts)).lower()).strip("-")


def _short_version(value) -> str:
    """The leading release number of a version string, with its local tag (OpenVINO's
    ``2024.4.0-16579-c3152d32c9c-releases/2024/4`` → ``2024.4.0``, torch's ``2.11.0+cu130`` as
    it is); anything else (a weights sha256 prefix) as it is; at most 12 characters."""
    import re

    if value is None:
        return "not installed"
    match = re.match(r"\d+(\.\d+)*([a-z]+\d*)?(\+[\w.]+)?(?!\w)", str(value))  # 1.20.0rc1, 2.6.0a0+…
    return _clip(match.group(0) if match else value, 12)


def _clip(text, width: int) -> str:
    """``text`` cut to ``width`` characters, an ellipsis marking the cut."""
    text = str(text)
    return text if len(text) <= width else text[:width - 1] + "…"


def _marker_label(changes) -> str:
    """``onnxruntime → 1.21.0`` for one change; two named, the rest counted."""
    named = [f"{field} → {_short_version(after)}" for field, _, after in changes]
    return ", ".join(named[:2]) + (f" +{len(named) - 2}" if len(named) > 2 else "")


def _engine_provenance(rows, other_backends) -> dict:
    """The provenance fields that can move this engine's numbers: not the harness commit, the
    device (one per engine) or the versions of the other backends."""
    fields = provenance(rows)
    return {k: v for k, v in fields.items() if k not in {"harness commit", "device", *other_backends}}


def _mark_version_changes(ax, engine_rows, order, other_backends, labelled: set) -> None:
    """A dashed line between consecutive runs of ``order`` whose provenance differs, labelled the
    first time the figure shows that change (``labelled`` holds the labels drawn)."""
    stamps = [_engine_provenance(engine_rows[engine_rows["run_id"] == r], other_backends) for r in order["run_id"]]
    for x, (before, after) in enumerate(zip(stamps, stamps[1:]), start=1):
        if not (changes := changed_fields(before, after)):
            continue
        ax.axvline(x - 0.5, color="0.35", linestyle="--", linewidth=1)
        if (label := _marker_label(changes)) not in labelled:
            labelled.add(label)
            ax.text(x - 0.5, 0.96, f" {label}", transform=ax.get_xaxis_transform(), va="top", fontsize=8,
                    color="0.2", bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})


def _run_ticks(ax, order, numbers) -> None:
    """Ticks at the runs of ``order`` (a :func:`rtmbench.results.runs` table): number and date,
    thinned to one per 0.65 inch of axis."""
    shown = max(2, int(ax.get_position().width * ax.figure.get_figwidth() / 0.65))
    step = max(1, -(-len(order) // shown))
    labels = [f"#{numbers[r.run_id]}\n{r.time:%m-%d %H:%M}" for r in order.itertuples()]
    ax.set_xticks(range(0, len(order), step), labels[::step], fontsize=8)
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.grid(alpha=0.3)


def _plot_throughput(ax, rows, x_of) -> None:
    """Median images/s per batch size, with the p10–p90 spread of the per-round images/s."""
    import numpy as np

    from .results import round_times

    for batch, s in rows.groupby("batch"):
        xs = s["run_id"].map(x_of).tolist()
        color = ax.plot(xs, s["value"], marker="o", label=f"batch {batch}")[0].get_color()
        spread = [(x, *np.percentile(batch / t, [10, 90])) for x, t in zip(xs, s["round_times"].map(round_times))
                  if t is not None]
        if spread:
            bx, low, high = zip(*spread)
            ax.fill_between(bx, low, high, color=color, alpha=0.2, linewidth=0)
            ax.vlines(bx, low, high, color=color, alpha=0.6)
    ax.set_ylabel("images/s\n(median, p10–p90)")
    ax.legend(fontsize=8, loc="best")


def _plot_accuracy(ax, rows, x_of, metric: str) -> None:
    """One accuracy metric on its own axis, scaled to its values and floors (padded by at least
    0.005): FAILed runs in red, each run's floor a dotted red dash."""
    import numpy as np

    xs, values, floors = rows["run_id"].map(x_of), rows["value"], rows["target"]
    ax.plot(xs, values, color="tab:green", zorder=1)
    ax.scatter(xs, values, c=["tab:red" if v == "FAIL" else "tab:green" for v in rows["verdict"]], zorder=2)
    if floors.notna().any():
        ax.hlines(floors, xs - 0.4, xs + 0.4, colors="tab:red", linestyles=":", label="floor")
        ax.legend(fontsize=7, loc="lower left")
    shown = np.r_[values.dropna(), floors.dropna()]  # NaN: a metric with no ground truth to measure
    if len(shown):
        pad = max(0.005, 0.15 * (shown.max() - shown.min()))
        ax.set_ylim(shown.min() - pad, shown.max() + pad)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_title(metric, fontsize=10)


def _panel_layout(has_throughput: bool, accuracy: list[str]) -> list[list[str]]:
    """images/s across the top, the accuracy metrics side by side below it (a subplot mosaic)."""
    from .results import THROUGHPUT_METRIC

    rows = [[THROUGHPUT_METRIC] * max(1, len(accuracy))] if has_throughput else []
    return rows + ([accuracy] if accuracy else [])


def _engine_figure(engine_rows, numbers, other_backends, title: str):
    """One panel per engine: images/s, and each accuracy metric on its own axis, each over the
    runs that measured it, with the version changes between those runs marked."""
    from .results import THROUGHPUT_METRIC, is_accuracy, runs

    accuracy = sorted((m for m in engine_rows["metric"].unique() if is_accuracy(m)), reverse=True)
    layout = _panel_layout((engine_rows["metric"] == THROUGHPUT_METRIC).any(), accuracy)
    fig = _figure(figsize=(PLOT_WIDTH_INCHES, 0.4 + 2.3 * len(layout)))
    axes = fig.subplot_mosaic(layout)
    labelled = set()
    for metric, ax in axes.items():
        rows = engine_rows[engine_rows["metric"] == metric]
        order = runs(rows)
        x_of = {run_id: x for x, run_id in enumerate(order["run_id"])}
        if metric == THROUGHPUT_METRIC:
            _plot_throughput(ax, rows, x_of)
        else:
            _plot_accuracy(ax, rows.drop_duplicates("run_id", keep="last"), x_of, metric)
        _mark_version_changes(ax, engine_rows, order, other_backends, labelled)
        _run_ticks(ax, order, numbers)
    fig.suptitle(title, fontsize=11)
    return fig


def _latency_figure(latest, batch: int):
    """Box plot of per-round latency (ms per batch) at ``batch``, one box per device/backend/precision."""
    from .results import round_times

    data, labels = [], []
    for row in latest.itertuples(index=False):
        if (t := round_times(row.round_times)) is not None:
            data.append(t * 1e3)
            labels.append(f"{row.backend} {row.precision}\n{row.model}\n{_clip(row.device, 28)}")
    if not data:
        return None
    fig = _figure(figsize=(PLOT_WIDTH_INCHES, 3.5))
    ax = fig.subplots()
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(data) + 1), labels, fontsize=7)
    ax.set_ylabel(f"latency per batch of {batch} (ms)")
    ax.set_title(f"latency distribution, batch {batch} (latest run per case)")
    ax.grid(alpha=0.3, axis="y")
    return fig


def _batch_figure(latest):
    """Latest images/s against batch size, a line per (model, device, backend, precision)."""
    fig = _figure(figsize=(PLOT_WIDTH_INCHES, 3.5))
    ax = fig.subplots()
    for (model, device, backend, precision), s in latest.groupby(["model", "device", "backend", "precision"],
                                                                 dropna=False):
        s = s.sort_values("batch")
        ax.plot(s["batch"], s["value"], marker="o", label=f"{model} · {backend} {precision} · {_clip(device, 28)}")
    ax.set_xscale("log", base=2)
    batches = sorted(latest["batch"].unique())
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s")
    ax.set_title("throughput against batch size (latest run per case)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def report_plots(results, latency_batch: int = 32) -> list[tuple[str, str, str]]:
    """(id, alt text, base64 PNG) of every plot the HTML report shows (rendered with Agg): one
    history panel per engine (:data:`ENGINE`), the latency boxes, images/s against batch size."""
    from .results import KEY, THROUGHPUT_METRIC, is_accuracy

    numbers = _run_numbers(results)
    backends = set(results["backend"])
    plots = []
    plotted = results[(results["metric"] == THROUGHPUT_METRIC) | results["metric"].map(is_accuracy)]
    for (model, backend, precision, device), engine_rows in plotted.groupby(ENGINE, dropna=False):
        title = f"{model} · {backend} {precision} · {device}"
        plot_id = f"history-{_slug(model, device, backend, precision)}"
        plot_id += f"-{len(plots)}" if any(p[0] == plot_id for p in plots) else ""
        fig = _engine_figure(engine_rows, numbers, backends - {backend}, title)
        plots.append((plot_id, f"history of images/s and accuracy per run: {title}", _png(fig)))
    perf = results[results["metric"] == THROUGHPUT_METRIC]
    latest = perf.sort_values(["time", "run_id"]).drop_duplicates(KEY + ["device"], keep="last")
    if (fig := _latency_figure(latest[latest["batch"] == latency_batch], latency_batch)) is not None:
        plots.append((f"latency-bs{latency_batch}", f"latency distribution at batch {latency_batch}", _png(fig)))
    if latest["batch"].nunique() > 1:
        plots.append(("throughput-vs-batch", "images/s against batch size", _png(_batch_figure(latest))))
    return plots


# ------------------------------------------------------------------ HTML report

_CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1200px}table{border-collapse:collapse;font-size:13px}
table{margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}th{background:#f0f0f0}
tr.regressed td,tr.fail td{background:#fdd}tr.worse-other-machine td{background:#fec}
tr.suspicious-gain td{background:#ffd}
img{width:900px;max-width:100%;display:block;margin:1em 0}"""


def _html_table(frame, columns: Sequence[str], table_id: str) -> str:
    """A table of ``frame``'s ``columns``; with a verdict column, each row's class is its verdict
    as a slug (``REGRESSED`` → ``regressed``, ``worse (other machine)`` → ``worse-other-machine``)."""
    from html import escape

    def row_class(rec) -> str:
        verdict = getattr(rec, "verdict", None)
        return "" if verdict is None else f' class="{_slug(verdict)}"'

    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join(
        f"<tr{row_class(rec)}>" + "".join(f"<td>{escape(_cell(getattr(rec, c)))}</td>" for c in columns) + "</tr>"
        for rec in frame[list(columns)].itertuples(index=False))
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _html_what_changed(changes: WhatChanged) -> list[str]:
    from html import escape

    fields = (_html_table(changes.provenance, PROVENANCE_COLUMNS, "provenance") if len(changes.provenance)
              else "<p>No provenance field differs.</p>")
    return ["<h2>What changed</h2>",
            f"<p>baseline <code>{escape(changes.baseline_run)}</code> → current "
            f"<code>{escape(changes.current_run)}</code></p>", *(f"<p>{escape(note)}</p>" for note in changes.notes),
            "<h3>Provenance fields that differ</h3>", fields,
            "<h3>Metrics against the baseline</h3>",
            _html_table(_formatted(changes.comparison), COMPARISON_COLUMNS, "comparison")]


def write_html(results, out, changes: WhatChanged | None = None, title: str = "rtmbench report",
               latency_batch: int = 32, now=None):
    """A self-contained HTML report of ``results`` (:func:`rtmbench.results.load_results`): the
    latest verdict of every case (table id ``summary``, ages at ``now``), what changed if given
    (ids ``provenance`` when a field differs, ``comparison``), the runs (id ``runs``) and PNG plots
    embedded as base64 ``<img class="plot">`` with ids (see :func:`report_plots`). Returns ``out``."""
    from html import escape
    from pathlib import Path

    from .fsutil import write_bytes_atomic
    from .results import short_commit

    run = _latest_run(results)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{escape(title)}</h1>",
             f"<p>latest run <code>{escape(run['run_id'])}</code>, {run['time']:%Y-%m-%d %H:%M UTC}, commit "
             f"<code>{escape(short_commit(run['commit']))}</code>, {escape(str(run['hostname']))}, "
             f"{escape(str(run['device']))}; {results['run_id'].nunique()} runs in the history</p>",
             "<h2>Summary: the latest verdict of every case, failures first</h2>",
             _html_table(latest_verdicts(results, _now(now)), LATEST_COLUMNS, "summary")]
    if changes is not None:
        parts += _html_what_changed(changes)
    parts += ["<h2>History</h2>", _html_table(run_table(results), RUN_COLUMNS, "runs")]
    for plot_id, alt, data in report_plots(results, latency_batch):
        parts.append(f'<img class="plot" id="{plot_id}" alt="{escape(alt)}" src="data:image/png;base64,{data}">')
    parts.append("</body></html>\n")
    out = Path(out)
    write_bytes_atomic(out, "\n".join(parts).encode())
    return out
