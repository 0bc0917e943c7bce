"""The detection loop: decode + letterbox + normalize in worker threads or processes, inference
on the calling thread and postprocessing on other threads, all overlapped. Used by ``predict``, ``eval``
and the accuracy gate.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .backends import Engine
from .data.preprocess import ImageMeta
from .decoding import LOOKAHEAD_BATCHES, Decoder, Loader, ProcessDecoder, ThreadDecoder, load_letterboxed
from .errors import RtmbenchError
from .model import ModelSpec
from .postprocess import Detections, postprocess, warm_up

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StageTimes:
    """Seconds spent per stage (decode and postprocess summed over their threads) and images
    seen; where the engine's thread waited instead of running the engine: for a decoded batch
    (decode is behind) or for postprocessing (it is behind); and where the batcher thread, which
    hands decoded batches to the engine, spent its time: waiting for the decode workers,
    completing batches (mostly the decode processes' normalize) or waiting for room in the engine's
    queue (the engine is behind)."""

    decode: float = 0.0
    infer: float = 0.0
    postprocess: float = 0.0
    wall: float = 0.0
    images: int = 0
    corrupt: list[str] = dataclasses.field(default_factory=list)
    waited_for_decode: float = 0.0
    waited_for_postprocess: float = 0.0
    batcher_waited_for_workers: float = 0.0
    batcher_completing: float = 0.0
    batcher_waited_for_engine: float = 0.0

    def waits(self) -> str:
        """The engine's and the batcher's threads' time as shares of the wall time, for a summary line."""
        share = lambda seconds: seconds / self.wall if self.wall > 0 else float("nan")  # noqa: E731
        return (f"engine waited {share(self.waited_for_decode):.0%} of the time for decode, "
                f"{share(self.waited_for_postprocess):.0%} for postprocessing; batcher waited "
                f"{share(self.batcher_waited_for_workers):.0%} for decode workers, "
                f"{share(self.batcher_waited_for_engine):.0%} for the engine, completed batches "
                f"{share(self.batcher_completing):.0%}")

    def images_per_s(self) -> dict[str, float]:
        """The whole loop's rate, the engine's while it ran, and decode's and postprocessing's per
        worker (their seconds are summed over their threads or processes: a stage's rate is about
        this times its workers)."""
        rate = lambda seconds: self.images / seconds if seconds > 0 else float("nan")  # noqa: E731
        return {"decode_per_worker": rate(self.decode), "infer": rate(self.infer),
                "postprocess_per_thread": rate(self.postprocess), "whole_loop": rate(self.wall)}


@dataclasses.dataclass
class Prediction:
    key: object  # caller's id for the image (COCO image id, file path, …)
    meta: ImageMeta
    detections: Detections
    raw: dict[str, np.ndarray] | None = None  # this image's head outputs and input, if asked


MAX_DEFAULT_THREADS = 8  # more decode threads only add GIL contention with the engine's thread


def default_workers(processes: bool = False) -> int:
    """Decode workers. Threads: one per core this process may run on, at most
    :data:`MAX_DEFAULT_THREADS`. Processes: one per core left after the engine's thread and the
    postprocess threads."""
    cores = len(os.sched_getaffinity(0))
    return max(1, cores - 1 - postprocess_workers()) if processes else min(cores, MAX_DEFAULT_THREADS)


QUEUED_BATCHES = 2  # decoded batches waiting for the engine


def batches_in_flight(post_workers: int) -> int:
    """Batch buffers the loop holds at once, at most: decoding, being queued, queued, in the
    engine, postprocessing (one more than the threads: the engine's thread waits for the oldest
    only beyond that)."""
    return LOOKAHEAD_BATCHES + 1 + QUEUED_BATCHES + 1 + post_workers + 1


def _one_per_four_cores() -> int:
    """One per four cores this process may run on, 1 to 4."""
    return min(4, max(1, len(os.sched_getaffinity(0)) // 4))


def postprocess_workers() -> int:
    """Postprocess threads: :func:`_one_per_four_cores` (numba's kernel does about 3,000 images/s
    per thread; a GPU engine outruns one)."""
    return _one_per_four_cores()


def normalize_threads() -> int:
    """Threads normalizing each batch the decode processes letterboxed: :func:`_one_per_four_cores`
    (one did 6.5 ms a batch on the H200's host, bound by one core's memory bandwidth)."""
    return _one_per_four_cores()


def _empty_detections() -> Detections:
    return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


def _yield_cores_to_the_engine() -> None:
    """Thread initializer: run this thread only on otherwise idle cores (Linux ``SCHED_IDLE``,
    per thread). A CPU engine's threads meet at a barrier after every layer, so a decode thread
    preempting one stalls them all; as an idle-class thread it decodes in the engine's gaps
    instead (on 2 cores: 0.84-0.91 of the loop's bound, against 0.76-0.82 at nice 10). Only
    next to such an engine: beside a GPU engine, other work on a shared host would starve them."""
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not permitted
        pass


def _helper_initializer(engine: Engine) -> Callable[[], None] | None:
    return _yield_cores_to_the_engine if engine.computes_on_host_cores else None


@contextlib.contextmanager
def _prompt_gil_handoff(seconds: float = 5e-4):
    """A thread waiting for the GIL forces a handoff after ``seconds`` instead of Python's 5 ms:
    the engine's thread makes many short GIL-releasing calls (CUDA launches, copies), each of
    which would otherwise wait up to 5 ms behind the decode threads."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def open_decoder(engine: Engine, spec: ModelSpec, batch_size: int, workers: int | None = None,
                 decode_in: str = "auto", loader: Loader = load_letterboxed, corrupt: str = "warn") -> Decoder:
    """The detection loop's decoder for ``engine``: ``decode_in`` 'threads', 'processes', or
    'auto': processes beside an engine that computes off the host's cores (a GPU: its thread
    needs the GIL for every launch), threads beside one that computes on them (yielding them
    to the engine's threads), and threads, with a warning, where shared memory is short."""
    if decode_in not in ("auto", "threads", "processes"):
        raise ValueError("decode_in must be 'auto', 'threads' or 'processes'")
    processes = decode_in == "processes" or (decode_in == "auto" and not engine.computes_on_host_cores)
    if processes:
        try:
            return ProcessDecoder(spec, workers or default_workers(processes=True), batch_size, loader, corrupt,
                                  normalize_threads())
        except RtmbenchError as exc:
            if decode_in == "processes":
                raise
            log.warning("decoding in threads: %s", exc)
    return ThreadDecoder(spec, workers or default_workers(), loader, corrupt, initializer=_helper_initializer(engine))


def run_detector(items: Sequence[tuple[object, Path]], engine: Engine, spec: ModelSpec,
                 batch_size: int = 32, workers: int | None = None, corrupt: str = "warn",
                 keep_raw: bool = False, progress: bool = True, loader: Loader = load_letterboxed,
                 times: StageTimes | None = None, decode_in: str = "auto", **test_cfg) -> Iterator[Prediction]:
    """Yield one :class:`Prediction` per ``(key, path)`` item, in order.

    Three stages overlap: ``workers`` threads or processes (:func:`open_decoder`) decode,
    letterbox and normalize the images into batch buffers (``Engine.new_batch``), a few batches
    ahead of the engine; the calling thread runs the engine; :func:`postprocess_workers` threads
    postprocess the previous batches meanwhile, each a whole batch at a time. OpenCV, NumPy, the
    compiled postprocess and the engines release the GIL, so the stages run on separate cores.

    Batches are always ``batch_size`` rows (the last one padded with blank rows and cropped back),
    so fixed-batch engines work. ``corrupt='warn'`` scores an undecodable image as having no
    detections and counts it in ``times.corrupt``; ``'fail'`` raises. ``test_cfg`` overrides
    :func:`rtmbench.postprocess.postprocess` thresholds (defaults: ``spec.test_cfg``).
    """
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

    batches: queue.Queue = queue.Queue(maxsize=QUEUED_BATCHES)
    stop = threading.Event()

    def produce(decoder: Decoder) -> None:
        try:
            with contextlib.closing(decoder.batches(items, batch_size, engine.new_batch)) as decoded:
                for batch in decoded:
                    timed("batcher_waited_for_engine", batches.put, batch)
                    if stop.is_set():  # before the decoder is asked for more: it would submit another batch
                        return
            batches.put(None)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            batches.put(exc)

    def finish(chunk, metas, inputs, outputs) -> list[Prediction]:
        placeholder = ImageMeta((height, width), (1.0, 1.0))
        shown = [meta or placeholder for meta in metas]
        dets = timed("postprocess", postprocess, outputs, shown, spec.input_size, spec.strides, **cfg,
                     device=engine.postprocess_device)
        predictions = []
        for row, (item, meta) in enumerate(zip(chunk, metas)):
            raw = None
            if keep_raw:
                raw = {name: value[row] for name, value in outputs.items()}
                raw["inputs"] = inputs[row].copy()  # not a view that keeps the (pinned) batch buffer alive
            predictions.append(Prediction(item[0], shown[row], dets[row] if meta is not None
                                          else _empty_detections(), raw))
        engine.recycle_batch(inputs)
        return predictions

    with open_decoder(engine, spec, batch_size, workers, decode_in, loader, corrupt) as decoder:
        # numba's kernels compile (or load from their cache), decode processes start and the
        # batch buffers are allocated now, not inside the timed loop
        warm_up(spec.strides, device=engine.postprocess_device)
        decoder.warm_up()
        post_workers = postprocess_workers()
        engine.reserve_batches((batch_size, 3, height, width), batches_in_flight(post_workers))
        begin = time.perf_counter()
        producer = threading.Thread(target=produce, args=(decoder,), name="rtmbench-batcher", daemon=True)
        finishing: collections.deque = collections.deque()
        bar = tqdm(total=len(items), desc="detect", unit="img", disable=not progress, leave=False)
        try:
            with _prompt_gil_handoff(), ThreadPoolExecutor(max_workers=post_workers, thread_name_prefix="rtmbench-post",
                                                           initializer=_helper_initializer(engine)) as post:
                producer.start()
                while (batch := timed("waited_for_decode", batches.get)) is not None:
                    if isinstance(batch, BaseException):
                        raise batch
                    chunk, metas, inputs = batch
                    for item, meta in zip(chunk, metas):
                        if meta is None:
                            times.corrupt.append(str(item[1]))
                            log.warning("%s: corrupt image, scored as no detections", item[1])
                    outputs = timed("infer", engine.infer, inputs)
                    finishing.append(post.submit(finish, chunk, metas, inputs, outputs))
                    while finishing and (len(finishing) > post_workers or finishing[0].done()):
                        yield from _collect(timed("waited_for_postprocess", finishing.popleft().result), times, bar)
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
            times.decode += decoder.seconds
            times.batcher_waited_for_workers += decoder.waited_for_workers
            times.batcher_completing += decoder.completing


def _collect(predictions: list[Prediction], times: StageTimes, bar) -> Iterator[Prediction]:
    times.images += len(predictions)
    bar.update(len(predictions))
    yield from predictions


def to_coco_results(pred: Prediction, image_id, category_ids: Sequence[int]) -> list[dict]:
    """COCO results rows for one image: ``bbox`` xywh in original pixels, rounded to 1e-3 px,
    ``score`` to 1e-6 (vectorized: row by row it would cost a core at GPU rates)."""
    d = pred.detections
    xywh = np.concatenate([d.boxes[:, :2], d.boxes[:, 2:] - d.boxes[:, :2]], axis=1).astype(np.float64)
    categories = np.asarray(category_ids)[d.labels].tolist()
    return [{"image_id": image_id, "category_id": category, "bbox": box, "score": score}
            for box, score, category in zip(np.round(xywh, 3).tolist(),
                                             np.round(d.scores.astype(np.float64), 6).tolist(), categories)]
