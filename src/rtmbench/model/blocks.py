"""Convolution blocks of RTMDet (CSPNeXt family), in plain PyTorch.

Re-expressed from mmdet 3.x / mmcv 2.x (``ConvModule``, ``DepthwiseSeparableConvModule``,
``ChannelAttention``, ``SPPBottleneck``, ``CSPNeXtBlock``, ``CSPLayer``). Attribute names equal
mmdet's so that checkpoints load with ``strict=True``. Reference: Lyu et al., "RTMDet: An
Empirical Study of Designing Real-Time Object Detectors", arXiv:2212.07784.
"""

from __future__ import annotations

import torch
from torch import nn

# mmdet's RTMDet configs use ``norm_cfg=dict(type='SyncBN')`` whose defaults are torch's
# (eps 1e-5); the backbone's own default (eps 1e-3) is overridden by every RTMDet config.
BN_EPS = 1e-5
BN_MOMENTUM = 0.1


class ConvModule(nn.Sequential):
    """conv (no bias) → BatchNorm → SiLU, named ``conv`` / ``bn`` like mmcv's ConvModule."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bn_eps: float = BN_EPS):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=BN_MOMENTUM)
        self.activate = nn.SiLU(inplace=True)


def fuse_batchnorms(model: nn.Module) -> nn.Module:
    """Fold every :class:`ConvModule`'s BatchNorm into its conv, in place (eval mode only), as
    inference engines do: one kernel instead of two, and in reduced precision one rounding of
    the folded weights instead of the conv's and the BatchNorm's. A conv shared between modules
    (the head's levels) gets one folded copy per module. Returns ``model``."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise ValueError("fuse_batchnorms needs a model in eval mode")
    for module in model.modules():
        if isinstance(module, ConvModule) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv = fuse_conv_bn_eval(module.conv, module.bn)
            module.bn = nn.Identity()
    return model


class DepthwiseSeparableConvModule(nn.Sequential):
    """Depthwise k×k ConvModule followed by a pointwise 1×1 ConvModule."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 bn_eps: float = BN_EPS):
        super().__init__()
        self.depthwise_conv = ConvModule(in_channels, in_channels, kernel_size, stride,
                                         groups=in_channels, bn_eps=bn_eps)
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1, bn_eps=bn_eps)


def make_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
              depthwise: bool = False, bn_eps: float = BN_EPS) -> nn.Module:
    """The conv mmdet picks with ``use_depthwise``: separable when set, plain otherwise."""
    if depthwise:
        return DepthwiseSeparableConvModule(in_channels, out_channels, kernel_size, stride, bn_eps)
    return ConvModule(in_channels, out_channels, kernel_size, stride, bn_eps=bn_eps)


class ChannelAttention(nn.Module):
    """Squeeze-excite without reduction: global average → 1×1 conv (with bias) → hard sigmoid."""

    def __init__(self, channels: int):
        super().__init__()
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(channels, channels, 1, bias=True)
        self.act = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.act(self.fc(self.global_avgpool(x)))


class SPPBottleneck(nn.Module):
    """Spatial pyramid pooling: 1×1 reduce, concat with max-pools (5, 9, 13), 1×1 expand."""

    def __init__(self, in_channels: int, out_channels: int,
                 kernel_sizes: tuple[int, ...] = (5, 9, 13), bn_eps: float = BN_EPS):
        super().__init__()
        mid_channels = in_channels // 2
        self.conv1 = ConvModule(in_channels, mid_channels, 1, bn_eps=bn_eps)
        self.poolings = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernel_sizes)
        self.conv2 = ConvModule(mid_channels * (len(kernel_sizes) + 1), out_channels, 1, bn_eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [pool(x) for pool in self.poolings], dim=1))


class CSPNeXtBlock(nn.Module):
    """3×3 conv then a 5×5 depthwise-separable conv, with an optional identity shortcut."""

    def __init__(self, in_channels: int, out_channels: int, expansion: float = 0.5,
                 add_identity: bool = True, depthwise: bool = False, bn_eps: float = BN_EPS):
        super().__init__()
        hidden_channels = int(out_channels * expansion)
        self.conv1 = make_conv(in_channels, hidden_channels, 3, depthwise=depthwise, bn_eps=bn_eps)
        self.conv2 = DepthwiseSeparableConvModule(hidden_channels, out_channels, 5, bn_eps=bn_eps)
        self.add_identity = add_identity and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class CSPLayer(nn.Module):
    """Cross-stage partial layer: a main branch of CSPNeXt blocks beside a 1×1 shortcut branch."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int,
                 expand_ratio: float = 0.5, add_identity: bool = True, depthwise: bool = False,
                 channel_attention: bool = False, bn_eps: float = BN_EPS):
        super().__init__()
        mid_channels = int(out_channels * expand_ratio)
        self.main_conv = ConvModule(in_channels, mid_channels, 1, bn_eps=bn_eps)
        self.short_conv = ConvModule(in_channels, mid_channels, 1, bn_eps=bn_eps)
        self.final_conv = ConvModule(2 * mid_channels, out_channels, 1, bn_eps=bn_eps)
        self.blocks = nn.Sequential(*(
            CSPNeXtBlock(mid_channels, mid_channels, 1.0, add_identity, depthwise, bn_eps)
            for _ in range(num_blocks)))
        self.attention = ChannelAttention(2 * mid_channels) if channel_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat((self.blocks(self.main_conv(x)), self.short_conv(x)), dim=1)
        if self.attention is not None:
            out = self.attention(out)
        return self.final_conv(out)
