"""Model variants as data: one frozen dataclass, filled from the table in ``models.yaml``."""

from __future__ import annotations

import dataclasses
from functools import cache
from importlib import resources

import yaml

# The head's raw outputs, in the order RTMDet.forward returns them (ONNX output names too).
OUTPUT_NAMES = ("cls_score_0", "cls_score_1", "cls_score_2", "bbox_pred_0", "bbox_pred_1", "bbox_pred_2")


@dataclasses.dataclass(frozen=True)
class TestConfig:
    """mmdet's ``test_cfg`` for RTMDet (defaults are the RTMDet configs' values)."""

    nms_pre: int = 30000
    score_thr: float = 0.001
    iou_threshold: float = 0.65
    max_per_img: int = 300
    min_bbox_size: float = 0.0


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Architecture and test-time pipeline of one RTMDet variant (mmdet config terms)."""

    name: str
    deepen_factor: float
    widen_factor: float
    neck_channels: int
    head_feat_channels: int
    neck_csp_blocks: int = 3
    expand_ratio: float = 0.5
    depthwise: bool = False
    channel_attention: bool = True
    head_stacked_convs: int = 2
    share_conv: bool = True
    exp_on_reg: bool = False
    class_names: tuple[str, ...] = ("person",)
    strides: tuple[int, ...] = (8, 16, 32)
    bn_eps: float = 1e-5
    input_size: tuple[int, int] = (320, 320)  # (height, width)
    pad_value: int = 114
    mean: tuple[float, float, float] = (103.53, 116.28, 123.675)  # BGR order, like the image
    std: tuple[float, float, float] = (57.375, 57.12, 58.395)
    test_cfg: TestConfig = TestConfig()
    description: str = ""

    def __post_init__(self):
        height, width = self.input_size  # (a size of another length fails here)
        if height != width:  # mmcv's scale rule fits the long side to the larger one
            raise ValueError(f"models.yaml: model {self.name!r} has input_size {list(self.input_size)}; "
                             "only a square one is supported (the keep-ratio resize would not fit a "
                             "tall image in a wide input)")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _from_dict(name: str, raw: dict) -> ModelSpec:
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    unknown = set(raw) - fields
    if unknown:
        raise ValueError(f"models.yaml: model {name!r} has unknown keys {sorted(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    if "test_cfg" in values:
        values["test_cfg"] = TestConfig(**values["test_cfg"])
    return ModelSpec(name=name, **values)


@cache
def model_table() -> dict[str, ModelSpec]:
    """All variants named in the packaged ``models.yaml``."""
    text = resources.files("rtmbench").joinpath("models.yaml").read_text()
    return {name: _from_dict(name, raw) for name, raw in yaml.safe_load(text).items()}


def get_spec(name: str) -> ModelSpec:
    table = model_table()
    if name not in table:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(table))}")
    return table[name]
