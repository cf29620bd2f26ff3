"""Weights files: safe loading for every stage, and the trusted import of pickled checkpoints.

Stages load weights only with ``torch.load(weights_only=True)`` or safetensors (:func:`load_weights_file`,
:func:`load_state_dict_file`); neither runs code from the file. A file whose unpickling needs classes (an
ultralytics ``.pt``, a full-model ``torch.save(model)``, ``{"model": module}``, a ``{"state_dict": ...}`` with
pickled extras such as numpy scalars, a TorchScript archive) is refused with :class:`WeightsError` naming the file and the way out:

    grounding weights import SRC -o DST --trust      (only for files you trust)

:func:`import_weights` (that command) unpickles SRC with ``torch.load(weights_only=False)`` - only when
``trust`` is set -, extracts its state dict and writes DST as a weights-only file (a plain state dict via
``torch.save``, or safetensors when DST ends in ``.safetensors``) plus the provenance sidecar ``DST.json``
(:func:`sidecar_path`): the source's path and sha256, the library (and version) its classes come from, class
names and model config when the source has them (ultralytics ``names`` / ``yaml``, mmdet
``meta.dataset_meta.classes``), the keys and the number of tensors, the grounding version. Both files are
written atomically (temporary file + rename); on any failure nothing is left at DST.

This module imports no model code (students and teachers both use it); ultralytics is imported, offline,
only when a trusted source needs it.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from grounding.config import ConfigError
from grounding.shards import file_sha256

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "grounding-weights-import-v1"
IMPORT_COMMAND = "grounding weights import SRC -o DST --trust"
#: wrapper keys that are unwrapped when they hold a plain dict of tensors (checkpoint-style files)
WRAPPER_KEYS = ("state_dict", "model")
#: pickled modules that say nothing about the source library (containers, numpy scalars, torch itself)
_GENERIC_MODULES = ("builtins", "__builtin__", "collections", "copyreg", "_codecs", "numpy", "torch", "argparse",
                    "pathlib", "typing", "functools")


class WeightsError(ConfigError):
    """A weights file named in the params that cannot be used as given (unsafe pickle, unreadable, not a
    state dict, wrong architecture); the message names the file and the fix. A :class:`ConfigError`, so
    every entry point reports it as one line with exit code 2 (grounding.errors)."""


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The provenance sidecar of a weights file: ``<file>.json`` beside it."""
    return Path(str(path) + ".json")


def is_pickle_refusal(e: BaseException) -> bool:
    """Whether ``e`` is ``torch.load(weights_only=True)`` refusing a file whose loading needs classes
    (pickled classes, or a TorchScript archive)."""
    return (isinstance(e, pickle.UnpicklingError) and ("Unsupported global" in str(e) or "GLOBAL" in str(e))) or \
        (isinstance(e, RuntimeError) and "TorchScript archive" in str(e))


def refusal_error(path: str | os.PathLike[str], exc: BaseException | None = None) -> WeightsError:
    """The error a stage raises for a pickled weights file (``exc``: torch's refusal, when known): names
    the file, what it pickles and ``grounding weights import ... --trust``."""
    path = Path(path)
    if exc is not None and "TorchScript archive" in str(exc):
        return _refusal(path, [], " (a TorchScript archive)")
    return _refusal(path, pickled_globals(path) or [])


def _refusal(path: Path, globals_: list[str], what: str = "") -> WeightsError:
    libs = sorted({g.split(".")[0] for g in globals_}, key=lambda m: (m in _GENERIC_MODULES, m))  # library first
    if globals_:
        what = f" (it pickles {len(globals_)} classes/functions from {', '.join(libs)})"
    return WeightsError(
        f"{path}: torch.load(weights_only=True) refused this file: unpickling it needs classes{what}, and stages "
        f"never run code from a weights file. Convert it once with `grounding weights import {path} -o "
        f"{path.with_suffix('')}.weights.pt --trust` (only for files you trust) and point the params at the "
        "written file")


def pickled_globals(path: Path) -> list[str] | None:
    """The classes/functions a torch checkpoint's pickle references beyond torch's safe set (read without
    unpickling), or ``None`` when the file is not a zip-format torch checkpoint."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - legacy or broken files: unknown
        return None


def load_weights_file(path: str | os.PathLike[str]) -> Any:
    """Load a local weights file without running code: safetensors (``.safetensors``) or
    ``torch.load(weights_only=True)`` onto the CPU. Raises ``FileNotFoundError`` for a missing file and
    :class:`WeightsError` naming the file for a pickled-classes file (with the import command) or an
    unreadable one (truncated, not a checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (weights are local files, never downloaded)")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - any failure is a bad file
            raise WeightsError(f"{path}: not a readable safetensors file "
                               f"({type(e).__name__}: {_first_line(e)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - weights_only loading runs no code; any failure is a bad file
        if is_pickle_refusal(e):
            raise refusal_error(path, e) from None
        raise WeightsError(f"{path}: not a readable torch weights file (truncated or not a checkpoint?); "
                           f"torch.load(weights_only=True) failed ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """A loaded weights object -> its state dict: a mapping of names to tensors, or one wrapped as
    ``{"state_dict": {...}}`` / ``{"model": {...}}`` (checkpoint files: the other entries are dropped).
    ``WeightsError`` naming the file otherwise."""
    if isinstance(obj, Mapping):
        for k in WRAPPER_KEYS:
            if isinstance(obj.get(k), Mapping) and obj[k] and _all_tensors(obj[k]):
                return dict(obj[k])
        if obj and _all_tensors(obj):
            return dict(obj)
    kind = f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, Mapping) else type(obj).__name__
    raise WeightsError(f"{path}: not a state dict (a mapping of parameter names to tensors, possibly under "
                       f"'state_dict' or 'model'); found {kind}")


def _all_tensors(d: Mapping[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def load_state_dict_file(path: str | os.PathLike[str], key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in a local weights file, loaded safely (:func:`load_weights_file`) and unwrapped
    (:func:`as_state_dict`). Pickled full models are refused with :class:`WeightsError` naming
    :data:`IMPORT_COMMAND`; ``key``, the params key that named the file, prefixes every error."""
    path = Path(path)
    try:
        return as_state_dict(load_weights_file(path), path)
    except (WeightsError, FileNotFoundError) as e:
        if key is None:
            raise
        raise type(e)(f"{key}: {e}") from None


def read_sidecar(path: str | os.PathLike[str], sha256: str | None = None) -> dict[str, Any] | None:
    """The import provenance of ``path`` (its ``<file>.json``), or ``None`` when there is none. A sidecar
    that describes another file (its recorded sha256 differs from ``sha256``, when given) is an error."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        doc = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{side}: unreadable provenance sidecar ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != SIDECAR_FORMAT:
        return None
    recorded = (doc.get("weights") or {}).get("sha256")
    if sha256 is not None and recorded != sha256:
        raise WeightsError(f"{side} describes another file (sha256 {str(recorded)[:12]}..., {path} has "
                           f"{sha256[:12]}...); re-import the weights or delete the stale sidecar")
    return doc


def sidecar_meta(doc: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a loader reads from a sidecar: ``classes`` and ``config`` when recorded, and ``library``."""
    if not doc:
        return {}
    meta = {k: doc[k] for k in ("classes", "config") if doc.get(k) is not None}
    if doc.get("library"):
        meta["library"] = doc["library"]["name"]
    return meta


# ---- the trusted import ------------------------------------------------------------------------------------
def _prepare_unpickling(path: Path, globals_: list[str] | None) -> None:
    """Import ultralytics through the project's offline helper before unpickling a file that needs it
    (unpickling would otherwise import it with its online defaults)."""
    needs = any(g.startswith("ultralytics.") for g in globals_) if globals_ is not None else \
        b"ultralytics" in path.read_bytes()
    if needs:
        from grounding.ultralytics_offline import offline_ultralytics

        offline_ultralytics(Path(tempfile.gettempdir()) / "grounding-ultralytics")


def _library(globals_: list[str]) -> dict[str, str]:
    """The distribution the pickled classes come from (torch when only torch/containers are pickled)."""
    tops = sorted({g.split(".")[0] for g in globals_} - set(_GENERIC_MODULES))
    name = tops[0] if tops else "torch"
    try:
        version = md.version({"open_clip": "open_clip_torch"}.get(name, name))
    except (md.PackageNotFoundError, ValueError):
        import sys

        version = str(getattr(sys.modules.get(name), "__version__", "unknown"))
    return {"name": name, "version": version}


def _names_list(names: Any) -> list[str] | None:
    if isinstance(names, Mapping):  # ultralytics: {0: "person", ...}
        return [str(names[k]) for k in sorted(names)]
    if isinstance(names, (list, tuple)):
        return [str(n) for n in names]
    return None


def _jsonable(obj: Any) -> Any:
    """A JSON-safe copy of a config mapping (tuples -> lists, other objects -> str)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def extract(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict and what is known about it from an unpickled checkpoint: a full ``nn.Module``
    (``state_dict()``), ``{"ema" | "model": module}`` as ultralytics stores it (EMA first, like ultralytics'
    own loader; ``.float().state_dict()``), ``{"state_dict": dict | module}``, or a plain state dict.
    Returns ``(state_dict, {"extracted_from", "classes", "config"})``."""
    info: dict[str, Any] = {"extracted_from": "state dict", "classes": None, "config": None, "module_class": None}
    module = None
    if isinstance(obj, torch.nn.Module):
        module, info["extracted_from"] = obj, "module"
    elif isinstance(obj, Mapping):
        for k in ("ema", "model", "state_dict"):
            if isinstance(obj.get(k), torch.nn.Module):
                module, info["extracted_from"] = obj[k], k
                break
        meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}  # mmdet / mmengine
        classes = (meta.get("dataset_meta") or {}).get("classes") or meta.get("CLASSES") or obj.get("classes")
        info["classes"] = _names_list(classes)
    if module is not None:
        info["module_class"] = f"{type(module).__module__}.{type(module).__qualname__}"
        is_ultralytics = type(module).__module__.startswith("ultralytics.")
        if is_ultralytics:
            module = module.float()
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()
                 if isinstance(v, torch.Tensor)}
        info["classes"] = _names_list(getattr(module, "names", None)) or info["classes"]
        cfg = getattr(module, "yaml", None)
        if isinstance(cfg, Mapping):
            cfg = {k: v for k, v in cfg.items() if k != "yaml_file"}
            info["config"] = _jsonable(cfg)
            if info["classes"] is not None and "nc" in cfg and int(cfg["nc"]) != len(info["classes"]):
                log.warning("%s: config nc=%s but %d class names", path, cfg["nc"], len(info["classes"]))
        return state, info
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        info["extracted_from"] = "state_dict"
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        info["extracted_from"] = "model"
        obj = obj["model"]
    if not (isinstance(obj, Mapping) and obj):
        raise WeightsError(f"{path}: no state dict found (expected an nn.Module, {{'model': module}}, "
                           f"{{'state_dict': ...}} or a mapping of names to tensors; found {type(obj).__name__})")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: not a state dict: entries {bad[:5]} are not tensors")
    return {str(k): v.detach().cpu().contiguous() for k, v in obj.items()}, info


def _atomic_write(dst: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``dst``, then rename it onto ``dst``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_state_dict(state: Mapping[str, torch.Tensor], dst: Path) -> str:
    """Write ``state`` weights-only at ``dst`` (safetensors for ``.safetensors``, else ``torch.save`` of a
    plain dict), atomically; returns the format written."""
    fmt = "safetensors" if dst.suffix == ".safetensors" else "torch"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        # safetensors refuses tensors sharing storage; clone makes each its own
        _atomic_write(dst, lambda p: save_file({k: v.clone() for k, v in state.items()}, str(p)))
    else:
        _atomic_write(dst, lambda p: torch.save(dict(state), p))
    return fmt


def import_weights(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, trust: bool = False,
                   force: bool = False) -> dict[str, Any]:
    """Convert a (possibly pickled) checkpoint ``src`` into the weights-only ``dst`` plus ``dst.json``.

    Unpickling runs code from the file, so it happens only with ``trust=True``; without it a
    :class:`WeightsError` is raised and nothing is written. ``dst`` (and its sidecar) must not exist unless
    ``force``. The written file is read back with ``weights_only=True`` before it is renamed into place.
    Returns the provenance record (the sidecar's content)."""
    from grounding import __version__

    src, dst = Path(src), Path(dst)
    if not trust:
        raise WeightsError(f"{src}: importing unpickles the file, which runs code from it; pass --trust only "
                           "for a file you trust (nothing was written)")
    if not src.is_file():
        raise FileNotFoundError(f"weights file {src} does not exist")
    if src.resolve() == dst.resolve():
        raise WeightsError(f"{dst}: the output must differ from the source {src}")
    for p in (dst, sidecar_path(dst)):
        if p.exists() and not force:
            raise WeightsError(f"{p} exists; pass --force to overwrite it (nothing was written)")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"{dst.parent}: output directory does not exist")
    globals_ = pickled_globals(src)
    if src.suffix == ".safetensors":
        obj: Any = load_weights_file(src)
    else:
        _prepare_unpickling(src, globals_)
        try:
            obj = torch.load(src, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - a trusted file that still does not load is a bad file
            raise WeightsError(f"{src}: cannot be loaded even with --trust (truncated or not a torch "
                               f"checkpoint?) ({type(e).__name__}: {_first_line(e)}); nothing was written") from None
    state, info = extract(obj, src)
    library = _library([info["module_class"]] if info["module_class"] else globals_ or [])
    fmt = save_state_dict(state, dst)
    try:
        back = load_state_dict_file(dst)
        if back.keys() != state.keys() or any(back[k].shape != state[k].shape for k in state):
            raise WeightsError(f"{dst}: the written file does not read back as the extracted state dict")
        record = {
            "format": SIDECAR_FORMAT,
            "source": {"path": str(src.resolve()), "sha256": file_sha256(src), "bytes": src.stat().st_size},
            "library": library,
            "pickled_globals": globals_,
            "extracted_from": info["extracted_from"],
            "module_class": info["module_class"],
            "classes": info["classes"],
            "config": info["config"],
            "weights": {"path": dst.name, "sha256": file_sha256(dst), "format": fmt},
            "num_tensors": len(state),
            "num_elements": int(sum(v.numel() for v in state.values())),
            "keys": list(state),
            "grounding_version": __version__,
            "torch_version": torch.__version__,
        }
        text = json.dumps(record, indent=1) + "\n"
        _atomic_write(sidecar_path(dst), lambda p: p.write_text(text))
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    log.info("imported %s -> %s (%d tensors, from %s)", src, dst, len(state), info["extracted_from"])
    return record
