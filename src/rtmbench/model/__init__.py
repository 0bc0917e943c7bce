"""RTMDet in plain PyTorch with mmdet's parameter names (see README: relation to mmdet)."""

from .rtmdet import OUTPUT_NAMES, RTMDet
from .spec import ModelSpec, TestConfig, get_spec, model_table

__all__ = ["OUTPUT_NAMES", "RTMDet", "ModelSpec", "TestConfig", "get_spec", "model_table"]
