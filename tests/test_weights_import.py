"""``grounding weights import``: stages refuse pickled weights files (the error names the command); the
command unpickles only with ``--trust``, writes a weights-only file and its provenance sidecar, and every
loader accepts what it wrote. Bad files give one clear error naming the file and leave nothing behind.

Fast: tiny random models (a scaled ultralytics YOLOv3-P5, a small ``nn.Sequential``, a slim ResNet, a
micro open_clip model); the CLI runs in-process through typer's ``CliRunner``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from grounding import __version__
from grounding import config as C
from grounding.cli import app
from grounding.weights import (
    SIDECAR_FORMAT,
    WeightsError,
    import_weights,
    load_state_dict_file,
    read_sidecar,
    sidecar_path,
)

runner = CliRunner()
CLASSES = ["red square", "blue circle", "green triangle"]


def cli(*args: str):
    return runner.invoke(app, list(args))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def files_in(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


# ---- ultralytics -----------------------------------------------------------------------------------------------
def yolo_doc(root: Path, weights: Path | None = None) -> dict:
    return {"device": "cpu", "progress": False, "seed": 0,
            "dataset": {"synthetic": {"n_images": 4, "min_size": 64, "max_size": 160}},
            "paths": {k: str(root / k) for k in ("prepared", "teachers", "students", "metrics", "models")},
            "teachers": {"yolo": {"backend": "ultralytics", "input_size": 128, "batch_size": 2, "num_workers": 0,
                                  "weights": str(weights) if weights else None}}}


@pytest.fixture(scope="module")
def ultralytics_pt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """A tiny ultralytics DetectionModel (the project's yolov3-p5.yaml scaled down) saved the way
    ultralytics' trainer saves a checkpoint: ``{"model": <half-precision module>, "ema": None, ...}``."""
    from grounding.teachers.detectors.yolo import import_ultralytics, model_config

    root = tmp_path_factory.mktemp("ultra")
    import_ultralytics(C.from_dict(yolo_doc(root)))
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    cfg = model_config("yolov3-p5.yaml", len(CLASSES), 0.33, 0.125)
    model = DetectionModel(cfg=cfg, nc=len(CLASSES), verbose=False).eval()
    model.names = dict(enumerate(CLASSES))
    reference = {k: v.clone() for k, v in model.float().state_dict().items()}
    import copy

    import ultralytics

    path = root / "yolo-tiny.pt"
    torch.save({"epoch": 3, "model": copy.deepcopy(model).half(), "ema": None, "optimizer": None,
                "train_args": {"imgsz": 128}, "version": ultralytics.__version__, "date": "2026-01-01"}, path)
    return path, reference, cfg


def test_stage_refuses_ultralytics_pt_and_accepts_the_import(ultralytics_pt, tmp_path: Path) -> None:
    from grounding.teachers.detectors import load_checkpoint
    from grounding.teachers.detectors.stage import build_detector

    src, reference, cfg = ultralytics_pt
    with pytest.raises(WeightsError, match=r"yolo-tiny\.pt: .*grounding weights import .* --trust") as e:
        load_checkpoint(src)
    assert "classes/functions from ultralytics, torch)" in str(e.value)
    p = C.from_dict(yolo_doc(tmp_path, src))
    with pytest.raises(WeightsError, match="grounding weights import"):
        _ = build_detector("yolo", p, src).classes

    dst = tmp_path / "yolo-tiny.weights.pt"
    res = cli("weights", "import", str(src), "-o", str(dst), "--trust")
    assert res.exit_code == 0, res.output
    assert torch.load(dst, weights_only=True).keys() == reference.keys()  # a plain state dict
    side = json.loads(sidecar_path(dst).read_text())
    assert side["source"]["sha256"] == sha(src) and side["weights"]["sha256"] == sha(dst)
    assert side["library"]["name"] == "ultralytics" and side["classes"] == CLASSES
    assert side["config"]["nc"] == len(CLASSES) and side["config"]["width_multiple"] == 0.125
    assert side["extracted_from"] == "model" and side["num_tensors"] == len(reference)

    ckpt = load_checkpoint(dst)
    assert ckpt.meta["classes"] == CLASSES and ckpt.meta["config"]["backbone"] == [list(r) for r in cfg["backbone"]]
    det = build_detector("yolo", C.from_dict(yolo_doc(tmp_path, dst)), dst)  # no classes/config in params
    assert det.classes == CLASSES
    got = det.model.state_dict()
    # stored in half precision by ultralytics: the import is the half weights, as float
    floats = [k for k in reference if reference[k].is_floating_point()]
    assert floats and all(torch.equal(got[k].float(), reference[k].half().float()) for k in floats)
    x = torch.rand(1, 3, 128, 128)
    assert det.forward(x)[0]["boxes"].shape[1] == 4


def test_yolo_anchors_stage_runs_on_the_imported_file(ultralytics_pt, tmp_path: Path) -> None:
    from grounding import stages
    from grounding.shards import ShardSet
    from grounding.shards.keys import file_sha256

    src, _, _ = ultralytics_pt
    dst = tmp_path / "yolo.weights.pt"
    import_weights(src, dst, trust=True)
    p = C.from_dict(yolo_doc(tmp_path, src))
    stages.run("prepare", p)
    with pytest.raises(WeightsError, match="grounding weights import"):
        stages.run("yolo-anchors", p)
    out = ShardSet(stages.run("yolo-anchors", C.from_dict(yolo_doc(tmp_path, dst))).path)
    assert len(out) == 4 and out.manifest.extra["classes"] == CLASSES
    assert out.manifest.teacher["weights_sha256"] == file_sha256(dst)


def test_sidecar_of_another_file_is_an_error(ultralytics_pt, tmp_path: Path) -> None:
    from grounding.teachers.detectors import load_checkpoint

    src, _, _ = ultralytics_pt
    dst = tmp_path / "w.pt"
    import_weights(src, dst, trust=True)
    torch.save(load_state_dict_file(dst) | {"extra": torch.zeros(1)}, dst)  # file changed, sidecar stale
    with pytest.raises(WeightsError, match=r"w\.pt\.json describes another file"):
        load_checkpoint(dst)


# ---- the command itself ----------------------------------------------------------------------------------------
def test_refuses_without_trust_and_writes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "full.pt"
    torch.save(tiny_net(), src)
    before = files_in(tmp_path)
    res = cli("weights", "import", str(src), "-o", str(tmp_path / "out.pt"))
    assert res.exit_code == 2 and "--trust" in res.output and "nothing" in res.output
    assert files_in(tmp_path) == before
    with pytest.raises(WeightsError, match="--trust"):
        import_weights(src, tmp_path / "out.pt")
    assert files_in(tmp_path) == before


@pytest.mark.parametrize("wrap", ["module", "model", "state_dict"])
def test_full_models_are_refused_then_imported_with_provenance(tmp_path: Path, wrap: str) -> None:
    net = tiny_net()
    obj = net if wrap == "module" else {wrap: net, "epoch": 7}
    src = tmp_path / "src.pth"
    torch.save(obj, src)
    with pytest.raises(WeightsError, match=r"src\.pth: .*needs classes .*grounding weights import"):
        load_state_dict_file(src)
    dst = tmp_path / "dst.pt"
    res = cli("weights", "import", str(src), "-o", str(dst), "--trust")
    assert res.exit_code == 0, res.output
    assert same_state(load_state_dict_file(dst), net.state_dict())
    side = read_sidecar(dst, sha(dst))
    assert side is not None and side["format"] == SIDECAR_FORMAT
    assert side["source"] == {"path": str(src.resolve()), "sha256": sha(src), "bytes": src.stat().st_size}
    assert side["library"] == {"name": "torch", "version": md.version("torch")}
    assert side["extracted_from"] == wrap and side["module_class"] == "torch.nn.modules.container.Sequential"
    assert side["keys"] == list(net.state_dict()) and side["num_tensors"] == 9  # 2 convs (w, b) + BN (5)
    assert side["grounding_version"] == __version__ and side["classes"] is None and side["config"] is None
    # an existing output is not overwritten unless --force
    res = cli("weights", "import", str(src), "-o", str(dst), "--trust")
    assert res.exit_code == 1 and "--force" in res.output
    assert cli("weights", "import", str(src), "-o", str(dst), "--trust", "--force").exit_code == 0


@pytest.mark.filterwarnings("ignore:.*TorchScript:UserWarning", "ignore:.*torch.jit:FutureWarning")
@pytest.mark.parametrize("kind", ["legacy-format", "torchscript"])
def test_legacy_pickles_and_torchscript_are_refused_then_imported(tmp_path: Path, kind: str) -> None:
    net = tiny_net().eval()
    src = tmp_path / f"{kind}.pt"
    if kind == "torchscript":
        torch.jit.save(torch.jit.script(net), src)
    else:
        torch.save(net, src, _use_new_zipfile_serialization=False)
    with pytest.raises(WeightsError, match=rf"{kind}\.pt: torch.load\(weights_only=True\) refused .*grounding weights"):
        load_state_dict_file(src)
    dst = tmp_path / "dst.pt"
    import_weights(src, dst, trust=True)
    assert same_state(load_state_dict_file(dst), net.state_dict())


def test_pickled_extras_in_a_state_dict_wrapper_and_safetensors_output(tmp_path: Path) -> None:
    import numpy as np

    net = tiny_net()
    src = tmp_path / "ckpt.pth"  # a checkpoint whose extras are numpy objects: weights_only refuses it
    torch.save({"state_dict": net.state_dict(), "best": np.float64(0.5), "meta": {"CLASSES": ("a", "b")}}, src)
    with pytest.raises(WeightsError, match=r"numpy.*grounding weights import"):
        load_state_dict_file(src)
    dst = tmp_path / "ckpt.safetensors"
    rec = import_weights(src, dst, trust=True)
    assert rec["extracted_from"] == "state_dict" and rec["classes"] == ["a", "b"]
    assert rec["weights"]["format"] == "safetensors" and dst.read_bytes()[8:9] == b"{"  # a safetensors header
    assert same_state(load_state_dict_file(dst), net.state_dict())


def test_weights_only_wrappers_still_load_directly(tmp_path: Path) -> None:
    net = tiny_net()
    for i, obj in enumerate([net.state_dict(), {"state_dict": net.state_dict(), "epoch": 1},
                             {"model": net.state_dict(), "args": {"lr": 0.1}}]):
        torch.save(obj, tmp_path / f"{i}.pt")
        assert same_state(load_state_dict_file(tmp_path / f"{i}.pt"), net.state_dict())


@pytest.mark.parametrize("kind", ["truncated", "text", "not-a-state-dict", "empty"])
def test_bad_files_give_a_clear_error_and_write_nothing(tmp_path: Path, kind: str) -> None:
    src = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        torch.save(tiny_net(), src)
        src.write_bytes(src.read_bytes()[:300])
    elif kind == "text":
        src.write_text("this is not a checkpoint\n")
    elif kind == "not-a-state-dict":
        torch.save({"lr": 0.1, "names": ["a"], "w": [torch.zeros(2)]}, src)
    else:
        src.write_bytes(b"")
    before = files_in(tmp_path)
    res = cli("weights", "import", str(src), "-o", str(tmp_path / "out.pt"), "--trust")
    assert res.exit_code == 1 and f"{kind}.pt" in res.output, res.output
    assert files_in(tmp_path) == before  # no output, no sidecar, no temporary file
    with pytest.raises(WeightsError, match=rf"{kind}\.pt: not a (readable torch weights file|state dict)"):
        load_state_dict_file(src)


def test_missing_source_and_same_path(tmp_path: Path) -> None:
    res = cli("weights", "import", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "out.pt"), "--trust")
    assert res.exit_code == 1 and "nope.pt does not exist" in res.output
    src = tmp_path / "a.pt"
    torch.save(tiny_net(), src)
    res = cli("weights", "import", str(src), "-o", str(src), "--trust", "--force")
    assert res.exit_code == 1 and "must differ" in res.output


# ---- other stages' loaders ------------------------------------------------------------------------------------
def test_student_backbone_refuses_a_pickled_resnet_and_accepts_the_import(tmp_path: Path) -> None:
    from torchvision.models.resnet import BasicBlock, ResNet

    from grounding.students.rec import build_backbone

    torch.manual_seed(0)
    resnet = ResNet(BasicBlock, [1, 1, 1, 1])  # the student's depth-10 ResNet at width 1
    src = tmp_path / "resnet10.pt"
    torch.save(resnet, src)
    with pytest.raises(WeightsError, match=r"resnet10\.pt: .*grounding weights import"):
        build_backbone(10, str(src), 1.0)
    dst = tmp_path / "resnet10.weights.pt"
    import_weights(src, dst, trust=True)
    body, c = build_backbone(10, str(dst), 1.0)
    assert c == 512 and torch.equal(body[0].weight, resnet.conv1.weight)
    assert torch.equal(body[4][0].conv1.weight, resnet.layer1[0].conv1.weight)


def test_mmdet_checkpoint_with_pickled_extras_keeps_its_class_names(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from grounding.teachers.detectors.mmdet import mmdet_state_dict

    net = tiny_net()
    src = tmp_path / "mmdet.pth"  # mmengine-style: meta with classes, plus a pickled runtime object
    torch.save({"meta": {"dataset_meta": {"classes": ("cat", "dog")}}, "state_dict": net.state_dict(),
                "message_hub": SimpleNamespace(step=3)}, src)
    with pytest.raises(WeightsError, match=r"mmdet\.pth: .*types.*grounding weights import"):
        mmdet_state_dict(src)
    dst = tmp_path / "mmdet.weights.pt"
    import_weights(src, dst, trust=True)
    ckpt = mmdet_state_dict(dst)
    assert same_state(ckpt.state_dict, net.state_dict()) and ckpt.meta["classes"] == ["cat", "dog"]


def test_clip_loader_refuses_a_pickled_model_and_accepts_the_import(tmp_path: Path) -> None:
    from grounding.teachers import clip as T

    micro = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    cfg = tmp_path / "micro-clip-import.json"
    cfg.write_text(json.dumps(micro))
    spec = T.model_spec(C.ClipParams(model_config=str(cfg)))
    torch.manual_seed(0)
    model = T.create_model(spec)
    src = tmp_path / "clip-full.pt"
    torch.save(model, src)
    with pytest.raises(C.ConfigError, match=r"clip-full\.pt: .*grounding weights import"):
        T.load_weights(T.create_model(spec), src)
    dst = tmp_path / "clip.weights.pt"
    import_weights(src, dst, trust=True)
    fresh = T.create_model(spec)
    T.load_weights(fresh, dst)
    assert same_state(fresh.state_dict(), model.state_dict())
