"""dataset.json streamed for its images (``CanonicalDataset.load(..., refs=False)``): what image-level teacher
stages use so their memory does not grow with the number of sentences (the 100k-image scale run)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from grounding.data.schema import CanonicalDataset, DataError, ImageRecord, RefRecord, read_records


def _dataset(tmp_path: Path, n_images: int = 6, refs_per_image: int = 3) -> CanonicalDataset:
    images = [ImageRecord(f"img{i:03d}", f"img{i:03d}.jpg", 64 + i, 48, f"{i:064x}") for i in range(n_images)]
    refs = [RefRecord(f"img{i:03d}-{k}", f"img{i:03d}", f"the red circle number {k} of image {i} ✓", "train",
                      (1.0, 2.0, 30.5, 40.0), "circle", {"size": [48, 64 + i], "counts": "a" * 200})
            for i in range(n_images) for k in range(refs_per_image)]
    return CanonicalDataset("toy", tmp_path / "images", images, refs, {"format": "toy", "n": n_images})


def test_images_only_equals_whole_and_refuses_refs(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    ds.save(tmp_path / "p")
    whole, lean = CanonicalDataset.load(tmp_path / "p"), CanonicalDataset.load(tmp_path / "p", refs=False)
    assert whole.refs == ds.refs and whole.source == ds.source == lean.source
    assert lean.images == ds.images and lean.fingerprint() == ds.fingerprint() == whole.fingerprint()
    assert lean.image_root == whole.image_root and lean.name == "toy"
    with pytest.raises(DataError, match="loaded without its sentences"):
        len(lean.refs)
    with pytest.raises(DataError, match="loaded without its sentences"):
        [r for r in lean.refs]


def test_file_is_one_json_document_one_record_per_line(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, 4, 2)
    text = ds.save(tmp_path / "p").read_text(encoding="utf-8")
    doc = json.loads(text)  # any JSON reader still reads it
    assert list(doc) == sorted(doc) and len(doc["images"]) == 4 and len(doc["refs"]) == 8
    assert len(text.splitlines()) == 4 + 8 + 7


def test_sentences_are_checked_even_when_not_kept(tmp_path: Path) -> None:
    """An edited sentence is caught by the fingerprint check of the images-only load too."""
    _dataset(tmp_path).save(tmp_path / "p")
    f = tmp_path / "p" / "dataset.json"
    f.write_text(f.read_text(encoding="utf-8").replace("number 2 of image 5", "number 2 of image 6"),
                 encoding="utf-8")
    for refs in (True, False):
        with pytest.raises(DataError, match="fingerprint mismatch"):
            CanonicalDataset.load(tmp_path / "p", refs=refs)


def test_unknown_image_and_unsorted_lines(tmp_path: Path) -> None:
    _dataset(tmp_path).save(tmp_path / "p")
    f = tmp_path / "p" / "dataset.json"
    lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if '"ref_id":"img005-2"' in line)
    lines[at] = lines[at].replace('"image_id":"img005"', '"image_id":"nope"')
    f.write_text("".join(lines), encoding="utf-8")
    for refs in (True, False):
        with pytest.raises(DataError, match="unknown image 'nope'"):
            CanonicalDataset.load(tmp_path / "p", refs=refs)
    # two image lines swapped: the streamed reader hands over to the whole-file reader, which sorts
    _dataset(tmp_path).save(tmp_path / "q")
    g = tmp_path / "q" / "dataset.json"
    lines = g.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[2], lines[3] = lines[3].lstrip(","), "," + lines[2]
    g.write_text("".join(lines), encoding="utf-8")
    assert CanonicalDataset.load(tmp_path / "q", refs=False).fingerprint() == _dataset(tmp_path).fingerprint()


def test_older_single_line_file_still_loads(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    ds.save(tmp_path / "p")
    f = tmp_path / "p" / "dataset.json"
    f.write_text(json.dumps(json.loads(f.read_text(encoding="utf-8"))), encoding="utf-8")
    assert len(f.read_text().splitlines()) == 1
    assert CanonicalDataset.load(tmp_path / "p").refs == ds.refs
    assert CanonicalDataset.load(tmp_path / "p", refs=False).images == ds.images
    head, images, refs = read_records(f)
    assert head["fingerprint"] == ds.fingerprint() and len(images) == 6 and len(list(refs)) == 18


def test_images_only_memory_does_not_hold_the_sentences(tmp_path: Path) -> None:
    """Peak Python allocation of the images-only load is a small fraction of the whole load when sentences
    dominate the file (as at scale: ~7 sentences with masks per image)."""
    _dataset(tmp_path, n_images=40, refs_per_image=100).save(tmp_path / "p")

    def peak(refs: bool) -> int:
        tracemalloc.start()
        CanonicalDataset.load(tmp_path / "p", refs=refs)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    whole, lean = peak(True), peak(False)
    assert lean < whole / 10, (lean, whole)


def test_read_source_reads_the_last_line_or_the_whole_file(tmp_path: Path) -> None:
    from grounding.data.schema import read_source

    _dataset(tmp_path).save(tmp_path / "p")
    f = tmp_path / "p" / "dataset.json"
    assert read_source(f) == {"format": "toy", "n": 6}
    f.write_text(json.dumps(json.loads(f.read_text(encoding="utf-8"))), encoding="utf-8")
    assert read_source(f) == {"format": "toy", "n": 6}
