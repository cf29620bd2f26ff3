"""WordNet soft labels (NCE+Distill, seed paper 002): phrase -> head noun -> distribution over detector classes.

Three pure steps and one stage (head nouns: :mod:`grounding.teachers.wordnet_head`; class vocabulary and
matching: :mod:`grounding.teachers.wordnet_classes`; the stage: this module, which re-exports both):

* :func:`head_noun` finds the head noun of a phrase. Paths: ``"nltk"`` (NLTK's averaged-perceptron POS
  tagger, as in the paper; needs NLTK's ``averaged_perceptron_tagger_eng`` data, which no package registry
  ships, so it is used only where the user has it) and ``"fallback"`` (deterministic, built on the WordNet
  lexicon; see below). Both share the phrase rules.
* :func:`match` maps a head noun onto the class vocabulary, as the paper describes: an exact class name,
  else the noun's most frequent synset (WordNet's first sense), its lemmas, then its hypernym closure,
  compared with the synsets of the class names. ``how`` says which step matched:

  ==========  ====================================================================================
  exact       the noun is a class name (case and ``_``/space insensitive)
  lemma       a base form of the noun (WordNet morphy: plurals, irregular forms) is a class name or
              a base form of one ("dogs" -> dog, "men" -> man)
  synonym     the noun's first synset is a synset of a class name: one of its lemmas names the
              class ("automobile" -> car)
  hypernym    the nearest level of the first synset's hypernym closure (instance hypernyms included)
              that holds a class synset ("puppy" -> dog, "guy" -> man)
  none        no head noun, a noun WordNet does not know, or no class reached
  ==========  ====================================================================================

  A class name's synsets are its first (most frequent) sense plus its senses that name concrete things
  (``class_senses: concrete``, see :class:`ClassVocabulary`; the paper's literal "any lemma equals a class
  name" is ``class_senses: all``, which sends "guy" to *cat* via {cat, guy, hombre, bozo}). The noun's
  "most frequent synset" is ranked by WordNet's sense counts over the noun and its base forms
  (:func:`most_frequent_synset`). A ``none`` records why: no head noun, not in WordNet, the noun is more
  general than the classes (the rule climbs only upwards), only a rarer sense would match, or no path.

  The soft label puts equal mass on every class matched at the deciding step (several classes match when a
  synset names two classes or two classes sit at the same hypernym depth), zero elsewhere; ``none`` gives
  the all-zero vector. Classes named ``__background__``, ``background`` or ``N/A`` never get mass.
* :func:`grounding.soft_targets.region_targets` turns a soft label and a detector's per-region class
  posterior into the paper's per-region target p̂(x, y) (it lives outside ``teachers/`` so that students
  may import it).

Fallback head-noun rules (all lookups in WordNet 3.0; the word lists are English function words, not
synonyms): the phrase is cut into segments at prepositions, relative pronouns, conjunctions, auxiliaries and
participles that follow a noun ("man *holding* umbrella"); the head is the last word of the first segment
that WordNet knows as a noun, skipping position words (left, top, side...) and ordinals; a quantity or
position noun followed by "of" ("a *group* of people", "the *left side* of the bed") hands over to the next
segment; a pronoun head ("the *one* on the left") means no head; a word read mostly as an adjective
(more adjective than noun senses) is a head only after a determiner ("an orange", not "empty"); plural
forms are kept as written (matching runs morphy). A compound that WordNet lists ("traffic light",
"ice-cream cone") is kept whole when its modifier has no adjective reading, or when it is a class name.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from grounding.teachers.wordnet_classes import (  # noqa: F401 - re-exported
    ClassVocabulary, _VOCABS, vocabulary, most_frequent_synset, match, REASON_MORE_GENERAL, REASON_OTHER_SENSE,
    REASON_OTHER_SENSE_GENERAL, REASON_NO_PATH, _closure, _miss_reason)
from grounding.teachers.wordnet_head import (  # noqa: F401 - re-exported
    HOW, TAGGERS, TAGGER_RESOURCE, IGNORED_CLASSES, _DETERMINERS, _PREPOSITIONS, _CLAUSE, _CONJUNCTIONS,
    _AUXILIARIES, _PRONOUNS, _POSITIONS, _ORDINALS, _PARTITIVES, _CONCRETE_LEXNAMES, CLASS_SENSE_LEXNAMES,
    CLASS_SENSES, _NOT_MODIFIERS, _TOKEN, TaggerMissing, HeadNoun, Match, _wn, _key, normalize_class,
    _morphy_all, _Lexicon, _LEXICONS, _lexicon, nltk_tagger_available, resolve_tagger, _perceptron,
    tagger_digest, tokenize, _kinds_fallback, _TAG_KINDS, _kinds_nltk, _segments, _compound, _separators,
    _pick, head_noun)


log = logging.getLogger(__name__)

STAGE = "wordnet-labels"


# ---- the stage ------------------------------------------------------------------------------------------------
FIELD_MEANING = {
    "label": "soft label over extra.classes: uniform over the matched classes, all zero when how is none",
    "how": "index into extra.how_codes: none | exact | lemma | synonym | hypernym",
    "matched": "indices of the matched classes into extra.classes",
    "head": "UTF-8 bytes of the head noun (empty: no head noun)",
    "synsets": "UTF-8 bytes of the WordNet synsets used, space separated (noun's first synset, then the matching "
               "hypernyms)",
}


def decode_text(arr: np.ndarray) -> str:
    """Text of a ragged uint8 field (``head``, ``synsets``)."""
    return bytes(np.asarray(arr, dtype=np.uint8)).decode("utf-8")


def _text_field(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def class_vocabulary(params: Any) -> tuple[list[str], dict[str, str]]:
    """The class list for the stage and the input keys it depends on: ``teachers.wordnet.classes``, else
    the manifest ``extra.classes`` of the stage named by ``teachers.wordnet.classes_from``, else the
    synthetic world's CLASSES for the synthetic dataset."""
    cfg = params.teachers.wordnet
    if cfg.classes:
        return list(cfg.classes), {}
    if cfg.classes_from:
        from grounding.shards import Manifest, ShardError

        src = params.teacher_dir(cfg.classes_from)
        try:
            m = Manifest.load(src)
        except ShardError as e:
            raise FileNotFoundError(f"teachers.wordnet.classes_from={cfg.classes_from!r}: {e}; run that stage "
                                    f"first") from None
        classes = m.extra.get("classes")
        if not classes or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"{src}/manifest.json has no extra.classes list; teachers.wordnet.classes_from "
                             f"must name a detector stage")
        return list(classes), {"classes_from": m.stage_key}
    if params.dataset.format == "synthetic":
        from grounding.data.synthetic import CLASSES

        return list(CLASSES), {}
    raise ValueError("teachers.wordnet needs a class vocabulary: set teachers.wordnet.classes (a list) or "
                     "teachers.wordnet.classes_from (a detector stage whose manifest lists extra.classes)")


def teacher_identity(path: str) -> dict[str, Any]:
    """Library, WordNet version and database digest, and the head-noun path (with its tagger's digest)."""
    import nltk

    from grounding.teachers import wordnet_db

    ident: dict[str, Any] = {"name": "wordnet", "library": "nltk", "library_version": nltk.__version__,
                             "wordnet_version": wordnet_db.WORDNET_VERSION,
                             "database_sha256": _db_digest(), "head_noun_path": path}
    if path == "nltk":
        ident["tagger"] = "averaged_perceptron_tagger_eng"
        ident["tagger_sha256"] = tagger_digest()
    return ident


@lru_cache(maxsize=1)
def _db_digest() -> str:
    from grounding.teachers import wordnet_db

    wordnet_db.load()
    return wordnet_db.database_digest()


@dataclass
class LabelRow:
    """One sentence's outputs (before conversion to shard fields)."""

    ref_id: str
    text: str
    head: str | None
    match: Match


def label_phrases(texts: Sequence[tuple[str, str]], classes: Sequence[str] | ClassVocabulary, *,
                  tagger: str = "auto", wn: Any = None) -> list[LabelRow]:
    """Head noun + match for each ``(ref_id, text)``; matches are cached per distinct head noun."""
    vocab = vocabulary(classes, wn=wn)
    path = resolve_tagger(tagger)
    multiword = [n for n in vocab.names if " " in normalize_class(n)]
    cache: dict[str | None, Match] = {}
    rows = []
    for ref_id, text in texts:
        head = head_noun(text, tagger=path, vocabulary=multiword, wn=vocab.wn).noun
        if head not in cache:
            cache[head] = match(head, vocab)
        rows.append(LabelRow(ref_id, text, head, cache[head]))
    return rows


def report(rows: Sequence[LabelRow], vocab: ClassVocabulary, categories: Mapping[str, str | None] | None = None,
           *, max_misses: int = 50) -> dict[str, Any]:
    """Coverage (fraction of phrases with a label, as the paper counts it), counts per ``how`` and per
    ``none`` reason; with GT ``categories`` (ref_id -> class name) also the argmax accuracy and the misses
    grouped by reason (``none: <reason>``, ``wrong class``, ``tie``: GT among several equal classes)."""
    n = len(rows)
    by_how = Counter(r.match.how for r in rows)
    none_reasons = Counter(r.match.reason for r in rows if r.match.how == "none")
    labelled = n - by_how.get("none", 0)
    out: dict[str, Any] = {
        "phrases": n, "labelled": labelled, "coverage": labelled / n if n else 0.0,
        "by_how": {h: by_how.get(h, 0) for h in HOW}, "none_reasons": dict(sorted(none_reasons.items())),
    }
    unique: dict[str, str] = {}
    for r in rows:
        unique.setdefault(" ".join(r.text.lower().split()), r.match.how)
    out["unique_phrases"] = len(unique)
    out["unique_labelled"] = sum(h != "none" for h in unique.values())
    out["unique_coverage"] = out["unique_labelled"] / len(unique) if unique else 0.0
    if categories is None:
        return out
    idx = {normalize_class(c): i for i, c in enumerate(vocab.names)}
    evaluated = correct = 0
    misses: Counter[tuple[str, str, str]] = Counter()
    for r in rows:
        cat = categories.get(r.ref_id)
        if cat is None or normalize_class(cat) not in idx:
            continue
        evaluated += 1
        gt = idx[normalize_class(cat)]
        lab = r.match.label.astype(np.float32)
        top = np.flatnonzero(lab == lab.max()) if lab.max() > 0 else np.array([], dtype=int)
        if len(top) == 1 and top[0] == gt:
            correct += 1
            continue
        if r.match.how == "none":
            why = f"none: {r.match.reason}"
        elif gt in top:
            why = f"tie: {len(top)} classes share the top mass"
        else:
            why = f"wrong class ({r.match.how} -> {', '.join(r.match.classes)})"
        misses[(why, r.head or "-", cat)] += 1
    by_reason: Counter[str] = Counter()
    for (why, _, _), c in misses.items():
        by_reason[why.split(" (")[0] if why.startswith("wrong") else why] += c
    out.update({
        "evaluated": evaluated, "argmax_correct": correct,
        "argmax_accuracy": correct / evaluated if evaluated else 0.0,
        "misses_by_reason": dict(by_reason.most_common()),
        "misses": [{"reason": why, "head": head, "category": cat, "count": c}
                   for (why, head, cat), c in misses.most_common(max_misses)],
    })
    return out


def key_parts(params: Any, classes: Sequence[str], path: str,
              inputs: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """``(stage params, teacher identity, inputs)`` hashed into the stage key: the class vocabulary and how
    its senses are chosen, the head-noun path, and (teacher) NLTK's version, the WordNet version, the
    database digest and the tagger's digest on the nltk path."""
    cfg = params.teachers.wordnet
    stage_params = {"classes": list(classes), "class_senses": cfg.class_senses,
                    "class_synsets": {k: list(v) for k, v in sorted(cfg.class_synsets.items())},
                    "tagger": path, "ignored_classes": sorted(IGNORED_CLASSES)}
    return stage_params, teacher_identity(path), dict(inputs)


def run_wordnet_labels(params: Any) -> Path:
    """The ``wordnet-labels`` stage: one row per sentence of the prepared dataset (sentence level)."""
    from grounding.data.schema import CanonicalDataset
    from grounding.shards import FieldSpec
    from grounding.codeset import code_version
    from grounding.stage_writer import dataset_extra, write_stage

    cfg = params.teachers.wordnet
    ds = CanonicalDataset.load(params.prepared_dir())
    classes, class_inputs = class_vocabulary(params)
    wn = _wn()
    vocab = vocabulary(classes, synsets=cfg.class_synsets or None, senses=cfg.class_senses, wn=wn)
    path = resolve_tagger(cfg.tagger)
    rows = label_phrases([(r.ref_id, r.text) for r in ds.refs], vocab, tagger=path, wn=wn)
    categories = {r.ref_id: r.category for r in ds.refs} if any(r.category for r in ds.refs) else None
    rep = report(rows, vocab, categories)
    by_ref = {r.ref_id: r for r in rows}
    out = params.teacher_dir(STAGE)
    C = len(classes)
    fields = (
        FieldSpec("label", "float16", (C,), meaning=FIELD_MEANING["label"]),
        FieldSpec("how", "int8", (), meaning=FIELD_MEANING["how"]),
        FieldSpec("matched", "int32", (), ragged=True, meaning=FIELD_MEANING["matched"]),
        FieldSpec("head", "uint8", (), ragged=True, meaning=FIELD_MEANING["head"]),
        FieldSpec("synsets", "uint8", (), ragged=True, meaning=FIELD_MEANING["synsets"]),
    )
    name_index = {n: i for i, n in enumerate(classes)}

    def row(r: LabelRow) -> dict[str, np.ndarray]:
        m = r.match
        return {"label": m.label, "how": np.int8(HOW.index(m.how)),
                "matched": np.array([name_index[c] for c in m.classes], dtype=np.int32),
                "head": _text_field(r.head or ""), "synsets": _text_field(" ".join(m.synsets))}

    stage_params, teacher, inputs = key_parts(params, classes, path, {"dataset": ds.fingerprint(), **class_inputs})
    extra = {**dataset_extra(params, ds, out), "classes": list(classes), "how_codes": list(HOW),
             "head_noun_path": path, "tagger_requested": cfg.tagger,
             "nltk_tagger_available": path == "nltk" or nltk_tagger_available(),
             "classes_without_synsets": list(vocab.without_synsets), "report": rep}
    result = write_stage(
        params, stage=STAGE, code=code_version(__name__),
        level="sentence", fields=fields, item_keys=[r.ref_id for r in ds.refs],
        rows=lambda todo: ((k, row(by_ref[k])) for k in todo), stage_params=stage_params,
        inputs=inputs, teacher=teacher, extra=extra, out_dir=out,
    )
    metrics = Path(params.paths.metrics) / STAGE / f"{params.dataset.name}.json"
    text = json.dumps(rep, indent=1, sort_keys=True) + "\n"
    if not metrics.is_file() or metrics.read_text() != text:  # unchanged: leave the file (and its mtime) alone
        metrics.parent.mkdir(parents=True, exist_ok=True)
        metrics.write_text(text)
    log.info("%s: coverage %.3f (%d/%d)%s", STAGE, rep["coverage"], rep["labelled"], rep["phrases"],
             f", argmax accuracy {rep['argmax_accuracy']:.3f}" if "argmax_accuracy" in rep else "")
    return result
