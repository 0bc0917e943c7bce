"""The torch-cuda backend's paths that need no GPU: device selection, provenance (NVML), cache
keys, the TF32 switch and the reason it gives where it cannot run. Its GPU half is the
conformance suite (test_backends.py) and the gates, run by tools/gpu_check.sh on a GPU."""

from __future__ import annotations

import os
import types

import pytest
import torch

from rtmbench import hostinfo
from rtmbench.backends import get_backend
from rtmbench.backends import torch_cuda
from rtmbench.errors import RtmbenchError
from rtmbench.gate import Case


def test_device_index_defaults_to_the_first_gpu_and_checks_the_variable():
    assert torch_cuda.device_index(2, env={}) == 0
    assert torch_cuda.device_index(2, env={torch_cuda.DEVICE_ENV: "1"}) == 1
    with pytest.raises(RtmbenchError, match="no such GPU .this machine has 2"):
        torch_cuda.device_index(2, env={torch_cuda.DEVICE_ENV: "2"})
    with pytest.raises(RtmbenchError, match="not a GPU index"):
        torch_cuda.device_index(2, env={torch_cuda.DEVICE_ENV: "cuda:1"})


class FakeNvml:
    def __init__(self, version=b"580.159", fail=False):
        self.version, self.fail, self.calls = version, fail, []

    def nvmlInit(self):
        self.calls.append("init")
        if self.fail:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlSystemGetDriverVersion(self):
        return self.version

    def nvmlShutdown(self):
        self.calls.append("shutdown")


@pytest.mark.parametrize("version", [b"580.159", "580.159"])
def test_driver_version_comes_from_nvml(version):
    nvml = FakeNvml(version)
    assert hostinfo.driver_version(nvml) == "580.159"
    assert nvml.calls == ["init", "shutdown"]


def test_driver_version_is_none_without_a_driver():
    assert hostinfo.driver_version(FakeNvml(fail=True)) is None


def test_unavailable_reason_names_the_cpu_build_or_the_missing_gpu():
    cpu_build = types.SimpleNamespace(__version__="2.13.0+cpu", version=types.SimpleNamespace(cuda=None))
    assert "CPU build" in torch_cuda.cuda_unavailable_reason(cpu_build)
    no_gpu = types.SimpleNamespace(__version__="2.11.0+cu130", version=types.SimpleNamespace(cuda="13.0"),
                                   cuda=types.SimpleNamespace(is_available=lambda: False))
    assert "no NVIDIA GPU visible to torch 2.11.0+cu130 (CUDA 13.0)" == torch_cuda.cuda_unavailable_reason(no_gpu)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on a machine without a GPU")
def test_gates_skip_torch_cuda_with_the_reason(gate):
    for backend in ("torch-cuda", "torch-cuda-compile"):
        why = gate.unavailable_reason(Case("rtmdet-nano-synthetic", backend, "fp16", 32))
        assert why.startswith(f"backend {backend} unavailable here: ")
        assert "CUDA" in why


def test_fp32_turns_tf32_off_and_reduced_precisions_leave_it(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    torch_cuda.set_fp32_math(torch, "fp16")
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    torch_cuda.set_fp32_math(torch, "fp32")
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


@pytest.fixture
def fake_gpu(monkeypatch):
    """A GPU as far as the backend's bookkeeping can tell (name, driver, runtime versions)."""
    facts = {"gpu": "NVIDIA H200", "driver": "580.159", "cuda_runtime": "13.0", "cudnn": "91900",
             "torch": "2.11.0+cu130"}
    monkeypatch.setattr(torch_cuda.TorchCudaBackend, "sdk_version", classmethod(lambda cls: facts["torch"]))
    monkeypatch.setattr(torch_cuda, "platform", lambda index: dict(facts))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    return facts


def test_cache_key_holds_everything_a_driver_upgrade_changes(fake_gpu, monkeypatch):
    key = get_backend("torch-cuda-compile").build_key("fp16", 32)
    assert {k: key[k] for k in fake_gpu} == fake_gpu
    assert key["device"] == "NVIDIA H200" and key["compile_mode"] == torch_cuda.COMPILE_MODE
    upgraded = dict(fake_gpu, driver="590.10")
    monkeypatch.setattr(torch_cuda, "platform", lambda index: upgraded)
    assert get_backend("torch-cuda-compile").build_key("fp16", 32) != key
    monkeypatch.setattr(torch_cuda, "platform", lambda index: dict(fake_gpu, driver=None))  # no NVML
    for module_version in ("580.159", "590.10"):
        monkeypatch.setattr(torch_cuda, "gpu_kernel_drivers", lambda v=module_version: {"kernel_driver.nvidia": v})
        key, before = get_backend("torch-cuda-compile").build_key("fp16", 32), key
        assert key["kernel_driver.nvidia"] == module_version and key != before


def test_folded_batchnorms_keep_the_outputs(reference, nano_spec, reference_model):
    """What the GPU engine runs (BatchNorms folded into the convs, a copy per head level where
    the conv is shared) against the reference model, on the ill-conditioned mmdet checkpoint:
    within the FP32 tolerance every engine is held to (folding moves it by 4e-4 of range; on
    the fixture model by 2e-6)."""
    import copy

    from rtmbench.fidelity import relative_max_error
    from rtmbench.model import OUTPUT_NAMES
    from rtmbench.model.blocks import fuse_batchnorms

    folded = fuse_batchnorms(copy.deepcopy(reference_model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    inputs = torch.from_numpy(reference.golden["inputs"])
    with torch.inference_mode():
        for name, out, ref in zip(OUTPUT_NAMES, folded(inputs), reference_model(inputs)):
            assert relative_max_error(out.numpy(), ref.numpy()) <= 1e-3, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU and a CUDA build of torch")
def test_pinned_batches_reach_the_gpu_without_the_staging_copy(reference, reference_model):
    """A batch in new_batch()'s pinned memory is copied to the device directly (the staging
    buffer keeps the previous, pageable batch) and gives the outputs the staged copy gives."""
    import copy

    import numpy as np

    engine = torch_cuda.TorchCudaEngine(copy.deepcopy(reference_model), "fp32", "cuda:0")
    first, second = reference.golden["inputs"][:2], reference.golden["inputs"][2:4]
    engine.infer(first)
    pinned = engine.new_batch(second.shape)
    pinned[...] = second
    direct = engine.infer(pinned)
    staging = engine._graph_for(second.shape)[3]
    assert np.array_equal(staging.numpy(), first)
    staged = engine.infer(second.copy())
    assert np.array_equal(staging.numpy(), second)
    for name in staged:
        np.testing.assert_array_equal(direct[name], staged[name], err_msg=name)


def test_compile_caches_are_set_for_the_block_and_restored(monkeypatch, tmp_path):
    """Both Inductor's and Triton's (torch derives Triton's from Inductor's once per process, so
    a second compile would write into the first one's artifact), restored even on an error."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    with pytest.raises(RuntimeError), torch_cuda.compile_caches_in(tmp_path):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)
        assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "triton")
        raise RuntimeError("compile failed")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere" and "TRITON_CACHE_DIR" not in os.environ
