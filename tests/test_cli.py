"""The `grounding` CLI end to end on a small synthetic dataset: run, data, shards ls/info/show/verify/render."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from grounding.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def cli(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, list(args))
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    tmp = tmp_path_factory.mktemp("cli")
    sets = ["--params", str(ROOT / "params.yaml"), "--set", "dataset.synthetic.n_images=12",
            "--set", f"paths.prepared={tmp}/prepared", "--set", f"paths.teachers={tmp}/teachers",
            "--set", "progress=false"]
    code, out = cli("run", "prepare", *sets)
    assert code == 0, out
    code, out = cli("run", "gt-boxes", *sets)
    assert code == 0, out
    return sets, tmp / "teachers" / "gt-boxes" / "synthetic"


def test_ls_info_show(workspace: tuple[list[str], Path]) -> None:
    sets, shard_dir = workspace
    code, out = cli("shards", "ls", str(shard_dir.parent.parent))
    assert code == 0 and "gt-boxes" in out and "image" in out and "ground-truth" in out
    code, out = cli("shards", "info", str(shard_dir))
    assert code == 0 and "stage key" in out and "float32" in out and "dataset_dir" in out
    code, out = cli("shards", "show", str(shard_dir), "syn000001")
    assert code == 0 and "boxes" in out and "labels" in out
    code, out = cli("shards", "show", str(shard_dir), "nope")
    assert code == 1 and "not in shard set" in out


def test_verify_ok_then_corrupted(workspace: tuple[list[str], Path], tmp_path: Path) -> None:
    import shutil

    _, shard_dir = workspace
    code, out = cli("shards", "verify", str(shard_dir))
    assert code == 0 and "OK" in out
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    shard = copy / "shard-00000.h5"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, out = cli("shards", "verify", str(copy))
    assert code == 1 and "sha256" in out


def test_render_draws_the_boxes(workspace: tuple[list[str], Path], tmp_path: Path) -> None:
    _, shard_dir = workspace
    out_png = tmp_path / "r.png"
    code, out = cli("shards", "render", str(shard_dir), "syn000002", "-o", str(out_png))
    assert code == 0, out
    img = Image.open(out_png)
    assert img.mode == "RGB" and img.height > 34
    px = img.convert("RGB").getcolors(1 << 20)
    assert any(c == (255, 64, 64) for _, c in px)  # the box colour is present
    code, out = cli("shards", "render", str(shard_dir), "missing", "-o", str(out_png))
    assert code == 1 and "missing" in out


def test_rerun_is_a_no_op(workspace: tuple[list[str], Path]) -> None:
    sets, shard_dir = workspace
    before = {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()}
    code, out = cli("run", "gt-boxes", *sets)
    assert code == 0 and {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()} == before


def test_data_stats_and_errors(workspace: tuple[list[str], Path]) -> None:
    sets, _ = workspace
    code, out = cli("data", "stats", *sets)
    assert code == 0 and "train" in out and "sentences" in out
    code, out = cli("run", "gt-boxes", "--params", str(ROOT / "params.yaml"), "--set", "shards.rows_per_shard=0")
    assert code == 2 and "shards.rows_per_shard" in out
    code, out = cli("run", "no-such-stage", *sets)
    assert code == 2 and "unknown stage" in out
    code, out = cli("data", "stats", "/nonexistent/dir")
    assert code == 1 and "no prepared dataset" in out


def test_data_prepare_real_format(tmp_path: Path) -> None:
    from fixtures import formats  # the reader fixtures in the real layouts

    paths = formats.make_simrec(tmp_path)
    simrec_json, image_root = paths["json_path"], paths["image_root"]
    code, out = cli("data", "prepare", "--params", str(ROOT / "params.yaml"), "--format", "simrec",
                    "--root", str(simrec_json), "--image-root", str(image_root), "--name", "mini",
                    "--option", "dataset=refcoco", "--set", f"paths.prepared={tmp_path}/prepared")
    assert code == 0, out
    assert (tmp_path / "prepared" / "mini" / "dataset.json").exists() and "prepared mini" in out


def _readme_command(prefix: str) -> list[str]:
    """The README's CLI-block command that starts with ``prefix`` (line continuations joined), as argv."""
    import shlex

    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith(prefix):
            return shlex.split(line)
    raise AssertionError(f"README has no command starting with {prefix!r}")


def test_readme_refcoco_prepare_as_written(tmp_path: Path) -> None:
    """The README's refcoco example, run as written on the refer-layout fixture placed where it points."""
    from fixtures import formats

    argv = _readme_command("grounding data prepare --format refcoco")
    paths = formats.make_refcoco(tmp_path / "fixture")
    where = {"data/raw/refer": str(paths["root"]), "data/raw/train2014": str(paths["image_root"])}
    argv = [where.get(a, a) for a in argv[1:]]
    assert set(where.values()) <= set(argv), f"README paths changed: {argv}"
    code, out = cli(*argv, "--params", str(ROOT / "params.yaml"), "--set", f"paths.prepared={tmp_path}/prepared")
    assert code == 0, out
    name = argv[argv.index("--name") + 1]
    assert (tmp_path / "prepared" / name / "dataset.json").exists()


def test_prepare_refuses_other_dataset_option(tmp_path: Path) -> None:
    from fixtures import formats

    paths = formats.make_refcoco(tmp_path / "fixture")
    code, out = cli("data", "prepare", "--params", str(ROOT / "params.yaml"), "--format", "refcoco",
                    "--root", str(paths["root"]), "--image-root", str(paths["image_root"]), "--name", "x",
                    "--option", "dataset=refcocog", "--set", f"paths.prepared={tmp_path}/prepared")
    assert code != 0 and "--format refcocog" in out and "Traceback" not in out
