"""params.yaml validation and --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from grounding import config as C

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_validate() -> None:
    p = C.load(ROOT / "params.yaml")
    assert p.dataset.format == "synthetic" and p.shards.rows_per_shard >= 1


def test_overrides_are_parsed_and_validated(tmp_path: Path) -> None:
    p = C.load(ROOT / "params.yaml", ["dataset.synthetic.n_images=12", "shards.rows_per_shard=7", "device=cpu"])
    assert p.dataset.synthetic["n_images"] == 12 and p.shards.rows_per_shard == 7 and p.device == "cpu"
    with pytest.raises(C.ConfigError, match="shards.rows_per_shard"):
        C.load(ROOT / "params.yaml", ["shards.rows_per_shard=0"])
    with pytest.raises(C.ConfigError, match="dataset.colour"):
        C.load(ROOT / "params.yaml", ["dataset.colour=1"])
    with pytest.raises(C.ConfigError, match="not of the form"):
        C.load(ROOT / "params.yaml", ["dataset.name"])
    with pytest.raises(C.ConfigError, match="dataset.format"):
        C.load(ROOT / "params.yaml", ["dataset.format=coco"])
    with pytest.raises(C.ConfigError, match="not found"):
        C.load(tmp_path / "missing.yaml")


def test_dump_and_reload_round_trips() -> None:
    p = C.load(ROOT / "params.yaml")
    assert C.from_dict(p.model_dump(mode="json", by_alias=True)) == p  # what the Prefect flow sends to tasks


def test_yaml_looking_strings_are_taken_as_strings_or_explained() -> None:
    """Issue 21: ``--option image_pattern={iid}.jpg`` unquoted (not valid YAML) and ``{iid}`` (YAML: a mapping
    of nulls) are the strings they look like; string params keep numbers as text; elsewhere an invalid
    YAML value is a ConfigError that shows the quoting, never a raw yaml traceback."""
    for raw in ("{iid}.jpg", "{iid}", '"{iid}.jpg"', "'{iid}.jpg'"):
        assert C.load(None, [f"dataset.options.image_pattern={raw}"]).dataset.options["image_pattern"] == raw.strip("'\"")
    assert C.load(None, ["dataset.options.n=3", "dataset.options.splits=[val]"]).dataset.options == {
        "n": 3, "splits": ["val"]}
    assert C.load(None, ["dataset.name=123"]).dataset.name == "123"
    assert C.load(None, ["refclip.word_vectors=null"]).refclip.word_vectors is None
    assert C.load(None, ["refclip.word_vectors={x}.txt"]).refclip.word_vectors == "{x}.txt"
    hint = r"""quote the strings inside it, e\.g\. teachers\.clip\.prompts='\["a \{\} photo"\]'"""
    with pytest.raises(C.ConfigError, match="is not valid YAML .*" + hint):
        C.load(None, ["teachers.clip.prompts=[a {} photo]"])
    with pytest.raises(C.ConfigError, match=r"is not valid YAML .*quote it: seed='\{1'"):
        C.load(None, ["seed={1"])


def test_cli_option_with_braces_reaches_the_reader(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from grounding.cli import app

    try:
        from fixtures import formats as F
    except ImportError:  # pragma: no cover
        from tests.fixtures import formats as F
    paths = F.make_simrec(tmp_path)
    for iid, (w, h) in F.REFER_IMAGES.items():  # the same images under a {iid}.jpg naming
        F.write_image(tmp_path / "flat" / f"{iid}.jpg", w, h, iid)
    res = CliRunner().invoke(app, ["data", "prepare", "--format", "simrec", "--root", str(paths["json_path"]),
                                   "--image-root", str(tmp_path / "flat"), "--name", "braces",
                                   "--option", "dataset=mine", "--option", "image_pattern={iid}.jpg",
                                   "--set", f"paths.prepared={tmp_path / 'prepared'}"])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output and "4 sentences" in res.output
    res = CliRunner().invoke(app, ["data", "prepare", "--format", "simrec", "--set", "seed={1"])
    assert res.exit_code == 2 and "quote it" in res.output and "Traceback" not in res.output
