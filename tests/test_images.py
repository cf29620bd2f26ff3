"""Safe image access: bad files, odd modes, EXIF orientation against the annotated size, path escapes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grounding.data.images import ImageError, image_record, load_rgb, probe_image, resolve_image_path
from grounding.data.schema import DataError


def _exif_jpeg(path: Path, orientation: int) -> None:
    img = Image.new("RGB", (60, 40), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # red marker at the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, format="JPEG", quality=95, exif=exif.tobytes())


def test_missing_truncated_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="missing"):
        probe_image(tmp_path / "nope.jpg")
    Image.new("RGB", (64, 48), (10, 20, 30)).save(tmp_path / "ok.jpg", quality=90)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"trunc\.jpg: cannot decode"):
        probe_image(tmp_path / "trunc.jpg")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match=r"junk\.png: cannot decode"):
        probe_image(tmp_path / "junk.png")


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16"])
def test_any_mode_decodes_to_rgb(tmp_path: Path, mode: str) -> None:
    ext = "jpg" if mode == "CMYK" else "png"
    if mode == "I;16":
        arr = np.full((8, 12), 65535, dtype=np.uint16)
        arr[:, :6] = 32896
        img = Image.fromarray(arr)
        assert img.mode.startswith("I;16")
    else:
        img = Image.new(mode, (12, 8))
    img.save(tmp_path / f"x.{ext}")
    rec, probe = image_record(tmp_path, "x", f"x.{ext}", (12, 8))
    out = load_rgb(tmp_path, rec)
    assert out.mode == "RGB" and out.size == (12, 8)
    if mode == "I;16":  # 16-bit scaled to 8 bits, not clipped
        px = np.asarray(out)
        assert px[0, 0, 0] == 128 and px[0, 11, 0] == 255
    if mode == "RGBA":  # fully transparent pixels composite over white
        assert np.asarray(out)[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_follows_the_annotation(tmp_path: Path) -> None:
    _exif_jpeg(tmp_path / "rot.jpg", 6)  # stored 60x40, displayed (rotated 90 deg) 40x60
    rec, probe = image_record(tmp_path, "r", "rot.jpg", (40, 60))
    assert (rec.orientation, rec.width, rec.height) == ("exif", 40, 60)
    img = load_rgb(tmp_path, rec)
    assert img.size == (40, 60)
    assert np.asarray(img)[2, 37, 0] > 200  # orientation 6 moves the top-left marker to the top-right
    rec2, probe2 = image_record(tmp_path, "r", "rot.jpg", (60, 40))
    assert (rec2.orientation, rec2.width, rec2.height) == ("raw", 60, 40) and "ignored" in probe2.note
    assert load_rgb(tmp_path, rec2).size == (60, 40)
    with pytest.raises(ImageError, match="neither the stored size 60x40 nor the EXIF-transposed size 40x60"):
        image_record(tmp_path, "r", "rot.jpg", (50, 50))
    assert probe_image(tmp_path / "rot.jpg").orientation == "exif"  # no annotated size: follow EXIF


def test_size_mismatch_without_exif_is_an_error(tmp_path: Path) -> None:
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    with pytest.raises(ImageError, match="decoded size 64x48 differs from annotated 48x64"):
        image_record(tmp_path, "a", "a.png", (48, 64))


def test_paths_may_not_escape_the_root(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
    for bad in ("../secret.png", "/etc/passwd", "a/../../secret.png"):
        with pytest.raises(DataError, match="refused"):
            resolve_image_path(root, bad)
    os.symlink(tmp_path / "secret.png", root / "link.png")
    with pytest.raises(ImageError, match="outside the image root"):
        resolve_image_path(root, "link.png")


def test_load_rgb_detects_a_changed_file(tmp_path: Path) -> None:
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    rec, _ = image_record(tmp_path, "a", "a.png", (64, 48))
    Image.new("RGB", (32, 48)).save(tmp_path / "a.png")
    with pytest.raises(ImageError, match="differs from the prepared 64x48"):
        load_rgb(tmp_path, rec)


def test_orientation_without_annotated_size_follows_the_reader(tmp_path: Path) -> None:
    from grounding.data.readers import orientation_when_unknown

    _exif_jpeg(tmp_path / "rot.jpg", 6)
    assert orientation_when_unknown("unc") == "raw" and orientation_when_unknown("referit") == "exif"
    rec, _ = image_record(tmp_path, "r", "rot.jpg", None, when_unknown="raw")
    assert (rec.orientation, rec.width, rec.height) == ("raw", 60, 40)
    rec, _ = image_record(tmp_path, "r", "rot.jpg", None, when_unknown="exif")
    assert (rec.orientation, rec.width, rec.height) == ("exif", 40, 60)
