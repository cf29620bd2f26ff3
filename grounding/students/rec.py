"""A small TransVG-style REC student: ResNet backbone, text encoder, fusion transformer with a [REG] token.

Input: letterboxed, ImageNet-normalised images ``(B_img, 3, S, S)`` and token ids ``(B, L)``; each sentence
names its image by ``image_index`` (the backbone runs once per image, however many sentences it has).
Output box: ``(B, 4)`` xyxy as fractions of the letterbox canvas (map back with
:func:`grounding.students.common.from_canvas_fraction`).

Stage ``student-rec-pseudo`` (:func:`run_student_rec_pseudo`) trains it on RefCLIP pseudo-boxes (never GT)
with random-resize augmentation and an EMA copy; loss SmoothL1 + GIoU (torchvision.ops).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss

from grounding import distributed as D
from grounding.students import common as C
from grounding.weights import WeightsError, load_state_dict_file

log = logging.getLogger(__name__)
CLIP_BPE_VOCAB = 49408  # open_clip SimpleTokenizer vocabulary (BPE merges shipped with open_clip)
MODULES = ("grounding.students.rec", "grounding.students.common", "grounding.imaging", "grounding.data.images")


@dataclass(frozen=True)
class RecConfig:
    """Architecture knobs (the trunk fields of :class:`grounding.config.TrunkParams`)."""

    depth: int = 18
    width: float = 1.0
    d_model: int = 256
    text_encoder: str = "transformer"
    bert_path: str | None = None
    max_len: int = 20
    text_layers: int = 2
    visual_layers: int = 6
    fusion_layers: int = 6
    heads: int = 8
    dropout: float = 0.1
    backbone_weights: str | None = None
    visual_stride: int = 32
    token_origin: float = 0.5  # token i's coordinate in its cell for the sine positions (0: the cell corner)

    @classmethod
    def from_params(cls, tp: Any, ds: Any = None) -> "RecConfig":
        """From a trunk params section; ``max_len`` by :func:`query_length` (``ds``: the canonical dataset)."""
        vals = {k: getattr(tp, k) for k in cls.__dataclass_fields__ if hasattr(tp, k)}
        return cls(**{**vals, "max_len": query_length(tp, ds)})


#: dataset names (``CanonicalDataset.source["dataset"]`` or the dataset name) that are RefCOCOg
REFCOCOG_NAMES = ("refcocog", "gref", "gref_umd", "refcocog_umd", "refcocog_google")


def query_length(tp: Any, ds: Any = None) -> int:
    """Token budget of a query: ``tp.max_len`` when set, else the papers' rule ``tp.max_len_refcocog`` (40,
    TransVG / PBREC) on RefCOCOg and ``tp.max_len_default`` (TransVG 20, PBREC 30) elsewhere."""
    if getattr(tp, "max_len", None):
        return int(tp.max_len)
    names = set()
    if ds is not None:
        names = {str(ds.name).lower(), str((ds.source or {}).get("dataset", "")).lower()}
    long = any(n in REFCOCOG_NAMES for n in names)
    return int(tp.max_len_refcocog if long else tp.max_len_default)


# ---- tokenizer ---------------------------------------------------------------------------------------------
class Tokenizer:
    """Token ids ``(N, max_len)`` int64 and a padding mask ``(N, max_len)`` bool (True = padding): open_clip's
    BPE (``<start>`` ids ``<end>``, cut to ``max_len`` keeping the end token) or a local BERT tokenizer."""

    def __init__(self, cfg: RecConfig) -> None:
        self.cfg = cfg
        if cfg.text_encoder == "bert":
            self._tok = _bert_module(cfg.bert_path).AutoTokenizer.from_pretrained(cfg.bert_path, local_files_only=True)
        else:
            from open_clip.tokenizer import SimpleTokenizer

            self._tok = SimpleTokenizer()

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        n, L = len(texts), self.cfg.max_len
        if self.cfg.text_encoder == "bert":
            enc = self._tok(list(texts), padding="max_length", truncation=True, max_length=L, return_tensors="pt")
            return enc["input_ids"].long(), enc["attention_mask"] == 0
        ids = torch.zeros(n, L, dtype=torch.long)
        sot, eot = self._tok.encoder["<start_of_text>"], self._tok.encoder["<end_of_text>"]
        for i, t in enumerate(texts):
            seq = [sot, *self._tok.encode(t)][:L - 1] + [eot]
            ids[i, :len(seq)] = torch.tensor(seq)
        return ids, ids == 0


def _bert_module(path: str | None) -> Any:
    if not path:
        raise ValueError("text_encoder: bert needs bert_path (a local BERT directory; nothing is downloaded)")
    try:
        import transformers
    except ImportError:
        raise ImportError("text_encoder: bert needs the `transformers` package (pip install transformers)") from None
    return transformers


# ---- model -------------------------------------------------------------------------------------------------
class _SlimResNet:
    """Factory of torchvision ResNets whose stage widths are scaled (stem kept at 64 channels)."""

    @staticmethod
    def build(block: Any, blocks: list[int], width: float) -> nn.Module:
        from torchvision.models.resnet import ResNet

        class Slim(ResNet):
            def _make_layer(self, block, planes, blocks, stride=1, dilate=False):  # type: ignore[override]
                return super()._make_layer(block, max(8, int(round(planes * width))), blocks, stride, dilate)

        return Slim(block, blocks)


def build_backbone(depth: int, weights: str | None = None, width: float = 1.0,
                   stride: int = 32) -> tuple[nn.Module, int]:
    """torchvision ResNet up to ``layer4`` (``stride`` 32) or ``layer3`` (16) and its output channels;
    depth 10 = [1, 1, 1, 1] BasicBlocks; ``width`` scales the stage widths (1: torchvision's ResNet).
    ``weights``: a local state-dict file of the matching torchvision ResNet (fc keys ignored; width must
    be 1; ``layer4`` keys unused at stride 16), read by :func:`grounding.weights.load_state_dict_file`
    (``weights_only=True`` or safetensors; a state dict wrapped as ``{"state_dict": ...}`` or
    ``{"model": ...}`` is unwrapped; pickled files are refused)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    layers = {10: (BasicBlock, [1, 1, 1, 1]), 18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
              50: (Bottleneck, [3, 4, 6, 3])}
    if depth not in layers:
        raise ValueError(f"backbone depth {depth} not in {sorted(layers)}")
    if stride not in (16, 32):
        raise ValueError(f"backbone stride must be 16 or 32, got {stride}")
    block, blocks = layers[depth]
    net = _SlimResNet.build(block, blocks, width)
    if weights:
        if width != 1.0:
            raise ValueError(f"backbone_weights {weights} need width 1.0 (got {width})")
        state = load_state_dict_file(weights, "backbone_weights")  # weights-only; pickled files refused, naming `weights import`
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith("fc.")]
        if bad or unexpected:
            raise ValueError(f"{weights}: not a ResNet-{depth} state dict (missing {bad[:3]}, unexpected {unexpected[:3]})")
    stages = [net.layer1, net.layer2, net.layer3] + ([net.layer4] if stride == 32 else [])
    body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, *stages)
    return body, _out_channels(stages[-1])


def _out_channels(layer: nn.Module) -> int:
    last = layer[-1]
    return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels


def sine_positions(h: int, w: int, d: int, origin: float = 0.5) -> torch.Tensor:
    """Fixed 2-D sine position embedding ``(h*w, d)`` (DETR style; any grid size, for random resize) of the
    points ``(i + origin) / h`` (row-major): 0.5 the cell centres, 0 the corners (torchvision's FCOS points)."""
    if d % 4:
        raise ValueError(f"d_model must be a multiple of 4 for 2-D sine positions, got {d}")
    q = d // 4
    freq = 1.0 / (10000 ** (torch.arange(q, dtype=torch.float32) / q))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32) + origin, torch.arange(w, dtype=torch.float32) + origin,
                            indexing="ij")
    ys, xs = ys.reshape(-1, 1) / h * 2 * math.pi, xs.reshape(-1, 1) / w * 2 * math.pi
    return torch.cat([torch.sin(xs * freq), torch.cos(xs * freq), torch.sin(ys * freq), torch.cos(ys * freq)], dim=1)


class PosEncoderLayer(nn.Module):
    """DETR's encoder layer (post-norm): the position embedding is added to the queries and keys of every
    layer, not to the values; ``(B, N, d)`` in and out."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = x + pos
        x = self.norm1(x + self.drop1(self.attn(q, q, x, need_weights=False)[0]))
        return self.norm2(x + self.drop2(self.ff(x)))


class VisualEncoder(nn.Module):
    """TransVG's visual transformer (DETR's encoder, 6 layers in the paper) over the projected ResNet tokens
    ``(B_img, N, d)`` with the 2-D sine positions ``(N, d)``; 0 layers: identity."""

    def __init__(self, d: int, heads: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PosEncoderLayer(d, heads, 4 * d, dropout) for _ in range(layers))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, pos)
        return x


class TextEncoder(nn.Module):
    """Token ids ``(B, L)`` -> token features ``(B, L, d)``: embedding + transformer, bi-GRU, or local BERT."""

    def __init__(self, cfg: RecConfig) -> None:
        super().__init__()
        self.kind, d = cfg.text_encoder, cfg.d_model
        if self.kind == "bert":
            self.bert = _bert_module(cfg.bert_path).AutoModel.from_pretrained(cfg.bert_path, local_files_only=True)
            self.proj = nn.Linear(self.bert.config.hidden_size, d)
            return
        self.embed = nn.Embedding(CLIP_BPE_VOCAB, d, padding_idx=0)
        if self.kind == "gru":
            if d % 2:
                raise ValueError(f"gru text encoder needs an even d_model, got {d}")
            self.gru = nn.GRU(d, d // 2, batch_first=True, bidirectional=True)
        else:
            self.pos = nn.Parameter(torch.zeros(cfg.max_len, d))
            nn.init.normal_(self.pos, std=0.02)
            layer = nn.TransformerEncoderLayer(d, cfg.heads, 4 * d, cfg.dropout, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)

    def forward(self, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        if self.kind == "bert":
            return self.proj(self.bert(input_ids=ids, attention_mask=(~pad).long()).last_hidden_state)
        x = self.embed(ids)
        if self.kind == "gru":
            return self.gru(x)[0]
        return self.encoder(x + self.pos[: ids.shape[1]], src_key_padding_mask=pad)


class RecStudent(nn.Module):
    """TransVG-style trunk. :meth:`forward` returns a dict:

    - ``box``: ``(B, 4)`` xyxy, fractions of the canvas (from the [REG] token; cxcywh sigmoid inside).
    - ``visual``: ``(B_img, N, d)`` visual tokens before fusion (after the visual encoder); ``text``:
      ``(B, L, d)`` text tokens before fusion; ``pad``: ``(B, L)`` bool; ``fused_visual`` ``(B, N, d)`` and
      ``fused_text`` ``(B, L, d)``: the fusion transformer's output at the visual / text positions (EpmVG's
      p'_v, p'_l; position 0 of each is its beginning token); ``grid``: ``(h, w)`` of the visual tokens.
    """

    def __init__(self, cfg: RecConfig) -> None:
        super().__init__()
        self.cfg, d = cfg, cfg.d_model
        self.backbone, c = build_backbone(cfg.depth, cfg.backbone_weights, cfg.width, cfg.visual_stride)
        self.visual_proj = nn.Conv2d(c, d, 1)
        self.visual_encoder = VisualEncoder(d, cfg.heads, cfg.visual_layers, cfg.dropout)
        self.text = TextEncoder(cfg)
        self.reg = nn.Parameter(torch.zeros(1, 1, d))
        self.modality = nn.Parameter(torch.zeros(3, d))  # reg, visual, text
        nn.init.normal_(self.reg, std=0.02)
        nn.init.normal_(self.modality, std=0.02)
        layer = nn.TransformerEncoderLayer(d, cfg.heads, 4 * d, cfg.dropout, batch_first=True)
        self.fusion = nn.TransformerEncoder(layer, cfg.fusion_layers, enable_nested_tensor=False)
        self.box_head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 4))

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """ResNet -> 1x1 projection -> visual transformer: ``(B_img, N, d)`` tokens and the grid ``(h, w)``."""
        f = self.visual_proj(self.backbone(images))  # [Bi,d,h,w]
        h, w = f.shape[-2:]
        pos = sine_positions(h, w, self.cfg.d_model, self.cfg.token_origin).to(f)
        return self.visual_encoder(f.flatten(2).transpose(1, 2), pos), (h, w)  # [Bi,N,d]

    def forward(self, images: torch.Tensor, image_index: torch.Tensor, ids: torch.Tensor,
                pad: torch.Tensor) -> dict[str, Any]:
        visual, (h, w) = self.encode_images(images)
        text = self.text(ids, pad)  # [B,L,d]
        b, n = ids.shape[0], visual.shape[1]
        pos = sine_positions(h, w, self.cfg.d_model, self.cfg.token_origin).to(visual)
        v = visual[image_index] + pos + self.modality[1]  # [B,N,d]
        t = text + self.modality[2]
        x = torch.cat([self.reg.expand(b, 1, -1) + self.modality[0], v, t], dim=1)
        mask = torch.cat([torch.zeros(b, 1 + n, dtype=torch.bool, device=pad.device), pad], dim=1)
        y = self.fusion(x, src_key_padding_mask=mask)
        cxcywh = self.box_head(y[:, 0]).sigmoid()
        box = torch.cat([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], dim=1)
        return {"box": box, "visual": visual, "text": text, "pad": pad, "fused_visual": y[:, 1:1 + n],
                "fused_text": y[:, 1 + n:], "grid": (h, w)}


BOX_L1 = ("l1", "smooth_l1", "smooth_l1_mean")


def box_loss(pred: torch.Tensor, target: torch.Tensor, giou_weight: float = 1.0,
             l1: str = "l1") -> tuple[torch.Tensor, dict[str, float]]:
    """Box regression loss of ``(B, 4)`` xyxy canvas-fraction boxes: a coordinate term + ``giou_weight`` * GIoU
    (torchvision.ops), each a mean over the batch. ``l1``: ``l1`` = TransVG (L1 on the normalised cx, cy, w, h,
    summed over the four coordinates), ``smooth_l1`` = EpmVG's eq. 8 (SmoothL1, same sum), ``smooth_l1_mean``
    = the first version here (SmoothL1 on xyxy averaged over coordinates: 4x smaller and nearly inert).
    Returns the loss and its parts."""
    if l1 not in BOX_L1:
        raise ValueError(f"box loss l1 must be one of {BOX_L1}, got {l1!r}")
    if l1 == "smooth_l1_mean":
        coord = F.smooth_l1_loss(pred, target)
    else:
        p, t = box_convert(pred, "xyxy", "cxcywh"), box_convert(target, "xyxy", "cxcywh")
        fn = F.l1_loss if l1 == "l1" else F.smooth_l1_loss
        coord = fn(p, t, reduction="none").sum(dim=1).mean()
    giou = generalized_box_iou_loss(pred, target, reduction="mean")
    return coord + giou_weight * giou, {l1: float(coord.detach()), "giou": float(giou.detach())}


# ---- data of one training / prediction run ------------------------------------------------------------------
class RecBatches:
    """What a REC step needs, by sentence index: texts tokenised once, each sentence's image, its target box
    (canvas fractions at the training letterbox), and the canvases. Teacher fields come per batch from
    ``shards`` (a :class:`grounding.shards.torch.ShardDataset` over the same sentence keys) when given."""

    def __init__(self, ds: Any, refs: Sequence[Any], canvases: C.Canvases, tokenizer: Tokenizer,
                 targets: np.ndarray | None = None, shards: Any = None) -> None:
        self.refs = list(refs)
        self.canvases = canvases
        self.image_of = [r.image_id for r in self.refs]
        self.tokenizer = tokenizer  # its ``cfg`` is the trunk's RecConfig (query length resolved)
        self.ids, self.pad = tokenizer([r.text for r in self.refs])
        self.lbs = [canvases.letterbox(i) for i in self.image_of]
        self.targets = C.to_canvas_fraction(targets, self.lbs) if targets is not None else None
        self.shards = shards

    def __len__(self) -> int:
        return len(self.refs)

    def inputs(self, batch: np.ndarray, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Images ``(B_img, 3, s, s)`` of the batch's distinct images (in first-seen order), each sentence's
        index into them, and those image ids."""
        images: list[str] = []
        where: dict[str, int] = {}
        index = []
        for i in batch:
            im = self.image_of[int(i)]
            if im not in where:
                where[im] = len(images)
                images.append(im)
            index.append(where[im])
        x = self.canvases.batch(images)
        if size is not None:
            x = C.resize_canvas(x, size)
        return x, torch.tensor(index, dtype=torch.long), images

    def teacher(self, batch: np.ndarray) -> dict[str, Any]:
        """The batch's rows of the teacher shard sets (collated)."""
        return self.shards.collate([self.shards[int(i)] for i in batch])

    def forward(self, model: RecStudent, batch: np.ndarray, size: int | None = None) -> dict[str, Any]:
        x, index, _ = self.inputs(batch, size)
        b = torch.as_tensor(batch)
        return model(x, index, self.ids[b], self.pad[b])


@torch.no_grad()
def predict_boxes(model: nn.Module, data: RecBatches, batch_images: int = 16) -> dict[str, np.ndarray]:
    """``{ref_id: (4,) float32 xyxy original pixels}`` of every sentence of ``data`` (eval mode)."""
    model.eval()
    gen = torch.Generator().manual_seed(0)
    out: dict[str, np.ndarray] = {}
    for batch in sorted(C.image_batches(data.image_of, batch_images, gen), key=lambda b: int(b[0])):
        boxes = C.from_canvas_fraction(data.forward(model, batch)["box"], [data.lbs[int(i)] for i in batch])
        for i, box in zip(batch, boxes):
            out[data.refs[int(i)].ref_id] = box
    return out


def state_dict_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain tensors (an AveragedModel's inner module; no ``n_averaged``), for ``weights_only`` loading."""
    inner = model.module if isinstance(model, torch.optim.swa_utils.AveragedModel) else model
    return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()}


def save_checkpoint(path: Path, models: dict[str, nn.Module], cfg: RecConfig, extra: dict[str, Any]) -> None:
    """``{"config": asdict(cfg), "<name>": state_dict, ...extra}``: tensors, strings and numbers only."""
    doc = {"config": asdict(cfg), **{k: state_dict_of(m) for k, m in models.items()}, **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(doc, path)


# ---- stage student-rec-pseudo -----------------------------------------------------------------------------------
def train_rec_pseudo(ds: Any, refs: Sequence[Any], pseudo: np.ndarray, rp: Any, seed: int, *,
                     progress: bool = False) -> tuple[RecStudent, Any, list[dict[str, float]], Tokenizer]:
    """Train on ``refs`` with their pseudo-boxes ``(N, 4)`` (xyxy original pixels); returns the model, its EMA
    copy, the curve and the tokenizer."""
    from grounding.runtime import seed_everything

    gen = seed_everything(seed)
    cfg = RecConfig.from_params(rp, ds)
    model = RecStudent(cfg)
    ema = C.ema_model(model, rp.ema_decay, rp.ema_warmup)
    tok = Tokenizer(cfg)
    data = RecBatches(ds, refs, C.Canvases(ds, rp.input_size), tok, targets=pseudo)

    def loss_fn(m: nn.Module, batch: np.ndarray, size: int) -> tuple[torch.Tensor, dict[str, float]]:
        out = data.forward(m, batch, size)
        return box_loss(out["box"], data.targets[torch.as_tensor(batch)].to(out["box"].device), rp.giou_weight, rp.box_l1)

    curve = C.fit(model, lambda g: C.image_batches(data.image_of, rp.batch_images, g), loss_fn, rp,
                  generator=gen, ema=ema, progress=progress, desc="student-rec-pseudo", group_of=data.image_of)
    ema.eval()
    return model, ema, curve, tok


def run_student_rec_pseudo(params: Any) -> Path:
    """Stage ``student-rec-pseudo``: weights, predictions shard set, metrics (raw and EMA student per seed,
    RefCLIP teacher and centred-box baselines) and the training curve."""
    from grounding.data.schema import CanonicalDataset
    from grounding.shards import file_sha256
    from grounding.shards.torch import ShardDataset

    stage, rp = "student-rec-pseudo", params.students.rec
    ds = CanonicalDataset.load(params.prepared_dir())
    train = C.split_refs(ds, rp.pseudo_split)
    pseudo_set = C.teacher_set(params, rp.pseudo_from, [r.ref_id for r in train], ds, stage)
    shards = ShardDataset({"pseudo": pseudo_set}, keys=[r.ref_id for r in train], fields={"pseudo": ["box"]})
    pseudo = np.stack([shards[i]["pseudo"]["box"].numpy() for i in range(len(shards))])  # never GT
    inputs = {"pseudo": pseudo_set.manifest.stage_key}
    sp = rp.model_dump(mode="json") | {"seed": params.seed} | params.train.key_params()
    if D.from_main(C.outputs_current(params, stage, MODULES, ds, inputs, sp)):  # all ranks decide as rank 0
        return params.student_dir(stage)
    runs, curves, best = [], [], None
    with C.torch_threads(rp.threads), C.training(params):
        for seed in rp.seeds:
            model, ema, curve, tok = train_rec_pseudo(ds, train, pseudo, rp, seed, progress=params.progress)
            if not D.is_main():
                continue  # every rank trains (torchrun); rank 0 alone evaluates and writes
            every = RecBatches(ds, ds.refs, C.Canvases(ds, rp.input_size), tok)
            acc_ema, n = C.acc_per_split(pred_ema := predict_boxes(ema, every), ds)
            acc_raw, _ = C.acc_per_split(predict_boxes(model, every), ds)
            runs.append({"seed": seed, "acc50_ema": acc_ema, "acc50_raw": acc_raw})
            curves.append([{**row, "seed": seed} for row in curve])
            if best is None:
                best = (model, ema, pred_ema)
    if not D.is_main():
        return params.student_dir(stage)
    model, ema, pred = best
    cfg = RecConfig.from_params(rp, ds)
    mpath = C.model_path(params, stage)
    save_checkpoint(mpath, {"state_dict": ema, "raw_state_dict": model}, cfg,
                    {"seed": rp.seeds[0], "pseudo_key": pseudo_set.manifest.stage_key})
    baselines = {"centred box": C.centred_box_baseline(ds)}
    teacher = _refclip_teacher_acc(params)
    if teacher:
        baselines["RefCLIP teacher"] = teacher
    C.write_metrics(params, stage, C.mean_acc([r["acc50_ema"] for r in runs]), n, baselines,
                    acc50_raw=C.mean_acc([r["acc50_raw"] for r in runs]), seeds=runs,
                    pseudo_key=pseudo_set.manifest.stage_key,
                    trained_on=f"{rp.pseudo_from} pseudo-boxes of the {rp.pseudo_split} split (no GT)")
    C.write_json(C.curve_path(params, stage), [row for c in curves for row in c])
    return C.write_predictions(params, stage, MODULES, ds, pred, inputs, sp, file_sha256(mpath))


def _refclip_teacher_acc(params: Any) -> dict[str, float]:
    """The RefCLIP teacher's own Acc@0.5 per split from ``data/metrics/refclip.json`` (empty if absent)."""
    import json

    path = Path(params.paths.metrics) / "refclip.json"
    if not path.is_file():
        return {}
    doc = json.loads(path.read_text()).get("refclip", {})
    return {s: float(v["acc"]) for s, v in sorted(doc.items()) if isinstance(v, dict) and "acc" in v}
