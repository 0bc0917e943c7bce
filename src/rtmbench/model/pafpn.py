"""CSPNeXtPAFPN neck (RTMDet): a top-down then bottom-up path of CSPLayers, mmdet's layout."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import BN_EPS, ConvModule, CSPLayer, make_conv


class CSPNeXtPAFPN(nn.Module):
    """Path-aggregation FPN over the backbone levels (fine → coarse).

    Inputs: feature maps with ``in_channels`` channels at strides 8/16/32.
    Outputs: as many maps, each with ``out_channels`` channels, at the same strides.
    """

    def __init__(self, in_channels: tuple[int, ...], out_channels: int, num_csp_blocks: int = 3,
                 expand_ratio: float = 0.5, depthwise: bool = False, bn_eps: float = BN_EPS):
        super().__init__()
        levels = len(in_channels)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.reduce_layers = nn.ModuleList()
        self.top_down_blocks = nn.ModuleList()
        for idx in range(levels - 1, 0, -1):
            self.reduce_layers.append(ConvModule(in_channels[idx], in_channels[idx - 1], 1, bn_eps=bn_eps))
            self.top_down_blocks.append(CSPLayer(in_channels[idx - 1] * 2, in_channels[idx - 1],
                                                 num_csp_blocks, expand_ratio, add_identity=False,
                                                 depthwise=depthwise, bn_eps=bn_eps))
        self.downsamples = nn.ModuleList()
        self.bottom_up_blocks = nn.ModuleList()
        for idx in range(levels - 1):
            self.downsamples.append(make_conv(in_channels[idx], in_channels[idx], 3, stride=2,
                                              depthwise=depthwise, bn_eps=bn_eps))
            self.bottom_up_blocks.append(CSPLayer(in_channels[idx] * 2, in_channels[idx + 1],
                                                  num_csp_blocks, expand_ratio, add_identity=False,
                                                  depthwise=depthwise, bn_eps=bn_eps))
        self.out_convs = nn.ModuleList(
            make_conv(ch, out_channels, 3, depthwise=depthwise, bn_eps=bn_eps) for ch in in_channels)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        # Top-down: reduce the coarser map, upsample, fuse with the finer one.
        inner_outs = [inputs[-1]]
        for i, idx in enumerate(range(len(inputs) - 1, 0, -1)):
            feat_high = self.reduce_layers[i](inner_outs[0])
            inner_outs[0] = feat_high
            fused = torch.cat([self.upsample(feat_high), inputs[idx - 1]], dim=1)
            inner_outs.insert(0, self.top_down_blocks[i](fused))
        # Bottom-up: downsample the finer result, fuse with the next coarser top-down map.
        outs = [inner_outs[0]]
        for idx in range(len(inputs) - 1):
            fused = torch.cat([self.downsamples[idx](outs[-1]), inner_outs[idx + 1]], dim=1)
            outs.append(self.bottom_up_blocks[idx](fused))
        return tuple(conv(out) for conv, out in zip(self.out_convs, outs))
