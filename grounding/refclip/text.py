"""RefCLIP's sentence tokenisation, vocabulary and frozen word vectors, as the public code builds them.

kingthreestones/RefCLIP ``datasets/dataloader.py``: a sentence is lower-cased, the characters
``. , ' ! ? " ( ) * # : ;`` are deleted, ``-`` and ``/`` become spaces, then it is split on whitespace. The
vocabulary is ``PAD`` = 0, ``UNK`` = 1, ``CLS`` = 2, then every new word in the order it first occurs when
reading the annotation file's splits (file order), their annotations and their ``refs`` (all splits,
val and test included). Ids are 0-padded and truncated to ``max_len``; unknown words are ``UNK``.
Word vectors (GloVe via spaCy there) are looked up per vocabulary word; a word without a vector gets zeros
(spaCy's vector for an out-of-vocabulary word).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

SPECIALS = ("PAD", "UNK", "CLS")
_DROP = re.compile(r"[.,'!?\"()*#:;]")


def tokenize(text: str) -> list[str]:
    """The public dataloader's word split (see the module docstring)."""
    return _DROP.sub("", text.lower()).replace("-", " ").replace("/", " ").split()


def build_vocab(texts: Iterable[str]) -> list[str]:
    """``PAD, UNK, CLS`` then each word at its first occurrence in ``texts`` (order matters)."""
    vocab, seen = list(SPECIALS), set(SPECIALS)
    for t in texts:
        for w in tokenize(t):
            if w not in seen:
                seen.add(w)
                vocab.append(w)
    return vocab


def annotation_texts(path: str | Path) -> list[str]:
    """Every sentence of a SimREC/RefCLIP annotation JSON (``{split: [{"refs": [...], ...}]}``), in the
    order the public dataloader reads them (splits in file order) — the order its vocabulary follows."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the RefCLIP annotation JSON ({e})") from e
    if not isinstance(doc, dict) or not all(isinstance(v, list) for v in doc.values()):
        raise ValueError(f"{path}: not a RefCLIP annotation JSON ({{split: [annotation, ...]}} expected)")
    out = []
    for split, anns in doc.items():
        for i, ann in enumerate(anns):
            refs = ann.get("refs") if isinstance(ann, dict) else None
            if not isinstance(refs, list):
                raise ValueError(f"{path}: {split}[{i}] has no 'refs' list")
            out.extend(str(r) for r in refs)
    return out


def encode(texts: Sequence[str], vocab: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(B, max_len)`` int64 (0 = PAD, unknown = UNK, truncated) and truncation flags ``(B,)``."""
    index = {w: i for i, w in enumerate(vocab)}
    unk = index.get("UNK", 1)
    ids = torch.zeros(len(texts), max_len, dtype=torch.long)
    truncated = torch.zeros(len(texts), dtype=torch.bool)
    for r, t in enumerate(texts):
        toks = [index.get(w, unk) for w in tokenize(t)]
        truncated[r] = len(toks) > max_len
        toks = toks[:max_len]
        if toks:
            ids[r, : len(toks)] = torch.tensor(toks)
    return ids, truncated


def _glove_text(path: Path, words: set[str]) -> tuple[dict[str, np.ndarray], int]:
    found: dict[str, np.ndarray] = {}
    dim = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            word, _, rest = line.rstrip("\n").rstrip().partition(" ")
            if not rest:
                raise ValueError(f"{path}:{line_no}: not a GloVe line ('word v1 ... vD' expected)")
            if line_no == 1 and len(rest.split()) == 1 and word.isdigit():  # word2vec header "N D"
                continue
            if word in words and word not in found:
                v = np.asarray(rest.split(), dtype=np.float32)
                if dim and len(v) != dim:
                    raise ValueError(f"{path}:{line_no}: vector of {len(v)} values, earlier ones have {dim}")
                dim = len(v)
                found[word] = v
            elif not dim:
                dim = len(rest.split())
    return found, dim


def _spacy_dir(path: Path, words: set[str]) -> tuple[dict[str, np.ndarray], int]:
    try:
        import spacy  # noqa: F401
        from spacy.vectors import Vectors
        from spacy.strings import StringStore
    except ImportError as e:
        raise ValueError(f"{path}: a spaCy vectors directory needs spaCy installed (not found); or export the "
                         "vectors to a GloVe text file ('word v1 ... vD' per line) and give that file") from e
    vec_dir = path / "vocab" if (path / "vocab" / "vectors").exists() else path
    vectors = Vectors().from_disk(vec_dir)
    strings = StringStore()
    found = {}
    for w in words:
        key = strings.add(w)
        if key in vectors:
            found[w] = np.asarray(vectors[key], dtype=np.float32)
    return found, int(vectors.shape[1])


def load_word_vectors(path: str | Path, vocab: Sequence[str], dim: int | None = None) -> torch.Tensor:
    """Frozen embedding matrix ``(len(vocab), D)`` float32 for ``vocab`` from a local GloVe text file or a
    spaCy vectors directory. Lookup: the word as is, else lower-cased; no vector: zeros (as spaCy gives)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"refclip.word_vectors: {p} does not exist (a GloVe .txt or a spaCy vectors directory)")
    words = set(vocab) | {w.lower() for w in vocab}
    found, d = _spacy_dir(p, words) if p.is_dir() else _glove_text(p, words)
    if not d:
        raise ValueError(f"{p}: no word vectors in it")
    if dim is not None and d != dim:
        raise ValueError(f"{p}: vectors have {d} values, refclip.word_dim is {dim}; set refclip.word_dim={d}")
    out = np.zeros((len(vocab), d), np.float32)
    hits = 0
    for i, w in enumerate(vocab):
        v = found.get(w, found.get(w.lower()))
        if v is not None:
            out[i] = v
            hits += 1
    log.info("word vectors: %d of %d vocabulary words found in %s", hits, len(vocab), p)
    return torch.from_numpy(out)
