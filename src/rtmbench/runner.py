"""The detection loop: decode + letterbox in worker threads, overlapped with inference and
postprocessing on the calling thread. Used by ``predict``, ``eval`` and the accuracy gate.
"""

from __future__ import annotations

import dataclasses
import logging
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


def run_detector(items: Sequence[tuple[object, Path]], engine: Engine, spec: ModelSpec,
                 batch_size: int = 32, workers: int = 2, corrupt: str = "warn",
                 keep_raw: bool = False, progress: bool = True,
                 loader: Callable[[Path, ModelSpec], tuple[np.ndarray, ImageMeta]] = load_letterboxed,
                 times: StageTimes | None = None, **test_cfg) -> Iterator[Prediction]:
    """Yield one :class:`Prediction` per ``(key, path)`` item, in order.

    Batches are always ``batch_size`` rows (the last one padded with zeros and cropped back), so
    fixed-batch engines work. ``corrupt='warn'`` scores an undecodable image as having no
    detections and counts it in ``times.corrupt``; ``'fail'`` raises. ``test_cfg`` overrides
    :func:`rtmbench.postprocess.postprocess` thresholds (defaults: ``spec.test_cfg``).
    """
    if corrupt not in ("warn", "fail"):
        raise ValueError("corrupt must be 'warn' or 'fail'")
    times = times if times is not None else StageTimes()
    cfg = {**dataclasses.asdict(spec.test_cfg), **test_cfg}
    height, width = spec.input_size

    def load(item):
        start = time.perf_counter()
        try:
            return loader(item[1], spec)
        except RtmbenchError:
            if corrupt == "fail":
                raise
            return None
        finally:
            times.decode += time.perf_counter() - start

    batches: queue.Queue = queue.Queue(maxsize=3)
    stop = threading.Event()

    def produce() -> None:
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rtmbench-decode") as pool:
                for start in range(0, len(items), batch_size):
                    chunk = items[start:start + batch_size]
                    loaded = list(pool.map(load, chunk))
                    if stop.is_set():
                        return
                    batches.put((chunk, loaded))
            batches.put(None)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            batches.put(exc)

    begin = time.perf_counter()
    producer = threading.Thread(target=produce, name="rtmbench-batcher", daemon=True)
    producer.start()
    bar = tqdm(total=len(items), desc="detect", unit="img", disable=not progress, leave=False)
    try:
        while (batch := batches.get()) is not None:
            if isinstance(batch, BaseException):
                raise batch
            chunk, loaded = batch
            pixels = np.zeros((batch_size, height, width, 3), np.uint8)
            metas = []
            for row, (item, result) in enumerate(zip(chunk, loaded)):
                if result is None:
                    times.corrupt.append(str(item[1]))
                    log.warning("%s: corrupt image, scored as no detections", item[1])
                    metas.append(ImageMeta((height, width), (1.0, 1.0)))
                else:
                    pixels[row], meta = result
                    metas.append(meta)
            inputs = normalize(pixels, spec.mean, spec.std)
            start = time.perf_counter()
            outputs = engine.infer(inputs)
            times.infer += time.perf_counter() - start
            start = time.perf_counter()
            dets = postprocess(outputs, metas, spec.input_size, spec.strides, **cfg)
            times.postprocess += time.perf_counter() - start
            for row, (item, result) in enumerate(zip(chunk, loaded)):
                if result is None:
                    dets[row] = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                                           np.zeros(0, np.int64))
                raw = None
                if keep_raw:
                    raw = {name: value[row] for name, value in outputs.items()}
                    raw["inputs"] = inputs[row]
                yield Prediction(item[0], metas[row], dets[row], raw)
            times.images += len(chunk)
            bar.update(len(chunk))
    finally:
        stop.set()
        bar.close()
        times.wall += time.perf_counter() - begin
        while producer.is_alive():  # unblock a producer waiting on a full queue
            try:
                batches.get_nowait()
            except queue.Empty:
                producer.join(0.05)


def to_coco_results(pred: Prediction, image_id, category_ids: Sequence[int]) -> Iterable[dict]:
    """COCO results rows for one image: ``bbox`` xywh in original pixels, rounded to 1e-3 px."""
    d = pred.detections
    xywh = np.concatenate([d.boxes[:, :2], d.boxes[:, 2:] - d.boxes[:, :2]], axis=1)
    for box, score, label in zip(xywh.tolist(), d.scores.tolist(), d.labels.tolist()):
        yield {"image_id": image_id, "category_id": int(category_ids[label]),
               "bbox": [round(v, 3) for v in box], "score": round(score, 6)}
