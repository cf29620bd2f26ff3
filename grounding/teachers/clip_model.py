"""The frozen CLIP teacher's model (open_clip): spec, construction, weights (a local file, never a hub tag),
identity, the built :class:`ClipTeacher`, text tokenisation and the embedding forwards. Stages live in
:mod:`grounding.teachers.clip`; image loading in :mod:`grounding.teachers.clip_loading`."""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from grounding.config import ClipParams, ConfigError, Params
from grounding.shards import file_sha256

log = logging.getLogger(__name__)


#: Architectures shipped with grounding (open_clip model-config JSON files, registered with open_clip).
CONFIG_DIR = Path(__file__).with_name("clip_configs")
TINY_MODEL = "grounding-tiny-clip"
#: Preprocessing of the shipped architectures, where it differs from open_clip's defaults. ``squash``
#: resizes the whole image to the square input, so every object is seen and patch maps cover the image.
PACKAGED_PREPROCESS: dict[str, dict[str, Any]] = {TINY_MODEL: {"resize_mode": "squash"}}
#: Modules whose source defines the outputs of the embedding stages (hashed into their keys).
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
    (the output of stage ``bootstrap-clip``, which the engine runs first)."""
    cp = params.teachers.clip
    if cp.pretrained:
        path = Path(cp.pretrained)
        if not path.is_file():
            raise ConfigError(f"teachers.clip.pretrained: {path} is not a file (a local weights file is "
                              "required; nothing is downloaded)")
        return path
    path = bootstrap_path(params)
    if not path.is_file():
        raise FileNotFoundError(f"teachers.clip.pretrained is null and {path} does not exist: run "
                                "`grounding run bootstrap-clip` (or name a weights file)")
    return path


def bootstrap_path(params: Params) -> Path:
    """Where stage ``bootstrap-clip`` writes the tiny CLIP of the configured dataset."""
    return Path(params.paths.models) / "bootstrap" / "clip" / f"{params.dataset.name}.pt"


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
