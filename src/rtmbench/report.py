"""Human-readable summaries of gate verdicts."""

from __future__ import annotations

from collections.abc import Sequence

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

RESULT_COLUMNS = ("model", "backend", "precision", "batch", "metric", "value", "target", "verdict")
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


def _latest_run(results):
    from .results import runs

    run = runs(results).iloc[-1]
    return run, results[results["run_id"] == run["run_id"]]


def markdown_summary(results, comparison=None) -> str:
    """Markdown for CI logs: the latest run's header and rows, then the comparison if given."""
    run, rows = _latest_run(results)
    commit = (run["commit"] or "unknown")[:12]
    parts = [f"### rtmbench run {run['run_id']}",
             f"{run['time']:%Y-%m-%d %H:%M UTC} · commit {commit} · {run['hostname']} · {run['device']}", "",
             markdown_table(rows, RESULT_COLUMNS)]
    if comparison is not None:
        parts += ["", markdown_comparison(comparison)]
    return "\n".join(parts) + "\n"


def markdown_comparison(comparison) -> str:
    """The :func:`rtmbench.results.compare` table as markdown, regressions counted first."""
    counts = comparison["verdict"].value_counts()
    head = ", ".join(f"{n} {v}" for v, n in counts.items())
    return f"### comparison with the baseline ({head})\n\n" + markdown_table(_formatted(comparison), COMPARISON_COLUMNS)


def _formatted(comparison):
    """Signed deltas and percentages as text."""
    return comparison.assign(
        delta=comparison["delta"].map(lambda x: "-" if x != x else _fmt(x, signed=True)),
        rel_delta=comparison["rel_delta"].map(lambda x: "-" if x != x else f"{x:+.1%}"))


# ------------------------------------------------------------------ HTML report


def _figure(**kwargs):
    """A matplotlib Figure on the Agg canvas (no pyplot: no global backend or figure state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> str:
    import base64
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _slug(*parts) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", "-".join(map(str, parts)).lower()).strip("-")


def _run_label(rows) -> str:
    import json

    first = rows.iloc[0]
    versions = json.loads(first["versions"] or "{}")
    sdk = f"{first['backend']} {first['backend_version'] or '?'}"
    driver = next((f"{k} {versions[k]}" for k in ("driver", "cuda", "sdk") if versions.get(k)), "")
    return f"{first['time']:%m-%d %H:%M}\n{sdk}" + (f"\n{driver}" if driver else "")


def _history_figure(group, title: str):
    """images/s (a line per batch, IQR band from per-round times) and mAP metrics against run."""
    import numpy as np

    from .results import THROUGHPUT_METRIC, is_accuracy, round_times

    order = group.drop_duplicates("run_id")[["run_id", "time"]].sort_values(["time", "run_id"])["run_id"].tolist()
    x_of = {run_id: i for i, run_id in enumerate(order)}
    panels = [(m, lab) for m, lab in ((THROUGHPUT_METRIC, "images/s"), ("accuracy", "mAP"))
              if (group["metric"] == m).any() or (m == "accuracy" and group["metric"].map(is_accuracy).any())]
    fig = _figure(figsize=(8, 2.8 * len(panels)))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)
    for ax, (kind, ylabel) in zip(axes[:, 0], panels):
        wanted = group["metric"] == kind if kind == THROUGHPUT_METRIC else group["metric"].map(is_accuracy)
        sel = group[wanted]
        series = "batch" if kind == THROUGHPUT_METRIC else "metric"
        for name, s in sel.groupby(series):
            s = s.sort_values("time")
            xs = [x_of[r] for r in s["run_id"]]
            ax.plot(xs, s["value"], marker="o", label=f"bs{name}" if series == "batch" else name)
            if kind == THROUGHPUT_METRIC:
                band = [(x, np.percentile(b / t, [25, 75])) for x, b, t in
                        zip(xs, s["batch"], map(round_times, s["round_times"])) if t is not None]
                if band:
                    ax.fill_between([x for x, _ in band], [q[0] for _, q in band], [q[1] for _, q in band], alpha=0.2)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0, 0].set_title(title)
    labels = [_run_label(group[group["run_id"] == r]) for r in order]
    step = max(1, len(order) // 12)
    axes[-1, 0].set_xticks(range(0, len(order), step), labels[::step], fontsize=7, rotation=30, ha="right")
    return fig


def _latency_figure(latest, batch: int):
    """Box plot of per-round latency (ms per batch) at ``batch``, one box per device/backend/precision."""
    from .results import round_times

    data, labels = [], []
    for row in latest.itertuples(index=False):
        if (t := round_times(row.round_times)) is not None:
            data.append(t * 1e3)
            labels.append(f"{row.model} · {row.backend} {row.precision}\n{str(row.device)[:28]}")
    if not data:
        return None
    fig = _figure(figsize=(max(5, 1.6 * len(data)), 3.5))
    ax = fig.subplots()
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(data) + 1), labels, fontsize=7)
    ax.set_ylabel(f"latency per batch of {batch} (ms)")
    ax.set_title(f"latency distribution, batch {batch} (latest run per case)")
    ax.grid(alpha=0.3, axis="y")
    return fig


def _batch_figure(latest):
    """Latest images/s against batch size, a line per (model, device, backend, precision)."""
    fig = _figure(figsize=(7, 3.5))
    ax = fig.subplots()
    for (model, device, backend, precision), s in latest.groupby(["model", "device", "backend", "precision"],
                                                                 dropna=False):
        s = s.sort_values("batch")
        ax.plot(s["batch"], s["value"], marker="o", label=f"{model} · {backend} {precision} · {str(device)[:24]}")
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
    """(id, alt text, base64 PNG) of every plot the HTML report shows (rendered with Agg)."""
    from .results import KEY, THROUGHPUT_METRIC

    plots = []
    for (device, backend, precision), group in results.groupby(["device", "backend", "precision"], dropna=False):
        for model, g in group.groupby("model", sort=True):
            title = f"{model} · {backend} {precision} · {device}"
            plot_id = f"history-{_slug(model, device, backend, precision)}"
            plot_id += f"-{len(plots)}" if any(p[0] == plot_id for p in plots) else ""
            plots.append((plot_id,
                          f"history of images/s and mAP per run: {title}", _png(_history_figure(g, title))))
    perf = results[results["metric"] == THROUGHPUT_METRIC]
    latest = perf.sort_values(["time", "run_id"]).drop_duplicates(KEY + ["device"], keep="last")
    if (fig := _latency_figure(latest[latest["batch"] == latency_batch], latency_batch)) is not None:
        plots.append((f"latency-bs{latency_batch}", f"latency distribution at batch {latency_batch}", _png(fig)))
    if latest["batch"].nunique() > 1:
        plots.append(("throughput-vs-batch", "images/s against batch size", _png(_batch_figure(latest))))
    return plots


_CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1200px}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}th{background:#f0f0f0}
tr.REGRESSED td,tr.FAIL td{background:#fdd}tr.suspicious-gain td{background:#ffd}
img{max-width:100%;display:block;margin:1em 0}"""


def _html_table(frame, columns: Sequence[str], table_id: str) -> str:
    from html import escape

    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join(
        f'<tr class="{escape(str(rec.verdict).replace(" ", "-"))}">'
        + "".join(f"<td>{escape(_cell(getattr(rec, c)))}</td>" for c in columns) + "</tr>"
        for rec in frame[list(columns)].itertuples(index=False))
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def write_html(results, out, comparison=None, title: str = "rtmbench report", latency_batch: int = 32):
    """A self-contained HTML report of ``results`` (:func:`rtmbench.results.load_results`): the
    latest run's table (id ``summary``), the comparison (id ``comparison``) if given, and PNG plots
    embedded as base64 ``<img class="plot">`` with ids (see :func:`report_plots`). Returns ``out``."""
    from html import escape
    from pathlib import Path

    from .fsutil import write_bytes_atomic

    run, rows = _latest_run(results)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{escape(title)}</h1>",
             f"<p>latest run <code>{escape(run['run_id'])}</code>, {run['time']:%Y-%m-%d %H:%M UTC}, commit "
             f"<code>{escape((run['commit'] or 'unknown')[:12])}</code>, {escape(str(run['hostname']))}, "
             f"{escape(str(run['device']))}; {results['run_id'].nunique()} runs in the history</p>",
             "<h2>Summary</h2>", _html_table(rows, RESULT_COLUMNS, "summary")]
    if comparison is not None:
        parts += ["<h2>Comparison with the baseline</h2>",
                  _html_table(_formatted(comparison), COMPARISON_COLUMNS, "comparison")]
    parts.append("<h2>Plots</h2>")
    for plot_id, alt, data in report_plots(results, latency_batch):
        parts.append(f'<img class="plot" id="{plot_id}" alt="{escape(alt)}" src="data:image/png;base64,{data}">')
    parts.append("</body></html>\n")
    out = Path(out)
    write_bytes_atomic(out, "\n".join(parts).encode())
    return out
