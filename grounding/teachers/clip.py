"""The frozen CLIP teacher (open_clip): model spec, weights, identity, embeddings and the ``clip-*`` stages.

Conventions:

* embeddings are L2-normalised and stored as float16 ``(D,)`` rows (``D`` = the model's ``embed_dim``);
* images are decoded only through :func:`grounding.data.images.load_rgb` and preprocessed exactly by the
  model's own open_clip transform (``PreprocessCfg``: size, mean, std, interpolation, resize mode), in
  DataLoader workers that open nothing before they fork;
* boxes (crops, QAM box) are float32 ``xyxy`` in original-image pixels;
* weights are only ever a local file: ``teachers.clip.pretrained`` names it, or, when it is null, the tiny
  CLIP trained by :mod:`grounding.teachers.clip_bootstrap` is used. open_clip is never given a hub tag.

Teacher identity (hashed into every stage key and written into every manifest): library and version,
model name, the full model config, the final preprocessing config, precision and the sha256 of the
weights file actually loaded.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from grounding.config import ClipParams, ConfigError, Params
from grounding.data.images import ImageError, load_rgb
from grounding.data.schema import CanonicalDataset, DataError, ImageRecord
from grounding.overlap import Pinnable, overlapped, prefetch_loader
from grounding.shards import FieldSpec, ShardSet, file_sha256
from grounding.shards.manifest import ShardError

log = logging.getLogger(__name__)

#: Architectures shipped with grounding (open_clip model-config JSON files, registered with open_clip).
CONFIG_DIR = Path(__file__).with_name("clip_configs")
TINY_MODEL = "grounding-tiny-clip"
#: Preprocessing of the shipped architectures, where it differs from open_clip's defaults. ``squash``
#: resizes the whole image to the square input, so every object is seen and patch maps cover the image.
PACKAGED_PREPROCESS: dict[str, dict[str, Any]] = {TINY_MODEL: {"resize_mode": "squash"}}
#: Modules whose source defines the outputs of the embedding stages (hashed into their keys).
CLIP_MODULES = ("grounding.teachers.clip", "grounding.data.images")
EMBEDDING_MEANING = "L2-normalised CLIP embedding, float16"


# ---- model spec and construction -----------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """An open_clip architecture: ``name``, its full ``model_cfg`` and final ``preprocess`` config
    (the fields of ``open_clip.transform.PreprocessCfg``)."""

    name: str
    model_cfg: dict[str, Any]
    preprocess: dict[str, Any]

    @property
    def image_size(self) -> int:
        size = self.preprocess["size"]
        return int(size if isinstance(size, int) else size[0])

    @property
    def context_length(self) -> int:
        return int(self.model_cfg.get("text_cfg", {}).get("context_length", 77))


@functools.lru_cache(maxsize=None)
def _register(path: str) -> None:
    import open_clip

    open_clip.add_model_config(path)


def _json_list(value: Any) -> Any:
    """Tuples to lists, recursively (so a spec compares equal to its JSON round trip)."""
    if isinstance(value, Mapping):
        return {str(k): _json_list(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_list(v) for v in value]
    return value


def model_spec(cp: ClipParams) -> ModelSpec:
    """Resolve ``teachers.clip`` to an architecture: ``model_config`` (a local open_clip model-config JSON
    file) wins over ``model`` (an open_clip or shipped name). Schema names (``hf-hub:``, ``local-dir:``)
    are refused: they fetch or pick files on their own."""
    import open_clip
    from open_clip.transform import PreprocessCfg

    _register(str(CONFIG_DIR))
    if cp.model_config_file:
        path = Path(cp.model_config_file)
        if not path.is_file():
            raise ConfigError(f"teachers.clip.model_config: file {path} not found")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"teachers.clip.model_config: {path} is not JSON ({e})") from None
        if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ConfigError(f"teachers.clip.model_config: {path} is not an open_clip model config "
                              "(needs embed_dim, vision_cfg, text_cfg)")
        open_clip.add_model_config(path.resolve())  # (re)read every time: the file may have changed
        name = path.stem
    else:
        name = cp.model
        if ":" in name:
            raise ConfigError(f"teachers.clip.model {name!r}: schema names are not allowed (nothing is "
                              "downloaded); use an open_clip architecture name or model_config: <file>")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"teachers.clip.model {name!r} is not a known architecture; known: "
                          f"{open_clip.list_models()}")
    pre = asdict_preprocess(PreprocessCfg())
    pre.update(PACKAGED_PREPROCESS.get(name, {}))
    pre.update(cp.preprocess or {})
    unknown = set(cp.preprocess or {}) - set(asdict_preprocess(PreprocessCfg()))
    if unknown:
        raise ConfigError(f"teachers.clip.preprocess: unknown fields {sorted(unknown)}")
    pre["size"] = cfg["vision_cfg"].get("image_size", pre["size"])
    return ModelSpec(name=name, model_cfg=_json_list(cfg), preprocess=_json_list(pre))


def asdict_preprocess(cfg: Any) -> dict[str, Any]:
    """The fields of an open_clip ``PreprocessCfg`` as a plain dict (lists, not tuples)."""
    from dataclasses import asdict

    return _json_list(asdict(cfg))


def create_model(spec: ModelSpec, *, precision: str = "fp32", device: str | torch.device = "cpu") -> torch.nn.Module:
    """A randomly initialised open_clip model of ``spec`` (eval mode) with its preprocess config attached.
    Weights come from :func:`load_weights`; open_clip's own loading is never used (no tags, no hub)."""
    import open_clip

    _register(str(CONFIG_DIR))
    if open_clip.get_model_config(spec.name) != spec.model_cfg:
        raise ConfigError(f"model {spec.name!r}: registered open_clip config differs from the spec "
                          "(build specs with model_spec)")
    prev = logging.getLogger().level
    logging.getLogger().setLevel(max(prev, logging.ERROR))  # open_clip warns "initialized randomly"
    try:
        model = open_clip.create_model(spec.name, pretrained=None, precision=precision, device=device,
                                       force_preprocess_cfg=spec.preprocess, pretrained_text=False)
    finally:
        logging.getLogger().setLevel(prev)
    return model.eval()


def load_weights(model: torch.nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a local weights file into ``model`` (strict; ``torch.load(weights_only=True)`` or safetensors;
    open_clip's converters for OpenAI/third-party layouts). A pickled file (a full model) is refused with
    the error of :func:`grounding.weights.refusal_error` (it names ``grounding weights import``)."""
    import open_clip

    from grounding.weights import is_pickle_refusal, refusal_error

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"CLIP weights file {path} not found (teachers.clip.pretrained must be a local file)")
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad weights file for this model
        if is_pickle_refusal(e):
            raise ConfigError(f"CLIP weights: {refusal_error(path, e)}") from None
        raise ConfigError(f"CLIP weights file {path} does not fit model "
                          f"({type(e).__name__}: {str(e)[:300]})") from None


def transform_of(preprocess: Mapping[str, Any]) -> Callable[[Any], torch.Tensor]:
    """open_clip's inference transform (PIL RGB image -> ``(3, S, S)`` float tensor) for a preprocess config."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = dict(preprocess)
    for k in ("mean", "std", "size"):
        if isinstance(cfg.get(k), list):
            cfg[k] = tuple(cfg[k])
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


@functools.lru_cache(maxsize=8)
def _cached_transform(preprocess_json: str) -> Callable[[Any], torch.Tensor]:
    return transform_of(json.loads(preprocess_json))


def weights_path(params: Params) -> Path:
    """The weights file the teacher loads: ``pretrained`` (must exist), else the bootstrapped tiny CLIP
    (trained now when missing or stale)."""
    cp = params.teachers.clip
    if cp.pretrained:
        path = Path(cp.pretrained)
        if not path.is_file():
            raise ConfigError(f"teachers.clip.pretrained: {path} is not a file (a local weights file is "
                              "required; nothing is downloaded)")
        return path
    from grounding.teachers.clip_bootstrap import bootstrap_weights

    return bootstrap_weights(params)


def teacher_identity(spec: ModelSpec, precision: str, weights_sha256: str) -> dict[str, Any]:
    """What defines the teacher's outputs: library + version, model name and full config, preprocessing,
    precision, sha256 of the weights file actually loaded."""
    import open_clip

    return {"library": "open_clip", "version": open_clip.__version__, "model": spec.name,
            "model_config": spec.model_cfg, "preprocess": spec.preprocess, "precision": precision,
            "weights_sha256": weights_sha256}


@dataclass
class ClipTeacher:
    """The frozen CLIP teacher: spec, identity and, built on first use, the model (on ``device``, eval
    mode, no grads) and its tokenizer. A stage whose output is up to date never builds the model: its key
    needs only the identity (spec + weights sha256)."""

    spec: ModelSpec
    identity: dict[str, Any]
    device: torch.device
    weights: Path | None
    precision: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)
    prebuilt: torch.nn.Module | None = None

    @functools.cached_property
    def model(self) -> torch.nn.Module:
        if self.prebuilt is not None:
            return self.prebuilt.eval().requires_grad_(False)
        if self.weights is None:
            raise ValueError("ClipTeacher without weights or a prebuilt model")
        model = create_model(self.spec, precision=self.precision, device="cpu")
        load_weights(model, self.weights)
        return model.to(self.device).eval().requires_grad_(False)

    @functools.cached_property
    def tokenizer(self) -> Any:
        import open_clip

        return open_clip.get_tokenizer(self.spec.name)

    @property
    def embed_dim(self) -> int:
        return int(self.spec.model_cfg["embed_dim"])


@functools.lru_cache(maxsize=64)
def _sha_cached(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def weights_sha256(path: Path) -> str:
    """sha256 of a weights file (memoised per path, size and mtime within one process)."""
    st = path.stat()
    return _sha_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


def build_teacher(params: Params) -> ClipTeacher:
    """The only constructor of the CLIP teacher: spec from params, weights from a local file (or the
    bootstrap), identity from both; the model itself is loaded on first use (see :class:`ClipTeacher`)."""
    from grounding.runtime import resolve_device

    cp = params.teachers.clip
    spec = model_spec(cp)
    device = resolve_device(cp.device)
    if cp.precision != "fp32" and device.type != "cuda":
        raise ConfigError(f"teachers.clip.precision {cp.precision!r} needs a CUDA device; use fp32 on CPU")
    path = weights_path(params)
    identity = teacher_identity(spec, cp.precision, weights_sha256(path))
    extra = {"weights_file": path.name, "torch": torch.__version__, "device": device.type}
    return ClipTeacher(spec, identity, device, path, cp.precision, extra)


# ---- text --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tokenized:
    """Token ids ``(N, L)`` int64 as open_clip builds them, the untruncated length of each text in tokens
    (start and end tokens included) and whether it was truncated to ``L``."""

    tokens: torch.Tensor
    n_tokens: np.ndarray
    truncated: np.ndarray


def tokenize(tokenizer: Any, texts: Sequence[str], context_length: int) -> Tokenized:
    """Tokenize like ``tokenizer(texts)`` and record truncation. Empty texts give ``[SOT, EOT]``; texts
    longer than ``context_length`` tokens are cut, keeping EOT last (open_clip's rule)."""
    texts = [t if isinstance(t, str) else "" for t in texts]
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id") and getattr(tokenizer, "reduction_fn", None) is None:
        ids = [[tokenizer.sot_token_id, *tokenizer.encode(t), tokenizer.eot_token_id] for t in texts]
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, seq in enumerate(ids):
            if len(seq) > context_length:
                seq = seq[:context_length]
                seq[-1] = tokenizer.eot_token_id
            out[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        n = np.array([len(s) for s in ids], dtype=np.int32)
        return Tokenized(out, n, n > context_length)
    # other tokenizers (HF, SigLIP): lengths from the padded ids; a full context counts as truncated
    out = tokenizer(list(texts), context_length=context_length)
    n = (out != 0).sum(dim=1).numpy().astype(np.int32)
    return Tokenized(out, n, n >= context_length)


@torch.no_grad()
def encode_texts(teacher: ClipTeacher, tokens: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` float32 L2-normalised text embeddings on the CPU."""
    emb = teacher.model.encode_text(tokens.to(teacher.device), normalize=True)
    return emb.float().cpu()


@torch.no_grad()
def encode_images(teacher: ClipTeacher, images: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` float32 L2-normalised image embeddings of preprocessed ``(N, 3, S, S)`` images."""
    dtype = next(teacher.model.parameters()).dtype
    emb = teacher.model.encode_image(images.to(teacher.device, dtype=dtype), normalize=True)
    return emb.float().cpu()


def class_prompt_embedding(teacher: ClipTeacher, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """``(C, D)``: per class, the normalised mean of the normalised embeddings of every filled template."""
    texts = [t.format(n) for n in names for t in templates]
    tok = tokenize(teacher.tokenizer, texts, teacher.spec.context_length)
    emb = encode_texts(teacher, tok.tokens).view(len(names), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


# ---- image loading in workers -------------------------------------------------------------------------
@dataclass(frozen=True)
class Loaded(Pinnable):
    """One decoded item: ``index`` into the item list, the tensor (``None`` on failure) and the error."""

    index: int
    tensor: torch.Tensor | None
    error: str | None = None
    meta: Any = None


class ImageItems(Dataset):
    """Images decoded and preprocessed inside DataLoader workers. Holds only picklable plain data (the
    transform is built on first use in each process): nothing is opened before fork."""

    def __init__(self, root: str | os.PathLike[str], records: Sequence[ImageRecord],
                 preprocess: Mapping[str, Any]) -> None:
        self.root = str(root)
        self.records = list(records)
        self.preprocess_json = json.dumps(dict(preprocess), sort_keys=True)

    def __len__(self) -> int:
        return len(self.records)

    def _decode(self, i: int) -> Image.Image | Loaded:
        """Image ``i`` as RGB, or the failed :class:`Loaded` item (decode errors follow ``on_error`` later)."""
        try:
            return load_rgb(self.root, self.records[i])
        except (DataError, OSError) as e:  # ImageError is a DataError
            return Loaded(i, None, str(e))

    def __getitem__(self, i: int) -> Loaded:
        img = self._decode(i)
        if isinstance(img, Loaded):
            return img
        return Loaded(i, _cached_transform(self.preprocess_json)(img), meta=(img.width, img.height))


def crop_box_pixels(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Integer crop rectangle of a float xyxy box (original pixels): floor/ceil outwards, clipped to the
    image, at least one pixel wide and high."""
    x1, y1, x2, y2 = (float(v) for v in box)
    l, t = int(np.clip(np.floor(x1), 0, width - 1)), int(np.clip(np.floor(y1), 0, height - 1))
    r, b = int(np.clip(np.ceil(x2), l + 1, width)), int(np.clip(np.ceil(y2), t + 1, height))
    return l, t, r, b


class CropItems(ImageItems):
    """Per image: every box cropped in original pixels and preprocessed by the model's transform,
    stacked ``(K, 3, S, S)`` (``K`` may be 0). Decoded in workers; plain data only."""

    def __init__(self, root: str | os.PathLike[str], records: Sequence[ImageRecord],
                 boxes: Sequence[np.ndarray], preprocess: Mapping[str, Any], image_size: int) -> None:
        if len(records) != len(boxes):
            raise ValueError(f"CropItems: {len(records)} images but {len(boxes)} box arrays")
        super().__init__(root, records, preprocess)
        self.boxes = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes]
        self.image_size = int(image_size)

    def __getitem__(self, i: int) -> Loaded:
        img = self._decode(i)
        if isinstance(img, Loaded):
            return img
        tf = _cached_transform(self.preprocess_json)
        crops = [tf(img.crop(crop_box_pixels(b, img.width, img.height))) for b in self.boxes[i]]
        s = self.image_size
        return Loaded(i, torch.stack(crops) if crops else torch.zeros(0, 3, s, s))


def _collate(batch: list[Loaded]) -> list[Loaded]:
    return batch


def iter_loaded(dataset: Dataset, *, batch_size: int, num_workers: int,
                device: torch.device | str = "cpu") -> Iterator[list[Loaded]]:
    """Batches of :class:`Loaded` items in dataset order; decoding runs in ``num_workers`` processes
    (0: in this process) and overlaps the model's forward. Inside a daemonic process (e.g. a Dask or
    multiprocessing pool worker), which may not fork children, decoding runs in-process; pinned memory on
    CUDA (grounding/overlap.py)."""
    yield from prefetch_loader(dataset, batch_size=batch_size, num_workers=num_workers, device=device,
                               collate_fn=_collate)


def embed_loaded_images(teacher: ClipTeacher, batch: list[Loaded]) -> dict[int, np.ndarray | Exception]:
    """Embed the decoded images of one batch; failures map to :class:`ImageError`. Values float16 ``(D,)``."""
    ok = [b for b in batch if b.tensor is not None]
    out: dict[int, np.ndarray | Exception] = {b.index: ImageError(b.error) for b in batch if b.tensor is None}
    if ok:
        emb = encode_images(teacher, torch.stack([b.tensor for b in ok])).numpy().astype(np.float16)
        out.update({b.index: emb[j] for j, b in enumerate(ok)})
    return out


# ---- stage helpers ----------------------------------------------------------------------------------
def _dataset(params: Params, *, refs: bool = True) -> CanonicalDataset:
    return CanonicalDataset.load(params.prepared_dir(), refs=refs)


def upstream(params: Params, stage: str) -> ShardSet:
    """The committed shard set of an upstream stage (``ShardError`` telling which stage to run)."""
    path = params.teacher_dir(stage)
    try:
        return ShardSet(path)
    except ShardError as e:
        raise ShardError(f"input shard set of stage {stage!r} is not ready at {path}: run "
                         f"`grounding run {stage}` first ({e})") from None


def _common_extra(params: Params, teacher: ClipTeacher, ds: CanonicalDataset, out: Path) -> dict[str, Any]:
    from grounding.stages import dataset_extra

    return {**dataset_extra(params, ds, out), **teacher.extra}


# ---- stages --------------------------------------------------------------------------------------------
def run_clip_image(params: Params) -> Path:
    """``clip-image``: one L2-normalised embedding per image (float16, D)."""
    return write_clip_image(params, build_teacher(params), _dataset(params, refs=False))


def write_clip_image(params: Params, teacher: ClipTeacher, ds: CanonicalDataset, out: Path | None = None) -> Path:
    """The body of ``clip-image`` with a built teacher: decode + preprocess in ``num_workers`` DataLoader
    workers, forward in batches of ``batch_size``, stream rows into the shard writer."""
    from grounding.stages import write_stage

    cp = params.teachers.clip
    out = out or params.teacher_dir("clip-image")
    index = ds.image_index

    def rows(todo: list[str]) -> Iterator[tuple[str, Any]]:
        items = ImageItems(ds.image_root, [index[k] for k in todo], teacher.spec.preprocess)
        for batch in iter_loaded(items, batch_size=cp.batch_size, num_workers=cp.num_workers, device=teacher.device):
            emb = embed_loaded_images(teacher, batch)
            for b in batch:
                e = emb[b.index]
                yield todo[b.index], (e if isinstance(e, Exception) else {"embedding": e})

    fields = (FieldSpec("embedding", "float16", (teacher.embed_dim,), meaning=EMBEDDING_MEANING + " of the image"),)
    return write_stage(params, stage="clip-image", modules=CLIP_MODULES, level="image", fields=fields,
                       item_keys=[im.image_id for im in ds.images], rows=lambda todo: overlapped(rows(todo)),
                       stage_params={},
                       inputs={"dataset": ds.fingerprint()}, teacher=teacher.identity,
                       extra=_common_extra(params, teacher, ds, out), out_dir=out)


def run_clip_text(params: Params) -> Path:
    """``clip-text``: one embedding per sentence, with token count and truncation flag."""
    from grounding.stages import write_stage

    ds = _dataset(params)
    teacher = build_teacher(params)
    cp = params.teachers.clip
    out = params.teacher_dir("clip-text")
    text = {r.ref_id: r.text for r in ds.refs}
    ctx = teacher.spec.context_length

    def rows(todo: list[str]) -> Iterator[tuple[str, Any]]:
        for lo in range(0, len(todo), cp.batch_size):
            keys = todo[lo:lo + cp.batch_size]
            tok = tokenize(teacher.tokenizer, [text[k] for k in keys], ctx)
            emb = encode_texts(teacher, tok.tokens).numpy().astype(np.float16)
            for j, k in enumerate(keys):
                yield k, {"embedding": emb[j], "n_tokens": tok.n_tokens[j], "truncated": np.uint8(tok.truncated[j])}

    fields = (
        FieldSpec("embedding", "float16", (teacher.embed_dim,), meaning=EMBEDDING_MEANING + " of the sentence"),
        FieldSpec("n_tokens", "int32", (), meaning="tokens of the untruncated sentence incl. start/end tokens"),
        FieldSpec("truncated", "uint8", (), meaning=f"1 when the sentence was cut to the context length ({ctx})"),
    )
    return write_stage(params, stage="clip-text", modules=CLIP_MODULES, level="sentence", fields=fields,
                       item_keys=[r.ref_id for r in ds.refs], rows=rows, stage_params={},
                       inputs={"dataset": ds.fingerprint()}, teacher=teacher.identity,
                       extra={**_common_extra(params, teacher, ds, out), "context_length": ctx}, out_dir=out)


def detector_classes(params: Params) -> tuple[list[str], str]:
    """The detector class list (``extra.classes`` of the ``classes_from`` shard set) and that set's key."""
    src = upstream(params, params.teachers.clip.classes_from)
    classes = src.manifest.extra.get("classes")
    if not classes or not all(isinstance(c, str) for c in classes):
        raise ShardError(f"{src.path}: manifest has no extra.classes list to embed")
    return list(classes), src.manifest.stage_key


def run_clip_classes(params: Params) -> Path:
    """``clip-classes``: one embedding per detector class name (mean over the prompt templates)."""
    from grounding.stages import write_stage

    ds = _dataset(params)
    teacher = build_teacher(params)
    cp = params.teachers.clip
    out = params.teacher_dir("clip-classes")
    classes, classes_key = detector_classes(params)
    if len(set(classes)) != len(classes):
        raise ShardError(f"detector class list of {cp.classes_from!r} has duplicate names")
    position = {c: i for i, c in enumerate(classes)}

    def rows(todo: list[str]) -> Iterator[tuple[str, Any]]:
        emb = class_prompt_embedding(teacher, todo, cp.prompts).numpy().astype(np.float16)
        for j, k in enumerate(todo):
            yield k, {"embedding": emb[j], "index": np.int32(position[k])}

    fields = (
        FieldSpec("embedding", "float16", (teacher.embed_dim,),
                  meaning=EMBEDDING_MEANING + ": normalised mean of the prompt-template embeddings"),
        FieldSpec("index", "int32", (), meaning="index of the class in the detector's class list"),
    )
    return write_stage(params, stage="clip-classes", modules=CLIP_MODULES, level="class", fields=fields,
                       item_keys=classes, rows=rows,
                       stage_params={"prompts": list(cp.prompts), "classes": classes},
                       inputs={cp.classes_from: classes_key}, teacher=teacher.identity,
                       extra={**_common_extra(params, teacher, ds, out), "classes": classes,
                              "classes_from": cp.classes_from}, out_dir=out)


def run_clip_crops(params: Params) -> Path:
    """``clip-crops``: one embedding per proposal crop (crops in original pixels from the ``crops_from``
    shard set's ragged ``boxes``, at most ``max_crops_per_image``, in the proposals' order)."""
    from grounding.stages import write_stage

    ds = _dataset(params)
    teacher = build_teacher(params)
    cp = params.teachers.clip
    out = params.teacher_dir("clip-crops")
    src = upstream(params, cp.crops_from)
    if "boxes" not in src.fields or not src.fields["boxes"].ragged:
        raise ShardError(f"{src.path}: stage {cp.crops_from!r} has no ragged 'boxes' field to crop")
    index = ds.image_index
    keys = [k for k in src.keys if k in index]
    missing = [k for k in src.keys if k not in index]
    if missing:
        raise ShardError(f"{src.path}: proposals for images not in dataset {ds.name}: {missing[:5]}")
    k_max = cp.max_crops_per_image

    def rows(todo: list[str]) -> Iterator[tuple[str, Any]]:
        boxes = [np.asarray(src.get(k, ["boxes"])["boxes"], np.float32)[:k_max] for k in todo]
        items = CropItems(ds.image_root, [index[k] for k in todo], boxes, teacher.spec.preprocess,
                          teacher.spec.image_size)
        pending: list[Loaded] = []
        n_pending = 0
        loader = iter_loaded(items, batch_size=1, num_workers=cp.num_workers)
        for batch in loader:
            pending.extend(batch)
            n_pending += sum(len(b.tensor) for b in batch if b.tensor is not None)
            if n_pending >= cp.batch_size:
                yield from _emit_crops(teacher, pending, todo, boxes, cp.batch_size)
                pending, n_pending = [], 0
        yield from _emit_crops(teacher, pending, todo, boxes, cp.batch_size)

    d = teacher.embed_dim
    fields = (
        FieldSpec("boxes", "float32", (4,), ragged=True, meaning="cropped proposal boxes, xyxy original pixels"),
        FieldSpec("embedding", "float16", (d,), ragged=True, meaning=EMBEDDING_MEANING + " of each crop"),
        FieldSpec("proposal_index", "int32", (), ragged=True,
                  meaning=f"row of each box within the {cp.crops_from} row of the image"),
    )
    return write_stage(params, stage="clip-crops", modules=CLIP_MODULES, level="region", fields=fields,
                       item_keys=keys, rows=rows,
                       stage_params={"crops_from": cp.crops_from, "max_crops_per_image": k_max},
                       inputs={"dataset": ds.fingerprint(), cp.crops_from: src.manifest.stage_key},
                       teacher=teacher.identity,
                       extra={**_common_extra(params, teacher, ds, out),
                              "classes": src.manifest.extra.get("classes", [])}, out_dir=out)


def _emit_crops(teacher: ClipTeacher, pending: list[Loaded], todo: list[str], boxes: list[np.ndarray],
                batch_size: int) -> Iterator[tuple[str, Any]]:
    """Embed the crops of ``pending`` images in model batches of ``batch_size`` and yield their rows."""
    ok = [b for b in pending if b.tensor is not None and len(b.tensor)]
    flat = torch.cat([b.tensor for b in ok]) if ok else torch.zeros(0)
    parts = [encode_images(teacher, flat[i:i + batch_size]) for i in range(0, len(flat), batch_size)]
    emb = torch.cat(parts).numpy().astype(np.float16) if parts else np.zeros((0, teacher.embed_dim), np.float16)
    at = 0
    for b in pending:
        k = todo[b.index]
        if b.tensor is None:
            yield k, ImageError(b.error)
            continue
        n = len(b.tensor)
        yield k, {"boxes": boxes[b.index][:n], "embedding": emb[at:at + n].reshape(n, teacher.embed_dim),
                  "proposal_index": np.arange(n, dtype=np.int32)}
        at += n


# ---- qam -----------------------------------------------------------------------------------------------
def image_runs(keys: Sequence[str], image_of: Mapping[str, str]) -> list[tuple[str, list[int]]]:
    """Group consecutive ``keys`` (sentence ids) by image: ``[(image_id, [positions in keys])]``."""
    runs: list[tuple[str, list[int]]] = []
    for i, k in enumerate(keys):
        im = image_of[k]
        if runs and runs[-1][0] == im:
            runs[-1][1].append(i)
        else:
            runs.append((im, [i]))
    return runs


def patch_grid(spec: ModelSpec) -> tuple[int, int]:
    """``(rows, cols)`` of a ViT's patch grid from its config; ``ValueError`` for non-ViT image towers."""
    v = spec.model_cfg["vision_cfg"]
    if "timm_model_name" in v or not isinstance(v.get("layers", 12), int):
        raise ValueError(f"QAM needs an open_clip ViT image tower; {spec.name} has "
                         f"{v.get('timm_model_name') or 'a ResNet'}")
    size, patch = v.get("image_size", 224), v.get("patch_size", 16)
    (h, w), (ph, pw) = [(x, x) if isinstance(x, int) else tuple(x) for x in (size, patch)]
    return h // ph, w // pw


def run_qam(params: Params) -> Path:
    """``qam``: BiCM's query attention map per sentence (patch grid, float16, min-max normalised) and its
    box P_t (float32 xyxy original pixels) at ``qam_threshold``; the image is squashed to the model's
    input (see :mod:`grounding.teachers.qam`)."""
    from grounding.stages import write_stage
    from grounding.teachers.qam import check_supported, map_box, qam_from_states, qam_preprocess, trunk

    ds = _dataset(params)
    teacher = build_teacher(params)
    cp = params.teachers.clip
    out = params.teacher_dir("qam")
    refs = {r.ref_id: r for r in ds.refs}
    index = ds.image_index
    gh, gw = patch_grid(teacher.spec)
    pre = qam_preprocess(teacher.spec.preprocess)
    thr = cp.qam_threshold

    def rows(todo: list[str]) -> Iterator[tuple[str, Any]]:
        check_supported(teacher.model.visual)
        if tuple(teacher.model.visual.grid_size) != (gh, gw):
            raise ValueError(f"model grid {teacher.model.visual.grid_size} != config grid {(gh, gw)}")
        dtype = next(teacher.model.parameters()).dtype
        runs = image_runs(todo, {k: refs[k].image_id for k in todo})
        items = ImageItems(ds.image_root, [index[im] for im, _ in runs], pre)
        for batch in iter_loaded(items, batch_size=max(1, cp.batch_size // 4), num_workers=cp.num_workers):
            results: dict[int, Any] = {}
            ok = [b for b in batch if b.tensor is not None]
            for b in batch:
                if b.tensor is None:
                    results.update({p: ImageError(b.error) for p in runs[b.index][1]})
            pairs = [(j, p) for j, b in enumerate(ok) for p in runs[b.index][1]]
            if ok:
                images = torch.stack([b.tensor for b in ok]).to(teacher.device, dtype)
                with torch.no_grad():
                    states = trunk(teacher.model.visual, images)  # blocks before the last: once per image
                tok = tokenize(teacher.tokenizer, [refs[todo[p]].text for _, p in pairs], teacher.spec.context_length)
                text = encode_texts(teacher, tok.tokens)
                for lo in range(0, len(pairs), cp.batch_size):
                    chunk = pairs[lo:lo + cp.batch_size]
                    res = qam_from_states(teacher.model, states, text[lo:lo + len(chunk)],
                                          torch.tensor([j for j, _ in chunk], dtype=torch.long))
                    for c, (j, p) in enumerate(chunk):
                        rec = index[runs[ok[j].index][0]]
                        box, _ = map_box(res.maps[c].numpy(), rec.width, rec.height, thr)
                        results[p] = {"map": res.maps[c].numpy(), "box": box,
                                      "cosine": np.float32(res.cosine[c]), "flat": np.uint8(res.flat[c])}
            for b in batch:
                for p in runs[b.index][1]:
                    yield todo[p], results[p]

    fields = (
        FieldSpec("map", "float16", (gh, gw), meaning="query attention map on the ViT patch grid (rows = image "
                  "top to bottom), att*ReLU(grad) of cos(image, text) w.r.t. the last block's CLS->patch "
                  "attention, mean over heads, min-max normalised to [0, 1]"),
        FieldSpec("box", "float32", (4,), meaning=f"P_t: tight box of the upsampled, renormalised map >= {thr}, "
                  "xyxy original pixels (whole image when flat)"),
        FieldSpec("cosine", "float32", (), meaning="cos(CLIP image, CLIP text) of the squashed image"),
        FieldSpec("flat", "uint8", (), meaning="1 when the map had no positive evidence (all zeros)"),
    )
    return write_stage(params, stage="qam", modules=(*CLIP_MODULES, "grounding.teachers.qam"), level="sentence",
                       fields=fields, item_keys=[r.ref_id for r in ds.refs], rows=rows,
                       stage_params={"threshold": thr, "resize_mode": "squash"},
                       inputs={"dataset": ds.fingerprint()}, teacher=teacher.identity,
                       extra={**_common_extra(params, teacher, ds, out), "grid": [gh, gw],
                              "qam_preprocess": pre}, out_dir=out)
