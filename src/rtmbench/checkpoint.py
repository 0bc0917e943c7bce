"""Read mmdet/mmengine checkpoints safely and load them into :class:`rtmbench.model.RTMDet`.

Checkpoints are pickles; they are read with ``torch.load(weights_only=True)``, which runs no code
from the file. What real OpenMMLab checkpoints keep beside the weights (numpy arrays in ``meta``,
mmengine's ``HistoryBuffer`` in ``message_hub``) is allow-listed: numpy as itself, mmengine
classes as inert stand-ins that only hold their pickled state.
"""

from __future__ import annotations

import collections
import logging
import re
from pathlib import Path

import numpy as np
import torch

from .errors import RtmbenchError, first_line

log = logging.getLogger(__name__)


class _InertState:
    """Stand-in for an mmengine object found in a checkpoint: keeps its state, runs nothing."""

    def __setstate__(self, state):
        self.state = state


def _inert(qualname: str) -> tuple[type, str]:
    return type(qualname.rsplit(".", 1)[1], (_InertState,), {}), qualname


class _ConfigDict:
    """Stand-in for mmengine's ``ConfigDict`` (an addict dict): made as a plain OrderedDict, the
    only kind of mapping torch's weights-only unpickler fills with items."""

    def __new__(cls, *args):
        return collections.OrderedDict()


def _numpy_globals() -> list:
    """numpy arrays and scalars, under the module names of numpy 1.x and 2.x pickles."""
    from numpy._core import multiarray

    dtype_classes = [type(np.dtype(t)) for t in "?bBhHiIlLqQefdgFDGUSOMm"]
    aliased = [(getattr(multiarray, name), f"{module}.multiarray.{name}")
               for name in ("_reconstruct", "scalar") for module in ("numpy.core", "numpy._core")]
    return [*aliased, np.ndarray, np.dtype, *dtype_classes]


SAFE_GLOBALS = [
    *_numpy_globals(),
    collections.OrderedDict,
    _inert("mmengine.logging.history_buffer.HistoryBuffer"),
    _inert("mmengine.logging.message_hub.MessageHub"),
    (_ConfigDict, "mmengine.config.config.ConfigDict"),
]


def _unpickling_problem(exc: Exception) -> str:
    """torch.load's reason in a few words: the global a checkpoint needs that is not allow-listed
    (torch's own message is a page of advice around it), else its first line."""
    text = str(exc)
    if match := re.search(r"Unsupported global: GLOBAL (\S+)", text):
        return f"it needs {match.group(1)}, which may run code and is not allow-listed"
    if match := re.search(r"WeightsUnpickler error:\s*(.+)", text):
        return re.sub(r"\x1b\[[0-9;]*m", "", match.group(1)).strip()
    return first_line(exc)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Return ``(state_dict, meta)`` from an mmdet/mmengine checkpoint or a plain state dict.

    Layouts: ``{'state_dict': …}`` (mmengine; when its EMAHook ran, this already holds the EMA
    weights and ``ema_state_dict`` the raw ones, swapped at save time), ``{'ema_state_dict': …}``
    alone (EMA weights, ``module.`` prefix and ``steps`` counter), ``{'model': …}``, or a bare
    state dict. A leading ``module.`` (DataParallel / EMA wrapper) is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise RtmbenchError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
        raise RtmbenchError(f"{path}: not a loadable checkpoint ({_unpickling_problem(exc)})") from None
    if not isinstance(raw, dict):
        raise RtmbenchError(f"{path}: checkpoint holds a {type(raw).__name__}, not a dict of weights")
    meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}
    for key in ("state_dict", "model", "ema_state_dict"):
        if isinstance(raw.get(key), dict):
            state = raw[key]
            break
    else:
        state = raw
    state = {k.removeprefix("module."): v for k, v in state.items()
             if isinstance(v, torch.Tensor) and k != "steps"}
    if not state:
        raise RtmbenchError(f"{path}: checkpoint holds no weight tensors")
    return state, meta


def load_weights(model: torch.nn.Module, path: str | Path) -> dict:
    """Load a checkpoint into ``model`` strictly; returns the checkpoint's ``meta``.

    A mismatch raises one line naming the file and the first missing, unexpected or
    wrongly-shaped keys.
    """
    state, meta = read_checkpoint(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} {tuple(state[k].shape)}≠{tuple(v.shape)}" for k, v in expected.items()
                   if k in state and state[k].shape != v.shape]
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:3])}{', …' if len(keys) > 3 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected),
                                    ("wrong shape", wrong_shape)) if keys]
    if problems:
        name = getattr(getattr(model, "spec", None), "name", type(model).__name__)
        raise RtmbenchError(f"{path}: checkpoint does not match model {name}: " + "; ".join(problems))
    if non_finite := [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]:
        log.warning("%s: %d of %d weight tensors hold NaN or inf (first: %s): a broken checkpoint; "
                    "its outputs and metrics will be meaningless", path, len(non_finite), len(state), non_finite[0])
    model.load_state_dict(state, strict=True)
    return meta
