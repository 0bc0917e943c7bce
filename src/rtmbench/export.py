"""torch → ONNX (input ``input`` float32[B, 3, H, W], dynamic batch) → onnxsim.

Outputs, in order: ``cls_score_0..2`` float32[B, C, H/s, W/s] (logits) and ``bbox_pred_0..2``
float32[B, 4, H/s, W/s] (distances in input pixels), strides s = 8, 16, 32.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import RtmbenchError, first_line
from .fsutil import atomic_path
from .model import OUTPUT_NAMES

if TYPE_CHECKING:
    import onnx

    from .model import RTMDet

log = logging.getLogger(__name__)

OPSETS = (13, 17)  # torch's TorchScript exporter writes both; 13 is the seed's
DEFAULT_OPSET = OPSETS[0]
SIMPLIFIERS = ("onnxsim", "onnxslim")  # simplify's tools, in the order it tries them
INPUT_NAME = "input"


def simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """Simplify with onnxsim, else (not installed, or it failed) onnxslim; returns the model and
    the tool (with version) used, or the model as it was and 'none', with a warning saying why."""
    try:
        import onnxsim
    except ImportError:
        why = "onnxsim is not installed"
    else:
        try:
            simplified, ok = onnxsim.simplify(model)
        except Exception as exc:  # it runs the graph in ONNX Runtime to check: errors of many types
            why = f"onnxsim failed ({first_line(exc)})"
        else:
            if ok:
                return simplified, f"onnxsim {onnxsim.__version__}"
            why = "onnxsim could not validate its simplification"
        log.warning("%s; trying onnxslim", why)
    try:
        import onnxslim
    except ImportError:
        warnings.warn(f"{why} and onnxslim is not installed: the ONNX model is not simplified")
        return model, "none"
    return onnxslim.slim(model), f"onnxslim {onnxslim.__version__}"


def export_onnx(model: RTMDet, out: str | Path, opset: int = DEFAULT_OPSET,
                do_simplify: bool = True) -> str:
    """Write ``model`` as ONNX to ``out`` atomically; returns the simplifier used ('none' if off)."""
    if opset not in OPSETS:
        raise RtmbenchError(f"opset {opset} is not supported: use {' or '.join(map(str, OPSETS))} "
                            f"(default {DEFAULT_OPSET})")
    import onnx  # torch and onnx only when exporting: this module's constants are read by the CLI
    import torch

    height, width = model.spec.input_size
    dummy = torch.zeros(1, 3, height, width)
    batch_axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    model = model.eval()
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter supports opset 13
        torch.onnx.export(model, dummy, str(tmp), input_names=[INPUT_NAME],
                          output_names=list(OUTPUT_NAMES), dynamic_axes=batch_axes,
                          opset_version=opset, dynamo=False)
        onnx_model = onnx.load(str(tmp))
        tool = "none"
        if do_simplify:
            onnx_model, tool = simplify(onnx_model)
        onnx_model.producer_name = "rtmbench"
        onnx.checker.check_model(onnx_model)
        onnx.save(onnx_model, str(tmp))
    log.info("exported %s (opset %d, simplifier %s)", out, opset, tool)
    return tool
