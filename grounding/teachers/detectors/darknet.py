"""SimREC's / RefCLIP's YOLOv3: DarkNet-53 + SPP + three anchor-guided YOLO heads (strides 32, 16, 8).

Re-implemented from the architecture of kingthreestones/RefCLIP ``models/visual_encoder.py`` and
``models/network_blocks.py`` (SimREC's visual encoder); no code copied. The module tree reproduces the
published state-dict keys exactly (``module_list.N.conv.weight``, ``module_list.N.module_list.i.j...``,
``module_list.19.Feature_adaption.dconv.weight`` ...) so published ``yolov3_coco.pth`` / ``yolov3_vg.pth``
state dicts load strictly. Conv blocks are conv (no bias) + BatchNorm2d (torch defaults: eps 1e-5,
momentum 0.1) + LeakyReLU(0.1). DropBlock (keep_prob 1: identity) and upsampling hold no parameters.

Each head predicts, per cell, 4 boxes: 3 anchor-based (anchors of its mask) and 1 anchor-free (base
size ``stride * 4``). A 1x1 ``guide_wh`` conv predicts 4 (log w, log h) guides; the *un-exponentiated*
guides feed a grouped 1x1 conv giving the offsets of a 3x3 deformable conv (``deformable_groups`` 4,
:func:`torchvision.ops.deform_conv2d`: no compiled extension; the offset layout, per group and kernel
tap ``k = 3 i + j``, channels ``2k`` = dy and ``2k + 1`` = dx, is the published DCN's); the prior size
of each box is ``exp(guide) * anchor`` (anchor-free: ``exp(guide) * 4 * stride``). Decoding (canvas
pixels): ``cx = (sigmoid(tx) + x) * stride``, ``w = exp(tw) * prior_w``, objectness and class scores
sigmoid.

``width``: channel widths are the published ones times ``width`` (1.0: the published network; the
bootstrap trains a narrow one); :func:`infer_config` reads width and class count from a state dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d

#: The nine YOLOv3 anchors (w, h) in 416-canvas pixels, as published (``sep=False``).
ANCHORS: tuple[tuple[int, int], ...] = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (42, 119),
                                        (116, 90), (156, 198), (121, 240))
#: (module index, stride, anchor mask, input channels at width 1) of the three heads, coarsest first.
HEADS: tuple[tuple[int, int, tuple[int, int, int], int], ...] = (
    (19, 32, (6, 7, 8), 1024), (28, 16, (3, 4, 5), 512), (37, 8, (0, 1, 2), 256))
N_PRED = 4  # predictions per cell: 3 anchor-based + 1 anchor-free
DEFORMABLE_GROUPS = N_PRED
ROUTES = (6, 8, 17, 26)  # outputs kept for the route/concat connections


@dataclass(frozen=True)
class DarknetConfig:
    """Architecture of one network: channel ``width`` multiplier and ``num_classes``."""

    width: float = 1.0
    num_classes: int = 80

    def ch(self, base: int) -> int:
        """Channels of a published ``base``-channel layer at this width (must be a positive integer)."""
        c = base * self.width
        if c < 1 or abs(c - round(c)) > 1e-6:
            raise ValueError(f"darknet width {self.width}: {base} x width = {c} is not a positive integer")
        return int(round(c))


def conv_block(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    """``add_conv``: conv (no bias, 'same' padding) -> BatchNorm2d -> LeakyReLU(0.1)."""
    s = nn.Sequential()
    s.add_module("conv", nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, bias=False))
    s.add_module("batch_norm", nn.BatchNorm2d(cout))
    s.add_module("leaky", nn.LeakyReLU(0.1))
    return s


class ResBlock(nn.Module):
    """``nblocks`` x (1x1 to ch/2, 3x3 to ch), with the residual sum when ``shortcut``."""

    def __init__(self, ch: int, nblocks: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.shortcut = shortcut
        self.module_list = nn.ModuleList(
            nn.ModuleList([conv_block(ch, ch // 2, 1, 1), conv_block(ch // 2, ch, 3, 1)]) for _ in range(nblocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for pair in self.module_list:
            h = x
            for layer in pair:
                h = layer(h)
            x = x + h if self.shortcut else h
        return x


class SPP(nn.Module):
    """Concat of the input and its 5/9/13 stride-1 max-pools (4x the channels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] + [F.max_pool2d(x, k, 1, k // 2) for k in (5, 9, 13)], 1)


class Identity(nn.Module):
    """The published DropBlock with keep_prob 1 (and any DropBlock in eval mode): the identity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest")


class DeformConv(nn.Module):
    """3x3 deformable conv (stride 1, padding 1, with bias) through :func:`torchvision.ops.deform_conv2d`;
    parameters ``weight`` (out, in, 3, 3) and ``bias`` (out,) as the published DCN module names them."""

    def __init__(self, cin: int, cout: int, deformable_groups: int) -> None:
        super().__init__()
        if cin % deformable_groups:
            raise ValueError(f"deformable conv: {cin} input channels not divisible by {deformable_groups} groups")
        self.deformable_groups = deformable_groups
        self.weight = nn.Parameter(torch.empty(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.empty(cout))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(cin * 9)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        if offset.shape[1] != 2 * 9 * self.deformable_groups:
            raise ValueError(f"deformable conv: offset has {offset.shape[1]} channels, "
                             f"expected {2 * 9 * self.deformable_groups}")
        return deform_conv2d(x, offset, self.weight, self.bias, stride=1, padding=1)


class FeatureAdaption(nn.Module):
    """Anchor-guided feature adaption: offsets from the (detached, un-exponentiated) guide w/h through a
    grouped 1x1 conv, then the deformable conv of the head's input."""

    def __init__(self, ch: int, n_pred: int = N_PRED) -> None:
        super().__init__()
        self.conv_offset = nn.Conv2d(2 * n_pred, 2 * 9 * n_pred, 1, groups=n_pred)
        self.dconv = DeformConv(ch, ch, deformable_groups=n_pred)

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        return self.dconv(x, self.conv_offset(guide.detach()))


class YoloHead(nn.Module):
    """One anchor-guided YOLO head. ``forward`` returns ``(pred, guide)``: ``pred`` (B, 4, H, W, 5 + C)
    decoded in canvas pixels ``[cx, cy, w, h, obj, cls...]`` (scores sigmoid), predictions in the order
    3 anchor-based (anchor-mask order) then anchor-free; ``guide`` (B, 4, H, W, 2) the raw guide log-sizes."""

    def __init__(self, ch: int, num_classes: int, stride: int, anchor_mask: tuple[int, ...]) -> None:
        super().__init__()
        self.stride, self.num_classes, self.anchor_mask = stride, num_classes, tuple(anchor_mask)
        self.guide_wh = nn.Conv2d(ch, 2 * N_PRED, 1)
        self.Feature_adaption = FeatureAdaption(ch)
        self.conv = nn.Conv2d(ch, N_PRED * (num_classes + 5), 1)
        priors = [list(map(float, ANCHORS[i])) for i in self.anchor_mask] + [[4.0 * stride] * 2]
        self.register_buffer("base_wh", torch.tensor(priors, dtype=torch.float32), persistent=False)  # (4, 2)

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Undecoded outputs: head conv (B, 4, H, W, 5 + C) and guide (B, 4, H, W, 2)."""
        guide = self.guide_wh(x)
        out = self.conv(self.Feature_adaption(x, guide))
        b, _, h, w = out.shape
        out = out.view(b, N_PRED, self.num_classes + 5, h, w).permute(0, 1, 3, 4, 2)
        guide = guide.view(b, N_PRED, 2, h, w).permute(0, 1, 3, 4, 2)
        return out, guide

    def decode(self, out: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """Raw outputs -> decoded predictions (canvas pixels, sigmoid scores), the published arithmetic."""
        h, w = out.shape[2:4]
        ys, xs = torch.meshgrid(torch.arange(h, dtype=out.dtype, device=out.device),
                                torch.arange(w, dtype=out.dtype, device=out.device), indexing="ij")
        prior = torch.exp(guide) * self.base_wh.to(out.dtype).view(1, N_PRED, 1, 1, 2)
        cx = (torch.sigmoid(out[..., 0]) + xs) * self.stride
        cy = (torch.sigmoid(out[..., 1]) + ys) * self.stride
        bw = torch.exp(out[..., 2]) * prior[..., 0]
        bh = torch.exp(out[..., 3]) * prior[..., 1]
        return torch.cat([torch.stack([cx, cy, bw, bh], -1), torch.sigmoid(out[..., 4:])], -1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, guide = self.raw(x)
        return self.decode(out, guide), guide


def build_module_list(cfg: DarknetConfig) -> nn.ModuleList:
    """The 38 modules in the published order (indices are the state-dict prefixes)."""
    c, nc = cfg.ch, cfg.num_classes
    m: list[nn.Module] = [
        conv_block(3, c(32), 3, 1), conv_block(c(32), c(64), 3, 2), ResBlock(c(64)),            # 0-2
        conv_block(c(64), c(128), 3, 2), ResBlock(c(128), 2),                                   # 3-4
        conv_block(c(128), c(256), 3, 2), ResBlock(c(256), 8),                                  # 5-6 (route)
        conv_block(c(256), c(512), 3, 2), ResBlock(c(512), 8),                                  # 7-8 (route)
        conv_block(c(512), c(1024), 3, 2), ResBlock(c(1024), 4),                                # 9-10
        ResBlock(c(1024), 1, shortcut=False), conv_block(c(1024), c(512), 1, 1), SPP(),         # 11-13
        conv_block(c(2048), c(512), 1, 1), conv_block(c(512), c(1024), 3, 1), Identity(),       # 14-16
        conv_block(c(1024), c(512), 1, 1),                                                      # 17 (route)
        conv_block(c(512), c(1024), 3, 1), YoloHead(c(1024), nc, 32, (6, 7, 8)),                # 18-19
        conv_block(c(512), c(256), 1, 1), Upsample(), conv_block(c(768), c(256), 1, 1),         # 20-22
        conv_block(c(256), c(512), 3, 1), Identity(), ResBlock(c(512), 1, shortcut=False),      # 23-25
        conv_block(c(512), c(256), 1, 1),                                                       # 26 (route)
        conv_block(c(256), c(512), 3, 1), YoloHead(c(512), nc, 16, (3, 4, 5)),                  # 27-28
        conv_block(c(256), c(128), 1, 1), Upsample(), conv_block(c(384), c(128), 1, 1),         # 29-31
        conv_block(c(128), c(256), 3, 1), Identity(), ResBlock(c(256), 1, shortcut=False),      # 32-34
        conv_block(c(256), c(128), 1, 1), conv_block(c(128), c(256), 3, 1),                     # 35-36
        YoloHead(c(256), nc, 8, (0, 1, 2)),                                                     # 37
    ]
    return nn.ModuleList(m)


class DarknetYolo(nn.Module):
    """The published visual encoder. ``forward(x)`` with ``x`` (B, 3, S, S) normalised canvases returns
    ``{"maps": [s32, s16, s8] head inputs, "preds": [...] decoded (B, 4, H, W, 5 + C) per level,
    "guides": [...] raw guides (B, 4, H, W, 2)}``, coarsest level first."""

    def __init__(self, cfg: DarknetConfig = DarknetConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.module_list = build_module_list(cfg)

    @property
    def strides(self) -> list[int]:
        return [s for _, s, _, _ in HEADS]

    def forward(self, x: torch.Tensor, decode: bool = True) -> dict[str, list[torch.Tensor]]:
        maps, preds, guides, routes = [], [], [], []
        for i, module in enumerate(self.module_list):
            if isinstance(module, YoloHead):
                maps.append(x)
                if decode:
                    p, g = module(x)
                else:
                    p, g = module.raw(x)
                preds.append(p)
                guides.append(g)
                x = routes[2] if i == 19 else routes[3] if i == 28 else x
                continue
            x = module(x)
            if i in ROUTES:
                routes.append(x)
            if i == 21:
                x = torch.cat((x, routes[1]), 1)
            elif i == 30:
                x = torch.cat((x, routes[0]), 1)
        return {"maps": maps, "preds": preds, "guides": guides}


# ---- state dicts ---------------------------------------------------------------------------------------------
def infer_config(state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> DarknetConfig:
    """Width (from ``module_list.0.conv.weight``: 32 x width output channels) and class count (from
    ``module_list.19.conv.weight``: 4 x (5 + C) outputs) of a public-layout state dict."""
    first, head = state_dict.get("module_list.0.conv.weight"), state_dict.get("module_list.19.conv.weight")
    if first is None or head is None:
        missing = [k for k, v in (("module_list.0.conv.weight", first), ("module_list.19.conv.weight", head))
                   if v is None]
        raise ValueError(f"{source}: not a SimREC/RefCLIP YOLOv3 state dict (no {', '.join(missing)}); "
                         f"keys start with {sorted(state_dict)[:3]}")
    if first.ndim != 4 or head.ndim != 4 or head.shape[0] % N_PRED or head.shape[0] // N_PRED <= 5:
        raise ValueError(f"{source}: unexpected shapes module_list.0.conv.weight {tuple(first.shape)}, "
                         f"module_list.19.conv.weight {tuple(head.shape)}")
    return DarknetConfig(width=first.shape[0] / 32, num_classes=head.shape[0] // N_PRED - 5)


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop ``visual_encoder.`` / ``module.`` prefixes carried by every key (RefCLIP nets, DataParallel);
    returns the dict and the prefixes removed."""
    sd, removed = dict(state_dict), []
    for prefix in ("module.", "visual_encoder."):
        while sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
            removed.append(prefix)
    return sd, removed


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` into ``model`` strictly; one ``ValueError`` naming ``source`` and every missing
    key, unexpected key and shape mismatch (first 10 of each)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{name} ({len(v)}): {', '.join(v[:10])}{' ...' if len(v) > 10 else ''}"
                 for name, v in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("shape mismatches", shapes)) if v]
        raise ValueError(f"{source}: does not match the SimREC/RefCLIP YOLOv3 layout; " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def from_state_dict(state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> DarknetYolo:
    """Build the network at the size the state dict's shapes say and load it strictly (eval mode)."""
    sd, _ = strip_prefixes(state_dict)
    try:
        model = DarknetYolo(infer_config(sd, source))
    except ValueError as e:
        raise ValueError(f"{source}: {e}" if not str(e).startswith(source) else str(e)) from None
    load_strict(model, sd, source)
    return model.eval()
