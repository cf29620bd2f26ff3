"""REC students (issue 9): the shared input checks, PBREC's soft targets and IoU vote, EMA, and the three
stages end to end on a tiny synthetic set with stand-in teacher shard sets (same schemas as the real
teachers): metrics contract, predictions, safe checkpoints, reproducibility, no-op rerun, evaluate table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from grounding import config, stages
from grounding.boxes import Letterbox
from grounding.data.schema import CanonicalDataset
from grounding.shards import FieldSpec, ShardSet, ShardSetSpec, ShardWriter
from grounding.students import common as C
from grounding.students import pbrec as P

N_IMAGES = 12
CLIP_D = 16
TINY = ["input_size=64", "depth=10", "width=0.25", "d_model=16", "text_layers=1", "fusion_layers=1", "heads=2",
        "epochs=2", "batch_images=4", "lr=0.001", "lr_backbone=0.001", "lr_drop=[1]", "max_len=8"]


def _write(path: Path, stage: str, level: str, fields: tuple, rows: dict, fingerprint: str) -> None:
    spec = ShardSetSpec(stage=stage, stage_key=f"stand-in-{stage}-{fingerprint[:8]}", level=level, fields=fields,
                        rows_per_shard=64, teacher={"name": "stand-in"}, inputs={"dataset": fingerprint})
    with ShardWriter(path, spec, sorted(rows), progress=False) as w:
        for k in w.todo():
            w.add(k, rows[k])


def _fcos_rows(ds: CanonicalDataset, rng: np.random.Generator) -> dict:
    """4x4 P5 points of a 128 letterbox per image at torchvision's FCOS anchor points (``i * 32``, the cell
    corners); each point's box is a random box around it, except that the point nearest each GT box centre
    carries (a jittered copy of) that GT box."""
    out = {}
    by_image: dict[str, list] = {}
    for r in ds.refs:
        by_image.setdefault(r.image_id, []).append(r.box)
    for im in ds.images:
        lb = Letterbox.fit(im.width, im.height, 128)
        c = np.arange(4) * 32.0
        xs, ys = np.meshgrid(c, c)
        canvas = np.stack([xs.ravel(), ys.ravel()], 1)
        pts = np.stack([(canvas[:, 0] - lb.dx) / lb.scale, (canvas[:, 1] - lb.dy) / lb.scale], 1).astype(np.float32)
        half = rng.uniform(10, 60, (16, 2))
        boxes = np.concatenate([pts - half, pts + half], 1)
        for box in by_image.get(im.image_id, []):
            k = int(np.argmin(((pts - [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]) ** 2).sum(1)))
            boxes[k] = np.array(box) + rng.normal(0, 1, 4)
        boxes = np.clip(boxes, 0, [im.width, im.height, im.width, im.height]).astype(np.float32)
        inside = ((pts[:, 0] >= 0) & (pts[:, 0] <= im.width) & (pts[:, 1] >= 0) & (pts[:, 1] <= im.height))
        out[im.image_id] = {"points": pts, "boxes": boxes, "inside": inside.astype(np.uint8)}
    return out


def _stand_in_teachers(p: config.Params, ds: CanonicalDataset, fingerprint: str | None = None) -> None:
    fp = fingerprint or ds.fingerprint()
    rng = np.random.default_rng(0)
    # RefCLIP pseudo-boxes: GT boxes shifted a little (a decent teacher), never read as GT by the student
    pseudo = {r.ref_id: {"box": (np.array(r.box) + rng.normal(0, 3, 4)).astype(np.float32)} for r in ds.refs}
    _write(p.teacher_dir("refclip-pseudo"), "refclip-pseudo", "sentence",
           (FieldSpec("box", "float32", (4,)),), pseudo, fp)
    unit = lambda v: (v / np.linalg.norm(v)).astype(np.float16)  # noqa: E731
    _write(p.teacher_dir("clip-image"), "clip-image", "image", (FieldSpec("embedding", "float16", (CLIP_D,)),),
           {im.image_id: {"embedding": unit(rng.normal(size=CLIP_D))} for im in ds.images}, fp)
    _write(p.teacher_dir("clip-text"), "clip-text", "sentence", (FieldSpec("embedding", "float16", (CLIP_D,)),),
           {r.ref_id: {"embedding": unit(rng.normal(size=CLIP_D))} for r in ds.refs}, fp)
    _write(p.teacher_dir("fcos-points"), "fcos-points", "image",
           (FieldSpec("points", "float32", (16, 2)), FieldSpec("boxes", "float32", (16, 4)),
            FieldSpec("inside", "uint8", (16,))), _fcos_rows(ds, rng), fp)
    Path(p.paths.metrics).mkdir(parents=True, exist_ok=True)
    (Path(p.paths.metrics) / "refclip.json").write_text(json.dumps({"refclip": {"train": {"acc": 0.5, "n": 3}}}))


def _params(tmp: Path, *extra: str) -> config.Params:
    sets = [f"students.{s}.{t}" for s in ("rec", "epmvg", "pbrec") for t in TINY]
    return config.load(None, [f"dataset.synthetic.n_images={N_IMAGES}", "progress=false",
                              *(f"paths.{k}={tmp}/{k}" for k in ("prepared", "teachers", "students", "models", "metrics")),
                              *sets, "students.rec.random_resize=[32,64]", "students.pbrec.visual_stride=16",
                              "students.rec.visual_layers=1", "students.epmvg.visual_layers=1",
                              "students.pbrec.visual_layers=1", "students.pbrec.epochs=2", *extra])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> config.Params:
    p = _params(tmp_path_factory.mktemp("students"))
    stages.run("prepare", p)
    _stand_in_teachers(p, CanonicalDataset.load(p.prepared_dir()))
    return p


# ---- checks ---------------------------------------------------------------------------------------------------
def test_require_rows_names_both_fingerprints_and_missing_keys(tiny: config.Params) -> None:
    path = tiny.teacher_dir("clip-text")
    ds = CanonicalDataset.load(tiny.prepared_dir())
    keys = [r.ref_id for r in ds.refs]
    assert len(C.require_rows(path, keys, ds.fingerprint(), "student-x")) == len(keys)
    with pytest.raises(C.StudentInputError, match=r"student-x.*clip-text.*'" + ds.fingerprint() + "'.*'f00'"):
        C.require_rows(path, keys, "f00", "student-x")
    with pytest.raises(C.StudentInputError, match=r"student-x.*no row for 1 of .*'nope-1'"):
        C.require_rows(path, [*keys, "nope-1"], ds.fingerprint(), "student-x")


def test_stage_stops_before_training_on_foreign_or_incomplete_shards(tiny: config.Params, tmp_path: Path) -> None:
    p = tiny.model_copy(update={"paths": tiny.paths.model_copy(update={"teachers": str(tmp_path / "t"),
                                                                       "models": str(tmp_path / "m")})})
    ds = CanonicalDataset.load(p.prepared_dir())
    _stand_in_teachers(p, ds, fingerprint="0" * 64)
    for stage in ("student-epmvg", "student-pbrec", "student-rec-pseudo"):
        with pytest.raises(C.StudentInputError, match=f"{stage}: .*{'0' * 64}.*{ds.fingerprint()}"):
            stages.run(stage, p)
    assert not (tmp_path / "m").exists()  # nothing trained
    # a set that lacks a sentence
    rows = {r.ref_id: {"box": np.array(r.box, np.float32)} for r in ds.refs[1:]}
    _write(p.teacher_dir("refclip-pseudo") / ".." / "short", "refclip-pseudo", "sentence",
           (FieldSpec("box", "float32", (4,)),), rows, ds.fingerprint())
    missing = next(r.ref_id for r in ds.refs if r.split == "train" and r.ref_id not in rows)
    with pytest.raises(C.StudentInputError, match=f"student-rec-pseudo: .*no row .*{missing}"):
        C.require_rows(p.teacher_dir("refclip-pseudo") / ".." / "short",
                       [r.ref_id for r in ds.refs if r.split == "train"], ds.fingerprint(), "student-rec-pseudo")


# ---- PBREC pieces ---------------------------------------------------------------------------------------------
def test_centerness_targets_follow_fcos_inside_3g_square() -> None:
    pts = np.array([[50, 50], [40, 50], [15, 50], [0, 50], [50, 95]], np.float32)
    box = (0, 0, 100, 100)
    got = P.centerness_targets(pts, box, g=20)
    assert got[0] == pytest.approx(1.0)
    assert got[1] == pytest.approx(np.sqrt(40 / 60))  # 10 px from the centre: inside the 60 px square
    assert got[2] == 0 and got[3] == 0 and got[4] == 0  # outside the 3g square / on the border


def test_massness_targets_fraction_of_cell_near_centroid() -> None:
    mask = np.zeros((100, 100), bool)
    mask[40:60, 40:60] = True  # centroid (50, 50)
    pts = np.array([[50, 50], [40, 50], [80, 50], [50, 95]], np.float32)
    got = P.massness_targets(pts, mask, g=10)
    assert got[0] == pytest.approx(1.0)  # cell [45,55)^2 fully covered
    assert got[1] == pytest.approx(0.5)  # cell [35,45)x[45,55): the half x >= 40 is covered
    assert got[2] == 0 and got[3] == 0  # beyond 2g of the centroid


def test_iou_vote_picks_the_consensus_box() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [50, 50, 60, 60], [51, 51, 61, 61], [49, 50, 59, 60.]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert P.iou_vote(boxes, scores, top_k=4) in (1, 2, 3) and P.iou_vote(boxes, scores, top_k=4) == 1
    assert P.iou_vote(boxes, scores, top_k=1) == 0


def test_ema_warmup_tracks_then_averages() -> None:
    m = torch.nn.Linear(2, 1)
    ema = C.ema_model(m, 0.9997, warmup=True)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.update_parameters(m)  # first update copies
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema.update_parameters(m)  # n=1: decay (1+1)/(10+1)
    assert ema.module.weight[0, 0].item() == pytest.approx(2 / 11, rel=1e-5)


# ---- stages end to end ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_students_end_to_end_contract_and_reproducibility(tiny: config.Params, tmp_path: Path) -> None:
    ds = CanonicalDataset.load(tiny.prepared_dir())
    for stage in ("student-rec-pseudo", "student-epmvg", "student-pbrec"):
        out = stages.run(stage, tiny).path
        m = json.loads((Path(tiny.paths.metrics) / f"{stage}.json").read_text())
        assert set(m) >= {"acc50", "n", "baselines"} and set(m["acc50"]) == set(ds.splits())
        assert all(0 <= v <= 1 for v in m["acc50"].values()) and sum(m["n"].values()) == len(ds.refs)
        assert "centred box" in m["baselines"]
        curve = json.loads((Path(tiny.paths.metrics) / f"{stage}-curve.json").read_text())
        assert curve and {"epoch", "loss"} <= set(curve[0])
        preds = ShardSet(out)
        assert len(preds) == len(ds.refs) and preds.manifest.level == "sentence"
        assert preds.get(ds.refs[0].ref_id)["box"].shape == (4,)
        ckpt = torch.load(C.model_path(tiny, stage), weights_only=True)
        assert "state_dict" in ckpt and ckpt["config"]["depth"] == 10
    rec = json.loads((Path(tiny.paths.metrics) / "student-rec-pseudo.json").read_text())
    assert rec["baselines"]["RefCLIP teacher"] == {"train": 0.5} and "acc50_raw" in rec
    ep = json.loads((Path(tiny.paths.metrics) / "student-epmvg.json").read_text())
    assert "distill: false" in ep["baselines"] and set(ep["variants"]) == {"distill", "no distill"}
    pb = json.loads((Path(tiny.paths.metrics) / "student-pbrec.json").read_text())
    assert pb["baselines"]["FCOS upper bound"]["train"] >= 0.8  # stand-in points carry the GT boxes (nearest point)

    # rerun: nothing to do (same key), files untouched
    mtime = C.model_path(tiny, "student-pbrec").stat().st_mtime_ns
    stages.run("student-pbrec", tiny)
    assert C.model_path(tiny, "student-pbrec").stat().st_mtime_ns == mtime

    # same shards + seed, fresh outputs: identical metrics and weights
    again = tiny.model_copy(update={"paths": tiny.paths.model_copy(update={
        "models": str(tmp_path / "models"), "metrics": str(tmp_path / "metrics"), "students": str(tmp_path / "s")})})
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "refclip.json").write_text((Path(tiny.paths.metrics) / "refclip.json").read_text())
    for stage in ("student-rec-pseudo", "student-epmvg", "student-pbrec"):
        stages.run(stage, again)
        a = json.loads((Path(tiny.paths.metrics) / f"{stage}.json").read_text())
        b = json.loads((tmp_path / "metrics" / f"{stage}.json").read_text())
        assert a == b, stage
        sa = torch.load(C.model_path(tiny, stage), weights_only=True)["state_dict"]
        sb = torch.load(C.model_path(again, stage), weights_only=True)["state_dict"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa), stage

    # evaluate: one table of every registered student and its baselines
    stages.run("evaluate", tiny)
    table = (Path(tiny.paths.metrics) / "students.md").read_text()
    doc = json.loads((Path(tiny.paths.metrics) / "students.json").read_text())
    for stage in ("student-rec-pseudo", "student-epmvg", "student-pbrec"):
        assert stage in doc["students"] and f"| {stage} |" in table
    assert "student-epmvg · baseline: distill: false" in table and "| model | train | val | testA | testB |" in table


def test_rec_students_never_import_teachers() -> None:
    import ast

    root = Path(__file__).resolve().parents[1] / "grounding" / "students"
    for name in ("common.py", "rec.py", "epmvg.py", "pbrec.py"):
        tree = ast.parse((root / name).read_text())
        mods = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        mods += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in mods if m.startswith("grounding.teachers")], name


@pytest.mark.parametrize("stride", [16, 32])
def test_visual_stride_sets_the_token_grid(stride: int) -> None:
    from grounding.students import rec as R

    cfg = R.RecConfig(depth=10, width=0.25, d_model=16, text_layers=1, fusion_layers=1, heads=2, max_len=8,
                      visual_stride=stride)
    model = R.RecStudent(cfg).eval()
    ids = torch.tensor([[1, 5, 2, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 128, 96), torch.tensor([0]), ids, ids == 0)
    assert out["grid"] == (128 // stride, 96 // stride)
    assert out["fused_visual"].shape == (1, (128 // stride) * (96 // stride), 16)
    with pytest.raises(ValueError, match="stride"):
        R.build_backbone(10, None, 0.25, stride=8)


# ---- images: students decode as the teachers (issue 22, item 1) ------------------------------------------------
def test_student_canvas_is_the_teacher_canvas_on_an_exif_rotated_image(tmp_path: Path) -> None:
    from PIL import Image

    from grounding.data.images import image_record, load_rgb
    from grounding.data.schema import RefRecord
    from grounding.teachers.detectors import IMAGENET_MEAN, letterbox_image

    img = Image.new("RGB", (60, 40), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # red marker at the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: 40 x 60
    img.save(tmp_path / "rot.jpg", format="JPEG", quality=95, exif=exif.tobytes())
    rec, _ = image_record(tmp_path, "r", "rot.jpg", (40, 60))
    assert (rec.orientation, rec.width, rec.height) == ("exif", 40, 60)
    ds = CanonicalDataset("x", tmp_path, [rec], [RefRecord("r-0", "r", "a red square", "train", (0, 0, 10, 10))])
    teacher, lb_t = letterbox_image(load_rgb(tmp_path, rec), 64, IMAGENET_MEAN)
    cv = C.Canvases(ds, 64)
    student = cv.canvas("r")
    assert student.shape == teacher.shape == (3, 64, 64)
    assert torch.equal(student, teacher)  # pixel for pixel, padding included
    assert cv.get("r")[1] == lb_t == cv.letterbox("r")  # decoded and recorded letterboxes agree
    # the stored top-left marker is displayed top-right: the student sees it where the boxes say
    assert student[0, lb_t.dy + 2, lb_t.dx + lb_t.new_w - 3] > 0.8 and student[0, lb_t.dy + 2, lb_t.dx + 2] < 0.2
    # normalised batch: padding is exactly 0
    x = cv.batch(["r"])
    assert torch.allclose(x[0, :, 0, 0], torch.zeros(3), atol=1e-6)
    # the raw decode the students used before (no EXIF transpose) gives other pixels and another size
    with Image.open(tmp_path / "rot.jpg") as raw:
        assert raw.convert("RGB").size == (60, 40)


# ---- the papers' rules (issue 22) ------------------------------------------------------------------------------
def test_box_loss_is_transvg_l1_summed_over_normalised_cxcywh_plus_giou() -> None:
    from grounding.students import rec as R

    pred, target = torch.tensor([[0.0, 0.0, 0.5, 0.5]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    # cxcywh (0.25, 0.25, 0.5, 0.5) vs (0.5, 0.5, 1, 1): |d| = 0.25 + 0.25 + 0.5 + 0.5 = 1.5; IoU 0.25, hull = target
    loss, parts = R.box_loss(pred, target, 1.0, "l1")
    assert parts["l1"] == pytest.approx(1.5) and parts["giou"] == pytest.approx(0.75) and float(loss) == pytest.approx(2.25)
    _, parts = R.box_loss(pred, target, 1.0, "smooth_l1")  # EpmVG eq. 8: 0.5 d^2 summed
    assert parts["smooth_l1"] == pytest.approx(0.5 * (0.0625 * 2 + 0.25 * 2))
    _, parts = R.box_loss(pred, target, 1.0, "smooth_l1_mean")  # the old term: xyxy d = (0, 0, .5, .5), mean
    assert parts["smooth_l1_mean"] == pytest.approx(0.5 * 0.25 * 2 / 4)
    two = torch.cat([pred, target]), torch.cat([target, target])  # a perfect row halves the batch mean
    assert R.box_loss(*two, 1.0, "l1")[1]["l1"] == pytest.approx(0.75)


def test_visual_encoder_adds_positions_to_queries_and_keys_only() -> None:
    from grounding.students import rec as R

    torch.manual_seed(0)
    enc = R.VisualEncoder(8, 2, 2, 0.0).eval()
    x = torch.randn(1, 1, 8).expand(1, 6, 8).contiguous()  # six identical tokens
    pos = torch.randn(6, 8)
    with torch.no_grad():
        y = enc(x, pos)
        y0 = enc(x, torch.zeros(6, 8))
    # identical values: attention returns them whatever the weights, so positions on q/k cannot change y
    assert torch.allclose(y, y0, atol=1e-5) and torch.allclose(y[0, 0], y[0, 5], atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(enc(x + pos, torch.zeros(6, 8)), y0, atol=1e-3)  # adding them to the input does
    assert len(R.VisualEncoder(8, 2, 6, 0.1).layers) == 6 and config.TrunkParams().visual_layers == 6
    cfg = R.RecConfig(depth=10, width=0.25, d_model=16, text_layers=1, visual_layers=0, fusion_layers=1, heads=2,
                      max_len=8)
    assert len(R.RecStudent(cfg).visual_encoder.layers) == 0


def test_query_length_rule_40_on_refcocog() -> None:
    from grounding.students import rec as R

    class _DS:
        def __init__(self, name: str, dataset: str) -> None:
            self.name, self.source = name, {"dataset": dataset}

    rec, pb = config.RecPseudoParams(), config.PbrecParams()
    assert R.query_length(rec, _DS("refcocog", "gref_umd")) == 40 and R.query_length(rec, _DS("x", "unc")) == 20
    assert R.query_length(pb, _DS("g", "refcocog")) == 40 and R.query_length(pb, _DS("x", "unc+")) == 30
    assert R.query_length(rec, None) == 20
    assert R.query_length(rec.model_copy(update={"max_len": 12}), _DS("refcocog", "gref")) == 12
    assert R.RecConfig.from_params(rec, _DS("refcocog", "gref")).max_len == 40


def test_epmvg_distils_the_fused_beginning_tokens_with_clip_pooled_to_the_student_width() -> None:
    from grounding.students import epmvg as E
    from grounding.students import rec as R

    assert E.clip_to_width(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 2).tolist() == [[1.5, 3.5]]
    cfg = R.RecConfig(depth=10, width=0.25, d_model=16, text_layers=1, visual_layers=1, fusion_layers=2, heads=2,
                      max_len=8, dropout=0.0)
    torch.manual_seed(0)
    model = R.RecStudent(cfg)
    ids = torch.tensor([[1, 5, 6, 2, 0, 0, 0, 0]] * 2)
    out = model(torch.randn(1, 3, 64, 64), torch.tensor([0, 0]), ids, ids == 0)
    v, t = E.beginning_tokens(out)
    n = out["fused_visual"].shape[1]
    assert v.shape == t.shape == (2, 16) and out["fused_text"].shape == (2, 8, 16)
    cos_v, cos_l = E.distill_loss(v, t, E.clip_to_width(torch.randn(2, 32), 16), E.clip_to_width(torch.randn(2, 32), 16))
    (cos_v + cos_l).backward()
    last = model.fusion.layers[-1].linear2.weight.grad
    assert last is not None and float(last.abs().sum()) > 0  # the fusion transformer gets the signal
    assert model.box_head[0].weight.grad is None  # the distillation terms do not touch the box head
    assert n == 4


def test_pbrec_points_are_the_student_tokens_one_to_one() -> None:
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    from grounding.students import rec as R

    # torchvision's FCOS P5 points of a 128 canvas: the anchor centres, at i * 32 (cell corners)
    gen = AnchorGenerator(((32,),), ((1.0,),))
    anchors = gen(ImageList(torch.zeros(1, 3, 128, 128), [(128, 128)]), [torch.zeros(1, 8, 4, 4)])[0]
    pts = ((anchors[:, :2] + anchors[:, 2:]) / 2) / 128
    assert pts[:5].tolist() == [[0.0, 0.0], [0.25, 0.0], [0.5, 0.0], [0.75, 0.0], [0.0, 0.25]]
    assert P.p5_token_index(pts, (4, 4)).tolist() == list(range(16))
    with pytest.raises(ValueError, match="one to one"):
        P.p5_token_index(pts, (2, 2))  # a coarser student grid would need interpolation
    with pytest.raises(ValueError, match="one to one"):
        P.p5_token_index(pts + 0.5 / 4, (4, 4))  # the half-cell shift of token centres
    # the point head reads token k for point k (a 64-px canvas at stride 16 is the 4x4 grid of the 128 FCOS one)
    cfg = R.RecConfig(depth=10, width=0.25, d_model=16, text_layers=1, visual_layers=1, fusion_layers=1, heads=2,
                      max_len=8, visual_stride=16)
    torch.manual_seed(0)
    model = P.PointStudent(cfg).eval()
    assert model.trunk.cfg.token_origin == 0.0
    ids = torch.tensor([[1, 5, 2, 0, 0, 0, 0, 0]])
    perm = torch.randperm(16).unsqueeze(0)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), torch.tensor([0]), ids, ids == 0, perm)
        direct = model.point_head(out["fused_visual"])
    assert torch.equal(out["point_logits"][0], direct[0, perm[0]])
    # the sine positions sit at the points: token (0, 1) of a 4x4 grid at x = 1/4, y = 0
    assert torch.allclose(R.sine_positions(4, 4, 16, 0.0)[1], R.sine_positions(8, 8, 16, 0.0)[2])


def test_param_groups_bert_and_cosine_schedule() -> None:
    net = torch.nn.Module()
    net.backbone = torch.nn.Linear(2, 2)
    net.text = torch.nn.Module()
    net.text.bert = torch.nn.Linear(2, 2)
    net.head = torch.nn.Linear(2, 2)
    groups = C.param_groups(net, 1e-4, 1e-5, 0.0, lr_bert=1e-6)
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [("rest", 1e-4, 2), ("backbone", 1e-5, 2),
                                                                       ("bert", 1e-6, 2)]
    opt = torch.optim.AdamW(groups)
    tp = config.PbrecParams()
    assert (tp.epochs, tp.lr, tp.lr_schedule, tp.lr_bert) == (15, 1e-4, "cosine", 1e-6)
    sched = C.scheduler(opt, tp)
    for _ in range(15):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert config.EpmvgParams().lr_bert == 1e-5 and config.EpmvgParams().box_l1 == "smooth_l1"


def test_bert_text_encoder_from_a_local_directory(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from grounding.students import rec as R

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "red", "square", "left", "of", "a", "blue"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32,
                                                   max_position_embeddings=32)).save_pretrained(tmp_path)
    cfg = R.RecConfig(depth=10, width=0.25, d_model=16, text_layers=1, visual_layers=1, fusion_layers=1, heads=2,
                      max_len=8, text_encoder="bert", bert_path=str(tmp_path))
    ids, pad = R.Tokenizer(cfg)(["the red square", "a blue square left of the red square"])
    assert ids[0, :5].tolist() == [2, 5, 6, 7, 3] and pad[0].tolist() == [False] * 5 + [True] * 3
    model = R.RecStudent(cfg)
    out = model(torch.randn(1, 3, 64, 64), torch.tensor([0, 0]), ids, pad)
    assert out["box"].shape == (2, 4) and out["fused_text"].shape == (2, 8, 16)
    groups = {g["name"]: g for g in C.param_groups(model, 1e-4, 1e-5, 0.0, lr_bert=1e-5)}
    n_bert = sum(p.numel() for p in model.text.bert.parameters())
    assert groups["bert"]["lr"] == 1e-5 and sum(p.numel() for p in groups["bert"]["params"]) == n_bert
    with pytest.raises(ValueError, match="bert_path"):
        R.Tokenizer(R.RecConfig(text_encoder="bert", bert_path=None))


def test_pbrec_from_scratch_text_encoder_trains_at_lr_not_the_bert_rate() -> None:
    """PBREC's 1e-6 is for a pre-trained BERT: a from-scratch text encoder (transformer / gru) is in the ``rest``
    group at ``lr``; only the ResNet takes ``lr_backbone``."""
    from grounding.students import rec as R

    cfg = R.RecConfig(depth=10, width=0.25, d_model=16, text_layers=1, visual_layers=1, fusion_layers=1, heads=2,
                      max_len=8, visual_stride=16)
    model = P.PointStudent(cfg)
    pp = config.PbrecParams()
    groups = {g["name"]: g for g in C.param_groups(model, pp.lr, pp.lr_backbone, 0.0, pp.lr_bert)}
    assert sorted(groups) == ["backbone", "rest"] and groups["rest"]["lr"] == pp.lr
    text = {id(p) for p in model.trunk.text.parameters()}
    assert text <= {id(p) for p in groups["rest"]["params"]}
    assert {id(p) for p in model.trunk.backbone.parameters()} == {id(p) for p in groups["backbone"]["params"]}


def test_pbrec_head_prior_starts_every_point_at_the_prior() -> None:
    """FCOS prior init: bias = -log((1 - π) / π), so sigmoid(bias) = π (0.01: bias -4.595)."""
    from grounding.students import rec as R

    cfg = R.RecConfig(depth=10, width=0.25, d_model=16, text_layers=1, visual_layers=1, fusion_layers=1, heads=2,
                      max_len=8, visual_stride=16)
    assert config.PbrecParams().head_prior == 0.01
    bias = P.PointStudent(cfg, head_prior=0.01).point_head[-1].bias
    assert torch.allclose(bias, torch.full((2,), -4.59512), atol=1e-5)
    assert torch.allclose(bias.sigmoid(), torch.full((2,), 0.01))
    torch.manual_seed(0)
    plain = P.PointStudent(cfg).point_head[-1].bias
    assert float(plain.abs().max()) < 1.0  # torch's init: near sigmoid 0.5
