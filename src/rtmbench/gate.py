"""The gates' session state: which cases run, engines and evaluations made once, verdicts, summary.

The root ``conftest.py`` creates one :class:`GateSession` per pytest run and its fixtures call
into it; nothing here depends on pytest.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .artifacts import EngineHandle, open_engine
from .backends import backend_names, get_backend
from .cache import ArtifactCache
from .data.coco import CocoDataset
from .errors import RtmbenchError
from .evaluate import EvalResult, evaluate_engine
from .model import ModelSpec, get_spec
from .thresholds import REFERENCE, Thresholds
from .weights import is_url, resolve_weights

log = logging.getLogger(__name__)

DATASETS_ENV = "DATASETS_DIR"
DEFAULT_REAL_MODEL = "rtmdet-nano-person"
DEFAULT_EMBEDDED_MODEL = "rtmdet-nano-synthetic"


@dataclasses.dataclass(frozen=True)
class Case:
    """One (model, backend, precision, batch) combination the gates run."""

    model: str
    backend: str
    precision: str
    batch: int

    @property
    def id(self) -> str:
        return f"{self.model}-{self.backend}-{self.precision}-bs{self.batch}"


@dataclasses.dataclass
class Verdict:
    """One gated number: ``status`` is pass, FAIL, 'no target' or INVALID (measured too briefly
    to count); ``detail`` says why."""

    case: Case
    metric: str
    measured: float
    target: float | None
    status: str
    detail: str = ""

    @property
    def margin(self) -> float | None:
        return None if self.target is None else self.measured - self.target

    @property
    def passed(self) -> bool:
        return self.status != "FAIL"

    def as_row(self) -> dict:
        """A plain dict (travels through pytest's user_properties, also from xdist workers)."""
        return {**dataclasses.asdict(self.case), "metric": self.metric, "measured": self.measured,
                "target": self.target, "margin": self.margin, "verdict": self.status, "detail": self.detail}

    def message(self) -> str:
        if self.target is None:
            return f"{self.case.id} {self.metric} = {self.measured:.4f}: {self.status} ({self.detail})"
        return (f"{self.case.id} {self.metric} = {self.measured:.4f}, target ≥ {self.target:.4f} "
                f"(margin {self.margin:+.4f}; {self.detail}) → {self.status}")


@dataclasses.dataclass
class GateOptions:
    models: list[str]
    backends: list[str] | None
    precisions: list[str] | None
    batch_size: int = 32
    weights: str | None = None
    onnx: Path | None = None
    data_root: Path | None = None
    thresholds: Path = Path("thresholds.yaml")
    cache_dir: Path | None = None
    rebuild: bool = False
    strict: bool = False
    max_images: int | None = None
    device: str | None = None  # overrides the device name perf targets are looked up by
    rounds: int | None = None  # timed rounds per perf case (None: as many as validity needs)
    min_rounds: int | None = None  # override thresholds.yaml's perf_validity
    min_seconds: float | None = None
    compare_across_machines: bool = False  # a baseline from another machine may call a regression
    run: str | None = None  # shared by the processes of one run (pytest-xdist's testrunuid): --rebuild once


def default_models(data_root: Path | None) -> list[str]:
    """The real model when a dataset is given (``--data-root`` or ``$DATASETS_DIR``), else the embedded default."""
    return [DEFAULT_REAL_MODEL if data_root else DEFAULT_EMBEDDED_MODEL]


class GateSession:
    """Engines, ONNX files and evaluations made at most once per session, and every verdict."""

    def __init__(self, options: GateOptions, thresholds: Thresholds):
        self.options = options
        self.thresholds = thresholds
        self.cache = ArtifactCache(options.cache_dir, rebuild=options.rebuild, run=options.run)
        self.verdicts: list[Verdict] = []
        self._engines: dict[Case, EngineHandle] = {}
        self._evaluations: dict[Case, EvalResult] = {}
        self._datasets: dict[str, CocoDataset] = {}
        self._weights: dict[str, Path] = {}
        self._first_batches: dict[tuple[str, int], tuple] = {}
        self._perf_inputs: dict[tuple[str, int], np.ndarray] = {}
        self._reference_outputs: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        self.throughput: dict[tuple[Case, str], float] = {}  # median images/s by (case, definition), this session

    # ------------------------------------------------------------ which cases

    def cases(self, kind: str) -> list[Case]:
        """Cases for the accuracy or perf gate: explicit options, else every backend × the
        precisions the model's thresholds name for that gate. An option given twice adds no case."""
        cases = []
        for model in self.options.models:
            entry = self.thresholds.model(model)
            rules = entry.accuracy if kind == "accuracy" else entry.perf
            precisions = self.options.precisions or sorted({r.precision for r in rules}) or ["fp32"]
            for backend in self.options.backends or backend_names():
                cases += [Case(model, backend, precision, self.options.batch_size) for precision in precisions
                          if precision in get_backend(backend).precisions]
        return list(dict.fromkeys(cases))

    def impossible_requests(self) -> list[tuple[str, str]]:
        """(what, why) for each --backend × --precision asked for that the backend does not have:
        no case runs it, so the summary says so (computed, not collected: under pytest-xdist the
        controller collects nothing)."""
        if not (self.options.backends and self.options.precisions):
            return []
        return [(f"{model}-{backend}-{precision}",
                 f"backend {backend} has no {precision} (has {', '.join(get_backend(backend).precisions)})")
                for model in self.options.models for backend in dict.fromkeys(self.options.backends)
                for precision in dict.fromkeys(self.options.precisions)
                if precision not in get_backend(backend).precisions]

    def unavailable_reason(self, case: Case) -> str | None:
        """Why ``case`` cannot run here (missing SDK, precision the device lacks). A configuration
        error (a GPU index that names no GPU) raises: it is no reason to skip."""
        backend = get_backend(case.backend)
        ok, why = backend.available()
        if not ok:
            return f"backend {case.backend} unavailable here: {why}"
        return backend.unsupported_reason(case.precision)

    def not_the_onnx_given(self, case: Case) -> str | None:
        """Why a gated ``case`` would not measure the ``--onnx`` model: its backend runs the
        weights (the torch FP32 reference does so whatever is given, as the harness's own checks may)."""
        if (self.options.onnx is None or get_backend(case.backend).runs_onnx
                or (case.backend, case.precision) == REFERENCE):
            return None
        return f"backend {case.backend} runs the PyTorch model from the weights, not --onnx {self.options.onnx}"

    # ------------------------------------------------------------ artifacts

    def spec(self, model: str) -> ModelSpec:
        try:
            return get_spec(model)
        except KeyError as exc:
            raise RtmbenchError(exc.args[0]) from None

    def weights(self, model: str) -> Path:
        if model not in self._weights:
            location, sha = self.thresholds.weights_location(model)
            given = self.options.weights
            self._weights[model] = resolve_weights(model, given or location, self.cache,
                                                   sha256_prefix=None if given else sha)
        return self._weights[model]

    def engine(self, case: Case) -> EngineHandle:
        if case not in self._engines:
            onnx = self.options.onnx if get_backend(case.backend).runs_onnx else None  # the reference: the weights
            self._engines[case] = open_engine(self.spec(case.model), self.weights(case.model), case.backend,
                                              case.precision, case.batch, self.cache, onnx=onnx)
        return self._engines[case]

    def check_options(self, given_data_root: Path | None) -> None:
        """Refuse, before anything runs, an option that names nothing: a model without a spec or
        a thresholds entry, an unknown backend, a local ``--weights`` or ``--onnx`` file that
        does not exist, and a ``--data-root`` (``given_data_root``) that is no folder or that
        none of the models reads (synthetic ones generate their data)."""
        for model in self.options.models:
            self.spec(model)
            self.thresholds.model(model)
        for backend in self.options.backends or []:
            get_backend(backend)
        weights = self.options.weights
        if weights and not is_url(weights) and not Path(weights).expanduser().is_file():
            raise RtmbenchError(f"--weights {weights}: checkpoint file not found")
        if self.options.onnx is not None and not self.options.onnx.is_file():
            raise RtmbenchError(f"--onnx {self.options.onnx}: ONNX file not found")
        if given_data_root is None:
            return
        if not given_data_root.is_dir():
            raise RtmbenchError(f"--data-root {given_data_root}: no such folder")
        if not any(self.thresholds.model(m).dataset.kind == "coco" for m in self.options.models):
            raise RtmbenchError(f"--data-root {given_data_root}: model {', '.join(self.options.models)} is "
                                f"evaluated on its generated synthetic dataset and reads no data root "
                                f"(drop --data-root, or pass --model {DEFAULT_REAL_MODEL})")

    def check_dataset_given(self, model: str) -> None:
        """A model evaluated on a real dataset needs ``--data-root`` or ``$DATASETS_DIR``, naming a folder."""
        source = self.thresholds.model(model).dataset
        if source.kind != "coco":
            return
        if self.options.data_root is None:
            raise RtmbenchError(
                f"model {model} is evaluated on COCO {source.split}: set {DATASETS_ENV} or pass "
                f"--data-root to the folder holding images/{source.split}/ and "
                f"annotations/{source.annotations}_{source.split}.json")
        if not self.options.data_root.is_dir():
            raise RtmbenchError(f"{self.options.data_root}: dataset root not found (set {DATASETS_ENV} "
                                f"or --data-root to a folder)")

    def provenance(self, case: Case) -> dict:
        """What a stored result row records about where it came from."""
        from .cache import file_sha256

        handle = self.engine(case)
        return {"device": handle.description["device"], "backend_version": handle.description.get("version"),
                "weights_sha256": file_sha256(self.weights(case.model)),
                "versions": handle.description.get("platform", {})}

    def dataset(self, model: str) -> CocoDataset:
        """The model's evaluation dataset: the real COCO root, or the synthetic split it names
        (opened once per session)."""
        if model not in self._datasets:
            self._datasets[model] = self._open_dataset(model)
        return self._datasets[model]

    def _open_dataset(self, model: str) -> CocoDataset:
        from .data.coco import open_coco

        source = self.thresholds.model(model).dataset
        spec = self.spec(model)
        self.check_dataset_given(model)
        if source.kind == "coco":
            return open_coco(self.options.data_root, spec.class_names, source.split, source.annotations)
        from .data.synthetic import GENERATOR_VERSION, generate

        root = self.cache.get_or_build(
            "datasets", {"generator": "rtmbench.data.synthetic", "seed": source.seed,
                         "num_images": source.num_images, "version": GENERATOR_VERSION},
            f"synthetic-seed{source.seed}-{source.num_images}",
            lambda tmp: generate(tmp, source.seed, source.num_images, "val", progress=False))
        return open_coco(root, spec.class_names, "val2017")

    def evaluate(self, case: Case) -> EvalResult:
        if case not in self._evaluations:
            dataset = self.dataset(case.model)
            handle = self.engine(case)
            self._evaluations[case] = evaluate_engine(dataset, handle.engine, self.spec(case.model),
                                                      case.batch, self.options.max_images, progress=False)
        return self._evaluations[case]

    def subset_note(self, model: str) -> str | None:
        """Why absolute floors do not apply to this session's evaluation of ``model``: with
        ``--max-images`` it sees fewer images than the floors were measured on. None on the full set."""
        total = len(self.dataset(model).images)
        if self.options.max_images is None or self.options.max_images >= total:
            return None
        return (f"--max-images {self.options.max_images} evaluates a subset of the {total} images the "
                f"floors were measured on; they are not applied")

    def reference_throughput(self, case: Case, definition: str) -> float:
        """Median images/s of ``case`` by ``definition`` ('compute' or 'end_to_end') in this
        session (measured now if not yet)."""
        if (case, definition) not in self.throughput:
            if (why := self.unavailable_reason(case)) is not None:
                raise RtmbenchError(f"the ratio target needs {case.id}: {why}")
            call = self.perf_calls(case)[1][definition]
            with self.device_lock(self.engine(case).description["device"]):
                times = self.time_rounds(case.model, call)
            self.throughput[(case, definition)] = case.batch / float(np.median(times))
        return self.throughput[(case, definition)]

    def perf_calls(self, case: Case) -> tuple[dict[str, np.ndarray], dict[str, Callable[[], object]]]:
        """What the perf gate times for ``case``: its engine's outputs of a first call on the perf
        inputs, held in a buffer of the engine's own kind (a GPU engine's pinned memory, as the
        detection loop feeds it), and the call each throughput definition times ('compute' reruns
        that input staged on the device, 'end_to_end' the whole call)."""
        engine = self.engine(case).engine
        inputs = engine.new_batch((case.batch, 3, *self.spec(case.model).input_size))
        inputs[...] = self.perf_inputs(case.model, case.batch)
        first_outputs = engine.infer(inputs)  # also stages the input for infer_compute
        return first_outputs, {"compute": engine.infer_compute, "end_to_end": lambda: engine.infer(inputs)}

    # ------------------------------------------------------------ valid perf numbers

    def validity(self, model: str):
        """The model's ``perf_validity`` with ``--perf-min-rounds`` / ``--perf-min-seconds`` applied."""
        return self.thresholds.model(model).perf_validity.overridden(self.options.min_rounds,
                                                                      self.options.min_seconds)

    def rounds_to_time(self, model: str, seconds_per_call: float) -> int:
        """``--perf-rounds`` if given (it may then be too few: INVALID), else
        :func:`~rtmbench.perf.rounds_for` the validity rules."""
        from .perf import rounds_for

        if self.options.rounds is not None:
            return self.options.rounds
        validity = self.validity(model)
        return rounds_for(seconds_per_call, validity.min_rounds, validity.min_seconds)

    def time_rounds(self, model: str, call) -> np.ndarray:
        """Seconds per ``call()`` as :func:`~rtmbench.perf.time_valid_rounds` times them, under
        the model's validity rules and ``--perf-rounds``."""
        from .perf import time_valid_rounds

        validity = self.validity(model)
        return time_valid_rounds(call, validity.min_rounds, validity.min_seconds, self.options.rounds)

    def first_batch(self, model: str, batch: int):
        """The first ``batch`` images of the model's evaluation set, preprocessed as the detection
        loop does: float32[n ≤ batch, 3, H, W] and their :class:`~rtmbench.data.ImageMeta`."""
        key = (model, batch)
        if key not in self._first_batches:
            from .data.preprocess import normalize
            from .runner import load_letterboxed

            spec = self.spec(model)
            pixels, metas = zip(*(load_letterboxed(path, spec) for _, path in self.dataset(model).items(batch)))
            self._first_batches[key] = normalize(np.stack(pixels), spec.mean, spec.std), list(metas)
        return self._first_batches[key]

    def perf_inputs(self, model: str, batch: int) -> np.ndarray:
        """What the perf gate times: :meth:`first_batch` (random rows past the dataset's end),
        the first image repeated in the last row (an engine must give one image the same
        outputs wherever it sits in the batch); random inputs where no dataset is at hand."""
        key = (model, batch)
        if key not in self._perf_inputs:
            from .perf import random_batch

            spec = self.spec(model)
            try:
                self.check_dataset_given(model)
            except RtmbenchError as exc:
                log.warning("perf inputs are random: %s", exc)
                inputs = random_batch(batch, spec.input_size)
            else:
                images = self.first_batch(model, batch)[0]
                inputs = np.concatenate([images, random_batch(batch - len(images), spec.input_size)])
            if batch > 1:
                inputs[-1] = inputs[0]
            self._perf_inputs[key] = inputs
        return self._perf_inputs[key]

    def check_outputs(self, case: Case, outputs: list[dict[str, np.ndarray]]) -> str | None:
        """Why outputs the engine gave for :meth:`perf_inputs` while timed are wrong, or None:
        beyond the precision's tolerance from the FP32 reference's outputs, or a different
        answer for the image repeated in the batch."""
        from .fidelity import OUTPUT_TOLERANCE, output_errors, relative_max_error

        inputs = self.perf_inputs(case.model, case.batch)
        key = (case.model, case.batch)
        if key not in self._reference_outputs:  # once per inputs, not per case
            self._reference_outputs[key] = self.engine(Case(case.model, *REFERENCE, case.batch)).engine.infer(inputs)
        reference = self._reference_outputs[key]
        tolerance = OUTPUT_TOLERANCE[case.precision]
        for when, out in zip(("first", "last"), outputs):
            errors = output_errors(out, reference)
            if bad := {k: v for k, v in errors.items() if not v <= tolerance}:
                worst = max(bad, key=bad.get)
                return (f"{when} timed call's outputs differ from torch fp32: {worst} by {bad[worst]:.2g} "
                        f"of its range > {tolerance:g}")
            if len(inputs) > 1:
                spread = {k: relative_max_error(v[-1], v[0]) for k, v in out.items()}
                if bad := {k: v for k, v in spread.items() if not v <= OUTPUT_TOLERANCE["fp32"]}:
                    worst = max(bad, key=bad.get)
                    return (f"the same image at rows 0 and {len(inputs) - 1} of the {when} timed call gives "
                            f"different {worst} ({bad[worst]:.2g} of its range)")
        return None

    def device_lock(self, device: str):
        """A lock held while timing on ``device``: perf cases of parallel workers (pytest -n)
        or other sessions sharing the cache never time the same device at once."""
        from .cache import cache_lock

        name = "".join(ch if ch.isalnum() else "_" for ch in device)
        return cache_lock(self.cache.make_dir(self.cache.root / "locks") / f"device-{name}.lock")

    def check_results_options(self, results_dir: Path, compare_to: str | None) -> None:
        """Before anything runs: the results folder can hold files, and an explicit baseline
        (a run id or a results path; ``last`` may have none yet) names a readable run."""
        from .results import find_baseline

        if results_dir.exists() and not results_dir.is_dir():
            raise RtmbenchError(f"{results_dir}: --results-dir is not a folder")
        if compare_to and compare_to != "last":
            find_baseline(results_dir, compare_to, skip_unreadable=True)

    def record_run(self, rows: list[dict], results_dir: Path, compare_to: str | None):
        """Store this run's rows under ``results_dir``, then compare them with ``compare_to``
        (``last``, a run id or a path). An old or unreadable file never costs this run its
        results. Returns (file written, comparison table or None, notes: one line each)."""
        from .hostinfo import cpu_name, machine_fingerprint, package_versions
        from .results import (NoBaseline, RunInfo, accuracy_tolerances, compare, find_baseline, other_machine_note,
                              to_frame, write_run)

        device = next((r["device"] for r in rows if r.get("device")), cpu_name())
        info = RunInfo.new(device=device, versions={**package_versions(), **machine_fingerprint()})
        try:
            path = write_run(results_dir, info, rows)
        except OSError as exc:
            raise RtmbenchError(f"{results_dir}: this run's results could not be stored "
                                f"({exc.strerror or exc})") from None
        if not compare_to:
            return path, None, []
        try:
            baseline = find_baseline(results_dir, compare_to, info.run_id, skip_unreadable=True)
        except NoBaseline as exc:
            first = "no baseline (first run)" if compare_to == "last" else "no baseline"
            return path, None, [f"{first}: {exc}"]
        except RtmbenchError as exc:
            return path, None, [f"not compared: {exc}"]
        from .report import changed_fields, describe_runs, provenance

        current = to_frame(info, rows)
        notes = [f"passed over {line}" for line in baseline.unreadable]
        notes.append(f"baseline rows from {describe_runs(baseline.rows)}")
        if changed := changed_fields(provenance(baseline.rows), provenance(current)):
            notes.append("what changed since the baseline: " + "; ".join(f"{field} {before} → {after}"
                                                                          for field, before, after in changed))
        across_machines = self.options.compare_across_machines
        comparison = compare(current, baseline.rows, accuracy_tolerances(self.thresholds, current),
                             across_machines=across_machines)
        if note := other_machine_note(comparison, across_machines):
            notes.append(note)
        return path, comparison, notes

    def close(self) -> None:
        for handle in self._engines.values():
            handle.engine.close()

    # ------------------------------------------------------------ verdicts

    def check_accuracy(self, case: Case, metric: str) -> Verdict:
        """Gate ``metric`` on the rule's floors. On a ``--max-images`` subset the verdict's metric is
        named for it (``mAP on 64 images``): another measurement than the full set's, stored and
        compared only with its like."""
        from .results import subset_metric

        measured = self.evaluate(case).metrics[metric]
        subset = self.subset_note(case.model)
        named = metric if subset is None else subset_metric(metric, self.options.max_images)
        rule = self.thresholds.accuracy_rule(case.model, case.backend, case.precision)
        if rule is None:
            return self._record(Verdict(case, named, measured, None, "no target",
                                        f"no accuracy rule for {case.backend} {case.precision} in "
                                        f"{self.thresholds.path.name}"))
        targets = []
        floor = getattr(rule, metric)
        if floor is not None and subset is None:
            targets.append((floor.minimum, f"expected {floor.expected:.4f} - tolerance {floor.tolerance:.4f}"))
        if metric in rule.max_drop:
            reference = Case(case.model, *REFERENCE, case.batch)
            ref_value = self.evaluate(reference).metrics[metric]
            targets.append((ref_value - rule.max_drop[metric],
                            f"torch fp32 {ref_value:.4f} - max drop {rule.max_drop[metric]:.4f}"))
        if not targets:  # the floor set aside on a subset, or none set
            why = subset if floor is not None and subset is not None else f"the rule sets no {metric} floor"
            return self._record(Verdict(case, named, measured, None, "no target", why))
        target, detail = max(targets)
        return self._record(Verdict(case, named, measured, target,
                                    "pass" if measured >= target else "FAIL", detail))

    def check_throughput(self, case: Case, images_per_s: float, device: str, definition: str,
                         reference_images_per_s, invalid: str | None = None,
                         wrong_outputs: str | None = None) -> Verdict:
        """Gate the median images/s on the device's target, or on a ratio to a reference case
        (``reference_images_per_s(case, definition)`` measures it in this run, by the same
        definition). An engine whose timed calls gave ``wrong_outputs`` fails whatever its speed;
        a measurement that breaks the validity rules (``invalid``: why) is INVALID, neither pass
        nor FAIL."""
        if wrong_outputs is not None:
            from .results import FAST_BUT_WRONG

            return self._record(Verdict(case, "images/s", images_per_s, None, "FAIL",
                                        f"{FAST_BUT_WRONG}: {wrong_outputs}"))
        if invalid is not None:
            return self._record(Verdict(case, "images/s", images_per_s, None, "INVALID",
                                        f"not a valid measurement: {invalid} (thresholds.yaml perf_validity, "
                                        f"--perf-min-rounds/--perf-min-seconds)"))
        device = self.options.device or device
        rule = self.thresholds.perf_rule(case.model, case.backend, case.precision, case.batch, device)
        if rule is None:
            return self._record(Verdict(case, "images/s", images_per_s, None, "no target",
                                        f"no perf target for {case.backend} {case.precision} at batch {case.batch} "
                                        f"on device {device!r} in {self.thresholds.path.name}"))
        if rule.definition != definition:
            raise RtmbenchError(f"{self.thresholds.path}: the {case.id} target is {rule.definition} "
                                f"images/s but this run measured {definition}")
        if rule.images_per_s is not None:
            target = rule.images_per_s * (1 - rule.tolerance)
            detail = f"{rule.images_per_s:.2f} on {rule.device} - {rule.tolerance:.0%}"
        else:
            ref = Case(case.model, rule.ratio_to.backend, rule.ratio_to.precision, case.batch)
            ref_value = reference_images_per_s(ref, definition)
            target = ref_value * rule.ratio_to.min_ratio
            detail = (f"{rule.ratio_to.min_ratio:g} × {ref.backend} {ref.precision} {ref_value:.1f}; "
                      f"ratio {images_per_s / ref_value:.2f}")
        return self._record(Verdict(case, "images/s", images_per_s, target,
                                    "pass" if images_per_s >= target else "FAIL", detail))

    def _record(self, verdict: Verdict) -> Verdict:
        self.verdicts.append(verdict)
        return verdict


def options_from_env(data_root: Path | None) -> Path | None:
    """``--data-root`` if given, else ``$DATASETS_DIR``."""
    if data_root is not None:
        return data_root
    env = os.environ.get(DATASETS_ENV)
    return Path(env) if env else None
