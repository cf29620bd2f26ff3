"""Image loading for the CLIP stages: decode (:func:`grounding.data.images.load_rgb`) and preprocess whole
images or box crops in DataLoader workers, plus the stage inputs (prepared dataset, upstream shard sets)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from grounding.config import Params
from grounding.data.images import ImageError, load_rgb
from grounding.data.schema import CanonicalDataset, DataError, ImageRecord
from grounding.shards import ShardSet
from grounding.shards.manifest import ShardError
from grounding.teachers.clip_model import ClipTeacher, _cached_transform, encode_images
from grounding.overlap import Pinnable, prefetch_loader


log = logging.getLogger(__name__)


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
    from grounding.stage_writer import dataset_extra

    return {**dataset_extra(params, ds, out), **teacher.extra}
