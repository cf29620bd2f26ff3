"""WordNet soft labels: database set-up, head nouns (hand-labelled fixture), matching, the stage, p̂ targets.

All lookups are real WordNet 3.0 lookups through NLTK (the database is installed by `make install`).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from grounding import config as C
from grounding.shards import ShardSet, stage_key
from grounding.soft_targets import region_targets
from grounding.teachers import wordnet as W
from grounding.teachers import wordnet_db as DB

FIXTURES = Path(__file__).parent / "fixtures"
COCO = ["__background__", "person", "bicycle", "car", "motorcycle", "bus", "traffic light", "N/A", "bench",
        "bird", "cat", "dog", "horse", "sheep", "cow", "umbrella", "tie", "skis", "kite", "hot dog", "chair",
        "couch", "dining table", "tv", "laptop", "mouse", "remote", "toaster", "teddy bear"]


@pytest.fixture(scope="module")
def wn():
    return DB.load()


# ---- database ---------------------------------------------------------------------------------------------
def test_wordnet_is_3_0_through_nltk(wn) -> None:
    assert wn.get_version() == "3.0"
    assert DB.corpus_dir().is_dir() and (DB.corpus_dir() / "lexnames").read_text() == DB.lexnames_text()
    assert len(DB.LEXNAMES) == 45 and [n for n, _, _ in DB.LEXNAMES] == list(range(45))
    assert wn.synset("dog.n.01").lexname() == "noun.animal"  # read through our lexnames


def test_lexnames_agree_with_the_database_and_manual(wn) -> None:
    counts = DB.check_lexnames(DB.corpus_dir())
    assert counts == {"noun": 82115, "verb": 13767, "adj": 18156, "adv": 3621}  # WordNet 3.0 synset counts
    man = Path("/usr/share/man/man5/lexnames.5WN.gz")
    if not man.exists():
        pytest.skip("lexnames(5WN) manual page not installed")
    rows = re.findall(r"^(\d\d)\t(\S+)\s", gzip.open(man, "rt").read(), re.M)
    assert [(int(n), name) for n, name in rows] == [(n, name) for n, name, _ in DB.LEXNAMES]


def test_missing_database_says_how_to_install(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GROUNDING_WORDNET_DIR", str(tmp_path))
    with pytest.raises(DB.WordNetMissing, match="apt-get install wordnet-base wordnet-sense-index"):
        DB.find_database()
    assert DB.main(["install", "--force"]) == 1  # the CLI reports it and fails


def test_install_lays_out_an_nltk_corpus(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("GROUNDING_WORDNET_DIR", raising=False)
    src = DB.find_database()
    target = DB.install(src, tmp_path)
    assert target == tmp_path / "corpora" / "wordnet"
    assert all((target / f).is_file() and not (target / f).is_symlink() for f in DB.DB_FILES)
    assert (target / "lexnames").read_text() == DB.lexnames_text()
    assert DB.install(src, tmp_path) == target  # idempotent
    assert DB.database_digest(target) == DB.database_digest()


# ---- head nouns ---------------------------------------------------------------------------------------------
def _fixture(name: str) -> list[tuple[str, str]]:
    rows = []
    for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            phrase, head = line.split("\t")
            rows.append((phrase, head))
    return rows


@pytest.mark.parametrize("name, floor", [("head_nouns.tsv", 0.95), ("head_nouns_heldout.tsv", 0.9)])
def test_fallback_head_noun_accuracy(wn, name: str, floor: float) -> None:
    rows = _fixture(name)
    assert len(rows) >= (100 if name == "head_nouns.tsv" else 50)
    got = [(p, gold, W.head_noun(p, tagger="fallback", wn=wn)) for p, gold in rows]
    assert all(h.path == "fallback" for _, _, h in got)
    wrong = [(p, gold, h.noun) for p, gold, h in got if (h.noun or "-") != gold]
    acc = 1 - len(wrong) / len(rows)
    print(f"{name}: fallback head-noun accuracy {acc:.3f} ({len(rows) - len(wrong)}/{len(rows)}); misses {wrong}")
    assert acc >= floor, wrong


@pytest.mark.parametrize("phrase", ["", "   ", "!!!", "the one on the left", "left", "bottom right", "it",
                                    "something blue", "second from left", "2nd from left", "the white one"])
def test_phrases_without_a_noun_are_none(wn, phrase: str) -> None:
    h = W.head_noun(phrase, tagger="fallback", wn=wn)
    assert h.noun is None
    m = W.match(h.noun, COCO, wn=wn)
    assert m.how == "none" and m.reason == "no head noun" and not m.label.any() and m.label.dtype == np.float16


def test_head_noun_rules(wn) -> None:
    hn = lambda p, **kw: W.head_noun(p, tagger="fallback", wn=wn, **kw).noun  # noqa: E731
    assert hn("puppies on the grass") == "puppies"  # plural kept as written
    assert hn("the red traffic light near the car") == "traffic light"  # WordNet compound
    assert hn("a hot dog with mustard") == "dog"  # adjective modifier: plain head ...
    assert hn("a hot dog with mustard", vocabulary=["hot dog"]) == "hot dog"  # ... unless it is a class
    assert hn("a group of people standing on a sidewalk") == "people"
    assert hn("the left side of the bed") == "bed"
    assert hn("man holding an umbrella") == "man" and hn("zebra facing left") == "zebra"
    assert hn("the man's hat") == "hat"


def test_tagger_paths(wn, monkeypatch) -> None:
    assert W.resolve_tagger("fallback") == "fallback"
    with pytest.raises(ValueError, match="tagger must be one of"):
        W.resolve_tagger("spacy")
    if not W.nltk_tagger_available():
        assert W.resolve_tagger("auto") == "fallback"
        with pytest.raises(W.TaggerMissing, match="averaged_perceptron_tagger_eng"):
            W.resolve_tagger("nltk")

    # The nltk path with a stand-in for the perceptron tagger (its data is not installable here): the
    # Penn Treebank tags drive the same phrase rules.
    class FakeTagger:
        tags = {"man": "NN", "in": "IN", "red": "JJ", "shirt": "NN", "the": "DT", "holding": "VBG", "a": "DT",
                "puppy": "NN", "group": "NN", "of": "IN", "people": "NNS", "one": "CD", "on": "IN", "left": "NN"}

        def tag(self, tokens):
            return [(t, self.tags.get(t.lower(), "NN")) for t in tokens]

    monkeypatch.setattr("grounding.teachers.wordnet_head.nltk_tagger_available", lambda: True)  # where head_noun looks
    monkeypatch.setattr("grounding.teachers.wordnet_head._perceptron", lambda: FakeTagger())
    assert W.head_noun("man in red shirt", tagger="nltk", wn=wn) == ("man", "nltk")
    assert W.head_noun("the man holding a puppy", tagger="auto", wn=wn) == ("man", "nltk")
    assert W.head_noun("a group of people", tagger="nltk", wn=wn).noun == "people"
    assert W.head_noun("the one on the left", tagger="nltk", wn=wn).noun is None


# ---- matching -------------------------------------------------------------------------------------------------
def test_match_examples_with_real_wordnet(wn) -> None:
    m = W.match("puppy", COCO, wn=wn)
    assert (m.how, m.classes, m.synsets) == ("hypernym", ("dog",), ("puppy.n.01", "dog.n.01"))
    assert W.match("guy", ["person", "man", "woman"], wn=wn)[:2] == ("hypernym", ("man",))  # nearest level
    assert W.match("guy", COCO, wn=wn)[:2] == ("hypernym", ("person",))
    assert W.match("automobile", COCO, wn=wn)[:3] == ("synonym", ("car",), ("car.n.01",))
    assert W.match("dog", COCO, wn=wn)[:3] == ("exact", ("dog",), ())
    assert W.match("Traffic_Light", COCO, wn=wn)[:2] == ("exact", ("traffic light",))
    assert W.match("traffic lights", COCO, wn=wn)[:2] == ("lemma", ("traffic light",))
    assert W.match("dogs", COCO, wn=wn)[:2] == ("lemma", ("dog",))
    assert W.match("ski", COCO, wn=wn)[:2] == ("lemma", ("skis",))  # plural class name
    assert W.match("puppies", COCO, wn=wn)[:2] == ("hypernym", ("dog",))
    assert W.match("men", COCO, wn=wn)[:3] == ("hypernym", ("person",), ("man.n.01", "person.n.01"))
    assert W.match("computer mouse", COCO, wn=wn)[:2] == ("synonym", ("mouse",))
    m = W.match("sky", COCO, wn=wn)
    assert m.how == "none" and m.reason == W.REASON_NO_PATH and not m.label.any()
    assert W.match("zzzqx", COCO, wn=wn).reason == "not in WordNet"


def test_soft_label_is_uniform_over_matched_classes(wn) -> None:
    m = W.match("automobile", ["auto", "person", "motorcar"], wn=wn)
    assert m.how == "synonym" and m.classes == ("auto", "motorcar")
    np.testing.assert_array_equal(m.label, np.array([0.5, 0, 0.5], dtype=np.float16))
    assert m.label.dtype == np.float16 and m.label.shape == (3,)
    m = W.match("circlet", ["ellipse", "circle"], wn=wn)  # circle IS-A ellipse: the nearest level wins
    assert m.classes == ("circle",)
    # background slots never get mass
    assert W.match("background", ["__background__", "background", "dog"], wn=wn).how == "none"


def test_class_senses(wn) -> None:
    # "cat" has the sense {cat, guy, hombre, bozo}: with every sense of the class name, guy -> cat.
    assert W.match("guy", W.vocabulary(["cat", "person"], senses="all", wn=wn), wn=wn)[:2] == ("synonym", ("cat",))
    assert W.match("guy", W.vocabulary(["cat", "person"], wn=wn), wn=wn)[:2] == ("hypernym", ("person",))
    v = W.vocabulary(["star", "person"], synsets={"star": ["star.n.05"]}, wn=wn)
    assert W.match("pentagram", v, wn=wn).classes == ("star",) and W.match("sun", v, wn=wn).how == "none"
    with pytest.raises(ValueError, match="unknown synset"):
        W.vocabulary(["star"], synsets={"star": ["star.n.99"]}, wn=wn)
    with pytest.raises(ValueError, match="duplicate class names"):
        W.ClassVocabulary(("Dog", "dog"), wn)


def test_synthetic_nouns_map_as_wordnet_says(wn) -> None:
    from grounding.data.synthetic import CLASSES, NOUNS

    for row in NOUNS:
        m = W.match(row.noun, CLASSES, wn=wn)
        if row.relation in ("exact", "hyponym"):
            assert m.classes == (row.cls,), row
        elif row.relation in ("hypernym", "none"):
            assert row.cls not in m.classes or len(m.classes) > 1, row  # never a confident wrong class


# ---- the stage ---------------------------------------------------------------------------------------------
def _params(tmp_path: Path, *overrides: str) -> C.Params:
    return C.load(None, [f"paths.prepared={tmp_path}/prepared", f"paths.teachers={tmp_path}/teachers",
                         f"paths.metrics={tmp_path}/metrics", "progress=false", "dataset.synthetic.n_images=12",
                         *overrides])


def test_stage_on_synthetic(tmp_path: Path, wn) -> None:
    from grounding import stages
    from grounding.data.schema import CanonicalDataset
    from grounding.data.synthetic import CLASSES

    p = _params(tmp_path)
    stages.run("prepare", p)
    out = stages.run("wordnet-labels", p).path
    s = ShardSet(out, verify=True)
    ds = CanonicalDataset.load(p.prepared_dir())
    m = s.manifest
    assert m.level == "sentence" and len(s) == len(ds.refs)
    assert m.extra["classes"] == list(CLASSES) and m.extra["how_codes"] == list(W.HOW)
    assert m.extra["head_noun_path"] in ("fallback", "nltk") and m.params["tagger"] == m.extra["head_noun_path"]
    assert m.teacher["wordnet_version"] == "3.0" and len(m.teacher["database_sha256"]) == 64
    rep = m.extra["report"]
    assert rep["phrases"] == len(ds.refs) and 0 < rep["coverage"] <= 1
    for r in ds.refs:
        row = s[r.ref_id]
        how = W.HOW[int(row["how"])]
        head = W.decode_text(row["head"])
        assert row["label"].dtype == np.float16 and row["label"].shape == (len(CLASSES),)
        if how == "none":
            assert not row["label"].any() and len(row["matched"]) == 0
        else:
            assert head and abs(float(row["label"].astype(np.float32).sum()) - 1) < 1e-3
            assert list(row["matched"]) == list(np.flatnonzero(row["label"]))
            if len(row["matched"]) == 1:  # a single confident class is the right one on this data
                assert CLASSES[int(row["matched"][0])] == r.category, (r.text, head)
    assert rep["argmax_correct"] == rep["labelled"] and rep["argmax_accuracy"] > 0.5
    assert json.loads((tmp_path / "metrics" / "wordnet-labels" / "synthetic.json").read_text()) == rep
    before = (out / "manifest.json").read_bytes()
    assert stages.run("wordnet-labels", p).path == out and (out / "manifest.json").read_bytes() == before


def test_stage_key_covers_classes_wordnet_version_and_tagger(tmp_path: Path, monkeypatch, wn) -> None:
    p = _params(tmp_path)

    def key(params: C.Params, classes=("dog", "cat"), path="fallback") -> str:
        sp, teacher, inputs = W.key_parts(params, list(classes), path, {"dataset": "d" * 64})
        return stage_key(W.STAGE, "code", teacher, sp, inputs)

    base = key(p)
    assert key(p) == base
    assert key(p, classes=("dog", "cat", "car")) != base
    assert key(p, path="nltk") != base
    assert key(_params(tmp_path, "teachers.wordnet.class_senses=all")) != base
    monkeypatch.setattr(DB, "WORDNET_VERSION", "3.1")
    assert key(p) != base


def test_classes_from_a_detector_manifest(tmp_path: Path, wn) -> None:
    from grounding import stages
    from grounding.shards import FieldSpec, ShardSetSpec, ShardWriter

    p = _params(tmp_path, "teachers.wordnet.classes_from=frcnn-proposals")
    with pytest.raises(FileNotFoundError, match="classes_from='frcnn-proposals'"):
        W.class_vocabulary(p)
    spec = ShardSetSpec(stage="frcnn-proposals", stage_key="k" * 64, level="image",
                        fields=(FieldSpec("n", "int32"),), extra={"classes": ["__background__", "circle", "star"]})
    with ShardWriter(p.teacher_dir("frcnn-proposals"), spec, ["a"], progress=False) as w:
        w.add("a", {"n": np.int32(1)})
    classes, inputs = W.class_vocabulary(p)
    assert classes == ["__background__", "circle", "star"] and inputs == {"classes_from": "k" * 64}
    stages.run("prepare", p)  # a stand-in detector set is there: deps="missing" runs no detector
    s = ShardSet(stages.run("wordnet-labels", p).path)
    assert s.fields["label"].shape == (3,) and s.manifest.inputs["classes_from"] == "k" * 64
    assert all(s[k]["label"][0] == 0 for k in s.keys)  # background never gets mass


def test_config_validation() -> None:
    with pytest.raises(C.ConfigError, match="teachers.wordnet.classes"):
        C.load(None, ["teachers.wordnet.classes=[dog, dog]"])
    with pytest.raises(C.ConfigError, match="teachers.wordnet.tagger"):
        C.load(None, ["teachers.wordnet.tagger=spacy"])
    p = C.load(None, ["teachers.wordnet.classes=[dog, traffic light]"])
    assert W.class_vocabulary(p) == (["dog", "traffic light"], {})


# ---- p̂(x, y) ∝ Σ_z p(y, z) p(z | x), normalised over regions ---------------------------------------------------
def test_region_targets_by_hand() -> None:
    labels = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]], dtype=np.float16)  # 3 phrases, 2 classes
    probs = np.array([[0.8, 0.2], [0.1, 0.9], [0.5, 0.5]], dtype=np.float32)  # 3 regions
    t, valid = region_targets(labels, probs)
    # phrase 0: t = [0.8, 0.1, 0.5] / 1.4; phrase 1: [0.5, 0.5, 0.5] / 1.5; phrase 2: no label -> no target
    np.testing.assert_allclose(t, [[4 / 7, 1 / 14, 5 / 14], [1 / 3, 1 / 3, 1 / 3], [0, 0, 0]], rtol=1e-6)
    assert valid.tolist() == [True, True, False] and t.dtype == np.float32
    t, valid = region_targets(labels[0], probs, region_mask=np.array([False, True, True]))
    np.testing.assert_allclose(t, [0, 1 / 6, 5 / 6], rtol=1e-6)
    t, valid = region_targets(np.array([0.0, 1.0]), np.array([[1.0, 0.0]]))  # no region supports the class
    assert not valid and not t.any()
    tt, tv = region_targets(torch.tensor(labels).float().expand(2, 3, 2), torch.tensor(probs).expand(2, 3, 2))
    assert tt.shape == (2, 3, 3) and tv.shape == (2, 3)
    np.testing.assert_allclose(tt[1].numpy(), region_targets(labels, probs)[0], rtol=1e-6)
    with pytest.raises(ValueError, match="share C"):
        region_targets(labels, probs[:, :1])
