"""The detection loop's decoders: threads and processes give the same batches, corrupt images and
dead workers are clear, and the shared-memory ring never outlives its decoder."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time
import types
import zlib
from multiprocessing import shared_memory

import cv2
import numpy as np
import pytest

from rtmbench import decoding, runner
from rtmbench.backends.base import Engine
from rtmbench.data import preprocess
from rtmbench.decoding import ProcessDecoder, ThreadDecoder
from rtmbench.errors import RtmbenchError


@pytest.fixture
def images(tmp_path):
    """11 JPEG/PNG files of assorted sizes and one that is not an image, as (key, path) items."""
    rng = np.random.default_rng(0)
    items = []
    for i, (h, w) in enumerate([(240, 320), (320, 240), (17, 500), (480, 640)] * 3):
        path = tmp_path / f"{i}.{'png' if i % 2 else 'jpg'}"
        if i == 5:
            path.write_bytes(b"not an image")
        else:
            cv2.imwrite(str(path), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        items.append((i, path))
    return items


def _decoded(decoder, items, batch_size=4):
    with decoder:
        decoder.warm_up()
        return [(list(chunk), metas, inputs.copy()) for chunk, metas, inputs in decoder.batches(items, batch_size)]


@pytest.mark.parametrize("normalize_threads", [1, 3])
def test_processes_fill_the_same_batches_as_threads(images, nano_spec, monkeypatch, normalize_threads):
    by_threads = _decoded(ThreadDecoder(nano_spec, 2), images)
    rows_by_pool_threads = []

    def normalize_into(image, out, *args):
        if threading.current_thread() is not threading.main_thread():
            rows_by_pool_threads.append(len(out))
        preprocess.normalize_into(image, out, *args)

    monkeypatch.setattr(decoding, "normalize_into", normalize_into)
    by_processes = _decoded(ProcessDecoder(nano_spec, 2, 4, normalize_threads=normalize_threads), images)
    # each batch's 4 rows split 1 + 1 + 2: the loop's thread takes the first part, the pool the others.
    # (Counting distinct threads would race: a pool thread that is idle again takes the next part too.)
    assert sorted(rows_by_pool_threads) == ([1, 1, 1, 2, 2, 2] if normalize_threads == 3 else [])
    assert len(by_threads) == len(by_processes) == 3
    for (chunk_t, metas_t, inputs_t), (chunk_p, metas_p, inputs_p) in zip(by_threads, by_processes):
        assert chunk_t == chunk_p and metas_t == metas_p
        assert inputs_t.tobytes() == inputs_p.tobytes()
    metas = [meta for _, batch_metas, _ in by_processes for meta in batch_metas]
    assert metas[5] is None and all(meta is not None for i, meta in enumerate(metas) if i != 5)
    assert metas[2].ori_shape == (17, 500)


def test_a_short_last_batch_is_padded_with_blank_rows(images, nano_spec):
    # 2 images in the last batch: split among 2 of the 3 normalize threads
    *_, (chunk, metas, inputs) = _decoded(ProcessDecoder(nano_spec, 2, 5, normalize_threads=3), images, batch_size=5)
    assert len(chunk) == len(metas) == 2 and inputs.shape[0] == 5
    blank = (np.float32(0) - np.float32(nano_spec.mean[0])) / np.float32(nano_spec.std[0])
    assert np.all(inputs[2:, 0] == blank) and not np.all(inputs[:2, 0] == blank)


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_warm_up_compiles_every_kind_of_array_the_loop_normalizes(images, nano_spec, monkeypatch, processes):
    """numba compiles a kernel per kind of array (dimensions, layout, read-only): one the loop
    meets only after warm_up compiles inside the timed loop (0.2-0.3 s, a GPU loop of 500 images 0.3 s)."""
    numba = pytest.importorskip("numba")
    kinds, phase = {"warm-up": set(), "loop": set()}, ["warm-up"]

    def normalize_into(images, out, mean, std):
        as_batch = lambda a: a if a.ndim == 4 else a[None]  # noqa: E731 (as normalize_into passes it)
        kinds[phase[0]].add((numba.typeof(as_batch(images)), numba.typeof(as_batch(out))))
        preprocess.normalize_into(images, out, mean, std)

    monkeypatch.setattr(decoding, "normalize_into", normalize_into)
    decoder = ProcessDecoder(nano_spec, 2, 5) if processes else ThreadDecoder(nano_spec, 2)
    with decoder:
        decoder.warm_up()
        phase[0] = "loop"
        batches = list(decoder.batches(images, 5))  # 12 images: a short last batch, padded
    assert len(batches[-1][0]) == 2 and kinds["loop"] and kinds["loop"] <= kinds["warm-up"], kinds


def test_the_first_batches_are_spread_over_every_worker_then_tasks_grow(images, nano_spec):
    """While the window first fills, each batch is split among all workers (the first is ready
    soonest); after, tasks are larger (fewer for this process to hand out)."""
    decoder = ProcessDecoder(nano_spec, 2, 4)
    task_sizes = []

    class RecordingPool:
        def __init__(self, pool):
            self.pool = pool

        def submit(self, fn, *args):
            if fn is decoding._decode_into_ring:
                task_sizes.append(len(args[4]))
            return self.pool.submit(fn, *args)

    decoder._pool = RecordingPool(decoder._pool)
    assert len(_decoded(decoder, images * 2)) == 6
    assert task_sizes == [2, 2] * decoding.LOOKAHEAD_BATCHES + [4] * (6 - decoding.LOOKAHEAD_BATCHES)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` × ``height`` and whose pixel data is cut short."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(10)))
            + chunk(b"IEND", b""))


def test_an_image_opencv_refuses_is_corrupt_and_a_sliver_is_letterboxed(tmp_path, nano_spec):
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header(999_999, 4000))  # beyond OpenCV's pixel limit: it raises, not returns None
    with pytest.raises(RtmbenchError, match=f"{huge}: cannot decode image \\(OpenCV: pixels"):
        decoding.load_letterboxed(huge, nano_spec)
    assert decoding._load_or_blank((0, huge), nano_spec, decoding.load_letterboxed, "warn")[1] is None
    sliver = tmp_path / "sliver.png"
    cv2.imwrite(str(sliver), np.full((1, 4000, 3), 200, np.uint8))  # its height rounds to 0 at 320 wide
    image, meta = decoding.load_letterboxed(sliver, nano_spec)
    assert image.shape == (*nano_spec.input_size, 3) and np.all(image[0, :320] == 200) and np.all(image[1:] == 114)
    assert meta.ori_shape == (1, 4000) and meta.scale_factor == (0.08, 1.0)


def test_corrupt_image_fails_naming_the_file_when_asked(images, nano_spec):
    with pytest.raises(RtmbenchError, match=f"{images[5][1]}: cannot decode image"):
        _decoded(ProcessDecoder(nano_spec, 2, 4, corrupt="fail"), images)


def _die(path, spec):
    os._exit(3)


def _die_from_the_third_image(path, spec):
    if int(path.stem) >= 2:
        os._exit(3)
    return decoding.load_letterboxed(path, spec)


@pytest.mark.parametrize("loader", [_die, _die_from_the_third_image], ids=["waited-for", "while-the-loop-went-on"])
def test_a_dead_worker_is_one_clear_error_and_the_next_loop_gets_a_new_pool(images, nano_spec, loader):
    with pytest.raises(RtmbenchError, match="a decode worker process died"):
        with ProcessDecoder(nano_spec, 2, 1, loader=loader) as decoder:
            decoder.warm_up()
            for _ in decoder.batches(images, 1):
                time.sleep(0.5)  # a slower engine: the next batches were decoded, or their worker died, meanwhile
    assert len(_decoded(ProcessDecoder(nano_spec, 2, 4), images)) == 3


def _ring_name(spec, batch_size: int) -> str:
    with ProcessDecoder(spec, 2, batch_size) as decoder:
        return decoder._memory.name


def test_one_ring_serves_every_loop_of_its_shape_and_none_outlives_the_process(nano_spec):
    """The workers keep the last ring mapped: a new one per loop would hold twice the memory."""
    first = _ring_name(nano_spec, 4)
    assert _ring_name(nano_spec, 4) == first
    other = _ring_name(nano_spec, 5)  # another shape: the kept ring is unlinked
    assert other != first
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(first)
    script = ("from rtmbench.decoding import ProcessDecoder\nfrom rtmbench.model import get_spec\n"
              "if __name__ == '__main__':\n"
              "    with ProcessDecoder(get_spec('rtmdet-nano-person'), 1, 4) as decoder:\n"
              "        print(decoder._memory.name)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert "leaked" not in done.stderr
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(done.stdout.strip())


def test_a_pool_broken_while_idle_is_replaced_for_the_next_loop(images, nano_spec):
    """A worker killed between loops (the OOM killer) broke the cached pool: the next loop used
    it and reported that its workers failed to start."""
    with ProcessDecoder(nano_spec, 2, 4) as decoder:
        decoder.warm_up()
        os.kill(next(iter(decoder._pool._processes)), 9)
    deadline = time.monotonic() + 30
    while not decoder._pool._broken and time.monotonic() < deadline:
        time.sleep(0.05)
    assert decoder._pool._broken
    assert len(_decoded(ProcessDecoder(nano_spec, 2, 4), images)) == 3


@pytest.mark.parametrize("how", ["sigterm", "generator-left-at-exit"])
def test_no_worker_or_ring_outlives_a_terminated_or_exiting_process(tmp_path, how):
    """SIGTERM (a cancelled CI job) ends the decode workers too, which then no longer keep the
    ring from being removed; a loop still open when the interpreter exits (a generator kept in a
    global) does not keep its ring past the atexit cleanup."""
    script = ("import time\nfrom rtmbench import runner\nfrom rtmbench.decoding import ProcessDecoder\n"
              "from rtmbench.model import get_spec\n"
              "def slow(path, spec):\n    time.sleep(0.05)\n    return runner.load_letterboxed(path, spec)\n"
              "def loop(decoder):\n    with decoder:\n        yield from decoder.batches([(i, 'missing.jpg') for i in range(400)], 4)\n"
              "if __name__ == '__main__':\n"
              "    decoder = ProcessDecoder(get_spec('rtmdet-nano-person'), 2, 4, loader=slow)\n"
              "    decoder.warm_up()\n"
              "    print(decoder._memory.name, *decoder._pool._processes, flush=True)\n"
              "    batches = loop(decoder)\n"
              "    next(batches)\n"
              f"    if {how == 'sigterm'}:\n"
              "        print('looping', flush=True)\n"
              "        for _ in batches:\n"
              "            pass\n")
    (path := tmp_path / "loop.py").write_text(script)  # a file: the spawned workers import its loader from it
    child = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ring, *workers = child.stdout.readline().split()
    if how == "sigterm":
        assert child.stdout.readline().strip() == "looping"
        child.terminate()
    _, stderr = child.communicate(timeout=60)  # the resource tracker, which removes a ring left, holds stderr too
    assert child.returncode == (-signal.SIGTERM if how == "sigterm" else 0), stderr
    if how != "sigterm":  # (killed, the process cannot tell the tracker that its ring was not a leak)
        assert "leaked" not in stderr
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(ring)
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]


def _slow(path, spec):
    time.sleep(0.2)
    return decoding.load_letterboxed(path, spec)


def test_an_abandoned_loops_running_tasks_end_before_its_ring_is_reused(images, nano_spec):
    decoder = ProcessDecoder(nano_spec, 2, 4, loader=_slow)
    with decoder:
        decoder.warm_up()
        next(iter(decoder.batches(images, 4)))  # two more batches being decoded
        assert any(task.running() for task in decoder._running)
    assert all(task.done() for task in decoder._running)
    assert _ring_name(nano_spec, 4) == decoder._memory.name


class _Engine(Engine):
    def __init__(self, on_host_cores: bool):
        super().__init__("fp32")
        self.computes_on_host_cores = on_host_cores

    def _run(self, batch):
        raise NotImplementedError


def test_processes_decode_beside_a_gpu_engine_and_threads_beside_a_cpu_one(monkeypatch, nano_spec):
    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: set(range(16)))
    for on_host_cores, kind in ((True, ThreadDecoder), (False, ProcessDecoder)):
        with runner.open_decoder(_Engine(on_host_cores), nano_spec, 8) as decoder:
            assert type(decoder) is kind
    with runner.open_decoder(_Engine(True), nano_spec, 8, decode_in="processes", workers=2) as decoder:
        assert type(decoder) is ProcessDecoder
    with pytest.raises(ValueError, match="decode_in"):
        runner.open_decoder(_Engine(True), nano_spec, 8, decode_in="fibers")
    # 16 cores: 4 postprocess threads and the engine's leave 11 for decode processes
    assert (runner.default_workers(), runner.default_workers(processes=True)) == (8, 11)


def test_a_ring_that_does_not_fit_in_shared_memory_is_refused_or_decoded_in_threads(monkeypatch, tmp_path, nano_spec,
                                                                                  caplog):
    decoding._unlink_idle_rings()  # none kept from an earlier loop
    monkeypatch.setattr(decoding, "SHARED_MEMORY_DIR", tmp_path)
    monkeypatch.setattr(decoding.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=2**20))
    expected = f"{tmp_path}: 38 MiB of shared memory needed for the decode processes' ring, 1 MiB free"
    with pytest.raises(RtmbenchError, match=expected):
        runner.open_decoder(_Engine(False), nano_spec, 32, decode_in="processes")
    with runner.open_decoder(_Engine(False), nano_spec, 32) as decoder:  # auto
        assert type(decoder) is ThreadDecoder
    assert f"decoding in threads: {expected}" in caplog.text

