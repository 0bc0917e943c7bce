"""CSPNeXt backbone (RTMDet, arXiv:2212.07784), mmdet's ``CSPNeXt`` with arch ``P5``."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import BN_EPS, ConvModule, CSPLayer, SPPBottleneck, make_conv

# (in_channels, out_channels, num_blocks, add_identity, use_spp) per stage, before widen/deepen.
ARCH_P5 = ((64, 128, 3, True, False), (128, 256, 6, True, False),
           (256, 512, 6, True, False), (512, 1024, 3, False, True))


class CSPNeXt(nn.Module):
    """Stem (three 3×3 convs, stride 2) and four stages; returns the stages in ``out_indices``.

    Each stage is a stride-2 conv, an SPP bottleneck on the last stage, and a CSPLayer.
    Output strides for out_indices (2, 3, 4): 8, 16, 32.
    """

    def __init__(self, deepen_factor: float, widen_factor: float, expand_ratio: float = 0.5,
                 depthwise: bool = False, channel_attention: bool = True,
                 out_indices: tuple[int, ...] = (2, 3, 4), bn_eps: float = BN_EPS):
        super().__init__()
        self.out_indices = out_indices
        stem_channels = int(ARCH_P5[0][0] * widen_factor)
        self.stem = nn.Sequential(
            ConvModule(3, stem_channels // 2, 3, stride=2, bn_eps=bn_eps),
            ConvModule(stem_channels // 2, stem_channels // 2, 3, bn_eps=bn_eps),
            ConvModule(stem_channels // 2, stem_channels, 3, bn_eps=bn_eps))
        self.layers = ["stem"]
        for i, (in_ch, out_ch, num_blocks, add_identity, use_spp) in enumerate(ARCH_P5, start=1):
            in_ch, out_ch = int(in_ch * widen_factor), int(out_ch * widen_factor)
            stage = [make_conv(in_ch, out_ch, 3, stride=2, depthwise=depthwise, bn_eps=bn_eps)]
            if use_spp:
                stage.append(SPPBottleneck(out_ch, out_ch, bn_eps=bn_eps))
            stage.append(CSPLayer(out_ch, out_ch, max(round(num_blocks * deepen_factor), 1),
                                  expand_ratio, add_identity, depthwise, channel_attention, bn_eps))
            self.add_module(f"stage{i}", nn.Sequential(*stage))
            self.layers.append(f"stage{i}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for i, name in enumerate(self.layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)
