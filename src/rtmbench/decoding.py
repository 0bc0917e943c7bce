"""The detection loop's first stage: read, decode and letterbox each image, and normalize it into
its row of a batch buffer, a few batches ahead of the engine.

Two ways, one interface (:meth:`Decoder.batches`):

- :class:`ThreadDecoder`: threads of this process. OpenCV and NumPy release the GIL, but each
  image still takes it back about eight times; next to a CPU engine that is cheap, and the
  threads can yield the cores to the engine's (``SCHED_IDLE``).
- :class:`ProcessDecoder`: worker processes write letterboxed uint8 images into a shared-memory
  ring; this process normalizes each whole batch into the engine's buffer in one call. Next to a
  GPU engine, whose thread needs the GIL for every launch and copy, threads contend for it: on
  the H200's 16-core host 8 decode threads did 2,500-4,600 images/s alone but 134 beside a
  thread holding the GIL, 11 processes 4,400 and 1,100-1,200.
"""

from __future__ import annotations

import abc
import atexit
import collections
import contextlib
import functools
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from .data.preprocess import ImageMeta, decode_image, letterbox, normalize_into
from .errors import RtmbenchError
from .model import ModelSpec

LOOKAHEAD_BATCHES = 3  # batches being decoded ahead of the engine
WORKER_START_TIMEOUT = 120.0  # seconds for every decode process to start
WORKER_TASK_TIMEOUT = 10.0  # seconds a closing decoder waits for an abandoned loop's running tasks
WORKER_DIED = "a decode worker process died (out of memory, or of a full /dev/shm?)"

Item = tuple[object, Path]  # (caller's key, image path)
Loader = Callable[[Path, ModelSpec], tuple[np.ndarray, ImageMeta]]


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


def _load_or_blank(item: Item, spec: ModelSpec, loader: Loader, corrupt: str) -> tuple[np.ndarray, ImageMeta | None]:
    """``loader``'s image and meta; a blank image and None for a corrupt one unless ``corrupt='fail'``."""
    try:
        return loader(item[1], spec)
    except RtmbenchError:
        if corrupt == "fail":
            raise
        return np.zeros((*spec.input_size, 3), np.uint8), None


class Decoder(abc.ABC):
    """Fills batch buffers float32[B, 3, H, W] from image files. ``seconds`` sums the time each
    worker spent decoding (so it exceeds the wall time when they overlap); ``worker_cpu_seconds``
    the CPU time of worker processes, which this process's own CPU time does not include.
    ``waited_for_workers`` and ``completing`` are the wall seconds the thread iterating
    :meth:`batches` spent waiting for a batch's images and then completing the batch (submitting
    the next one, the processes' normalize, padding): where a slow decode stage loses its time."""

    def __init__(self, spec: ModelSpec, loader: Loader = load_letterboxed, corrupt: str = "warn"):
        if corrupt not in ("warn", "fail"):
            raise ValueError("corrupt must be 'warn' or 'fail'")
        self.spec, self.loader, self.corrupt = spec, loader, corrupt
        self.seconds = self.worker_cpu_seconds = 0.0
        self.waited_for_workers = self.completing = 0.0
        self._lock = threading.Lock()
        self._blank = np.zeros((*spec.input_size, 3), np.uint8)

    def batches(self, items: Sequence[Item], batch_size: int,
                new_batch: Callable[[tuple[int, ...]], np.ndarray] = functools.partial(np.empty, dtype=np.float32),
                ) -> Iterator[tuple[Sequence[Item], list[ImageMeta | None], np.ndarray]]:
        """Yield ``(items, metas, inputs)`` per batch of ``batch_size`` items, in order: ``inputs``
        from ``new_batch(shape)``, always ``batch_size`` rows (a short last batch is padded with
        blank images); ``metas`` None for a corrupt image. :data:`LOOKAHEAD_BATCHES` are decoded
        ahead of the one yielded."""
        starts = iter(range(0, len(items), batch_size))
        window: collections.deque = collections.deque()

        def submit_next_batch(filling: bool = False) -> None:
            if (start := next(starts, None)) is not None:
                chunk = items[start:start + batch_size]
                inputs = new_batch((batch_size, 3, *self.spec.input_size))
                window.append((chunk, inputs, self._submit(chunk, inputs, filling)))

        for _ in range(LOOKAHEAD_BATCHES):
            submit_next_batch(filling=True)
        try:
            while window:
                chunk, inputs, pending = window.popleft()
                start = time.perf_counter()
                metas = self._wait(pending)
                waited = time.perf_counter()
                submit_next_batch()  # the workers go on while this batch is finished
                self._finish(pending, chunk, inputs)
                if len(chunk) < batch_size:
                    self._pad(inputs, len(chunk))
                self.waited_for_workers += waited - start
                self.completing += time.perf_counter() - waited
                yield chunk, metas, inputs
        finally:
            for _, _, pending in window:
                self._cancel(pending)

    def _add_seconds(self, seconds: float, worker_cpu_seconds: float = 0.0) -> None:
        with self._lock:
            self.seconds += seconds
            self.worker_cpu_seconds += worker_cpu_seconds

    def _pad(self, inputs: np.ndarray, first: int) -> None:
        """Rows ``first``... of ``inputs``: the normalized blank image (a short batch's padding).
        Normalized once and copied, not normalized from a read-only broadcast: numba compiles a
        kernel per kind of array, and that kind would be compiled inside the loop (0.2-0.3 s here, cold cache)."""
        normalize_into(self._blank[None], inputs[first:first + 1], self.spec.mean, self.spec.std)
        inputs[first + 1:] = inputs[first]

    def warm_up(self) -> None:
        """Compile numba's normalize (or load it from its cache) before any clock starts."""
        self._pad(np.empty((1, 3, *self.spec.input_size), np.float32), 0)

    @abc.abstractmethod
    def _submit(self, chunk: Sequence[Item], inputs: np.ndarray, filling: bool):
        """Start decoding ``chunk`` into ``inputs[:len(chunk)]``; a handle for :meth:`_wait`.
        ``filling``: one of the first batches, submitted together while nothing is decoded yet."""

    @abc.abstractmethod
    def _wait(self, pending) -> list[ImageMeta | None]:
        """Wait for the workers on a batch :meth:`_submit` started; its metas."""

    def _finish(self, pending, chunk: Sequence[Item], inputs: np.ndarray) -> None:
        """Complete ``inputs`` of a batch :meth:`_wait` returned, after the next batch was submitted."""

    @staticmethod
    def _cancel(pending) -> None:
        for future in pending:
            future.cancel()

    def close(self) -> None:
        """Release the workers' resources; decoding that is still running is abandoned."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class ThreadDecoder(Decoder):
    """One task per image on ``workers`` threads, each normalizing straight into its row."""

    def __init__(self, spec: ModelSpec, workers: int, loader: Loader = load_letterboxed, corrupt: str = "warn",
                 initializer: Callable[[], None] | None = None):
        super().__init__(spec, loader, corrupt)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rtmbench-decode",
                                        initializer=initializer)

    def _load_row(self, item: Item, inputs: np.ndarray, row: int) -> ImageMeta | None:
        start = time.perf_counter()
        try:
            image, meta = _load_or_blank(item, self.spec, self.loader, self.corrupt)
            normalize_into(image, inputs[row], self.spec.mean, self.spec.std)
            return meta
        finally:
            self._add_seconds(time.perf_counter() - start)

    def _submit(self, chunk, inputs, filling) -> list[Future]:
        return [self._pool.submit(self._load_row, item, inputs, row) for row, item in enumerate(chunk)]

    def _wait(self, pending):
        return [future.result() for future in pending]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class ProcessDecoder(Decoder):
    """Tasks of a few images each on ``workers`` processes (kept for the next decoder with as
    many), writing into a ring of uint8 batches in shared memory: :data:`LOOKAHEAD_BATCHES`
    being decoded and one being normalized into its batch buffer here, its rows split among
    ``normalize_threads`` threads (this one included).

    That normalize is the one serial step: on the H200's host it took 6.5 ms a batch on one
    thread (a ceiling of 4,900 images/s; decode alone stayed at 4,400 from 11 to 14 workers).
    It is bound by one core's memory bandwidth, so threads share it out: on 2 cores 2.5 ms a
    batch on one thread, 1.4-2.0 on two."""

    def __init__(self, spec: ModelSpec, workers: int, batch_size: int, loader: Loader = load_letterboxed,
                 corrupt: str = "warn", normalize_threads: int = 1):
        super().__init__(spec, loader, corrupt)
        shape = (LOOKAHEAD_BATCHES + 1, batch_size, *spec.input_size, 3)
        self._workers, self._pool = workers, _process_pool(workers)
        self._shape, self._memory = shape, _take_ring(shape)
        self._ring = np.ndarray(shape, np.uint8, self._memory.buf)
        self._free_slots = list(range(shape[0]))
        self._running: set[Future] = set()  # tasks submitted and not yet waited for
        # Once running, tasks of a few images, enough that every worker has one while the window
        # is full (the fewer tasks, the less of this process's time they take). While the window
        # first fills, each batch is spread over every worker, so that the first is ready after a
        # third of the time the window takes (H200 host: an estimated 15 ms sooner, 3 images a
        # task instead of 9).
        self._per_task = max(1, -(-LOOKAHEAD_BATCHES * batch_size // workers))
        self._per_task_filling = max(1, -(-batch_size // workers))
        self._normalize_threads = max(1, normalize_threads)
        self._normalizers = ThreadPoolExecutor(self._normalize_threads - 1, thread_name_prefix="rtmbench-normalize") \
            if self._normalize_threads > 1 else None

    def warm_up(self) -> None:
        super().warm_up()
        seen: set[int] = set()
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        with _broken_pool_as("a decode worker process failed to start (its error is above; a script that runs "
                             "the detection loop needs `if __name__ == '__main__':`, as multiprocessing says)"):
            while len(seen) < self._workers:  # every worker answered: one still importing would idle in the loop
                if time.monotonic() > deadline:
                    raise RtmbenchError(f"only {len(seen)} of {self._workers} decode worker processes "
                                        f"started within {WORKER_START_TIMEOUT} s")
                answers = [self._pool.submit(_start_worker) for _ in range(self._workers)]
                seen |= {future.result(timeout=max(0.0, deadline - time.monotonic())) for future in answers}

    def _submit(self, chunk, inputs, filling):
        slot = self._free_slots.pop()
        per_task = self._per_task_filling if filling else self._per_task
        with _broken_pool_as(WORKER_DIED):  # a worker died on an earlier batch while this loop went on
            futures = [self._pool.submit(_decode_into_ring, self._memory.name, self._ring.shape, slot, first,
                                         chunk[first:first + per_task], self.spec, self.loader, self.corrupt)
                       for first in range(0, len(chunk), per_task)]
        self._running.update(futures)
        return slot, futures

    def _wait(self, pending):
        metas = []
        with _broken_pool_as(WORKER_DIED):
            for future in pending[1]:
                task_metas, seconds, cpu_seconds = future.result()
                metas += task_metas
                self._add_seconds(seconds, cpu_seconds)
        self._running.difference_update(pending[1])
        return metas

    def _finish(self, pending, chunk, inputs):
        slot = pending[0]

        def normalize_rows(rows: slice) -> None:
            normalize_into(self._ring[slot, rows], inputs[rows], self.spec.mean, self.spec.std)

        start = time.perf_counter()
        bounds = np.linspace(0, len(chunk), min(self._normalize_threads, len(chunk)) + 1).astype(int)
        parts = [slice(first, end) for first, end in zip(bounds[:-1], bounds[1:])]
        others = [self._normalizers.submit(normalize_rows, rows) for rows in parts[1:]]
        normalize_rows(parts[0])
        for future in others:
            future.result()
        self._add_seconds(time.perf_counter() - start)
        self._free_slots.append(slot)

    @staticmethod
    def _cancel(pending) -> None:
        Decoder._cancel(pending[1])

    def close(self) -> None:
        if self._normalizers is not None:
            self._normalizers.shutdown()
        # an abandoned loop's tasks that already started write on: the next decoder may take the ring after them
        finished = not wait(self._running, timeout=WORKER_TASK_TIMEOUT).not_done
        del self._ring  # the mapping cannot close while a view of it exists
        _return_ring(self._memory, self._shape, reusable=finished)


SHARED_MEMORY_DIR = Path("/dev/shm")  # where Linux keeps multiprocessing's shared memory
_idle_rings: dict[tuple[int, ...], shared_memory.SharedMemory] = {}  # closed decoders' rings, by shape


def _take_ring(shape: tuple[int, ...]) -> shared_memory.SharedMemory:
    """A uint8 ring of ``shape`` in shared memory: a closed decoder's, else a new one. Reused
    because the workers keep the ring they last wrote into mapped until they get another: a new
    ring per loop would hold two rings' worth (on a container's 64 MB /dev/shm, one too many)."""
    if (memory := _idle_rings.pop(shape, None)) is not None:
        return memory
    _unlink_idle_rings()  # other shapes': their memory is freed as the workers move on
    size = int(np.prod(shape))
    _check_shared_memory(size)
    memory = shared_memory.SharedMemory(create=True, size=size)
    np.ndarray(shape, np.uint8, memory.buf).fill(0)  # pages are allocated as first written: now, not in a loop
    return memory


def _return_ring(memory: shared_memory.SharedMemory, shape: tuple[int, ...], reusable: bool) -> None:
    """Keep a closed decoder's ring for the next decoder of its shape (unlinked at exit), or
    unlink it when it may still be written into or one of its shape is kept already."""
    if reusable and shape not in _idle_rings and not sys.is_finalizing():  # (at exit: unlinked after atexit ran)
        _idle_rings[shape] = memory
        _unlink_idle_rings_at_exit()
    else:
        _unlink(memory)


def _unlink(memory: shared_memory.SharedMemory) -> None:
    memory.close()
    memory.unlink()  # workers still writing keep their own mapping until they move on


def _unlink_idle_rings() -> None:
    while _idle_rings:
        _unlink(_idle_rings.popitem()[1])


@functools.cache
def _unlink_idle_rings_at_exit() -> None:
    atexit.register(_unlink_idle_rings)


def _check_shared_memory(size: int) -> None:
    """Refuse a ring that does not fit: shared memory is allocated as it is written, and a worker
    writing past a full /dev/shm dies of SIGBUS (a container's default is 64 MB)."""
    if SHARED_MEMORY_DIR.is_dir() and (free := shutil.disk_usage(SHARED_MEMORY_DIR).free) < size:
        raise RtmbenchError(f"{SHARED_MEMORY_DIR}: {size / 2**20:.0f} MiB of shared memory needed for the "
                            f"decode processes' ring, {free / 2**20:.0f} MiB free (give a container more with "
                            f"--shm-size, or decode in threads)")


_pools: dict[int, ProcessPoolExecutor] = {}  # by worker count


def _process_pool(workers: int) -> ProcessPoolExecutor:
    """One pool per worker count for the process's lifetime (spawning costs about a second), a
    new one where a worker died while it was idle (the OOM killer). Spawned, not forked: forking
    a process that runs CUDA and helper threads is unsafe."""
    if workers not in _pools or _pools[workers]._broken:
        _end_workers_on_sigterm()
        _pools[workers] = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                              initializer=_init_worker)
    return _pools[workers]


def _end_workers_on_sigterm() -> None:
    """Where SIGTERM (``timeout``, a cancelled CI job, ``docker stop``) has its default action,
    end the decode workers before it ends the process: they would outlive it, and keep its ring
    in /dev/shm from being removed (multiprocessing's resource tracker removes it once they are
    gone). Nothing else changes, and nothing is unwound: an exception raised wherever the signal
    lands can leave a lock of concurrent.futures held, and the process hung at exit."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _end_workers_and_die)


def _end_workers_and_die(signum, frame) -> None:
    for pool in list(_pools.values()):
        for process in list(pool._processes.values()):
            process.terminate()  # a system call: no lock the interrupted code may hold
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@contextlib.contextmanager
def _broken_pool_as(message: str):
    """A worker that died breaks its pool: one clear error, and the next decoder gets a new pool."""
    try:
        yield
    except BrokenProcessPool:  # (the next decoder gets a new pool: _process_pool)
        raise RtmbenchError(message) from None


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # each worker is one core's share; OpenCV's own pool would oversubscribe
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the loop's to handle, not each worker's


def _start_worker() -> int:
    """Answered by a started worker; it takes a moment, so that no worker answers for another."""
    time.sleep(0.01)
    return os.getpid()


_attached: dict[str, shared_memory.SharedMemory] = {}  # in a worker: the ring it writes into, by name


def _decode_into_ring(ring_name: str, shape: tuple[int, ...], slot: int, first: int, items: Sequence[Item],
                      spec: ModelSpec, loader: Loader, corrupt: str) -> tuple[list[ImageMeta | None], float, float]:
    """In a worker: letterbox ``items`` into rows ``first``... of ring slot ``slot``; their metas,
    and the seconds and CPU seconds it took."""
    start, cpu_start = time.perf_counter(), time.process_time()
    if ring_name not in _attached:  # another ring than the last: the last is unlinked or kept by the parent
        while _attached:
            _attached.popitem()[1].close()
        _attached[ring_name] = shared_memory.SharedMemory(ring_name)
    memory = _attached[ring_name]
    metas = []
    for row, item in enumerate(items, first):
        image, meta = _load_or_blank(item, spec, loader, corrupt)
        # a temporary view: one kept alive would stop the mapping closing when the ring changes
        np.ndarray(shape, np.uint8, memory.buf)[slot, row] = image
        metas.append(meta)
    return metas, time.perf_counter() - start, time.process_time() - cpu_start
