"""RTMDet in plain PyTorch with mmdet's parameter names (see README: relation to mmdet).

The specs need no torch; :class:`RTMDet` imports it on first use, so that loading a cached
ONNX Runtime or OpenVINO engine never does.
"""

from .spec import OUTPUT_NAMES, ModelSpec, TestConfig, get_spec, model_table

__all__ = ["OUTPUT_NAMES", "RTMDet", "ModelSpec", "TestConfig", "get_spec", "model_table"]


def __getattr__(name: str):
    if name == "RTMDet":
        from .rtmdet import RTMDet

        return RTMDet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
