"""The detection loop: decode + letterbox in worker threads, overlapped with inference and
postprocessing on the calling thread. Used by ``predict``, ``eval`` and the accuracy gate.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .backends import Engine
from .data.preprocess import ImageMeta, decode_image, letterbox, normalize
from .errors import RtmbenchError
from .model import ModelSpec
from .postprocess import Detections, postprocess

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StageTimes:
    """Seconds spent per stage (decode summed over workers) and images seen."""

    decode: float = 0.0
    infer: float = 0.0
    postprocess: float = 0.0
    wall: float = 0.0
    images: int = 0
    corrupt: list[str] = dataclasses.field(default_factory=list)

    def images_per_s(self) -> dict[str, float]:
        rate = lambda seconds: self.images / seconds if seconds > 0 else float("nan")  # noqa: E731
        return {"decode": rate(self.decode), "infer": rate(self.infer),
                "postprocess": rate(self.postprocess), "whole_loop": rate(self.wall)}


@dataclasses.dataclass
class Prediction:
    key: object  # caller's id for the image (COCO image id, file path, …)
    meta: ImageMeta
    detections: Detections
    raw: dict[str, np.ndarray] | None = None  # this image's head outputs and input, if asked


def load_letterboxed(path: Path, spec: ModelSpec) -> tuple[np.ndarray, ImageMeta]:
    """Read and letterbox one image file: uint8[H, W, 3] BGR padded to ``spec.input_size``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RtmbenchError(f"{path}: cannot read image ({exc.strerror})") from None
    try:
        img = decode_image(data)
    except ValueError as exc:
        raise RtmbenchError(f"{path}: {exc}") from None
    return letterbox(img, spec.input_size, spec.pad_value)


def default_workers() -> int:
    """Decode threads: one per core this process may run on."""
    return len(os.sched_getaffinity(0))


def _empty_detections() -> Detections:
    return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


def run_detector(items: Sequence[tuple[object, Path]], engine: Engine, spec: ModelSpec,
                 batch_size: int = 32, workers: int | None = None, corrupt: str = "warn",
                 keep_raw: bool = False, progress: bool = True,
                 loader: Callable[[Path, ModelSpec], tuple[np.ndarray, ImageMeta]] = load_letterboxed,
                 times: StageTimes | None = None, postprocess_threads: int = 1,
                 **test_cfg) -> Iterator[Prediction]:
    """Yield one :class:`Prediction` per ``(key, path)`` item, in order.

    Three stages overlap: ``workers`` threads decode and letterbox ahead of the engine (a
    batcher thread assembles and normalizes each batch), the calling thread runs the engine,
    and ``postprocess_threads`` threads postprocess earlier batches meanwhile. OpenCV, NumPy and
    the compiled postprocess release the GIL, so the stages use separate cores.

    Batches are always ``batch_size`` rows (the last one padded with zeros and cropped back), so
    fixed-batch engines work. ``corrupt='warn'`` scores an undecodable image as having no
    detections and counts it in ``times.corrupt``; ``'fail'`` raises. ``test_cfg`` overrides
    :func:`rtmbench.postprocess.postprocess` thresholds (defaults: ``spec.test_cfg``).
    """
    if corrupt not in ("warn", "fail"):
        raise ValueError("corrupt must be 'warn' or 'fail'")
    workers = workers or default_workers()
    times = times if times is not None else StageTimes()
    cfg = {**dataclasses.asdict(spec.test_cfg), **test_cfg}
    height, width = spec.input_size
    timing_lock = threading.Lock()

    def timed(stage: str, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            with timing_lock:
                setattr(times, stage, getattr(times, stage) + time.perf_counter() - start)

    def load(item):
        try:
            return timed("decode", loader, item[1], spec)
        except RtmbenchError:
            if corrupt == "fail":
                raise
            return None

    batches: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def assemble(chunk, loaded):
        pixels = np.zeros((batch_size, height, width, 3), np.uint8)
        metas = []
        for row, (item, result) in enumerate(zip(chunk, loaded)):
            if result is None:
                metas.append(ImageMeta((height, width), (1.0, 1.0)))
            else:
                pixels[row], meta = result
                metas.append(meta)
        return chunk, loaded, metas, normalize(pixels, spec.mean, spec.std)

    def produce() -> None:
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rtmbench-decode") as pool:
                # Decode runs ahead by up to two batches, bounded so memory stays flat.
                pending = collections.deque()
                upcoming = iter(items)
                for start in range(0, len(items), batch_size):
                    while len(pending) < 3 * batch_size and (item := next(upcoming, None)) is not None:
                        pending.append(pool.submit(load, item))
                    chunk = items[start:start + batch_size]
                    loaded = [pending.popleft().result() for _ in chunk]
                    if stop.is_set():
                        return
                    batches.put(assemble(chunk, loaded))
            batches.put(None)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            batches.put(exc)

    def finish(chunk, loaded, metas, inputs, outputs) -> list[Prediction]:
        dets = timed("postprocess", postprocess, outputs, metas, spec.input_size, spec.strides, **cfg,
                     implementation="torch" if engine.postprocess_device else "auto",
                     device=engine.postprocess_device)
        predictions = []
        for row, (item, result) in enumerate(zip(chunk, loaded)):
            raw = None
            if keep_raw:
                raw = {name: value[row] for name, value in outputs.items()}
                raw["inputs"] = inputs[row]
            predictions.append(Prediction(item[0], metas[row], dets[row] if result is not None
                                          else _empty_detections(), raw))
        return predictions

    begin = time.perf_counter()
    producer = threading.Thread(target=produce, name="rtmbench-batcher", daemon=True)
    producer.start()
    finishing: collections.deque = collections.deque()
    bar = tqdm(total=len(items), desc="detect", unit="img", disable=not progress, leave=False)
    try:
        with ThreadPoolExecutor(max_workers=postprocess_threads, thread_name_prefix="rtmbench-post") as post:
            while (batch := batches.get()) is not None:
                if isinstance(batch, BaseException):
                    raise batch
                chunk, loaded, metas, inputs = batch
                for item, result in zip(chunk, loaded):
                    if result is None:
                        times.corrupt.append(str(item[1]))
                        log.warning("%s: corrupt image, scored as no detections", item[1])
                outputs = timed("infer", engine.infer, inputs)
                finishing.append(post.submit(finish, chunk, loaded, metas, inputs, outputs))
                while finishing and (len(finishing) > postprocess_threads or finishing[0].done()):
                    yield from _collect(finishing.popleft().result(), times, bar)
            while finishing:
                yield from _collect(finishing.popleft().result(), times, bar)
    finally:
        stop.set()
        for future in finishing:
            future.cancel()
        bar.close()
        times.wall += time.perf_counter() - begin
        while producer.is_alive():  # unblock a producer waiting on a full queue
            try:
                batches.get_nowait()
            except queue.Empty:
                producer.join(0.05)


def _collect(predictions: list[Prediction], times: StageTimes, bar) -> Iterator[Prediction]:
    times.images += len(predictions)
    bar.update(len(predictions))
    yield from predictions


def to_coco_results(pred: Prediction, image_id, category_ids: Sequence[int]) -> Iterable[dict]:
    """COCO results rows for one image: ``bbox`` xywh in original pixels, rounded to 1e-3 px."""
    d = pred.detections
    xywh = np.concatenate([d.boxes[:, :2], d.boxes[:, 2:] - d.boxes[:, :2]], axis=1)
    for box, score, label in zip(xywh.tolist(), d.scores.tolist(), d.labels.tolist()):
        yield {"image_id": image_id, "category_id": int(category_ids[label]),
               "bbox": [round(v, 3) for v in box], "score": round(score, 6)}
