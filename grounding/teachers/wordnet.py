"""WordNet soft labels (NCE+Distill, seed paper 002): phrase -> head noun -> distribution over detector classes.

Three pure steps and one stage:

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
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

log = logging.getLogger(__name__)

STAGE = "wordnet-labels"
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


# ---- class vocabulary and matching ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassVocabulary:
    """Detector classes prepared for matching: normalised names, base forms and class synsets.

    A class's synsets are chosen among the noun synsets that have the class name (or a base form of it)
    among their lemmas, by ``senses``:

    * ``"concrete"`` (default): the first (most frequent) of them plus those of the others that name
      concrete things (lexicographer files artifact, object, food, plant, animal, body, substance, shape).
      A detector class names a visible thing: "cat" keeps cat.n.01 and big_cat.n.01 but not guy.n.01
      ({cat, guy, hombre, bozo}), which would send every "guy" to the cat class; "mouse" keeps the
      computer mouse; "toaster" keeps the appliance besides its first sense, the person proposing a toast.
    * ``"first"``: the first only. ``"all"``: every one (the paper's literal "lemma in the class list").

    ``overrides`` (``{"star": ["star.n.05"]}``) pin a class's synsets explicitly."""

    names: tuple[str, ...]
    wn: Any = field(repr=False, compare=False)
    overrides: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    senses: str = "concrete"
    index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)
    base_index: dict[str, set[int]] = field(default_factory=dict, init=False, repr=False, compare=False)
    synset_classes: dict[str, set[int]] = field(default_factory=dict, init=False, repr=False, compare=False)
    without_synsets: tuple[str, ...] = field(default=(), init=False, compare=False)
    ignored: frozenset[int] = field(default=frozenset(), init=False, compare=False)

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("the class vocabulary is empty")
        if self.senses not in CLASS_SENSES:
            raise ValueError(f"class senses must be one of {CLASS_SENSES}, got {self.senses!r}")
        normalized = [normalize_class(n) for n in self.names]
        dup = [n for n, c in Counter(normalized).items() if c > 1 and n not in IGNORED_CLASSES]
        if dup:
            raise ValueError(f"duplicate class names (after normalising case/underscores): {dup}")
        unknown = set(self.overrides) - set(self.names)
        if unknown:
            raise ValueError(f"class_synsets names classes not in the vocabulary: {sorted(unknown)}")
        wn = self.wn
        ignored = {i for i, n in enumerate(normalized) if n in IGNORED_CLASSES or n.startswith("__")}
        object.__setattr__(self, "ignored", frozenset(ignored))
        no_syn = []
        for i, (name, norm) in enumerate(zip(self.names, normalized)):
            if i in ignored:
                continue
            self.index[norm] = i
            key = _key(norm)
            bases = {key, *_morphy_all(wn, key)}
            for b in bases:
                self.base_index.setdefault(b.replace("_", " "), set()).add(i)
            if name in self.overrides:
                syns = []
                for s in self.overrides[name]:
                    try:
                        syns.append(wn.synset(s))
                    except Exception as e:  # nltk raises WordNetError / ValueError
                        raise ValueError(f"class_synsets[{name!r}]: unknown synset {s!r} ({e})") from None
            else:
                named = [s for s in wn.synsets(key, "n") if {lm.lower() for lm in s.lemma_names()} & bases]
                if self.senses == "all":
                    syns = named
                elif self.senses == "first":
                    syns = named[:1]
                else:
                    syns = named[:1] + [s for s in named[1:] if s.lexname() in CLASS_SENSE_LEXNAMES]
            if not syns:
                no_syn.append(name)
            for s in syns:
                self.synset_classes.setdefault(s.name(), set()).add(i)
        object.__setattr__(self, "without_synsets", tuple(no_syn))

    def __len__(self) -> int:
        return len(self.names)

    def label(self, classes: Iterable[int]) -> np.ndarray:
        """Uniform soft label over the given class indices (float16, ``(C,)``)."""
        idx = sorted(set(classes))
        out = np.zeros(len(self.names), dtype=np.float32)
        if idx:
            out[idx] = 1.0 / len(idx)
        return out.astype(np.float16)


_VOCABS: dict[tuple[tuple[str, ...], str, int], ClassVocabulary] = {}


def vocabulary(classes: Sequence[str] | ClassVocabulary, *, synsets: Mapping[str, Sequence[str]] | None = None,
               senses: str = "concrete", wn: Any = None) -> ClassVocabulary:
    """A :class:`ClassVocabulary` for ``classes`` (cached for plain name lists)."""
    if isinstance(classes, ClassVocabulary):
        return classes
    wn = _wn(wn)
    if synsets:
        return ClassVocabulary(tuple(classes), wn, {k: tuple(v) for k, v in synsets.items()}, senses)
    key = (tuple(classes), senses, id(wn))
    vocab = _VOCABS.get(key)
    if vocab is None or vocab.wn is not wn:
        vocab = _VOCABS[key] = ClassVocabulary(key[0], wn, {}, senses)
    return vocab


def most_frequent_synset(wn: Any, key: str, synsets: Sequence[Any] | None = None) -> Any:
    """The noun's most frequent synset: the largest SemCor count (``Lemma.count()``, from ``cntlist.rev``) of
    its lemmas spelled as the noun or one of its base forms; ties go to WordNet's sense order. For a plain
    noun this is WordNet's first sense; for an inflected form it weighs the base form's senses too ("men":
    man.n.01, not the rare work_force sense listed under "men")."""
    synsets = list(synsets if synsets is not None else wn.synsets(key, "n"))
    forms = {key.lower(), *(b.lower() for b in _morphy_all(wn, key))}

    def freq(s: Any) -> int:
        return sum(lm.count() for lm in s.lemmas() if lm.name().lower() in forms)

    return max(synsets, key=lambda s: (freq(s), -synsets.index(s)))


def match(noun: str | None, classes: Sequence[str] | ClassVocabulary, *, wn: Any = None) -> Match:
    """Map a head noun onto the class vocabulary (see the module docstring for the steps).

    Args:
        noun: head noun as returned by :func:`head_noun` (``None``: no head noun).
        classes: class names in detector order, or a prepared :class:`ClassVocabulary`.

    Returns:
        :class:`Match` ``(how, classes, synsets, label, reason)``; ``label`` is float16 ``(C,)``.
    """
    vocab = vocabulary(classes, wn=wn)
    wn = vocab.wn

    def result(how: str, idx: Iterable[int], synsets: Sequence[Any] = (), reason: str = "") -> Match:
        idx = sorted(set(idx))
        return Match(how, tuple(vocab.names[i] for i in idx), tuple(s.name() for s in synsets),
                     vocab.label(idx), reason)

    if noun is None or not noun.strip():
        return result("none", (), reason="no head noun")
    norm = normalize_class(noun)
    if norm in vocab.index:
        return result("exact", [vocab.index[norm]])
    key = _key(norm)
    bases = [b.replace("_", " ") for b in _morphy_all(wn, key)]
    lemma_hits = {i for b in [norm, *bases] for i in vocab.base_index.get(b, ())}
    if lemma_hits:
        return result("lemma", lemma_hits)
    synsets = wn.synsets(key, "n")
    if not synsets:
        return result("none", (), reason="not in WordNet")
    first = most_frequent_synset(wn, key, synsets)
    hits = vocab.synset_classes.get(first.name(), set())
    if hits:
        return result("synonym", hits, [first])
    seen = {first}
    frontier = [first]
    while frontier:
        nxt = []
        for s in frontier:
            for h in s.hypernyms() + s.instance_hypernyms():
                if h not in seen:
                    seen.add(h)
                    nxt.append(h)
        nxt.sort(key=lambda s: s.name())
        level = [(h, vocab.synset_classes[h.name()]) for h in nxt if h.name() in vocab.synset_classes]
        if level:
            return result("hypernym", set().union(*(c for _, c in level)), [first, *(h for h, _ in level)])
        frontier = nxt
    return result("none", (), [first], reason=_miss_reason(wn, vocab, first, synsets))


#: Reasons a noun known to WordNet gets no class (``Match.reason`` and the stage's report).
REASON_MORE_GENERAL = "more general than the classes (a hypernym of a class; the rule only climbs upwards)"
REASON_OTHER_SENSE = "only a less frequent sense of the noun reaches a class"
REASON_OTHER_SENSE_GENERAL = "only a less frequent sense of the noun is more general than a class"
REASON_NO_PATH = "no class among its first synset, lemmas and hypernyms"


def _closure(s: Any) -> set[Any]:
    return set(s.closure(lambda x: x.hypernyms() + x.instance_hypernyms()))


def _miss_reason(wn: Any, vocab: "ClassVocabulary", first: Any, synsets: Sequence[Any]) -> str:
    ancestors = set().union(*(_closure(wn.synset(n)) for n in vocab.synset_classes))
    if first in ancestors:
        return REASON_MORE_GENERAL
    others = [s for s in synsets if s != first]
    if any(s.name() in vocab.synset_classes or any(h.name() in vocab.synset_classes for h in _closure(s))
           for s in others):
        return REASON_OTHER_SENSE
    if any(s in ancestors for s in others):
        return REASON_OTHER_SENSE_GENERAL
    return REASON_NO_PATH


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
