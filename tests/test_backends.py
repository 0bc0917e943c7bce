"""Conformance of every registered backend: built and loaded through the artifact cache, outputs
against the FP32 PyTorch reference at batch 1, 7 and 32 (fp32 on the mmdet reference checkpoint,
fp16 / bf16 on the trained fixture model), a complete describe(), and a package
that imports and lists its backends with no vendor SDK present.
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rtmbench.artifacts import open_engine
from rtmbench.backends import BUILTIN_BACKENDS, backend_names, get_backend
from rtmbench.checkpoint import load_weights
from rtmbench.cache import ArtifactCache
from rtmbench.errors import RtmbenchError
from rtmbench.fidelity import output_errors
from rtmbench.model import OUTPUT_NAMES, RTMDet, get_spec
from rtmbench.model.blocks import fuse_batchnorms

BATCHES = (1, 7, 32)
CASES = [(name, precision) for name in backend_names() for precision in get_backend(name).precisions]

FP32_TOLERANCE = 1e-3  # max |Δ| / max |reference|, per output, on the mmdet reference checkpoint
# FP16 / BF16 are checked on the trained fixture model instead. The reference checkpoint is
# ill-conditioned (untrained weights): rounding only its input moves outputs by 3.5-12 % of their
# range in fp16 and 17-51 % in bf16, so no tolerance there tells an honest engine from a broken one.
# The yardstick is the fixture model computed wholly in that precision by torch on the CPU
# (BatchNorms folded, as engines fold them): an engine may be at most this many times as far from
# FP32 as that. Measured at batch 32: ONNX Runtime fp16 0.5-0.7 times it, OpenVINO bf16 0.5-1.0
# (fp16 yardstick 1.2e-3 to 9.7e-3 of each output's range, bf16 1.1e-2 to 5.0e-2).
REDUCED_PRECISION_FACTOR = 2.0
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FIXTURE_MODEL = "rtmdet-nano-synthetic"
FIXTURE_WEIGHTS = Path(__file__).resolve().parents[1] / "fixtures" / "rtmdet-nano-synthetic.pth"

# Vendor SDKs (and cuda-python) made unimportable in the subprocess checks.
SDK_MODULES = ("tensorrt", "ixrt", "tvm", "cuda")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> ArtifactCache:
    return ArtifactCache(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="module")
def inputs(reference) -> np.ndarray:
    """float32[32, 3, 320, 320]: the six preprocessed reference images, shifted 8 px per repeat
    so that every row differs (a row-order mix-up cannot pass)."""
    images = reference.golden["inputs"]
    return np.stack([np.roll(images[i % len(images)], 8 * (i // len(images)), axis=-1) for i in range(32)])


@pytest.fixture(scope="module")
def fixture_model():
    """The trained fixture model (well-conditioned), eval mode (treat as read-only)."""
    model = RTMDet(get_spec(FIXTURE_MODEL)).eval()
    load_weights(model, FIXTURE_WEIGHTS)
    return model


@pytest.fixture(scope="module")
def reference_run(reference_model, fixture_model, inputs):
    """Outputs for all 32 inputs of the model an engine of ``precision`` is checked on: the mmdet
    reference checkpoint for fp32, the fixture model otherwise; ``computed_in`` another
    precision: wholly in it (BatchNorms folded, weights and activations cast). Cached."""

    @functools.cache
    def run(precision: str, computed_in: str = "fp32") -> dict[str, np.ndarray]:
        model = reference_model if precision == "fp32" else fixture_model
        batch = torch.from_numpy(inputs)
        if computed_in != "fp32":
            model = fuse_batchnorms(copy.deepcopy(model)).to(DTYPES[computed_in])
            batch = batch.to(DTYPES[computed_in])
        with torch.inference_mode():
            return {name: out.float().numpy() for name, out in zip(OUTPUT_NAMES, model(batch))}

    return run


def _first(outputs: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    return {name: value[:batch] for name, value in outputs.items()}


def _tolerances(precision: str, batch: int, reference_run) -> dict[str, float]:
    if precision == "fp32":
        return dict.fromkeys(OUTPUT_NAMES, FP32_TOLERANCE)
    yardstick = output_errors(_first(reference_run(precision, precision), batch), _first(reference_run(precision), batch))
    return {name: REDUCED_PRECISION_FACTOR * value for name, value in yardstick.items()}


def _open_or_skip(name: str, precision: str, batch: int, cache, reference, nano_spec):
    backend = get_backend(name)
    ok, why = backend.available()
    if not ok:
        pytest.skip(f"backend {name} unavailable: {why}")
    try:
        backend.check_precision(precision)  # e.g. OpenVINO bf16 on a CPU without native bf16
    except RtmbenchError as exc:
        pytest.skip(str(exc))
    if precision == "fp32":
        return open_engine(nano_spec, reference.checkpoint, name, precision, batch, cache)
    return open_engine(get_spec(FIXTURE_MODEL), FIXTURE_WEIGHTS, name, precision, batch, cache)


@pytest.mark.fidelity
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name, precision", CASES)
def test_engine_matches_torch_reference(name, precision, batch, cache, inputs, reference_run,
                                        reference, nano_spec):
    handle = _open_or_skip(name, precision, batch, cache, reference, nano_spec)
    with handle.engine as engine:
        actual = engine.infer(inputs[:batch])
        if batch == 1:
            engine.infer_compute()
    expected = _first(reference_run(precision), batch)
    assert sorted(actual) == sorted(OUTPUT_NAMES)
    for out in OUTPUT_NAMES:
        assert actual[out].shape == expected[out].shape and actual[out].dtype == np.float32, out
    errors = output_errors(actual, expected)
    tolerances = _tolerances(precision, batch, reference_run)
    failed = {out: f"{errors[out]:.2e} > {tolerances[out]:.2e}" for out in OUTPUT_NAMES
              if not errors[out] <= tolerances[out]}
    assert not failed, f"{name} {precision} batch {batch}: {failed}; all errors {errors}"


@pytest.mark.parametrize("name, precision", CASES)
def test_describe_is_complete(name, precision, cache, reference, nano_spec):
    handle = _open_or_skip(name, precision, 1, cache, reference, nano_spec)
    handle.engine.close()
    info = handle.description
    assert info["backend"] == name and info["precision"] == precision
    assert info["version"] == get_backend(name).sdk_version()
    assert isinstance(info["device"], str) and info["device"]


def test_engine_without_a_staged_input_refuses_infer_compute(cache, reference, nano_spec):
    handle = _open_or_skip("onnxruntime", "fp32", 1, cache, reference, nano_spec)
    with handle.engine as engine, pytest.raises(RuntimeError, match="infer"):
        engine.infer_compute()


def _run_without_sdks(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where the vendor SDKs cannot be imported."""
    block = f"import sys; sys.modules.update(dict.fromkeys({SDK_MODULES!r}))\n"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", block + code], capture_output=True, text=True, env=env)


def test_package_and_every_backend_load_without_vendor_sdks():
    result = _run_without_sdks(
        "import rtmbench\n"
        "from rtmbench.backends import backend_names, get_backend\n"
        "for name in backend_names():\n"
        "    backend = get_backend(name)\n"
        "    print(name, *backend.available(), sep='|')\n")
    assert result.returncode == 0, result.stderr
    rows = {line.split("|")[0]: line.split("|")[1:] for line in result.stdout.splitlines()}
    assert set(BUILTIN_BACKENDS) <= set(rows)
    hints = {"tensorrt": "pip install tensorrt", "ixrt": "IXUCA", "igie": "IXUCA"}
    for name, hint in hints.items():
        available, why = rows[name]
        assert available == "False" and hint in why, rows[name]


def test_cli_lists_all_backends_with_reasons():
    result = _run_without_sdks("from rtmbench.cli import main; sys.exit(main(['backends']))")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert set(BUILTIN_BACKENDS) <= set(lines)
    for line in lines.values():
        _, status, reason = line.split(None, 2)
        assert status in ("available", "unavailable") and reason.strip(), line
    for name in ("tensorrt", "ixrt", "igie"):
        assert lines[name].split()[1] == "unavailable", lines[name]
