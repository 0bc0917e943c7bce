"""Checkpoint layouts real OpenMMLab training produces, and bad checkpoints."""

from __future__ import annotations

import pickle
import sys
import types

import numpy as np
import pytest
import torch

from rtmbench.checkpoint import load_weights, read_checkpoint
from rtmbench.errors import RtmbenchError
from rtmbench.model import RTMDet


@pytest.fixture(scope="module")
def state(reference):
    return torch.load(reference.checkpoint, weights_only=True)["state_dict"]


@pytest.fixture
def fake_mmengine(monkeypatch):
    """A stand-in ``mmengine.logging.history_buffer.HistoryBuffer`` so tests can pickle one."""
    module = types.ModuleType("mmengine.logging.history_buffer")

    class HistoryBuffer:
        def __init__(self):
            self._log_history = np.array([0.5, 0.25])

    HistoryBuffer.__module__ = module.__name__
    HistoryBuffer.__qualname__ = "HistoryBuffer"
    module.HistoryBuffer = HistoryBuffer
    for name in ("mmengine", "mmengine.logging"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return HistoryBuffer


def perturbed(state, delta):
    return {k: v + delta if v.is_floating_point() else v for k, v in state.items()}


def test_mmengine_checkpoint_with_numpy_and_history_buffers(tmp_path, state, fake_mmengine, nano_spec):
    ckpt = {"meta": {"dataset_meta": {"classes": ("person",), "palette": [(220, 20, 60)]},
                     "seed": np.int64(0), "epoch": 100, "mmengine_version": "0.10.7"},
            "state_dict": state, "message_hub": {"log_scalars": {"loss": fake_mmengine()}},
            "ema_state_dict": {"steps": torch.tensor(7), **{f"module.{k}": v for k, v in perturbed(state, 1).items()}}}
    path = tmp_path / "epoch_100.pth"
    torch.save(ckpt, path)
    model = RTMDet(nano_spec)
    meta = load_weights(model, path)
    assert meta["dataset_meta"]["classes"] == ("person",)
    # mmengine's EMAHook saves the EMA weights in state_dict (the raw ones go to ema_state_dict).
    key = "bbox_head.rtm_reg.0.bias"
    torch.testing.assert_close(model.state_dict()[key], state[key])


@pytest.mark.parametrize("layout", ["plain", "module_prefix", "ema_only", "model_key"])
def test_other_layouts_load(tmp_path, state, layout, nano_spec):
    wrapped = {
        "plain": state,
        "module_prefix": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
        "ema_only": {"ema_state_dict": {"steps": torch.tensor(3), **{f"module.{k}": v for k, v in state.items()}}},
        "model_key": {"model": state},
    }[layout]
    path = tmp_path / f"{layout}.pth"
    torch.save(wrapped, path)
    loaded, _ = read_checkpoint(path)
    assert loaded.keys() == state.keys()
    load_weights(RTMDet(nano_spec), path)


def test_wrong_architecture_is_one_line_naming_keys(tmp_path, state, nano_spec):
    bad = dict(state)
    bad.pop("bbox_head.rtm_cls.0.bias")
    bad["bbox_head.rtm_cls.0.weight"] = torch.zeros(80, 64, 1, 1)
    bad["extra.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.pth"
    torch.save({"state_dict": bad}, path)
    with pytest.raises(RtmbenchError) as info:
        load_weights(RTMDet(nano_spec), path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "missing (1): bbox_head.rtm_cls.0.bias" in message
    assert "unexpected (1): extra.weight" in message
    assert "bbox_head.rtm_cls.0.weight (80, 64, 1, 1)≠(1, 64, 1, 1)" in message


def test_corrupt_and_truncated_files_are_one_clear_error(tmp_path, reference):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(reference.checkpoint.read_bytes()[:100_000])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    for path in (truncated, garbage, tmp_path / "missing.pth"):
        with pytest.raises(RtmbenchError, match=str(path)):
            read_checkpoint(path)


class _Exploit:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch's note on protocol 4, expected
@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_code_in_a_pickle_is_never_run(tmp_path, monkeypatch, protocol):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": _Exploit()}, f, protocol=protocol)
    with pytest.raises(RtmbenchError) as refused:
        read_checkpoint(path)
    message = str(refused.value)  # torch's reason, not its page of advice around it
    assert message.startswith(f"{path}: not a loadable checkpoint (") and "\n" not in message
    assert "Weights only load failed" not in message and "\x1b" not in message
    if protocol == 2:  # (at protocol 4 torch stops earlier, at its FRAME opcode)
        assert message.endswith("(it needs exec, which may run code and is not allow-listed)")
    assert not (tmp_path / "PWNED").exists()


def test_a_config_pickled_as_mmengine_configdicts_loads_as_plain_dicts(tmp_path, state, monkeypatch):
    """mmengine's ConfigDict is an addict dict (``__getstate__`` returns itself); the weights-only
    unpickler fills no mapping but a dict, OrderedDict or Counter."""
    module = types.ModuleType("mmengine.config.config")

    class ConfigDict(dict):
        def __getstate__(self):
            return self

        def __setstate__(self, state):
            self.update(state)

    ConfigDict.__module__, ConfigDict.__qualname__ = module.__name__, "ConfigDict"
    module.ConfigDict = ConfigDict
    for name in ("mmengine", "mmengine.config"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    path = tmp_path / "with_cfg.pth"
    torch.save({"state_dict": state, "meta": {"cfg": ConfigDict(model=ConfigDict(type="RTMDet"))}}, path)
    monkeypatch.delitem(sys.modules, module.__name__)  # as on a machine without mmengine
    weights, meta = read_checkpoint(path)
    assert len(weights) == len(state) and meta["cfg"] == {"model": {"type": "RTMDet"}}



def test_non_finite_weights_are_named_in_a_warning(state, tmp_path, nano_spec, caplog):
    def warnings_loading(weights: dict, path) -> list[str]:
        torch.save({"state_dict": weights}, path)
        caplog.clear()
        with caplog.at_level("WARNING", logger="rtmbench.checkpoint"):
            load_weights(RTMDet(nano_spec), path)
        return [r.getMessage() for r in caplog.records]

    broken = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    [message] = warnings_loading(broken, tmp_path / "nan.pth")
    floating = sum(v.is_floating_point() for v in state.values())
    assert message.startswith(f"{tmp_path / 'nan.pth'}: {floating} of {len(state)} weight tensors hold NaN or inf")
    assert warnings_loading(state, tmp_path / "ok.pth") == []
