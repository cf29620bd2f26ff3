"""Load a trained public RefCLIP checkpoint (kingthreestones/RefCLIP ``train.py``'s ``det_best.pth``) into
:class:`~grounding.refclip.model.RefCLIPNet` for ``refclip-pseudo``, without retraining.

The file is ``{'epoch', 'state_dict', 'optimizer', 'scheduler', 'lr'}`` (a bare state dict is accepted too);
keys may carry DataParallel's ``module.`` prefix. The Net's state dict holds ``visual_encoder.*`` (the frozen
detector: not used here — the detector's outputs come from the ``yolo-anchors`` cache; compared with
``teachers.yolo.weights`` when that file is given), ``lang_encoder.*``, ``linear_vs.*``, ``linear_ts.*`` and
``multi_scale_manner.*``; our modules carry the same names, so those load strictly as they are. Sizes
(vocabulary, word and hidden widths, GRU or LSTM, self-attention depth, FF width, fusion widths) are read
from the shapes; ``heads`` (8 published) and ``max_len`` come from params.

The checkpoint carries no vocabulary. The public dataloader builds it from the annotation JSON it trained
on (``PAD, UNK, CLS``, then words in file order over all splits: :mod:`grounding.refclip.text`), so
``refclip.vocab_from`` must name that same file; its size is checked against the embedding.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from grounding.refclip.model import RefCLIPConfig, RefCLIPNet
from grounding.refclip.text import annotation_texts, build_vocab

log = logging.getLogger(__name__)
TRAINED = ("lang_encoder.", "linear_vs.", "linear_ts.", "multi_scale_manner.")
DETECTOR = "visual_encoder."


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The Net state dict of a public checkpoint (``{'state_dict': ..., 'epoch', 'optimizer', ...}`` or the
    bare state dict ``grounding weights import`` writes), ``module.`` prefixes stripped. Read weights-only
    (:func:`grounding.errors.load_weights`: a missing, unreadable or pickled file is a one-line error)."""
    from grounding.errors import WeightsError, load_weights

    p = Path(path)
    obj = load_weights(p, "refclip.checkpoint")
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"refclip.checkpoint: {p}: not a RefCLIP checkpoint "
                           f"({{'state_dict': {{name: tensor}}, ...}} expected)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def _need(sd: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"{path}: not a RefCLIP Net state dict: key {key!r} is missing")
    return sd[key]


def infer_config(sd: dict[str, torch.Tensor], path: Path, heads: int, max_len: int) -> RefCLIPConfig:
    """Model sizes from the shapes of a public Net state dict."""
    emb = _need(sd, "lang_encoder.embedding.weight", path)
    hidden = int(_need(sd, "linear_ts.weight", path).shape[0])
    gates = int(_need(sd, "lang_encoder.lstm.weight_ih_l0", path).shape[0]) // hidden
    if gates not in (3, 4):
        raise ValueError(f"{path}: lang_encoder.lstm has {gates * hidden} gate rows for hidden {hidden}")
    n_sa = len({m.group(1) for k in sd if (m := re.match(r"lang_encoder\.sa_list\.(\d+)\.", k))})
    ff = int(_need(sd, "lang_encoder.sa_list.0.ffn.mlp.fc.linear.weight", path).shape[0]) if n_sa else 2048
    fused = int(_need(sd, "multi_scale_manner.top_proj.conv.weight", path).shape[0])
    c32 = int(_need(sd, "multi_scale_manner.up_modules.1.1.conv.weight", path).shape[1])
    c16 = int(_need(sd, "multi_scale_manner.mid_proj.conv.weight", path).shape[1]) - fused
    c8 = int(_need(sd, "multi_scale_manner.bot_proj.conv.weight", path).shape[1]) - fused // 2
    return RefCLIPConfig(vocab_size=int(emb.shape[0]), features="multiscale", channels=(c8, c16, c32),
                         fusion_hidden=fused, word_dim=int(emb.shape[1]), hidden=hidden, n_sa=n_sa, heads=heads,
                         ff_size=ff, rnn="gru" if gates == 3 else "lstm", max_len=max_len,
                         word_vectors="public checkpoint (frozen GloVe rows)")


def load_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict`` with an error naming the file, the missing/unexpected keys and bad shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}" for k in own
              if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def few(xs: list[str]) -> str:
            return ", ".join(xs[:8]) + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "")

        parts = [f"missing keys: {few(missing)}" if missing else "",
                 f"unexpected keys: {few(unexpected)}" if unexpected else "",
                 f"shape mismatches: {few(shapes)}" if shapes else ""]
        raise ValueError(f"{path}: does not fit RefCLIP's Net: " + "; ".join(p for p in parts if p))
    model.load_state_dict(sd)


def check_detector(sd: dict[str, torch.Tensor], path: Path, detector_weights: str | None) -> dict[str, Any]:
    """Compare the checkpoint's ``visual_encoder.*`` with ``detector_weights`` (when given); a summary.

    The public training leaves the frozen detector's BatchNorm in training mode, so its running statistics
    in a trained checkpoint may differ from the detector file's: that is reported, never an error."""
    det = {k[len(DETECTOR):]: v for k, v in sd.items() if k.startswith(DETECTOR)}
    out: dict[str, Any] = {"visual_encoder_keys": len(det)}
    if not detector_weights or not Path(detector_weights).is_file() or not det:
        return out
    try:
        ref = torch.load(detector_weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - only a report
        out["compared"] = f"not compared: {detector_weights} unreadable ({type(e).__name__})"
        return out
    ref = {re.sub(r"^(module\.|visual_encoder\.)+", "", k): v for k, v in ref.items()
           if isinstance(v, torch.Tensor)}
    common = [k for k in det if k in ref and ref[k].shape == det[k].shape]
    differ = [k for k in common if not torch.equal(ref[k].to(det[k].dtype), det[k])]
    out.update(compared=len(common), differ=len(differ), not_in_detector=len(det) - len(common))
    if differ or len(common) != len(det):
        log.warning("%s: %d of %d visual_encoder tensors differ from %s (%d not found there); the yolo-anchors "
                    "cache was made with the latter (BatchNorm statistics drift in the public training)",
                    path, len(differ), len(det), detector_weights, len(det) - len(common))
    return out


def load_public_checkpoint(path: str | Path, vocab_from: str | None, rp: Any,
                           detector_weights: str | None = None) -> tuple[RefCLIPNet, list[str]]:
    """The eval-mode model and its vocabulary from a public RefCLIP checkpoint (see the module docstring)."""
    p = Path(path)
    sd = read_state_dict(p)
    trained = {k: v for k, v in sd.items() if k.startswith(TRAINED)}
    other = sorted(k for k in sd if not k.startswith(TRAINED) and not k.startswith(DETECTOR))
    if other:
        raise ValueError(f"{p}: unexpected keys outside RefCLIP's Net: {', '.join(other[:8])}")
    cfg = infer_config(trained, p, rp.heads, rp.max_len)
    if cfg.hidden % cfg.heads:
        raise ValueError(f"{p}: hidden {cfg.hidden} is not a multiple of refclip.heads={cfg.heads}")
    if not vocab_from:
        raise ValueError(f"refclip.vocab_from: {p} carries no vocabulary; give the RefCLIP annotation JSON it was "
                         "trained with (e.g. data/anns/refcoco.json) so the embedding rows line up")
    vocab = build_vocab(annotation_texts(vocab_from))
    if len(vocab) != cfg.vocab_size:
        raise ValueError(f"refclip.vocab_from: {vocab_from} gives {len(vocab)} tokens, the checkpoint's embedding "
                         f"has {cfg.vocab_size} rows: not the annotation file {p} was trained with")
    model = RefCLIPNet(cfg)
    load_strict(model, trained, p)
    model.lang_encoder.embedding.weight.requires_grad_(False)
    info = check_detector(sd, p, detector_weights)
    log.info("public RefCLIP checkpoint %s: %d keys loaded, %s", p, len(trained), info)
    return model.eval(), vocab
