"""The HTML report, rendered from synthetic results and loaded in real headless Chromium: the
tables are there and every plot image decodes (naturalWidth > 0)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from rtmbench.report import markdown_summary, what_changed, write_html
from rtmbench.results import ACROSS_MACHINES, RunInfo, compare, load_results, write_run

T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
BATCHES = (1, 8, 32)

# Runs after load: writes each image's natural size into data attributes and marks the body done.
PROBE = """<script>
window.addEventListener("load", () => {
  for (const img of document.querySelectorAll("img")) {
    img.dataset.naturalWidth = img.naturalWidth;
    img.dataset.complete = img.complete;
  }
  document.body.dataset.probed = "yes";
});
</script>"""


def synthetic_history(root, runs: int = 4):
    """``runs`` runs on two backends × batch sizes, with per-round times and accuracy rows."""
    rng = np.random.default_rng(0)
    for i in range(runs):
        info = RunInfo.new(device="Test CPU", versions={"onnxruntime": f"1.{18 + i}.0", "openvino": "2024.4",
                                                        "driver": "550.1"}, now=T0 + dt.timedelta(days=i))
        rows = []
        for backend, speed in (("onnxruntime", 1.0), ("openvino", 0.8)):
            for batch in BATCHES:
                times = (0.004 * batch ** 0.9 * speed * rng.lognormal(0, 0.03, 20)).tolist()
                rows.append({"model": "m", "backend": backend, "precision": "fp32", "batch": batch,
                             "metric": "images/s", "measured": batch / float(np.median(times)), "target": None,
                             "verdict": "no target", "detail": "", "round_times": times})
            for metric, value in (("mAP", 0.40), ("mAP50", 0.62)):
                rows.append({"model": "m", "backend": backend, "precision": "fp32", "batch": 32, "metric": metric,
                             "measured": value - 0.002 * i, "target": value - 0.005, "verdict": "pass",
                             "detail": "floor"})
        write_run(root, info, rows)
    return load_results(root)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    results = synthetic_history(root)
    run_ids = results.drop_duplicates("run_id")["run_id"].tolist()
    current, baseline = (results[results["run_id"] == r] for r in (run_ids[-1], run_ids[-2]))
    changes = what_changed(baseline, current, compare(current, baseline))
    out = write_html(results, root / "report.html", changes)
    return out, results, changes


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tables, self.body, self.row_classes, self.style = [], [], {}, {}, ""
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs)
        elif tag == "table":
            self.tables.append(attrs.get("id"))
        elif tag == "body":
            self.body = attrs
        elif tag == "tr" and self.tables:
            self.row_classes.setdefault(self.tables[-1], []).append(attrs.get("class"))
        self._in_style = tag == "style"

    def handle_data(self, data):
        if self._in_style:
            self.style += data


def test_report_html_structure(report):
    out, results, _ = report
    page = _Collect()
    page.feed(out.read_text())
    ids = [img["id"] for img in page.imgs]
    assert page.tables == ["summary", "provenance", "comparison", "runs"]
    # one history plot per (model, device, backend, precision), the latency boxes, images/s vs batch
    assert sorted(ids) == ["history-m-test-cpu-onnxruntime-fp32", "history-m-test-cpu-openvino-fp32",
                           "latency-bs32", "throughput-vs-batch"]
    assert all(img["alt"] and img["src"].startswith("data:image/png;base64,") for img in page.imgs)
    assert "rtmbench run" in markdown_summary(results)


def test_rows_that_got_worse_are_highlighted(report, tmp_path):
    out, results, changes = report
    highlighted = ("REGRESSED", ACROSS_MACHINES, "suspicious gain")
    verdicts = [*highlighted, "ok"] * len(changes.comparison)
    changes = dataclasses.replace(changes, comparison=changes.comparison.assign(
        verdict=verdicts[:len(changes.comparison)]))
    page = _Collect()
    page.feed(write_html(results, tmp_path / "report.html", changes).read_text())
    classes = page.row_classes["comparison"][1:]  # after the header row
    assert classes[:4] == ["regressed", "worse-other-machine", "suspicious-gain", "ok"]
    style = page.style.replace("\n", "")
    assert all(re.search(rf"tr\.{c} td[,{{]", style) for c in classes[:3]), style
    assert "tr.ok td" not in style


def test_an_engine_with_only_other_metrics_gets_no_history_panel(tmp_path):
    """The fidelity gate stores 'detections matched' rows: shown in the tables, not plotted."""
    info = RunInfo.new(device="Test CPU", versions={}, now=T0)
    write_run(tmp_path, info, [{"model": "m", "backend": "openvino", "precision": "bf16", "batch": 32,
                                "metric": "detections matched", "measured": 1.0, "target": 0.9,
                                "verdict": "pass", "detail": "head maps"}])
    results = load_results(tmp_path)
    page = _Collect()
    page.feed(write_html(results, tmp_path / "report.html").read_text())
    assert page.imgs == [] and "summary" in page.tables


def test_nan_metrics_and_formula_like_names_render(tmp_path):
    """mAP is NaN where the evaluated images hold no ground truth; a device name is shown as
    written, `$` and all (matplotlib would parse it as a formula and fail)."""
    rows = [{"model": "m", "backend": "onnxruntime", "precision": "fp32", "batch": 32, "metric": "mAP",
             "measured": value, "target": 0.3, "verdict": "pass", "detail": "floor"} for value in (0.4, float("nan"))]
    for day, row in enumerate(rows):
        write_run(tmp_path, RunInfo.new(device=r"GPU $\foo$ 1", versions={}, now=T0 + dt.timedelta(days=day)), [row])
    results = load_results(tmp_path)
    page = _Collect()
    page.feed(write_html(results, tmp_path / "report.html").read_text())
    assert [img["id"] for img in page.imgs] == ["history-m-gpu-foo-1-onnxruntime-fp32"]
    run_ids = results["run_id"].unique()
    comparison = compare(results[results["run_id"] == run_ids[1]], results[results["run_id"] == run_ids[0]])
    assert comparison["verdict"].tolist() == ["ok"] and "not compared" in comparison["reason"].iloc[0]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    out, _, _ = report
    probe = tmp_path / "probe.html"
    probe.write_text(out.read_text().replace("</body>", PROBE + "</body>"))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
             "--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000"]
    result = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    page = _Collect()
    page.feed(result.stdout)
    assert page.body.get("data-probed") == "yes", "the probe script did not run"
    assert page.tables == ["summary", "provenance", "comparison", "runs"]
    assert len(page.imgs) == 4
    for img in page.imgs:
        assert int(img["data-natural-width"]) > 0, f"plot {img['id']} did not decode"
    assert re.search(r"<td>REGRESSED</td>|<td>ok</td>", result.stdout)
