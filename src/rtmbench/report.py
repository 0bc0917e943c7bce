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
    what was not run and why."""
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
        lines.append("not run:")
        lines += [f"  {what}: {why}" for what, why in not_run]
    return lines
