"""BiCM's query attention map (QAM) on an open_clip ViT, and its box P_t.

QAM of an (image, sentence) pair: the gradient of ``cos(CLIP image, CLIP text)`` with respect to the last
ViT block's attention, ``att * ReLU(grad)`` on the CLS -> patch row, averaged over heads, min-max
normalised, at patch-grid resolution ``(gh, gw)``. open_clip's blocks call ``nn.MultiheadAttention`` with
``need_weights=False`` and the weights it can return are not in the autograd graph of the output
(PITFALLS.md), so the last block is recomputed here explicitly from ``in_proj_weight``/``out_proj``
(``softmax(q k^T / sqrt(d)) v``); :func:`last_block` reproduces the built-in block (tested).

The box: the map upsampled bilinearly to the original image size, min-max normalised again, and the
tight box of the pixels ``>= threshold`` (float32 xyxy, original pixels, ``x2`` = last column + 1). The map
must cover the whole image, so the image is resized ("squashed") to the model's square input without a
centre crop (:func:`qam_preprocess`); for the shipped tiny CLIP that is its own preprocessing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class QamOutput:
    """Maps ``(B, gh, gw)`` float32 in [0, 1] (min-max normalised; all zeros when ``flat``), the cosine
    ``(B,)`` of each pair and ``flat`` ``(B,)`` bool: no positive evidence (max == min)."""

    maps: torch.Tensor
    cosine: torch.Tensor
    flat: torch.Tensor


def qam_preprocess(preprocess: Mapping[str, Any]) -> dict[str, Any]:
    """The model's preprocessing with ``resize_mode="squash"``: the whole image, aspect not kept, so the
    patch grid maps onto the original image by a plain scale."""
    return {**dict(preprocess), "resize_mode": "squash"}


def check_supported(visual: torch.nn.Module) -> None:
    """Raise ``ValueError`` for vision towers the explicit recomputation does not cover."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"QAM needs an open_clip VisionTransformer, got {type(visual).__name__}")
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError("QAM: vision towers with an attentional pooler are not supported")
    block = visual.transformer.resblocks[-1]
    if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
        raise ValueError(f"QAM: last block {type(block).__name__} is not a plain ResidualAttentionBlock")
    if not block.attn._qkv_same_embed_dim or block.attn.in_proj_weight is None:
        raise ValueError("QAM: attention without a packed in_proj_weight is not supported")


def trunk(visual: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Token states ``(B, 1 + gh*gw, width)`` (batch first) entering the last block."""
    x = visual._embeds(images)  # noqa: SLF001 - conv1, class token, positions, ln_pre (open_clip's own)
    tr = visual.transformer
    if not tr.batch_first:
        x = x.transpose(0, 1)
    for blk in tr.resblocks[:-1]:
        x = blk(x)
    return x.transpose(0, 1) if not tr.batch_first else x


def last_block(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last residual block computed explicitly: ``(output (B, T, W), attention (B, H, T, T))``, the
    attention inside the autograd graph of the output."""
    attn = block.attn
    b, t, w = x.shape
    h = attn.num_heads
    d = w // h
    y = block.ln_1(x)
    qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)  # [B,T,3W]
    q, k, v = (z.reshape(b, t, h, d).transpose(1, 2) for z in qkv.chunk(3, dim=-1))  # [B,H,T,d]
    att = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(d), dim=-1)  # [B,H,T,T]
    o = (att @ v).transpose(1, 2).reshape(b, t, w)
    o = F.linear(o, attn.out_proj.weight, attn.out_proj.bias)
    x = x + block.ls_1(o)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, att


def head(visual: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled, projected image features ``(B, D)`` from the final token states (open_clip's pooling)."""
    pooled, _ = visual._pool(x)  # noqa: SLF001 - ln_post + token/avg pooling exactly as open_clip
    return pooled @ visual.proj if visual.proj is not None else pooled


def qam(model: torch.nn.Module, images: torch.Tensor, text_emb: torch.Tensor,
        image_index: torch.Tensor | None = None) -> QamOutput:
    """QAM of pairs ``(images[image_index[i]], text_emb[i])``.

    Args:
        model: an open_clip CLIP with a ViT image tower (frozen; parameters need no grad).
        images: ``(G, 3, S, S)`` preprocessed images (see :func:`qam_preprocess`).
        text_emb: ``(N, D)`` text embeddings (normalised or not; the cosine normalises).
        image_index: ``(N,)`` int64 image of each pair (default ``arange(N)`` with ``G == N``). The blocks
            before the last run once per image.
    Returns:
        :class:`QamOutput` with maps at the patch grid ``(gh, gw)``.
    """
    check_supported(model.visual)
    if image_index is None:
        if len(images) != len(text_emb):
            raise ValueError(f"qam: {len(images)} images for {len(text_emb)} texts and no image_index")
        image_index = torch.arange(len(images))
    dtype = next(model.visual.parameters()).dtype
    with torch.no_grad():
        states = trunk(model.visual, images.to(dtype))
    return qam_from_states(model, states, text_emb, image_index)


def qam_from_states(model: torch.nn.Module, states: torch.Tensor, text_emb: torch.Tensor,
                    image_index: torch.Tensor) -> QamOutput:
    """:func:`qam` from the token states entering the last block (``trunk``), so the earlier blocks run once
    per image however many sentences it has. ``states (G, T, W)``, ``text_emb (N, D)``, ``image_index (N,)``."""
    visual = model.visual
    if len(image_index) != len(text_emb):
        raise ValueError(f"qam: {len(image_index)} image indices for {len(text_emb)} texts")
    x = states[image_index.to(states.device)]
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)  # frozen weights: the graph to the attention starts here
        out, att = last_block(visual.transformer.resblocks[-1], x)
        img = F.normalize(head(visual, out).float(), dim=-1)
        cos = (img * F.normalize(text_emb.to(img.device).float(), dim=-1)).sum(-1)
        (grad,) = torch.autograd.grad(cos.sum(), att)
    gh, gw = visual.grid_size
    cam = (att.detach()[:, :, 0, 1:].float() * grad[:, :, 0, 1:].float().clamp(min=0)).mean(dim=1)  # [N,gh*gw]
    maps, flat = minmax(cam.reshape(-1, gh, gw))
    return QamOutput(maps.cpu(), cos.detach().float().cpu(), flat.cpu())


def minmax(maps: torch.Tensor, rel_eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max normalise each ``(..., h, w)`` map to [0, 1]. A map whose spread is at most ``rel_eps`` of
    its largest magnitude (constant up to float rounding, or all zeros) becomes zeros and is flagged.
    Returns ``(maps, flat)``."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    flat_k = span <= rel_eps * torch.maximum(lo.abs(), hi.abs())
    out = torch.where(flat_k, torch.zeros_like(maps), (maps - lo) / torch.where(flat_k, torch.ones_like(span), span))
    return out, flat_k[..., 0, 0]


def map_box(grid_map: np.ndarray | torch.Tensor, width: int, height: int, threshold: float = 0.7) -> tuple[np.ndarray, bool]:
    """BiCM's P_t: upsample a patch-grid map ``(gh, gw)`` bilinearly to ``height x width``, min-max
    normalise, and return the tight box of the pixels ``>= threshold`` as float32 xyxy original pixels
    (``[x_min, y_min, x_max + 1, y_max + 1]``) with ``False``; a flat map gives the whole image and ``True``."""
    if width <= 0 or height <= 0:
        raise ValueError(f"map_box: image size must be positive, got {width}x{height}")
    m = torch.as_tensor(np.asarray(grid_map, dtype=np.float32))
    if m.ndim != 2:
        raise ValueError(f"map_box: expected a 2-D map, got shape {tuple(m.shape)}")
    up = F.interpolate(m[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    up, flat = minmax(up)
    if bool(flat):
        return np.array([0, 0, width, height], dtype=np.float32), True
    mask = up >= threshold
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    box = np.array([cols[0].item(), rows[0].item(), cols[-1].item() + 1, rows[-1].item() + 1], dtype=np.float32)
    return box, False
