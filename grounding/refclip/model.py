"""RefCLIP's anchor-text matching models, trained on a cached frozen detector (never run here).

Two visual sides (``refclip.features``), one language side (:class:`~grounding.refclip.language.
LanguageEncoder`, as published):

- ``multiscale`` (:class:`RefCLIPNet`): RefCLIP's ``Net`` as published (kingthreestones/RefCLIP
  ``models/RefCLIP/net.py``): the trainable :class:`~grounding.refclip.fusion.MultiScaleFusion` over the three
  cached pre-head maps, the kept cells of the fused stride-32 map (ascending cell index), ``linear_vs``
  (fused width → hidden) and ``linear_ts`` (hidden → hidden). Module names follow the public state dict
  (``lang_encoder``, ``multi_scale_manner``, ``linear_vs``, ``linear_ts``).
- ``p5-cells`` (:class:`RefCLIP`): the earlier model on the ultralytics cache: the cached stride-32 neck
  feature of each kept cell through a projection ``visual`` (``visual_mlp`` layers), the sentence through
  ``text``.

The score of an anchor for a sentence is the dot product of the two joint-space vectors (Eq. 3).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from grounding.refclip.fusion import MultiScaleFusion
from grounding.refclip.language import LanguageEncoder

FORMAT = "grounding-refclip-v2"
from grounding.word_vocab import PAD, UNK, build_vocab, encode, tokenize  # noqa: E402,F401 - re-exported


@dataclass(frozen=True)
class RefCLIPConfig:
    """Model sizes. ``feature_dim``: the p5-cells cached feature width; ``channels``: (C8, C16, C32) of the
    multiscale cache; ``fusion_hidden``: the fused width (1024 published); ``hidden``: language/joint dim."""

    vocab_size: int
    features: str = "multiscale"
    feature_dim: int = 0
    channels: tuple[int, int, int] = (256, 512, 1024)
    fusion_hidden: int = 1024
    word_dim: int = 300
    hidden: int = 512
    n_sa: int = 3
    heads: int = 8
    ff_size: int = 2048
    dropout: float = 0.1
    rnn: str = "gru"
    visual_mlp: int = 1  # p5-cells: 1 a linear projection; 2 Linear-ReLU-Linear
    max_len: int = 15
    word_vectors: str | None = None  # where the frozen word vectors came from (None: learned embeddings)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RefCLIPConfig":
        return cls(**{**d, "channels": tuple(d.get("channels", (256, 512, 1024)))})


def _language(cfg: RefCLIPConfig) -> LanguageEncoder:
    return LanguageEncoder(cfg.vocab_size, cfg.word_dim, cfg.hidden, cfg.n_sa, cfg.heads, cfg.ff_size,
                           cfg.dropout, cfg.rnn)


class _Scorer(nn.Module):
    cfg: RefCLIPConfig
    lang_encoder: LanguageEncoder

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def scores(self, visual: Any, ids: torch.Tensor) -> torch.Tensor:
        """All-pairs scores ``[t, i, k] = <anchor k of image i, sentence t>`` (Eq. 3)."""
        return torch.einsum("ikh,th->tik", self.embed_anchors(visual), self.embed_text(ids))

    def embed_anchors(self, visual: Any) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError


class RefCLIP(_Scorer):
    """``p5-cells``: cached kept-cell features ``(B, K, feature_dim)`` → ``(B, K, hidden)``."""

    def __init__(self, cfg: RefCLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.lang_encoder = _language(cfg)
        if cfg.visual_mlp == 1:
            self.visual = nn.Linear(cfg.feature_dim, cfg.hidden)
        else:
            self.visual = nn.Sequential(nn.Linear(cfg.feature_dim, cfg.hidden), nn.ReLU(),
                                        nn.Linear(cfg.hidden, cfg.hidden))
        self.text = nn.Linear(cfg.hidden, cfg.hidden)

    def embed_anchors(self, features: torch.Tensor) -> torch.Tensor:
        return self.visual(features.float())

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text(self.lang_encoder(ids))

    def forward(self, features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.scores(features, ids)


class RefCLIPNet(_Scorer):
    """``multiscale``: ``(s8, s16, s32, kept)`` — the three cached maps (float) and the kept cell indices
    ``(B, K)`` long (row-major, ascending) — → ``(B, K, hidden)`` joint-space vectors of the kept cells."""

    def __init__(self, cfg: RefCLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.lang_encoder = _language(cfg)
        self.linear_vs = nn.Linear(cfg.fusion_hidden, cfg.hidden)
        self.linear_ts = nn.Linear(cfg.hidden, cfg.hidden)
        self.multi_scale_manner = MultiScaleFusion(cfg.channels, cfg.fusion_hidden)

    def embed_anchors(self, visual: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        s8, s16, s32, kept = visual
        fused = self.multi_scale_manner(s8.float(), s16.float(), s32.float())  # [B,h,G,G]
        flat = fused.flatten(2).transpose(1, 2)  # [B,G*G,h], cells row-major (y, x)
        cells = flat.gather(1, kept.long().unsqueeze(-1).expand(-1, -1, flat.shape[-1]))  # [B,K,h]
        return self.linear_vs(cells)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.linear_ts(self.lang_encoder(ids))

    def forward(self, visual: tuple[torch.Tensor, ...], ids: torch.Tensor) -> torch.Tensor:
        return self.scores(visual, ids)


def build_model(cfg: RefCLIPConfig) -> RefCLIP | RefCLIPNet:
    """The model ``cfg.features`` names."""
    if cfg.features == "multiscale":
        return RefCLIPNet(cfg)
    if cfg.features == "p5-cells":
        return RefCLIP(cfg)
    raise ValueError(f"refclip.features must be p5-cells or multiscale, got {cfg.features!r}")


def checkpoint(model: RefCLIP | RefCLIPNet, vocab: Sequence[str]) -> dict[str, Any]:
    """A plain dict (tensors, strings, numbers) that ``torch.load(weights_only=True)`` accepts; the config
    records whether the embeddings are frozen word vectors (``word_vectors``: their source) or learned."""
    return {"format": FORMAT, "config": model.cfg.to_dict(), "vocab": list(vocab),
            "state_dict": model.state_dict()}


def from_checkpoint(ckpt: dict[str, Any]) -> tuple[RefCLIP | RefCLIPNet, list[str]]:
    """Rebuild the model and its vocabulary from :func:`checkpoint`'s dict."""
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} RefCLIP checkpoint (format {ckpt.get('format')!r}); retrain it with "
                         "refclip-train, or give a public RefCLIP checkpoint as refclip.checkpoint")
    model = build_model(RefCLIPConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), list(ckpt["vocab"])
