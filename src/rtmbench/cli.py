"""``rtmbench`` command line. Bad input: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .errors import RtmbenchError
from .export import DEFAULT_OPSET, OPSETS

log = logging.getLogger("rtmbench")
DEFAULT_THRESHOLDS = Path("thresholds.yaml")  # in the current folder


def _number_type(parse, accept, requirement: str, kind: str):
    """An argparse/pytest option type: ``parse(text)``, refused with one line unless ``accept``s it."""
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{value:g} is not {requirement}")
        return value
    return convert


# Batch sizes, image and round counts; durations; a relative drop or a significance level.
positive_int = _number_type(int, lambda v: v >= 1, "≥ 1", "whole number")
positive_float = _number_type(float, lambda v: v > 0, "> 0", "number")
fraction = _number_type(float, lambda v: 0 < v < 1, "between 0 and 1", "number")


def _why_unwritable(path: Path) -> str | None:
    """Why no file can be created at ``path``: its nearest existing folder is a file or takes no
    new file (probed with a temporary file, removed at once). None when one can."""
    folder = next(p for p in path.absolute().parents if p.exists())
    if not folder.is_dir():
        return f"{folder} is not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
    except OSError as exc:
        return exc.strerror
    os.close(fd)
    os.unlink(probe)
    return None


def output_file(text: str) -> Path:
    """An argparse type for a file the command writes at the end: refused before any work
    unless it can be created."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: is a folder, not a file")
    if (why := _why_unwritable(path)) is not None:
        raise argparse.ArgumentTypeError(f"{path}: cannot be written ({why})")
    return path


def output_folder(text: str) -> Path:
    """An argparse type for a folder the command fills: refused before any work unless it is new
    or empty (what was there would lie beside what the command writes) and files can be created
    in it."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: is a file, not a folder")
    if path.is_dir() and any(path.iterdir()):
        raise argparse.ArgumentTypeError(f"{path}: is not empty (give a new or empty folder)")
    if (why := _why_unwritable(path / "file")) is not None:
        raise argparse.ArgumentTypeError(f"{path}: cannot be written ({why})")
    return path


def _add_model_args(p: argparse.ArgumentParser, weights: bool = True) -> None:
    p.add_argument("--model", required=True, help="model name from models.yaml")
    if weights:
        p.add_argument("--weights", help="checkpoint path or URL (default: the model's entry in --thresholds)")
    p.add_argument("--thresholds", type=Path, default=DEFAULT_THRESHOLDS,
                   help="where known weights are looked up (default: %(default)s)")
    p.add_argument("--cache-dir", type=Path, help="artifact cache (default: $RTMBENCH_CACHE_DIR or the user cache dir)")
    p.add_argument("--rebuild", action="store_true", help="rebuild cached artifacts")


def _add_engine_args(p: argparse.ArgumentParser, batch_default: int = 32) -> None:
    p.add_argument("--backend", default="onnxruntime", help="engine backend (default: %(default)s)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--batch-size", type=positive_int, default=batch_default, help="default: %(default)s")
    p.add_argument("--onnx", type=Path, help="use this ONNX model instead of exporting one")


def _cache(args):
    from .cache import ArtifactCache

    return ArtifactCache(args.cache_dir, rebuild=getattr(args, "rebuild", False))


def _thresholds_with(args, model: str):
    """``--thresholds``, loaded, where that file exists and has an entry for ``model``; else None."""
    from .thresholds import load_thresholds

    if args.thresholds.is_file() and model in (thresholds := load_thresholds(args.thresholds)).data.models:
        return thresholds
    return None


def _spec_and_weights(args, cache):
    from .model import get_spec
    from .weights import resolve_weights

    try:
        spec = get_spec(args.model)
    except KeyError as exc:
        raise RtmbenchError(exc.args[0]) from None
    weights, sha256 = getattr(args, "weights", None), None
    if weights is None:  # the model's known weights
        if not args.thresholds.is_file():
            raise RtmbenchError(f"no weights known for model {spec.name}: {args.thresholds} not found (run from "
                                f"the project folder, or pass --thresholds FILE or --weights PATH|URL)")
        if (thresholds := _thresholds_with(args, spec.name)) is not None:
            weights, sha256 = thresholds.weights_location(spec.name)
    return spec, resolve_weights(spec.name, weights, cache, sha256_prefix=sha256)


def cmd_export(args) -> None:
    from .export import export_onnx
    from .model import RTMDet
    from .checkpoint import load_weights

    spec, weights = _spec_and_weights(args, _cache(args))
    model = RTMDet(spec)
    if weights is not None:
        load_weights(model, weights)
    tool = export_onnx(model, args.out, opset=args.opset, do_simplify=not args.no_simplify)
    print(f"{args.out} (opset {args.opset}, simplifier: {tool})")


def standard_json(value) -> bytes:
    """``value`` as JSON that every parser reads (jq, browsers): a NaN or infinite number (a
    metric with nothing to measure) becomes null, where ``json.dumps`` writes a bare ``NaN``."""
    def finite(item):
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: finite(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [finite(v) for v in item]
        return item

    return json.dumps(finite(value), indent=2, allow_nan=False).encode()


def _image_ids(paths: list[str]) -> list[tuple[int | str, Path]]:
    """(image id, path) per image: the file name without its suffix, as a number where it is one
    (COCO's ``000000000139.jpg`` → 139, so that the results score against COCO annotations).
    Two images with one id would merge in the results: refused."""
    items, first = [], {}
    for path in map(Path, paths):
        image_id = int(path.stem) if path.stem.isdecimal() else path.stem
        if image_id in first:
            raise RtmbenchError(f"{first[image_id]} and {path} would both be image {image_id!r} in the results "
                                f"(the file name without its suffix): rename one, or predict them apart")
        first[image_id] = path
        items.append((image_id, path))
    return items


def _open_engine(args, cache):
    spec, weights = _spec_and_weights(args, cache)
    return spec, weights, _engine(args, cache, spec, weights)


def _engine(args, cache, spec, weights):
    from .artifacts import open_engine

    return open_engine(spec, weights, args.backend, args.precision, args.batch_size, cache, onnx=args.onnx)


def cmd_predict(args) -> None:
    from .runner import run_detector, to_coco_results

    items = _image_ids(args.images)
    cache = _cache(args)
    spec, _, handle = _open_engine(args, cache)
    results, raw = [], []
    with handle.engine as engine:
        test_cfg = {} if args.score_thr is None else {"score_thr": args.score_thr}  # else the model's
        for pred in run_detector(items, engine, spec, args.batch_size, corrupt="fail",
                                 keep_raw=args.raw_out is not None, progress=sys.stderr.isatty(), **test_cfg):
            results.extend(to_coco_results(pred, pred.key, range(1, spec.num_classes + 1)))
            raw.append(pred.raw)
    from .evaluate import write_results
    from .fsutil import atomic_path

    write_results(args.out, results)
    if args.raw_out is not None:
        with atomic_path(args.raw_out) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{name: np.stack([r[name] for r in raw]) for name in raw[0]})
    print(f"{len(results)} detections on {len(items)} image{'s' if len(items) != 1 else ''} → {args.out}")


def cmd_eval(args) -> None:
    from .data.coco import open_coco
    from .evaluate import evaluate_engine, write_results
    from .cache import file_sha256
    from .fsutil import write_bytes_atomic
    from .hostinfo import package_versions

    cache = _cache(args)
    spec, weights = _spec_and_weights(args, cache)
    dataset = open_coco(args.data_root, spec.class_names, annotation=args.annotations)  # fail before building
    handle = _engine(args, cache, spec, weights)
    with handle.engine as engine:
        result = evaluate_engine(dataset, engine, spec, args.batch_size, args.max_images,
                                 workers=args.workers, decode_in=args.decode_in, corrupt=args.corrupt,
                                 evaluator=args.evaluator, progress=sys.stderr.isatty())
    report = {"metrics": result.metrics, "dataset": result.dataset, "model": spec.name,
              "weights_sha256": file_sha256(weights) if weights else None,
              "backend": args.backend, "precision": args.precision, "batch_size": args.batch_size,
              "evaluator": args.evaluator, "images_per_s": result.images_per_s(),
              "engine_waited_s": {"for_decode": result.times.waited_for_decode,
                                  "for_postprocess": result.times.waited_for_postprocess},
              "batcher_s": {"waited_for_workers": result.times.batcher_waited_for_workers,
                            "completing": result.times.batcher_completing,
                            "waited_for_engine": result.times.batcher_waited_for_engine},
              "corrupt_images": result.times.corrupt, "engine": handle.description,
              "engine_key": handle.key, "versions": package_versions()}
    if args.dets_out is not None:
        write_results(args.dets_out, result.results)
    write_bytes_atomic(args.json, standard_json(report))
    m = result.metrics
    corrupt = f" ({len(result.times.corrupt)} corrupt, scored empty)" if result.times.corrupt else ""
    print(f"{spec.name} {args.backend} {args.precision}: mAP {m['mAP']:.4f}  mAP50 {m['mAP50']:.4f}  "
          f"on {result.dataset['images']} images{corrupt}, {result.images_per_s()['whole_loop']:.1f} images/s "
          f"→ {args.json}")


def cmd_make_data(args) -> None:
    from .data.synthetic import generate

    ann = generate(args.out, args.seed, args.num_images, args.split, progress=sys.stderr.isatty())
    print(ann)


def cmd_bench(args) -> int:
    from .fsutil import write_bytes_atomic
    from .hostinfo import package_versions
    from .perf import GFLOP_PER_IMAGE, measure, random_batch
    from .thresholds import PerfValidity

    # the perf gate's rules: the model's perf_validity in --thresholds, where it has an entry
    thresholds = _thresholds_with(args, args.model)
    rules = thresholds.model(args.model).perf_validity if thresholds is not None else PerfValidity()
    validity = rules.overridden(args.min_rounds, args.min_seconds)
    spec, _, handle = _open_engine(args, _cache(args))
    with handle.engine as engine:
        batch = engine.new_batch((args.batch_size, 3, *spec.input_size))  # as the detection loop feeds it
        batch[...] = random_batch(args.batch_size, spec.input_size)
        figures = measure(engine, batch, validity.min_rounds, validity.min_seconds, args.rounds)
    invalid = [f"{definition}: {figures[definition]['invalid']}" for definition in ("compute", "end_to_end")
               if figures[definition]["invalid"]]
    report = {"model": spec.name, "backend": args.backend, "precision": args.precision,
              "batch_size": args.batch_size, "valid": not invalid,
              "validity": validity.model_dump(), **figures,
              "gflops_compute": figures["images_per_s_compute"] * GFLOP_PER_IMAGE.get(spec.name, float("nan")),
              "device": handle.description["device"], "engine": handle.description,
              "engine_key": handle.key, "versions": package_versions()}
    write_bytes_atomic(args.json, standard_json(report))
    print(f"{spec.name} {args.backend} {args.precision} batch {args.batch_size}: "
          f"{figures['images_per_s_compute']:.1f} images/s compute, "
          f"{figures['images_per_s_end_to_end']:.1f} end-to-end → {args.json}"
          + (f"\nINVALID, not a valid measurement: {'; '.join(invalid)}" if invalid else ""))
    return 1 if invalid else 0  # a CI job must not take an invalid measurement for a figure


def cmd_build(args) -> None:
    _, _, handle = _open_engine(args, _cache(args))
    handle.engine.close()
    print(handle.path if handle.path is not None else f"(backend {args.backend} builds nothing)")


def cmd_backends(args) -> None:
    from .backends import backend_names, get_backend

    names = backend_names()
    width = max(map(len, names))
    for name in names:
        ok, info = get_backend(name).available()
        print(f"{name:{width}} {'available' if ok else 'unavailable':11} {info}")


def cmd_cache(args) -> None:
    cache = _cache(args)
    if args.action == "clear":
        cache.clear()
        print(f"cleared {cache.root}")
        return
    rows = cache.entries()
    if not rows:
        return
    print(f"{'kind':8} {'size':>11}  {'built (UTC)':16}  {'took':>8}  path")
    for row in rows:
        built, took = row.get("built_at"), row.get("build_seconds")  # numbers, unless the manifest was edited
        built = datetime.fromtimestamp(built, timezone.utc).strftime("%Y-%m-%d %H:%M") if _is_seconds(built) else "?"
        took = f"{took:6.1f} s" if _is_seconds(took) else "?"
        print(f"{row['kind']:8} {row['size_bytes'] / 1e6:8.2f} MB  {built:16}  {took:>8}  {row['path']}")
    entries = "1 entry" if len(rows) == 1 else f"{len(rows)} entries"
    print(f"{entries}, {sum(row['size_bytes'] for row in rows) / 1e6:.2f} MB in {cache.root}")


def _is_seconds(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e11


def cmd_report(args) -> int:
    from .report import markdown_summary, scope_history, what_changed, write_html
    from .results import (NoBaseline, accuracy_tolerances, compare, find_baseline, has_regression,
                          other_machine_note, runs)
    from .thresholds import load_thresholds

    # one given is checked now, compare or not; ./thresholds.yaml only read when there is a comparison
    thresholds = load_thresholds(args.thresholds) if args.thresholds is not None else None
    history = _readable_history(args.results)
    results = scope_history(history, args.runs, args.since)
    changes = baseline = None
    if args.compare is not None:
        current_id = runs(results)["run_id"].iloc[-1]
        try:
            baseline = find_baseline(args.results, args.compare, current_run_id=current_id, history=history).rows
        except NoBaseline as exc:
            if args.compare != "last":
                raise
            print(f"rtmbench: no baseline (first run): {exc}", file=sys.stderr)  # as the gate says, not an error
    if baseline is not None:
        current = results[results["run_id"] == current_id]
        if thresholds is None and DEFAULT_THRESHOLDS.is_file():  # the tolerances the pytest gate compares with
            thresholds = load_thresholds(DEFAULT_THRESHOLDS)
        tolerance = accuracy_tolerances(thresholds, current) if thresholds is not None else None
        print(f"rtmbench: accuracy tolerances from {thresholds.path}" if thresholds is not None else
              "rtmbench: accuracy tolerance 0.005 (no thresholds.yaml here; --thresholds names one)", file=sys.stderr)
        comparison = compare(current, baseline, tolerance, perf_drop=args.perf_drop, alpha=args.alpha,
                             across_machines=args.compare_across_machines)
        note = other_machine_note(comparison, args.compare_across_machines)
        changes = what_changed(baseline, current, comparison, [note] if note else [])
    text = markdown_summary(results, changes)
    print(text, end="")
    if args.markdown is not None:
        from .fsutil import write_bytes_atomic

        write_bytes_atomic(args.markdown, text.encode())
    if args.html is not None:
        write_html(results, args.html, changes)
        print(f"HTML report → {args.html}")
    return 1 if changes is not None and has_regression(changes.comparison) else 0


def _readable_history(paths: list[Path]):
    """The results under ``paths``, each unreadable file passed over with a warning on stderr, as
    the gates pass it over; when no file is readable, the error :func:`load_results` gives."""
    from .results import load_readable_results, load_results

    results, unreadable = load_readable_results(paths)
    if results is None:
        return load_results(paths)  # raises: no results files, or the first unreadable one
    for line in unreadable:
        print(f"rtmbench: warning: passed over {line}", file=sys.stderr)
    return results


def _utc_timestamp(text: str):
    """A --since value (``2025-03-01``, ``2025-03-01T12:00``, with or without a zone) as a UTC timestamp."""
    import pandas as pd

    try:
        stamp = pd.Timestamp(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date or time: {text!r}") from None
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


class _OneLineErrors(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit 2, like every other bad input (not argparse's usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog="rtmbench", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a model to ONNX (simplified with onnxsim)")
    _add_model_args(p)
    p.add_argument("--out", required=True, type=output_file)
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, choices=OPSETS,
                   help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--no-simplify", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("build", help="build (or reuse) an engine and print its path")
    _add_model_args(p)
    _add_engine_args(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("predict", help="detect on image files, write COCO results JSON")
    _add_model_args(p)
    _add_engine_args(p, batch_default=8)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=output_file, help="COCO results JSON")
    p.add_argument("--raw-out", type=output_file, help="NPZ of inputs and raw head outputs")
    p.add_argument("--score-thr", type=fraction,
                   help="keep detections scoring above this (default: the model's test_cfg, 0.001, as mmdet "
                        "evaluates: up to 300 boxes an image)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("eval", help="COCO bbox metrics of an engine on a COCO-layout dataset")
    _add_model_args(p)
    _add_engine_args(p)
    p.add_argument("--data-root", required=True, type=Path, help="dataset root (COCO layout)")
    p.add_argument("--annotations", default="person_keypoints",
                   help="person_keypoints, instances, or an annotation file path (default: %(default)s)")
    p.add_argument("--max-images", type=positive_int, help="evaluate only the first N images")
    p.add_argument("--workers", type=positive_int,
                   help="decode threads or processes (default: one per core, at most 8 threads; "
                        "processes: the cores the engine and postprocessing leave)")
    p.add_argument("--decode-in", choices=("auto", "threads", "processes"), default="auto",
                   help="where images are decoded: auto = processes beside a GPU engine, threads "
                        "beside a CPU one (default: %(default)s)")
    p.add_argument("--corrupt", choices=("warn", "fail"), default="warn",
                   help="an undecodable image: count it and score it empty, or fail (default: %(default)s)")
    p.add_argument("--evaluator", choices=("faster-coco-eval", "pycocotools"), default="faster-coco-eval",
                   help="COCO metrics implementation; both give the same numbers (default: %(default)s)")
    p.add_argument("--json", required=True, type=output_file, help="metrics and run details")
    p.add_argument("--dets-out", type=output_file, help="COCO results JSON (annotation image ids)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="throughput of one engine (compute and end-to-end images/s)")
    _add_model_args(p)
    _add_engine_args(p)
    p.add_argument("--rounds", type=positive_int,
                   help="timed rounds per definition (default: enough for --min-rounds and --min-seconds, "
                        "sized on 3 untimed calls)")
    p.add_argument("--min-rounds", type=positive_int,
                   help="fewer timed rounds make the measurement INVALID (default: the perf gate's, 20)")
    p.add_argument("--min-seconds", type=positive_float,
                   help="less timed time makes the measurement INVALID (default: the perf gate's, 2 s)")
    p.add_argument("--json", required=True, type=output_file)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("make-data", help="generate the synthetic person dataset (COCO layout)")
    p.add_argument("--out", required=True, type=output_folder)
    p.add_argument("--seed", type=int, default=7, help="default: %(default)s, the embedded default's val split")
    p.add_argument("--num-images", type=positive_int, default=500, help="default: %(default)s")
    p.add_argument("--split", choices=("val", "train"), default="val", help="default: %(default)s")
    p.set_defaults(func=cmd_make_data)

    p = sub.add_parser("backends", help="list backends and whether they are available here")
    p.set_defaults(func=cmd_backends)

    p = sub.add_parser("cache", help="list or clear the artifact cache")
    p.add_argument("action", choices=("ls", "clear"))
    p.add_argument("--cache-dir", type=Path)
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser(
        "report", help="summarize stored gate results; compare with a baseline run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print the latest verdict of every case in RESULTS as markdown (optionally an HTML\n"
                    "report with history plots); with --compare, what changed against a baseline run:\n"
                    "the provenance fields that differ and each metric's delta and verdict.",
        epilog="exit codes:\n  0  ok (no regression)\n  1  a metric REGRESSED against the baseline\n"
               "  2  bad input (no readable results, unknown baseline)")
    p.add_argument("results", nargs="+", type=Path, metavar="RESULTS",
                   help="results files (run-*.csv) or folders holding them")
    p.add_argument("--html", type=output_file, metavar="OUT", help="write a self-contained HTML report here")
    p.add_argument("--runs", type=positive_int, metavar="N", help="only the last N runs of the history")
    p.add_argument("--since", type=_utc_timestamp, metavar="DATE",
                   help="only runs at or after DATE (ISO 8601; UTC unless a zone is given)")
    p.add_argument("--markdown", type=output_file, metavar="OUT", help="also write the markdown summary here")
    p.add_argument("--compare", metavar="BASELINE",
                   help="'last' (for each metric the latest run measured, its latest earlier valid "
                        "measurement, on this machine first), a run id (or unique prefix), or a results file/folder")
    p.add_argument("--thresholds", type=Path,
                   help=f"take accuracy tolerances from this thresholds.yaml (default: {DEFAULT_THRESHOLDS} "
                        f"in the current folder where it exists, else 0.005 for every metric)")
    p.add_argument("--perf-drop", type=fraction, default=0.05,
                   help="images/s median drop that counts as a regression when significant (default: %(default)s)")
    p.add_argument("--alpha", type=fraction, default=0.01,
                   help="significance level of the one-sided Mann–Whitney U test (default: %(default)s)")
    p.add_argument("--compare-across-machines", action="store_true",
                   help="let a baseline from another machine (CPU, cores, memory, GPU, power limit, clocks "
                        "differ) call images/s regressions; by default a drop against it is 'worse (other "
                        "machine)', which fails nothing")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        status = args.func(args)
    except RtmbenchError as exc:
        print(f"rtmbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rtmbench: interrupted", file=sys.stderr)
        return 130
    return status or 0
