"""The detection loop's plumbing, with a stand-in engine and postprocess: order, buffers, workers."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from rtmbench import runner
from rtmbench.backends.base import Engine
from rtmbench.data import ImageMeta
from rtmbench.model import OUTPUT_NAMES
from rtmbench.postprocess import Detections


class CountingEngine(Engine):
    """Head outputs whose first value is the batch's first input value; keeps the buffers it allocated."""

    def __init__(self):
        super().__init__("fp32")
        self.buffers = []

    def _allocate_batch(self, shape):
        self.buffers.append(super()._allocate_batch(shape))
        return self.buffers[-1]

    def _run(self, batch):
        assert any(batch is buffer for buffer in self.buffers), "the loop must fill the engine's own buffers"
        return {name: np.full((len(batch), 1, 1, 1), batch[0, 0, 0, 0]) for name in OUTPUT_NAMES}


def _load(path, spec):
    """The image 'at' ``path`` (an int): a blank image whose first pixel value is the path."""
    image = np.zeros((*spec.input_size, 3), np.uint8)
    image[0, 0, 0] = path
    return image, ImageMeta(spec.input_size, (1.0, 1.0))


@pytest.mark.parametrize(("post_workers", "decode_in"), [(1, "threads"), (3, "threads"), (3, "processes")])
def test_loop_yields_in_order_whatever_order_postprocessing_ends_in(monkeypatch, nano_spec, post_workers, decode_in):
    seen_threads = set()

    def slow_postprocess(outputs, metas, *args, **kwargs):
        seen_threads.add(threading.get_ident())
        time.sleep(random.uniform(0, 0.02))  # later batches often finish first
        first = outputs["cls_score_0"][0, 0, 0, 0]
        return [Detections(np.zeros((1, 4), np.float32), np.array([first], np.float32), np.zeros(1, np.int64))
                for _ in metas]

    monkeypatch.setattr(runner, "postprocess", slow_postprocess)
    monkeypatch.setattr(runner, "warm_up", lambda *a, **k: None)
    monkeypatch.setattr(runner, "postprocess_workers", lambda: post_workers)
    items = [(i, i % 200) for i in range(203)]  # 26 batches of 8, the last one short
    engine = CountingEngine()
    predictions = list(runner.run_detector(items, engine, nano_spec, batch_size=8, progress=False, loader=_load,
                                           workers=2, decode_in=decode_in))
    assert [p.key for p in predictions] == [i for i, _ in items]
    # each batch's detections came from that batch's outputs: its first image, normalized
    mean, std = np.float32(nano_spec.mean[0]), np.float32(nano_spec.std[0])
    expected = [(np.float32(path) - mean) / std for _, path in items[::8]]
    assert [p.detections.scores[0] for p in predictions[::8]] == expected
    # allocated before the loop, then going round: as many as the loop can hold at once
    assert len(engine.buffers) == runner.batches_in_flight(post_workers) < 26
    assert 1 <= len(seen_threads) <= post_workers


def test_postprocess_and_normalize_threads_scale_with_the_cores(monkeypatch):
    for cores, expected in ((1, 1), (2, 1), (8, 2), (16, 4), (64, 4)):
        monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert runner.postprocess_workers() == runner.normalize_threads() == expected


def test_engine_batch_buffers_are_reused_by_shape_and_dropped_at_close():
    engine = CountingEngine()
    first = engine.new_batch((2, 3, 4, 4))
    engine.recycle_batch(first)
    assert engine.new_batch((2, 3, 4, 4)) is first  # no second allocation
    assert engine.new_batch((2, 3, 4, 4)) is not first and engine.new_batch((1, 3, 4, 4)).shape == (1, 3, 4, 4)
    assert len(engine.buffers) == 3
    engine.recycle_batch(first)
    engine.close()
    assert engine.new_batch((2, 3, 4, 4)) is not first
    engine.reserve_batches((5, 3, 4, 4), 2)  # allocated now, handed out later without allocating
    allocated = len(engine.buffers)
    assert engine.new_batch((5, 3, 4, 4)) is not engine.new_batch((5, 3, 4, 4)) and len(engine.buffers) == allocated


def _slow_load(path, spec):
    time.sleep(0.005)
    return _load(path, spec)


@pytest.mark.parametrize("slow", ["decode", "postprocess"])
def test_the_loop_says_where_the_engine_waited(monkeypatch, nano_spec, slow):
    def postprocess(outputs, metas, *args, **kwargs):
        time.sleep(0.02 if slow == "postprocess" else 0)
        return [Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
                for _ in metas]

    monkeypatch.setattr(runner, "postprocess", postprocess)
    monkeypatch.setattr(runner, "warm_up", lambda *a, **k: None)
    monkeypatch.setattr(runner, "postprocess_workers", lambda: 1)
    times = runner.StageTimes()
    # 48 batches of 4: 0.96 s of either stage. The batcher runs ahead of the engine by the batches
    # in flight, idle at the end: with 12 batches its share of waiting could not pass 0.67
    items = [(i, i) for i in range(192)]
    list(runner.run_detector(items, CountingEngine(), nano_spec, batch_size=4, progress=False, times=times,
                             loader=_slow_load if slow == "decode" else _load, workers=1, decode_in="threads"))
    waited = {"decode": times.waited_for_decode, "postprocess": times.waited_for_postprocess}
    other = "postprocess" if slow == "decode" else "decode"
    assert waited[slow] > 0.5 * times.wall and waited[other] < 0.25 * times.wall, waited
    # the batcher, between the decode workers and the engine, waits on the slow side
    batcher = {"decode": times.batcher_waited_for_workers, "postprocess": times.batcher_waited_for_engine}
    assert batcher[slow] > 0.5 * times.wall and batcher[other] < 0.25 * times.wall, batcher
    assert 0 <= times.batcher_completing < 0.25 * times.wall
    assert times.waits().startswith("engine waited ") and "batcher waited" in times.waits()
