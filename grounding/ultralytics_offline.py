"""Importing ultralytics offline: its settings under a project directory, no network, no analytics
(:func:`offline_ultralytics`). A neutral module: the YOLO teacher and the trusted weights import both use it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

_OFF = ("sync", "hub", "tensorboard", "wandb", "mlflow", "clearml", "comet", "dvc", "neptune", "raytune",
        "openvino_msg")


def offline_ultralytics(config_dir: str | os.PathLike[str]) -> Any:
    """Point ultralytics' settings at ``config_dir`` (not the home dir), force offline mode, switch off
    analytics and logger callbacks; returns the ``ultralytics`` module. Call before any other import of
    ultralytics (its settings and online check are read at import time)."""
    config_dir = Path(config_dir).resolve()
    config_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    os.environ["YOLO_OFFLINE"] = "1"
    import ultralytics
    from ultralytics.utils import SETTINGS, patches

    # Importing ultralytics monkey-patches PIL.Image.open (on an unidentified image it pip-installs pi-heif
    # at run time) and torch.save process-wide; put the originals back so load_rgb and every other module
    # behave the same whether or not ultralytics was imported.
    Image.open = patches._image_open
    torch.save = patches._torch_save

    updates = {k: False for k in _OFF if k in SETTINGS}
    updates.update({k: str(config_dir / k.replace("_dir", "")) for k in ("datasets_dir", "weights_dir", "runs_dir")
                    if k in SETTINGS})
    if any(SETTINGS.get(k) != v for k, v in updates.items()):
        SETTINGS.update(updates)
    return ultralytics
