"""Tiny detector backbones for the bootstrap teachers (trained from scratch on the synthetic world).

A five-stage conv net (strides 2..32) whose C3/C4/C5 maps (strides 8, 16, 32) feed a torchvision
:class:`~torchvision.ops.FeaturePyramidNetwork`. Small enough to train on 2 CPU cores in minutes; the
same ``out_channels`` / ``OrderedDict`` contract as torchvision's ``BackboneWithFPN``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

#: Channels of the five stages (strides 2, 4, 8, 16, 32).
TINY_CHANNELS: tuple[int, ...] = (16, 32, 64, 96, 128)
TINY_FPN_CHANNELS = 64


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyBody(nn.Module):
    """Five stride-2 stages of conv-bn-relu (a second conv from stride 8 on, where it is cheap);
    returns ``{"c3", "c4", "c5"}`` (strides 8, 16, 32)."""

    def __init__(self, channels: tuple[int, ...] = TINY_CHANNELS) -> None:
        super().__init__()
        stages, cin = [], 3
        for i, c in enumerate(channels):
            layers = [_conv_bn(cin, c, 2)] + ([_conv_bn(c, c, 1)] if i >= 2 else [])
            stages.append(nn.Sequential(*layers))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 2:
                out[f"c{i + 1}"] = x
        return out


class TinyFPNBackbone(nn.Module):
    """:class:`TinyBody` + FPN over its last ``levels`` maps; ``forward`` returns an ``OrderedDict`` of maps
    with ``out_channels`` channels, finest first: with ``levels=3`` ``"0"`` (stride 8), ``"1"`` (16),
    ``"2"`` (32); with ``levels=1`` only ``"0"`` (stride 32); then the ``extra_blocks`` levels."""

    def __init__(self, extra_blocks: ExtraFPNBlock | None, out_channels: int = TINY_FPN_CHANNELS,
                 levels: int = 3) -> None:
        super().__init__()
        if not 1 <= levels <= 3:
            raise ValueError(f"levels must be 1..3 (C3..C5), got {levels}")
        self.body = TinyBody()
        self.levels = levels
        self.fpn = FeaturePyramidNetwork(list(self.body.channels[-levels:]), out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = list(self.body(x).values())[-self.levels:]
        return self.fpn(OrderedDict((str(i), v) for i, v in enumerate(feats)))
