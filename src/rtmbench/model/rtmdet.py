"""RTMDet single-stage detector: CSPNeXt backbone → CSPNeXtPAFPN neck → RTMDetSepBNHead."""

from __future__ import annotations

import torch
from torch import nn

from .cspnext import ARCH_P5, CSPNeXt
from .head import RTMDetSepBNHead
from .pafpn import CSPNeXtPAFPN
from .spec import OUTPUT_NAMES, ModelSpec


class RTMDet(nn.Module):
    """``forward(inputs float32[B, 3, H, W])`` → the six raw head maps in ``OUTPUT_NAMES`` order:
    class logits per level, then box distances (input pixels) per level, strides 8/16/32.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        eps = spec.bn_eps
        self.backbone = CSPNeXt(spec.deepen_factor, spec.widen_factor, spec.expand_ratio,
                                spec.depthwise, spec.channel_attention, bn_eps=eps)
        neck_in = tuple(int(stage[1] * spec.widen_factor) for stage in ARCH_P5[1:])
        self.neck = CSPNeXtPAFPN(neck_in, spec.neck_channels, spec.neck_csp_blocks,
                                 spec.expand_ratio, spec.depthwise, bn_eps=eps)
        self.bbox_head = RTMDetSepBNHead(spec.num_classes, spec.neck_channels, spec.head_feat_channels,
                                         spec.head_stacked_convs, spec.strides, spec.share_conv,
                                         spec.exp_on_reg, spec.depthwise, bn_eps=eps)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cls_scores, bbox_preds = self.bbox_head(self.neck(self.backbone(inputs)))
        return (*cls_scores, *bbox_preds)
