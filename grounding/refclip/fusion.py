"""RefCLIP's trainable multi-scale fusion (kingthreestones/RefCLIP ``models/network_blocks.py``
``MultiScaleFusion``, ``scaled=True``), with the public module names so ``multi_scale_manner.*`` keys load.

Inputs: the frozen detector's three pre-head maps ``s8`` ``(B, C8, 4G, 4G)``, ``s16`` ``(B, C16, 2G, 2G)``,
``s32`` ``(B, C32, G, G)``; ``h`` = ``hidden``. Every conv is conv(no bias) → BatchNorm → LeakyReLU(0.1).
Top-down: ``m = [up(1x1, 3x3)(s32) ; s16]`` (h/2 + C16), ``l = [up(1x1, 3x3)(m) ; s8]`` (h/2 + C8);
bottom-up: ``m = [avgpool, 1x1, 3x3 (l) ; m]`` (h + C16), ``s = [avgpool, 1x1, 3x3 (m) ; s32]`` (h/2 + C32);
outputs ``top_proj(s)`` (h, stride 32), ``mid_proj(m)``, ``bot_proj(l)`` (h). RefCLIP reads only the
stride-32 output, so :meth:`forward` computes only that one (``mid_proj``/``bot_proj`` exist for the state
dict; in the public code they run in training too, which updates only their own BatchNorm statistics).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def darknet_conv(n_in: int, n_out: int, k: int) -> nn.Sequential:
    """conv (k x k, stride 1, 'same' padding, no bias) → BatchNorm → LeakyReLU(0.1): keys conv/batch_norm."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(n_in, n_out, k, padding=(k - 1) // 2, bias=False),
                                     batch_norm=nn.BatchNorm2d(n_out), leaky=nn.LeakyReLU(0.1)))


class MultiScaleFusion(nn.Module):
    """``channels`` = (C8, C16, C32) of the cached maps; ``hidden`` = the fused width (1024 published)."""

    def __init__(self, channels: tuple[int, int, int] = (256, 512, 1024), hidden: int = 1024) -> None:
        super().__init__()
        c8, c16, c32 = channels
        h2 = hidden // 2
        if hidden % 2:
            raise ValueError(f"refclip.fusion_hidden must be even, got {hidden}")
        up = lambda n_in: nn.Sequential(nn.UpsamplingNearest2d(scale_factor=2), darknet_conv(n_in, h2, 1),  # noqa: E731
                                        darknet_conv(h2, h2, 3))
        down = lambda n_in: nn.Sequential(nn.AvgPool2d(2, 2), darknet_conv(n_in, h2, 1),  # noqa: E731
                                          darknet_conv(h2, h2, 3))
        self.up_modules = nn.ModuleList([up(c16 + h2), up(c32)])
        self.down_modules = nn.ModuleList([down(h2 + c8), down(hidden + c16)])
        self.top_proj = darknet_conv(c32 + h2, hidden, 1)
        self.mid_proj = darknet_conv(c16 + hidden, hidden, 1)
        self.bot_proj = darknet_conv(c8 + h2, hidden, 1)
        self.channels, self.hidden = tuple(channels), hidden

    def forward(self, s8: torch.Tensor, s16: torch.Tensor, s32: torch.Tensor) -> torch.Tensor:
        """The fused stride-32 map ``(B, hidden, G, G)``."""
        m = torch.cat([self.up_modules[1](s32), s16], 1)
        l_ = torch.cat([self.up_modules[0](m), s8], 1)
        m = torch.cat([self.down_modules[0](l_), m], 1)
        s = torch.cat([self.down_modules[1](m), s32], 1)
        return self.top_proj(s)
