"""RTMDetSepBNHead: per-level classification and regression towers (BN not shared across levels).

Returns raw maps only; decoding lives in :mod:`rtmbench.postprocess`.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import BN_EPS, make_conv


class RTMDetSepBNHead(nn.Module):
    """Outputs per level ``cls_score`` float32[B, num_classes, H, W] (logits) and
    ``bbox_pred`` float32[B, 4, H, W]: distances (left, top, right, bottom) in input pixels,
    i.e. already multiplied by the level's stride (``exp()`` first when ``exp_on_reg``).
    """

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int,
                 stacked_convs: int = 2, strides: tuple[int, ...] = (8, 16, 32),
                 share_conv: bool = True, exp_on_reg: bool = False, depthwise: bool = False,
                 pred_kernel_size: int = 1, bn_eps: float = BN_EPS):
        super().__init__()
        self.strides = strides
        self.exp_on_reg = exp_on_reg
        self.cls_convs = nn.ModuleList()
        self.reg_convs = nn.ModuleList()
        for _ in strides:
            for tower in (self.cls_convs, self.reg_convs):
                tower.append(nn.Sequential(*(
                    make_conv(in_channels if i == 0 else feat_channels, feat_channels, 3,
                              depthwise=depthwise, bn_eps=bn_eps)
                    for i in range(stacked_convs))))
        self.rtm_cls = nn.ModuleList(nn.Conv2d(feat_channels, num_classes, pred_kernel_size,
                                               padding=pred_kernel_size // 2) for _ in strides)
        self.rtm_reg = nn.ModuleList(nn.Conv2d(feat_channels, 4, pred_kernel_size,
                                               padding=pred_kernel_size // 2) for _ in strides)
        if share_conv:
            # mmdet shares the convolutions (not the BatchNorms) of every level with level 0.
            for tower in (self.cls_convs, self.reg_convs):
                for level in tower[1:]:
                    for conv, conv0 in zip(level.modules(), tower[0].modules()):
                        if isinstance(conv, nn.Conv2d):
                            conv.weight = conv0.weight

    def forward(self, feats: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        cls_scores, bbox_preds = [], []
        for idx, (x, stride) in enumerate(zip(feats, self.strides)):
            cls_scores.append(self.rtm_cls[idx](self.cls_convs[idx](x)))
            reg = self.rtm_reg[idx](self.reg_convs[idx](x))
            bbox_preds.append((reg.exp() if self.exp_on_reg else reg) * stride)
        return tuple(cls_scores), tuple(bbox_preds)
