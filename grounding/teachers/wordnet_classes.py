"""Class vocabulary and matching (the second step of the WordNet soft labels, :mod:`grounding.teachers.wordnet`):
the synsets of the detector class names and :func:`match` of a head noun onto them."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from grounding.teachers.wordnet_head import (
    IGNORED_CLASSES, CLASS_SENSE_LEXNAMES, CLASS_SENSES, Match, _wn, _key, normalize_class, _morphy_all)


log = logging.getLogger(__name__)

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
