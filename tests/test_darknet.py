"""SimREC's / RefCLIP's YOLOv3 (``teachers.yolo.backend: darknet``): deformable conv vs a bilinear-sampling
reference, public key layout, strict loading and clear errors, SimREC preprocessing and exact box
back-mapping, the cached rows equal a direct call of the network.

Fast: random weights at width 0.125 on a 6-image synthetic set.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from grounding import config as C
from grounding.boxes import Letterbox
from grounding.data.images import load_rgb
from grounding.data.schema import CanonicalDataset
from grounding.shards import ShardSet
from grounding.teachers.detectors import keep_count
from grounding.teachers.detectors.stage import build_detector
from grounding.teachers.detectors.darknet import (
    ANCHORS,
    DarknetConfig,
    DarknetYolo,
    DeformConv,
    from_state_dict,
    infer_config,
)
from grounding.teachers.detectors.darknet_stage import (
    DarknetDetector,
    canvas_cxcywh_to_original,
    normalise,
    original_to_canvas_xyxy,
    random_weights,
    simrec_fit,
    simrec_letterbox,
)

WIDTH = 0.125


# ---- deformable conv ----------------------------------------------------------------------------------------
def bilinear(img: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """(C,) value of ``img`` (C, H, W) at (y, x): bilinear with zeros outside, the DCN convention (a
    point with y <= -1, x <= -1, y >= H or x >= W is 0; corners outside the image count as 0)."""
    c, h, w = img.shape
    if y <= -1 or x <= -1 or y >= h or x >= w:
        return torch.zeros(c, dtype=img.dtype)
    y0, x0 = math.floor(y), math.floor(x)
    out = torch.zeros(c, dtype=img.dtype)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * img[:, yy, xx]
    return out


def reference_deform_conv(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          groups: int) -> torch.Tensor:
    """3x3, stride 1, pad 1 deformable conv by explicit sampling. Offset layout of the published DCN
    (``deform_2d_im2col_cuda.cuh``): per deformable group g and tap k = 3 i + j, channel
    ``g * 18 + 2k`` is dy and ``g * 18 + 2k + 1`` is dx."""
    b, cin, h, w = x.shape
    cpg = cin // groups
    out = torch.zeros(b, weight.shape[0], h, w, dtype=x.dtype)
    for n in range(b):
        for oy in range(h):
            for ox in range(w):
                cols = torch.zeros(cin, 3, 3, dtype=x.dtype)
                for g in range(groups):
                    for i in range(3):
                        for j in range(3):
                            k = 3 * i + j
                            dy, dx = offset[n, g * 18 + 2 * k, oy, ox], offset[n, g * 18 + 2 * k + 1, oy, ox]
                            cols[g * cpg:(g + 1) * cpg, i, j] = bilinear(
                                x[n, g * cpg:(g + 1) * cpg], float(oy - 1 + i + dy), float(ox - 1 + j + dx))
                out[n, :, oy, ox] = (weight * cols).sum((1, 2, 3)) + bias
    return out


def test_deform_conv_equals_bilinear_sampling_reference() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    conv = DeformConv(8, 3, deformable_groups=4).double()
    offset = torch.randn(2, 72, 5, 6, dtype=torch.float64) * 1.5  # includes samples past the border
    with torch.no_grad():
        got = conv(x, offset)
        want = reference_deform_conv(x, offset, conv.weight, conv.bias, 4)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        # a pure dx shift of +1 on every tap of every group (odd channels: dx) is an ordinary conv whose
        # window starts one column right: output column c reads input columns c .. c + 2 (zeros past the edge)
        shift = torch.zeros_like(offset)
        shift[:, 1::2] = 1.0
        plain = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 2, 1, 1)), conv.weight, conv.bias)
        torch.testing.assert_close(conv(x, shift), plain, rtol=1e-9, atol=1e-9)


# ---- architecture and weights -------------------------------------------------------------------------------
def test_public_key_layout_and_shapes_at_full_width() -> None:
    sd = DarknetYolo(DarknetConfig(1.0, 80)).state_dict()
    assert len(sd) == 462
    expect = {
        "module_list.0.conv.weight": (32, 3, 3, 3), "module_list.0.batch_norm.running_var": (32,),
        "module_list.2.module_list.0.0.conv.weight": (32, 64, 1, 1),
        "module_list.6.module_list.7.1.conv.weight": (256, 128, 3, 3),
        "module_list.10.module_list.3.1.batch_norm.num_batches_tracked": (),
        "module_list.14.conv.weight": (512, 2048, 1, 1), "module_list.22.conv.weight": (256, 768, 1, 1),
        "module_list.31.conv.weight": (128, 384, 1, 1),
        "module_list.19.guide_wh.weight": (8, 1024, 1, 1),
        "module_list.19.Feature_adaption.conv_offset.weight": (72, 2, 1, 1),
        "module_list.19.Feature_adaption.dconv.weight": (1024, 1024, 3, 3),
        "module_list.19.Feature_adaption.dconv.bias": (1024,),
        "module_list.19.conv.weight": (340, 1024, 1, 1), "module_list.28.conv.weight": (340, 512, 1, 1),
        "module_list.37.conv.weight": (340, 256, 1, 1),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith(("module_list.13.", "module_list.16.", "module_list.21.")) for k in sd)
    assert infer_config(sd) == DarknetConfig(1.0, 80)


def test_random_file_in_public_layout_loads_strictly_and_round_trips(tmp_path: Path) -> None:
    path = random_weights(tmp_path / "w.pth", WIDTH, 5, seed=3)
    sd = torch.load(path, weights_only=True)
    assert all(k.startswith("module_list.") for k in sd)
    model = from_state_dict(sd, str(path))
    assert model.cfg == DarknetConfig(WIDTH, 5) and not model.training
    again = model.state_dict()
    assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)
    # RefCLIP-net / DataParallel prefixes are stripped
    wrapped = {f"module.visual_encoder.{k}": v for k, v in sd.items()}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), from_state_dict(wrapped)(x)
    for u, v in zip(a["maps"] + a["preds"], b["maps"] + b["preds"]):
        assert torch.equal(u, v)


def test_bad_state_dicts_give_errors_naming_file_and_keys(tmp_path: Path) -> None:
    sd = DarknetYolo(DarknetConfig(WIDTH, 5)).state_dict()
    src = "w.pth"
    missing = {k: v for k, v in sd.items() if k != "module_list.19.guide_wh.bias"}
    with pytest.raises(ValueError, match=r"w\.pth.*missing keys \(1\): module_list\.19\.guide_wh\.bias"):
        from_state_dict(missing, src)
    extra = {**sd, "module_list.19.rfb.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"w\.pth.*unexpected keys \(1\): module_list\.19\.rfb\.weight"):
        from_state_dict(extra, src)
    wrong = dict(sd)
    wrong["module_list.5.conv.weight"] = torch.zeros(32, 16, 1, 1)
    with pytest.raises(ValueError, match=r"w\.pth.*shape mismatches \(1\): module_list\.5\.conv\.weight: "
                                         r"file \(32, 16, 1, 1\) vs model \(32, 16, 3, 3\)"):
        from_state_dict(wrong, src)
    with pytest.raises(ValueError, match=r"w\.pth: not a SimREC/RefCLIP YOLOv3 state dict"):
        from_state_dict({"backbone.conv.weight": torch.zeros(1)}, src)


def test_detector_rejects_truncated_and_foreign_files(tmp_path: Path, world) -> None:
    root, params = world
    good = Path(params.teachers.yolo.weights)
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(good.read_bytes()[:1000])
    foreign = tmp_path / "foreign.pth"
    torch.save({"backbone.conv.weight": torch.zeros(3)}, foreign)
    for path, msg in ((trunc, r"trunc\.pth: not a readable torch weights file \(truncated"), (foreign, r"foreign\.pth: not a SimREC/RefCLIP")):
        det = build_detector("yolo", with_yolo(params, weights=str(path)), path)
        with pytest.raises(ValueError, match=msg):
            _ = det.model


# ---- head decoding --------------------------------------------------------------------------------------------
def test_head_decoding_follows_the_published_arithmetic() -> None:
    torch.manual_seed(1)
    model = DarknetYolo(DarknetConfig(WIDTH, 3)).eval()
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        out = model(x)
        raw = model(x, decode=False)
    for level, (idx, stride, mask) in enumerate(((19, 32, (6, 7, 8)), (28, 16, (3, 4, 5)), (37, 8, (0, 1, 2)))):
        p, r, g = out["preds"][level], raw["preds"][level], raw["guides"][level]
        assert p.shape == (1, 4, 128 // stride, 96 // stride, 8)
        a, yy, xx = 1, 2, 1
        base = [ANCHORS[m] for m in mask] + [(4 * stride, 4 * stride)]
        for a in range(4):
            t, gw = r[0, a, yy, xx], g[0, a, yy, xx]
            want = [(torch.sigmoid(t[0]) + xx) * stride, (torch.sigmoid(t[1]) + yy) * stride,
                    torch.exp(t[2]) * torch.exp(gw[0]) * base[a][0], torch.exp(t[3]) * torch.exp(gw[1]) * base[a][1]]
            torch.testing.assert_close(p[0, a, yy, xx, :4], torch.stack(want))
            torch.testing.assert_close(p[0, a, yy, xx, 4:], torch.sigmoid(t[4:]))
    # maps are the inputs of the heads: channels 1024/512/256 x width
    assert [m.shape[1] for m in out["maps"]] == [128, 64, 32]


# ---- preprocessing and back-mapping ---------------------------------------------------------------------------
@pytest.mark.parametrize("w,h", [(640, 427), (427, 640), (333, 333), (1000, 37), (500, 499)])
def test_simrec_geometry_and_exact_back_mapping(w: int, h: int) -> None:
    lb = simrec_fit(w, h, 416)
    ar = w / h
    nw, nh = (int(416 * ar), 416) if ar < 1 else (416, int(416 / ar))
    assert (lb.new_w, lb.new_h, lb.dx, lb.dy) == (nw, nh, (416 - nw) // 2, (416 - nh) // 2)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, [w, h], size=(20, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 50, size=(20, 2))], 1).astype(np.float32)
    canvas = original_to_canvas_xyxy(boxes, lb)
    cxcywh = np.concatenate([(canvas[:, :2] + canvas[:, 2:]) / 2, canvas[:, 2:] - canvas[:, :2]], 1)
    back = canvas_cxcywh_to_original(cxcywh, lb)
    np.testing.assert_allclose(back, boxes, rtol=0, atol=1e-3)
    # SimREC's yolobox2label, written out: x1 = (x1 - dx) / nw * w, x2 = x1 + (x2 - x1) / nw * w
    x1, y1, x2, y2 = canvas[0].astype(np.float64)
    ox1, oy1 = (x1 - lb.dx) / nw * w, (y1 - lb.dy) / nh * h
    np.testing.assert_allclose(back[0], [ox1, oy1, ox1 + (x2 - x1) / nw * w, oy1 + (y2 - y1) / nh * h], atol=1e-4)


def test_simrec_letterbox_pixels() -> None:
    import cv2

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(50, 80, 3), dtype=np.uint8)
    canvas, lb = simrec_letterbox(Image.fromarray(arr), 64)
    assert (lb.new_w, lb.new_h, lb.dx, lb.dy) == (64, 40, 0, 12)
    want = np.full((64, 64, 3), 127, np.uint8)
    want[12:52] = cv2.resize(arr, (64, 40))
    np.testing.assert_array_equal((canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), want)
    norm = normalise(canvas[None])[0]
    torch.testing.assert_close(norm[:, 0, 0], (torch.full((3,), 127 / 255) - torch.tensor([0.485, 0.456, 0.406]))
                               / torch.tensor([0.229, 0.224, 0.225]))


# ---- the stage --------------------------------------------------------------------------------------------------
def with_yolo(params: C.Params, **changes: object) -> C.Params:
    from tests.test_detectors import doc_of

    doc = doc_of(params)
    doc["teachers"]["yolo"].update(changes)
    return C.from_dict(doc)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, C.Params]:
    from grounding import stages
    from grounding.data.synthetic import CLASSES
    from tests.test_detectors import make_params

    root = tmp_path_factory.mktemp("darknet")
    base = make_params(root, yolo={"backend": "darknet", "input_size": 128})
    stages.run("prepare", base)
    w = random_weights(root / "w" / "darknet.pth", WIDTH, len(CLASSES), seed=0)
    return root, make_params(root, yolo={"backend": "darknet", "input_size": 128, "weights": str(w),
                                         "classes": list(CLASSES)})


def test_cached_rows_equal_direct_network_call(world) -> None:
    from grounding import stages

    root, params = world
    shards = ShardSet(stages.run("yolo-anchors", params).path)
    ds = CanonicalDataset.load(params.prepared_dir())
    g, k = 4, keep_count(16, params.teachers.yolo.keep_ratio)
    ex = shards.manifest.extra
    assert ex["grid"] == [g, g] and ex["kept_per_image"] == k and ex["channels"] == {"s32": 128, "s16": 64, "s8": 32}
    assert shards.manifest.level == "image"
    for image_id in shards.keys[:3]:
        det = build_detector("yolo", params, Path(params.teachers.yolo.weights))
        assert isinstance(det, DarknetDetector)
        canvas, lb = simrec_letterbox(load_rgb(ds.image_root, ds.image_index[image_id]), 128)
        with torch.no_grad():
            out = det.model(normalise(canvas[None]))
        row = shards.get(image_id)
        for name, m in zip(("map_s32", "map_s16", "map_s8"), out["maps"]):
            assert row[name].dtype == np.float16
            np.testing.assert_allclose(row[name].astype(np.float32), m[0].numpy(), rtol=1e-3, atol=1e-3)
        p = out["preds"][0][0].permute(1, 2, 0, 3).reshape(g * g, 4, -1).numpy()
        np.testing.assert_allclose(row["cell_objectness"], p[..., 4], atol=1e-6)
        np.testing.assert_allclose(row["cell_scores"], p[..., 4].mean(1), atol=1e-6)
        np.testing.assert_allclose(row["cell_boxes"], canvas_cxcywh_to_original(p[..., :4], lb), atol=1e-3)
        order = np.argsort(-p[..., 4].mean(1), kind="stable")[:k]
        np.testing.assert_array_equal(row["kept_cells"], np.sort(order))
        np.testing.assert_array_equal(Letterbox.from_array(row["letterbox"]).as_array(), lb.as_array())


def test_darknet_params_validation(tmp_path: Path) -> None:
    with pytest.raises(C.ConfigError, match=r"32 x width_multiple must be a positive integer"):
        C.from_dict({"teachers": {"yolo": {"backend": "darknet", "width_multiple": 0.1}}})
    with pytest.raises(C.ConfigError, match=r"backend"):
        C.from_dict({"teachers": {"yolo": {"backend": "darknet53"}}})
    assert C.from_dict({"teachers": {"yolo": {"backend": "darknet", "width_multiple": 0.125}}}).teachers.yolo.backend \
        == "darknet"


# ---- bootstrap ------------------------------------------------------------------------------------------------
def test_yolo_loss_assigns_every_level_and_overfits_one_image() -> None:
    from grounding.teachers.detectors.darknet_train import train_darknet, yolo_loss

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    canvas = torch.randn(3, 96, 96)
    target = (torch.tensor([[10.0, 12.0, 50.0, 40.0], [60.0, 50.0, 90.0, 95.0]]), torch.tensor([1, 0]))
    model = DarknetYolo(DarknetConfig(WIDTH, 2))
    with torch.no_grad():
        before = yolo_loss(model, model(canvas[None], decode=False), [target[0]], [target[1]])
    assert set(before) == {"xy", "wh", "guide", "obj", "cls"} and all(float(v) > 0 for v in before.values())
    model, stats = train_darknet([canvas], [target], DarknetConfig(WIDTH, 2), epochs=40, batch_size=1, lr=3e-3,
                                 crop=96, gen=gen)
    assert stats["final_loss"] < 0.5 * stats["first_loss"], stats
    with torch.no_grad():
        p32 = model(canvas[None])["preds"][0][0]  # (4, 3, 3, 7)
    # the stride-32 cell holding the first box's centre (30, 26) -> (y 0, x 0) scores above the empty ones
    obj = p32[..., 4].mean(0)
    assert obj[0, 0] > obj[1, 0] and obj[0, 0] > obj[0, 1], obj


def test_bootstrap_writes_a_public_layout_state_dict_the_stage_loads(tmp_path: Path) -> None:
    from grounding import stages
    from grounding.data.synthetic import CLASSES
    from grounding.teachers.bootstrap import bootstrap_path
    from tests.test_detectors import make_params

    p = make_params(tmp_path, yolo={"backend": "darknet", "input_size": 128,
                                    "bootstrap": {"epochs": 1, "batch_size": 4, "input_size": 128, "crop": 64}})
    stages.run("prepare", p)
    weights = stages.run("bootstrap-yolo", p).path
    assert weights == bootstrap_path(p, "yolo")
    sd = torch.load(weights, weights_only=True)
    assert isinstance(sd, dict) and all(k.startswith("module_list.") for k in sd)
    assert infer_config(sd) == DarknetConfig(WIDTH, len(CLASSES))
    shards = ShardSet(stages.run("yolo-anchors", p).path)
    assert shards.manifest.extra["classes"] == list(CLASSES)
    assert shards.manifest.teacher["weights_sha256"] == build_detector("yolo", p, weights).checkpoint.sha256


# ---- against the published code (when a checkout of kingthreestones/RefCLIP is at hand) ------------------------
_REFCLIP_GIT = Path("/work/.mirror/kingthreestones+RefCLIP/repo")
_DCN_SHIM = '''
import math, torch
from torch import nn
from torchvision.ops import deform_conv2d
class DeformConv2d(nn.Module):  # the published module's parameters; torchvision's kernel (same offset layout)
    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation=1, groups=1,
                 deformable_groups=1, im2col_step=64, bias=True):
        super().__init__()
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.uniform_(self.bias, -0.01, 0.01)
    def forward(self, input, offset):
        return deform_conv2d(input, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                             dilation=self.dilation)
'''


def _published_sources(dst: Path) -> bool:
    """Write the published models/visual_encoder.py + network_blocks.py (from ``$GROUNDING_REFCLIP_SRC``, a
    checkout, or the local git mirror) and a DCN shim under ``dst``; False when neither is available."""
    import os
    import subprocess

    files = ("models/visual_encoder.py", "models/network_blocks.py")
    src = os.environ.get("GROUNDING_REFCLIP_SRC")
    texts = {}
    for f in files:
        if src and (Path(src) / f).is_file():
            texts[f] = (Path(src) / f).read_text()
        elif _REFCLIP_GIT.is_dir():
            r = subprocess.run(["git", "-C", str(_REFCLIP_GIT), "show", f"HEAD:{f}"], capture_output=True, text=True)
            if r.returncode:
                return False
            texts[f] = r.stdout
        else:
            return False
    for f, t in texts.items():
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        (dst / f).write_text(t)
    for pkg in ("models", "utils", "utils/DCN", "utils/DCN/modules"):
        (dst / pkg).mkdir(parents=True, exist_ok=True)
        (dst / pkg / "__init__.py").write_text("")
    (dst / "utils/DCN/modules/deform_conv2d.py").write_text(_DCN_SHIM)
    return True


def test_equals_the_published_network_on_its_random_weights(tmp_path: Path) -> None:
    """The published YOLOv3 (its own code, DCN through torchvision) with random weights and BN statistics,
    saved as a state dict, loaded here: the three pre-head maps and every level's boxes and scores agree."""
    import subprocess
    import sys

    if not _published_sources(tmp_path / "pub"):
        pytest.skip("no kingthreestones/RefCLIP source (set GROUNDING_REFCLIP_SRC to a checkout)")
    script = f'''
import sys, torch
sys.path.insert(0, {str(tmp_path / "pub")!r})
from models.visual_encoder import YOLOv3
torch.manual_seed(0)
net = YOLOv3(num_classes=80).eval()
for m in net.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.1, 0.1); m.running_var.uniform_(0.5, 1.5)
        m.weight.data.uniform_(0.5, 1.5); m.bias.data.uniform_(-0.1, 0.1)
x = torch.randn(1, 3, 416, 416)
with torch.no_grad():
    _, maps, boxes = net(x)
torch.save(net.state_dict(), {str(tmp_path / "w.pth")!r})
torch.save({{"x": x, "maps": maps, "boxes": boxes}}, {str(tmp_path / "out.pt")!r})
'''
    # a subprocess: the published package names (models, utils) must not shadow anything in this process
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    ref = torch.load(tmp_path / "out.pt", weights_only=True)
    model = from_state_dict(torch.load(tmp_path / "w.pth", weights_only=True), "w.pth")
    with torch.no_grad():
        out = model(ref["x"])
    for a, b in zip(ref["maps"], out["maps"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for a, p in zip(ref["boxes"], out["preds"]):  # published: (B, cells, 4, 5 + C); here (B, 4, G, G, 5 + C)
        g = p.shape[2]
        torch.testing.assert_close(p.permute(0, 2, 3, 1, 4).reshape(1, g * g, 4, -1), a, rtol=1e-5, atol=1e-3)
