"""Options and session fixtures for the gates (benchmarks/) and the harness's own tests (tests/).

Thin by design: the session state is :class:`rtmbench.gate.GateSession`, made once in
``pytest_configure``; fixtures and hooks only call into it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent
FIXTURES = ROOT / "fixtures"
VERDICT_PROPERTY = "rtmbench_verdict"


def pytest_addoption(parser):
    from rtmbench.cli import positive_float, positive_int

    group = parser.getgroup("rtmbench", "rtmbench gates (pytest benchmarks -m accuracy|perf)")
    group.addoption("--model", action="append", dest="rtmbench_models", metavar="NAME",
                    help="model(s) to gate (default: rtmdet-nano-person with a dataset, else the "
                         "embedded default rtmdet-nano-synthetic)")
    group.addoption("--backend", action="append", dest="rtmbench_backends", metavar="NAME",
                    help="backend(s) (default: every registered backend; unavailable ones are skipped with the reason)")
    group.addoption("--precision", action="append", dest="rtmbench_precisions", metavar="P",
                    choices=("fp32", "fp16", "bf16"), help="precision(s) (default: those the thresholds name)")
    group.addoption("--batch-size", type=positive_int, default=32, dest="rtmbench_batch", metavar="N",
                    help="default: %(default)r")
    group.addoption("--weights", dest="rtmbench_weights", metavar="PATH|URL",
                    help="checkpoint path or URL (default: thresholds.yaml's)")
    group.addoption("--onnx", type=Path, dest="rtmbench_onnx", metavar="FILE",
                    help="use this ONNX model instead of exporting")
    group.addoption("--data-root", type=Path, dest="rtmbench_data_root", metavar="DIR",
                    help="COCO root (default: $DATASETS_DIR; neither: the embedded synthetic default)")
    group.addoption("--thresholds", type=Path, default=ROOT / "thresholds.yaml", dest="rtmbench_thresholds",
                    metavar="PATH",
                    help="default: thresholds.yaml beside this conftest")
    group.addoption("--cache-dir", type=Path, dest="rtmbench_cache_dir", metavar="DIR",
                    help="artifact cache (default: $RTMBENCH_CACHE_DIR or the user cache dir)")
    group.addoption("--rebuild", action="store_true", dest="rtmbench_rebuild", help="rebuild cached artifacts once")
    group.addoption("--max-images", type=positive_int, dest="rtmbench_max_images", metavar="N",
                    help="evaluate the first N images only")
    group.addoption("--device-name", dest="rtmbench_device", metavar="NAME",
                    help="device name to look targets up by (default: detected)")
    group.addoption("--results-dir", type=Path, default=ROOT / "results", dest="rtmbench_results_dir", metavar="DIR",
                    help="where each run's results are kept, one file per run (default: results/)")
    group.addoption("--compare-across-machines", action="store_true", dest="rtmbench_across_machines",
                    help="let a baseline from another machine (CPU, cores, memory, GPU, power limit, "
                         "clocks differ) call images/s regressions; by default those differences are only shown")
    group.addoption("--compare-to", dest="rtmbench_compare_to", metavar="last|RUN_ID|PATH",
                    help="compare with stored results (last: each metric's latest earlier valid measurement, "
                         "on this machine first); a regression fails the session (exit 1)")
    group.addoption("--perf-rounds", type=positive_int, dest="rtmbench_rounds", metavar="N",
                    help="timed rounds per perf case (default: enough for the validity minimums)")
    group.addoption("--perf-min-rounds", type=positive_int, dest="rtmbench_min_rounds", metavar="N",
                    help="fewer timed rounds make a perf case INVALID (default: thresholds.yaml perf_validity, 20)")
    group.addoption("--perf-min-seconds", type=positive_float, dest="rtmbench_min_seconds", metavar="S",
                    help="less timed time makes a perf case INVALID (default: thresholds.yaml perf_validity, 2 s)")


def pytest_configure(config):
    from rtmbench.errors import RtmbenchError
    from rtmbench.gate import GateOptions, GateSession, default_models, options_from_env
    from rtmbench.thresholds import load_thresholds

    data_root = options_from_env(config.getoption("rtmbench_data_root"))
    options = GateOptions(
        models=config.getoption("rtmbench_models") or default_models(data_root),
        backends=config.getoption("rtmbench_backends"), precisions=config.getoption("rtmbench_precisions"),
        batch_size=config.getoption("rtmbench_batch"), weights=config.getoption("rtmbench_weights"),
        onnx=config.getoption("rtmbench_onnx"), data_root=data_root,
        thresholds=config.getoption("rtmbench_thresholds"), cache_dir=config.getoption("rtmbench_cache_dir"),
        rebuild=config.getoption("rtmbench_rebuild"),
        # pytest's own --strict ("all strictness options") also makes a missing target a failure.
        strict=bool(config.getoption("strict") or config.getini("strict")),
        max_images=config.getoption("rtmbench_max_images"), device=config.getoption("rtmbench_device"),
        rounds=config.getoption("rtmbench_rounds"), min_rounds=config.getoption("rtmbench_min_rounds"),
        min_seconds=config.getoption("rtmbench_min_seconds"),
        compare_across_machines=config.getoption("rtmbench_across_machines"),
        run=getattr(config, "workerinput", {}).get("testrunuid"))
    try:
        config.rtmbench = GateSession(options, load_thresholds(options.thresholds))
        config.rtmbench.check_options(config.getoption("rtmbench_data_root"))
        config.rtmbench.check_results_options(config.getoption("rtmbench_results_dir"),
                                              config.getoption("rtmbench_compare_to"))
    except RtmbenchError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.pluginmanager.register(GateReporter(config), "rtmbench-gate-reporter")


def pytest_unconfigure(config):
    if hasattr(config, "rtmbench"):
        config.rtmbench.close()


def pytest_generate_tests(metafunc):
    for kind in ("accuracy", "perf"):
        name = f"{kind}_case"
        if name in metafunc.fixturenames:
            cases = metafunc.config.rtmbench.cases(kind)
            metafunc.parametrize(name, cases, ids=[c.id for c in cases])


@pytest.hookimpl(trylast=True)  # after -m / -k deselection
def pytest_collection_modifyitems(config, items):
    """The selected cases' weights (fetched now, if a URL) and, for accuracy, their dataset: one
    missing stops the run before anything is built (pytest-xdist workers leave it to each case,
    which fails with that line: a usage error raised in a worker crashes the controller)."""
    from rtmbench.errors import RtmbenchError

    if hasattr(config, "workerinput"):
        return
    params = [item.callspec.params for item in items if hasattr(item, "callspec")]
    evaluated = {p["accuracy_case"].model for p in params if "accuracy_case" in p}
    timed = {p["perf_case"].model for p in params if "perf_case" in p}
    try:
        for model in sorted(evaluated):
            config.rtmbench.check_dataset_given(model)
        for model in sorted(evaluated | timed) if not config.option.collectonly else ():  # --co fetches nothing
            config.rtmbench.weights(model)
    except RtmbenchError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """An RtmbenchError (bad input, failed build) is reported as its one line, not a traceback."""
    outcome = yield
    report = outcome.get_result()
    from rtmbench.errors import RtmbenchError

    if call.excinfo is not None and call.excinfo.errisinstance(RtmbenchError):
        report.longrepr = f"rtmbench: {call.excinfo.value}"


class GateReporter:
    """Collects verdicts (xdist workers send user_properties back with each report) and skips
    of the gates; at the end stores the run, compares it with a baseline and prints the summary."""

    def __init__(self, config):
        self.config = config
        self.rows: list[dict] = []
        self.not_run: list[tuple[str, str]] = []
        self.stored: tuple | None = None

    def pytest_runtest_logreport(self, report):
        if report.when == "call":
            self.rows.extend(v for k, v in report.user_properties if k == VERDICT_PROPERTY)
        if report.skipped and report.nodeid.startswith("benchmarks/"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.not_run.append((report.nodeid.split("::")[-1], reason.removeprefix("Skipped: ")))

    def pytest_sessionfinish(self, session):
        if not self.rows or hasattr(self.config, "workerinput"):  # xdist workers report to the controller
            return
        from rtmbench.errors import RtmbenchError
        from rtmbench.results import has_regression

        if session.exitstatus == pytest.ExitCode.INTERRUPTED:
            self.stored = (None, None, [f"interrupted: the {len(self.rows)} results measured so far are not "
                                        f"stored (a partial run would be a misleading baseline)"])
            return
        try:
            self.stored = self.config.rtmbench.record_run(
                self.rows, self.config.getoption("rtmbench_results_dir"),
                self.config.getoption("rtmbench_compare_to"))
        except RtmbenchError as exc:  # the summary still prints; the run fails
            self.stored = (None, None, [f"rtmbench: {exc}"])
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
            return
        comparison = self.stored[1]
        if comparison is not None and has_regression(comparison) and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        from rtmbench.report import markdown_comparison, summary_lines
        from rtmbench.results import has_regression

        lines = summary_lines(self.rows, sorted(set(self.not_run + self.config.rtmbench.impossible_requests())))
        if self.stored is not None:
            path, comparison, notes = self.stored
            if path is not None:
                lines.append(f"results: {path}")
            lines += notes
            if comparison is not None:
                lines += ["", f"compared with {self.config.getoption('rtmbench_compare_to')}:",
                          *markdown_comparison(comparison).splitlines()]
                if has_regression(comparison):  # pytest's own last line may say "passed"
                    lines.append("REGRESSED against the baseline: the session fails (exit 1)")
        if lines:
            terminalreporter.section("rtmbench gates")
            for line in lines:
                terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def gate(request):
    """The session's :class:`rtmbench.gate.GateSession`."""
    return request.config.rtmbench


def skip_unless_runnable(gate, case) -> None:
    """Skip a gated ``case`` with why it cannot run here (or would not measure ``--onnx``); under
    ``--strict`` a case of a backend named by ``--backend`` fails instead: a gate asked for that
    engine must not pass without it."""
    if (why := gate.unavailable_reason(case) or gate.not_the_onnx_given(case)) is None:
        return
    if gate.options.strict and case.backend in (gate.options.backends or ()):
        pytest.fail(f"--strict: {case.id} was asked for and cannot run: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="session")
def onnxruntime_fp32(gate):
    """The first model's ONNX Runtime FP32 case, which the harness's own checks (overheads,
    gate sensitivity, regression detection) measure with; skipped with the reason when ONNX
    Runtime is unavailable or ``--backend`` leaves it out."""
    from rtmbench.gate import Case

    if gate.options.backends and "onnxruntime" not in gate.options.backends:
        pytest.skip("measures with onnxruntime fp32, which --backend does not select")
    case = Case(gate.options.models[0], "onnxruntime", "fp32", gate.options.batch_size)
    if (why := gate.unavailable_reason(case)) is not None:
        pytest.skip(why)
    return case


@pytest.fixture(scope="session")
def first_perf_case(gate):
    """The first perf case that can run here (the harness's checks that need some engine's real
    outputs use its); skipped with the reasons when none can."""
    reasons = {}
    for case in gate.cases("perf"):
        if (why := gate.unavailable_reason(case)) is None:
            return case
        reasons[case.id] = why
    pytest.skip("no perf case can run here: " + "; ".join(f"{case}: {why}" for case, why in reasons.items()))


class Reference:
    """Test vectors made with mmdet itself (fixtures/mmdet-reference/README.md)."""

    def __init__(self, root: Path):
        self.root = root
        self.checkpoint = root / "checkpoint.pth"
        self.info = json.loads((root / "golden.json").read_text())
        self.image_paths = [root / "images" / im["file"] for im in self.info["images"]]
        with np.load(root / "golden.npz") as golden:
            self.golden = dict(golden)

    @property
    def raw_outputs(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in self.golden.items() if k.startswith(("cls_score", "bbox_pred"))}

    def detections(self):
        from rtmbench.postprocess import Detections

        g = self.golden
        return [Detections(g[f"dets_{i}_bboxes"], g[f"dets_{i}_scores"], g[f"dets_{i}_labels"])
                for i in range(len(self.image_paths))]

    def metas(self):
        from rtmbench.data import ImageMeta

        return [ImageMeta(tuple(im["ori_shape"]), tuple(im["scale_factor"])) for im in self.info["images"]]


@pytest.fixture(scope="session")
def reference() -> Reference:
    return Reference(FIXTURES / "mmdet-reference")


@pytest.fixture(scope="session")
def nano_spec():
    from rtmbench.model import get_spec

    return get_spec("rtmdet-nano-person")


@pytest.fixture(scope="session")
def reference_model(reference, nano_spec):
    """RTMDet-nano-person with the reference checkpoint, eval mode (treat as read-only)."""
    from rtmbench.checkpoint import load_weights
    from rtmbench.model import RTMDet

    model = RTMDet(nano_spec).eval()
    load_weights(model, reference.checkpoint)
    return model


@pytest.fixture
def refused_port():
    """A local port that refuses connections: bound, never listening (a fixed one, say 9, may be in use)."""
    import socket

    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield bound.getsockname()[1]


@pytest.fixture(scope="session")
def run_cli():
    """Run ``python -m rtmbench ARGS…`` in a subprocess (installed or not); returns the result."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}

    def run(*args, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "rtmbench", *map(str, args)],
                                capture_output=True, text=True, env=env)
        if check and result.returncode != 0:
            raise AssertionError(f"rtmbench {' '.join(map(str, args))} exited {result.returncode}:\n"
                                 f"{result.stderr}")
        return result

    return run
