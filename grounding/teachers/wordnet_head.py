"""Head nouns of referring phrases (the first step of the WordNet soft labels, :mod:`grounding.teachers.wordnet`):
closed English word classes, WordNet lexicon access, the optional NLTK tagger and :func:`head_noun`."""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np


log = logging.getLogger(__name__)

#: ``how`` codes, stored as int8 indices into this tuple (also in the manifest's ``extra.how_codes``).
HOW: tuple[str, ...] = ("none", "exact", "lemma", "synonym", "hypernym")
TAGGERS = ("auto", "nltk", "fallback")
TAGGER_RESOURCE = "taggers/averaged_perceptron_tagger_eng/"
#: Class names that never receive mass (detector background / unused slots).
IGNORED_CLASSES = frozenset({"__background__", "background", "n/a"})

# ---- closed word classes (English function words; WordNet has no entries for most of them) ---------------
_DETERMINERS = frozenset(
    "a an the this that these those some any each every either neither no his her its their our my your "
    "another other both all few several many much more most such what whose which".split())
_PREPOSITIONS = frozenset(
    "about above across after against along alongside amid among amongst around as at atop before behind "
    "below beneath beside besides between beyond by despite down during except for from in inside into "
    "like near nearest next of off on onto opposite out outside over past per through throughout to toward "
    "towards under underneath unlike until up upon via with within without than".split())
_CLAUSE = frozenset("that which who whom whose where when while because if so".split())
_CONJUNCTIONS = frozenset("and or but nor".split())
_AUXILIARIES = frozenset(
    "is are was were be been being am has have had does do did can could will would should may might must "
    "isn't aren't wasn't weren't".split())
_PRONOUNS = frozenset(
    "one ones it its he she they them him her us we you i me this that these those someone somebody "
    "something anyone anybody anything everyone everybody everything nothing nobody none other others "
    "either neither each".split())
#: Position words: never the head; "<position> of X" hands over to X.
_POSITIONS = frozenset(
    "left right top bottom middle center centre front back rear side sides corner corners edge end part half "
    "foreground background upper lower far near closest nearest furthest farthest leftmost rightmost "
    "topmost bottommost uppermost lowermost".split())
_ORDINALS = frozenset("first second third fourth fifth sixth seventh eighth ninth tenth last next 1st 2nd "
                      "3rd 4th 5th".split())
#: Quantity / collective nouns: "<noun> of X" is headed by X for grounding purposes.
_PARTITIVES = frozenset(
    "group groups pair pairs couple bunch bunches lot lots number crowd crowds team teams herd herds flock "
    "flocks pile piles stack stacks row rows set sets collection bundle kind kinds type types sort sorts "
    "piece pieces slice slices bit bits portion handful line lines array cluster swarm pack school".split())
#: Lexicographer files of concrete things: an -ing/-ed form whose first noun sense is one of these is a noun
#: ("building", "clothing"), otherwise a participle ("sitting", "wearing").
_CONCRETE_LEXNAMES = frozenset({"noun.artifact", "noun.object", "noun.food", "noun.plant", "noun.animal",
                                "noun.body", "noun.person", "noun.substance", "noun.shape"})
#: Lexicographer files of the class-name senses kept besides the first (``class_senses: concrete``).
CLASS_SENSE_LEXNAMES = frozenset({"noun.artifact", "noun.object", "noun.food", "noun.plant", "noun.animal",
                                  "noun.body", "noun.substance", "noun.shape"})
CLASS_SENSES = ("concrete", "first", "all")
_NOT_MODIFIERS = frozenset({"det", "pron", "pos", "ord"})
_TOKEN = re.compile(r"[A-Za-z0-9]+(?:[-'’][A-Za-z0-9]+)*")


class TaggerMissing(LookupError):
    """``tagger: nltk`` was asked for but NLTK's tagger data is not installed."""


class HeadNoun(NamedTuple):
    """The head noun of a phrase (as written, lowercase, words joined by spaces) or ``None``, and the path
    that found it (``"nltk"`` | ``"fallback"``)."""

    noun: str | None
    path: str


class Match(NamedTuple):
    """Result of :func:`match`: ``how`` (one of :data:`HOW`), matched class names (vocabulary order), the
    WordNet synsets used (the noun's first synset, then the matching hypernyms; empty for exact / lemma
    matches), the soft label (float16, ``(C,)``, sums to 1 or all zero) and, for ``none``, the reason."""

    how: str
    classes: tuple[str, ...]
    synsets: tuple[str, ...]
    label: np.ndarray
    reason: str = ""


# ---- WordNet access ---------------------------------------------------------------------------------------
def _wn(wn: Any = None) -> Any:
    if wn is not None:
        return wn
    from grounding.teachers.wordnet_db import load

    return load()


def _key(text: str) -> str:
    """WordNet lemma spelling of a (multi-word) noun: lowercase, words joined by ``_``."""
    return "_".join(text.lower().replace("_", " ").split())


def normalize_class(name: str) -> str:
    """Class names compare lowercase with single spaces (``Traffic_Light`` == ``traffic light``)."""
    return " ".join(name.lower().replace("_", " ").split())


def _morphy_all(wn: Any, key: str) -> list[str]:
    """All noun base forms WordNet's morphy finds for ``key`` (the form itself when it is in WordNet)."""
    fn = getattr(wn, "_morphy", None)
    if fn is not None:
        return list(dict.fromkeys(fn(key, "n")))
    base = wn.morphy(key, "n")
    return [base] if base else []


class _Lexicon:
    """Cached per-word WordNet facts used by the head-noun rules."""

    def __init__(self, wn: Any) -> None:
        self.wn = wn
        self.noun_senses = lru_cache(maxsize=65536)(self._noun_senses)
        self.adj_senses = lru_cache(maxsize=65536)(self._adj_senses)
        self.first_lexname = lru_cache(maxsize=65536)(self._first_lexname)
        self.is_inflected_verb = lru_cache(maxsize=65536)(self._is_inflected_verb)
        self.is_compound = lru_cache(maxsize=65536)(self._is_compound)

    def _noun_senses(self, word: str) -> int:
        return len(self.wn.synsets(word, "n")) if word.isascii() and not word.isdigit() else 0

    def _adj_senses(self, word: str) -> int:
        return len(self.wn.synsets(word, "a")) if word.isascii() else 0

    def _first_lexname(self, word: str) -> str | None:
        ss = self.wn.synsets(word, "n")
        return ss[0].lexname() if ss else None

    def _is_inflected_verb(self, word: str) -> bool:
        return word.endswith(("ing", "ed")) and any(b != word for b in self.wn._morphy(word, "v")) \
            if hasattr(self.wn, "_morphy") else bool(self.wn.morphy(word, "v") not in (None, word))

    def _is_compound(self, key: str) -> bool:
        return bool(self.wn.synsets(key, "n"))


_LEXICONS: dict[int, _Lexicon] = {}


def _lexicon(wn: Any) -> _Lexicon:
    lex = _LEXICONS.get(id(wn))
    if lex is None or lex.wn is not wn:
        lex = _LEXICONS[id(wn)] = _Lexicon(wn)
    return lex


# ---- tagger -------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def nltk_tagger_available() -> bool:
    """True when NLTK's averaged-perceptron tagger data is installed where NLTK looks for it (checked once
    per process)."""
    try:
        import nltk

        from grounding.teachers import wordnet_db

        d = str(wordnet_db.nltk_data_dir())
        if d not in nltk.data.path:
            nltk.data.path.append(d)
        nltk.data.find(TAGGER_RESOURCE)
        return True
    except LookupError:
        return False


def resolve_tagger(tagger: str = "auto") -> str:
    """``"auto"`` -> ``"nltk"`` when its data is installed, else ``"fallback"``; ``"nltk"`` without the data
    raises :class:`TaggerMissing` saying how to install it."""
    if tagger not in TAGGERS:
        raise ValueError(f"tagger must be one of {TAGGERS}, got {tagger!r}")
    if tagger == "fallback":
        return "fallback"
    if nltk_tagger_available():
        return "nltk"
    if tagger == "nltk":
        raise TaggerMissing(
            "teachers.wordnet.tagger is 'nltk' but NLTK's averaged_perceptron_tagger_eng data is not installed "
            "(no package registry ships it). Copy it to <nltk_data>/taggers/averaged_perceptron_tagger_eng/ "
            "(e.g. `python -m nltk.downloader -d .venv/share/nltk_data averaged_perceptron_tagger_eng` where "
            "NLTK's server is reachable), or use tagger: auto | fallback")
    return "fallback"


@lru_cache(maxsize=1)
def _perceptron() -> Any:
    from nltk.tag import PerceptronTagger

    return PerceptronTagger()


def tagger_digest() -> str | None:
    """sha256 over the NLTK tagger data files (part of the teacher identity on the nltk path)."""
    import hashlib

    import nltk

    try:
        root = Path(str(nltk.data.find(TAGGER_RESOURCE)))
    except LookupError:
        return None
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


# ---- head noun --------------------------------------------------------------------------------------------
def tokenize(phrase: str) -> list[str]:
    """Words of a phrase as written (possessive ``'s`` dropped: "the man's hat" -> the man hat)."""
    out = []
    for t in _TOKEN.findall(phrase.replace("’", "'")):
        if t.lower().endswith("'s"):
            t = t[:-2]
        if t:
            out.append(t)
    return out


def _kinds_fallback(words: list[str], lex: _Lexicon) -> list[str]:
    """Per word: ``det`` | ``prep`` | ``clause`` | ``conj`` | ``verb`` | ``pron`` | ``pos`` | ``ord`` |
    ``noun`` (WordNet knows it as a noun) | ``ing`` (inflected verb form that WordNet also knows as a
    noun; decided in context) | ``other``."""
    kinds = []
    for w in words:
        if w in _DETERMINERS and w not in ("that", "which", "whose"):
            kinds.append("det")
        elif w in _PREPOSITIONS:
            kinds.append("prep")
        elif w in _CLAUSE or w in ("that", "which", "whose"):
            kinds.append("clause")
        elif w in _CONJUNCTIONS:
            kinds.append("conj")
        elif w in _AUXILIARIES:
            kinds.append("verb")
        elif w in _PRONOUNS:
            kinds.append("pron")
        elif w in _POSITIONS:
            kinds.append("pos")
        elif w in _ORDINALS:
            kinds.append("ord")
        elif lex.is_inflected_verb(w):
            kinds.append("ing" if lex.noun_senses(w) else "participle")
        elif lex.noun_senses(w):
            kinds.append("noun")
        else:
            kinds.append("other")
    return kinds


_TAG_KINDS = {"IN": "prep", "TO": "prep", "WDT": "clause", "WP": "clause", "WP$": "clause", "WRB": "clause",
              "CC": "conj", "MD": "verb", "DT": "det", "PDT": "det", "PRP$": "det", "PRP": "pron", "EX": "pron",
              "CD": "other", "POS": "other"}


def _kinds_nltk(raw: list[str], words: list[str]) -> list[str]:
    tags = [t for _, t in _perceptron().tag(raw)]
    kinds = []
    for w, t in zip(words, tags):
        if w in _POSITIONS:
            kinds.append("pos")
        elif w in _ORDINALS:
            kinds.append("ord")
        elif w in _PRONOUNS and t in ("PRP", "NN", "CD", "DT"):
            kinds.append("pron")
        elif t.startswith("NN"):
            kinds.append("noun")
        elif t in ("VBG", "VBN", "VBD"):
            kinds.append("participle")
        elif t.startswith("VB"):
            kinds.append("verb")
        else:
            kinds.append(_TAG_KINDS.get(t, "other"))
    return kinds


def _segments(words: list[str], kinds: list[str], lex: _Lexicon | None) -> list[tuple[list[int], str | None]]:
    """Split into noun-phrase candidates: ``(word indices, word that ended the segment)``."""
    segs: list[tuple[list[int], str | None]] = []
    cur: list[int] = []
    n = len(words)
    for i, (w, k) in enumerate(zip(words, kinds)):
        has_noun = any(kinds[j] in ("noun", "ing") for j in cur)
        if k in ("prep", "clause", "verb"):
            segs.append((cur, w))
            cur = []
            continue
        if k == "conj":
            # "black and white cow": a conjunction after adjectives only joins modifiers.
            nouny = [j for j in cur if kinds[j] == "noun" and
                     (lex is None or lex.adj_senses(words[j]) <= lex.noun_senses(words[j]))]
            if nouny or (lex is None and has_noun):
                segs.append((cur, w))
                cur = []
            continue
        if k in ("participle", "ing") and has_noun:
            concrete = k == "ing" and lex is not None and lex.first_lexname(w) in _CONCRETE_LEXNAMES
            nxt = kinds[i + 1] if i + 1 < n else None
            takes_object = nxt in ("det", "noun", "pos", "pron", "other", "ing")
            if not concrete or takes_object:
                segs.append((cur, w))
                cur = []
                continue
        cur.append(i)
    segs.append((cur, None))
    return segs


def _compound(words: list[str], kinds: list[str], seg: list[int], pos: int, lex: _Lexicon,
              vocabulary: frozenset[str]) -> str:
    """The longest noun ending at ``seg[pos]`` that is a class name or a WordNet compound (modifier with no
    adjective reading); else the word itself."""
    head = words[seg[pos]]
    for span in (3, 2):
        if pos - span + 1 < 0:
            continue
        idx = seg[pos - span + 1:pos + 1]
        if idx != list(range(idx[0], idx[0] + span)) or any(kinds[j] in _NOT_MODIFIERS for j in idx):
            continue  # not contiguous, or spans a determiner / pronoun / position word / ordinal
        parts = [words[j] for j in idx]
        text = " ".join(parts)
        if normalize_class(text) in vocabulary:
            return text
        if lex.adj_senses(parts[0]):
            continue  # "old man", "hot dog": an adjective reading of the modifier keeps the plain head
        for seps in _separators(span - 1):
            key = parts[0] + "".join(s + p for s, p in zip(seps, parts[1:]))
            if lex.is_compound(key):
                return text
    return head


@lru_cache(maxsize=8)
def _separators(n: int) -> tuple[tuple[str, ...], ...]:
    if n == 0:
        return ((),)
    return tuple((s, *rest) for s in ("_", "-") for rest in _separators(n - 1))


def _pick(words: list[str], kinds: list[str], segs: list[tuple[list[int], str | None]], lex: _Lexicon | None,
          vocabulary: frozenset[str]) -> str | None:
    fallback: str | None = None
    for seg, ended_by in segs:
        body = [j for j in seg if kinds[j] != "det"]
        if body and kinds[body[-1]] == "pron":
            return fallback  # "the white one"
        cands = [j for j in body if kinds[j] in ("noun", "ing")]
        if lex is not None:
            # A word read mostly as an adjective is a head only when nothing follows it and a determiner
            # precedes it ("an orange"); "empty", "black and white" are not heads.
            def adjectival(j: int) -> bool:
                return lex.adj_senses(words[j]) > lex.noun_senses(words[j])
            cands = [j for j in cands if not adjectival(j)
                     or (j == seg[-1] and any(kinds[i] == "det" for i in seg if i < j))]
        if not cands:
            if any(kinds[j] == "pron" for j in body):
                return fallback  # "the one on the left", "something blue"
            continue  # "the left side of the bed", "on the left ...": look further
        pos = seg.index(cands[-1])
        word = words[seg[pos]]
        if word in _PARTITIVES and ended_by == "of":
            fallback = fallback or word
            continue  # "a group of people" -> people
        if lex is None:
            return word
        return _compound(words, kinds, seg, pos, lex, vocabulary)
    return fallback


def head_noun(phrase: str, *, tagger: str = "auto", vocabulary: Iterable[str] = (), wn: Any = None) -> HeadNoun:
    """The head noun of ``phrase`` and the path used (``"nltk"`` | ``"fallback"``).

    Args:
        phrase: a referring expression or phrase ("man in red shirt").
        tagger: ``"auto"`` | ``"nltk"`` | ``"fallback"`` (see :func:`resolve_tagger`).
        vocabulary: class names; a multi-word class name ending at the head is kept whole ("traffic light").
        wn: a WordNet reader (default: :func:`grounding.teachers.wordnet_db.load`).

    Returns:
        ``HeadNoun(noun, path)``; ``noun`` is lowercase as written (plural kept), words joined by spaces, or
        ``None`` when the phrase names no thing (empty, pronoun head, position only).
    """
    path = resolve_tagger(tagger)
    raw = tokenize(phrase)
    if not raw:
        return HeadNoun(None, path)
    words = [w.lower() for w in raw]
    wn = _wn(wn)
    lex = _lexicon(wn)
    kinds = _kinds_nltk(raw, words) if path == "nltk" else _kinds_fallback(words, lex)
    segs = _segments(words, kinds, lex)
    vocab = frozenset(normalize_class(v) for v in vocabulary)
    return HeadNoun(_pick(words, kinds, segs, lex, vocab), path)
