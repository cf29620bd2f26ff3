"""The WordNet 3.0 database, laid out where NLTK's reader accepts it, and the reader itself.

Source: the Princeton WordNet 3.0 database files (``index.*``, ``data.*``, ``*.exc``, ``index.sense``, and
``cntlist.rev``, the sense frequencies behind ``Lemma.count()``). On
Debian/Ubuntu they come from the packages ``wordnet-base`` (database) and ``wordnet-sense-index``
(``index.sense``, which NLTK's reader opens while it starts), both under ``/usr/share/wordnet``; ``make
install`` installs them (see the Makefile). Any other directory holding the same files can be named with
``GROUNDING_WORDNET_DIR``.

NLTK (3.9+) refuses to open corpus files outside its data path, and its reader also needs ``lexnames``, the
table of the 45 lexicographer files of WordNet 3.0 (lexnames(5WN)) that Debian does not ship. So
:func:`install` copies the database into ``<nltk data dir>/corpora/wordnet/`` (regular files: NLTK's path
checks refuse symlinks), writes ``lexnames`` from :data:`LEXNAMES` after checking it against the
``lex_filenum`` of every synset in the database, and :func:`load` puts that data dir first on
``nltk.data.path``, opens the reader and checks ``get_version() == "3.0"``.

The NLTK data dir is ``$GROUNDING_NLTK_DATA`` or ``<sys.prefix>/share/nltk_data`` (inside the project's
``.venv``, one of the places NLTK searches by default), never the user's home.

``python -m grounding.teachers.wordnet_db install|check|where`` runs the steps by hand.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

WORDNET_VERSION = "3.0"

#: Files of the WordNet 3.0 database that NLTK's reader opens (``lexnames`` is written by :func:`install`).
DB_FILES: tuple[str, ...] = (
    "index.noun", "index.verb", "index.adj", "index.adv",
    "data.noun", "data.verb", "data.adj", "data.adv",
    "noun.exc", "verb.exc", "adj.exc", "adv.exc",
    "index.sense", "cntlist.rev",
)
#: Copied when present.
OPTIONAL_FILES: tuple[str, ...] = ()

#: lexnames(5WN) of WordNet 3.0: (file number, lexicographer file name, syntactic category 1=n 2=v 3=a 4=r),
#: as printed in the manual page shipped with ``wordnet-base`` (/usr/share/man/man5/lexnames.5WN.gz).
#: :func:`check_lexnames` verifies it against the database before it is written.
LEXNAMES: tuple[tuple[int, str, int], ...] = (
    (0, "adj.all", 3), (1, "adj.pert", 3), (2, "adv.all", 4), (3, "noun.Tops", 1), (4, "noun.act", 1),
    (5, "noun.animal", 1), (6, "noun.artifact", 1), (7, "noun.attribute", 1), (8, "noun.body", 1),
    (9, "noun.cognition", 1), (10, "noun.communication", 1), (11, "noun.event", 1), (12, "noun.feeling", 1),
    (13, "noun.food", 1), (14, "noun.group", 1), (15, "noun.location", 1), (16, "noun.motive", 1),
    (17, "noun.object", 1), (18, "noun.person", 1), (19, "noun.phenomenon", 1), (20, "noun.plant", 1),
    (21, "noun.possession", 1), (22, "noun.process", 1), (23, "noun.quantity", 1), (24, "noun.relation", 1),
    (25, "noun.shape", 1), (26, "noun.state", 1), (27, "noun.substance", 1), (28, "noun.time", 1),
    (29, "verb.body", 2), (30, "verb.change", 2), (31, "verb.cognition", 2), (32, "verb.communication", 2),
    (33, "verb.competition", 2), (34, "verb.consumption", 2), (35, "verb.contact", 2), (36, "verb.creation", 2),
    (37, "verb.emotion", 2), (38, "verb.motion", 2), (39, "verb.perception", 2), (40, "verb.possession", 2),
    (41, "verb.social", 2), (42, "verb.stative", 2), (43, "verb.weather", 2), (44, "adj.ppl", 3),
)

#: Where the database is looked for, in order, after ``$GROUNDING_WORDNET_DIR`` and ``$WNSEARCHDIR``.
SEARCH_DIRS: tuple[str, ...] = ("/usr/share/wordnet", "/usr/local/WordNet-3.0/dict", "/usr/local/share/wordnet")

INSTALL_HINT = (
    "WordNet 3.0 is needed for the wordnet-labels stage. Install it with `make install` (as root it runs "
    "`apt-get install -y wordnet-base wordnet-sense-index`), or by hand on Debian/Ubuntu: "
    "`sudo apt-get install wordnet-base wordnet-sense-index`; or point GROUNDING_WORDNET_DIR at a directory "
    "holding the WordNet 3.0 database files ({files})."
)

_POS_OF_DATA = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_lock = threading.Lock()
_reader: Any = None


class WordNetMissing(RuntimeError):
    """The WordNet 3.0 database could not be found or is not usable; the message says how to install it."""


# ---- locations ---------------------------------------------------------------------------------------
def nltk_data_dir() -> Path:
    """The NLTK data directory this project uses: ``$GROUNDING_NLTK_DATA`` or ``<sys.prefix>/share/nltk_data``."""
    env = os.environ.get("GROUNDING_NLTK_DATA")
    return Path(env) if env else Path(sys.prefix) / "share" / "nltk_data"


def corpus_dir(data_dir: Path | None = None) -> Path:
    """``<nltk data dir>/corpora/wordnet``."""
    return (data_dir or nltk_data_dir()) / "corpora" / "wordnet"


def _missing(directory: Path) -> list[str]:
    return [f for f in DB_FILES if not (directory / f).is_file()]


def find_database() -> Path:
    """The first directory holding the WordNet database files: ``$GROUNDING_WORDNET_DIR``,
    ``$WNSEARCHDIR``, then :data:`SEARCH_DIRS`. Raises :class:`WordNetMissing` with install instructions."""
    looked: list[str] = []
    for var in ("GROUNDING_WORDNET_DIR", "WNSEARCHDIR"):
        value = os.environ.get(var)
        if value:
            d = Path(value)
            missing = _missing(d)
            if not missing:
                return d
            raise WordNetMissing(f"${var}={value} lacks WordNet database files {missing}. "
                                 + INSTALL_HINT.format(files=", ".join(DB_FILES)))
    for d in map(Path, SEARCH_DIRS):
        if not _missing(d):
            return d
        looked.append(f"{d} (missing {', '.join(_missing(d)[:3])}{', ...' if len(_missing(d)) > 3 else ''})")
    raise WordNetMissing("WordNet 3.0 database not found; looked in " + "; ".join(looked) + ". "
                         + INSTALL_HINT.format(files=", ".join(DB_FILES)))


# ---- lexnames ------------------------------------------------------------------------------------------
def lexnames_text() -> str:
    """The ``lexnames`` file NLTK expects: ``NN<TAB>name<TAB>category`` per line, 45 lines."""
    return "".join(f"{n:02d}\t{name}\t{cat}\n" for n, name, cat in LEXNAMES)


def check_lexnames(directory: Path) -> dict[str, int]:
    """Check :data:`LEXNAMES` against the database: every synset's ``lex_filenum`` (field 2 of each
    ``data.*`` line) must name a lexicographer file of the synset's own syntactic category (an adjective
    satellite ``s`` counts as an adjective). Returns the number of synsets per data file; raises
    :class:`WordNetMissing` on a mismatch (a database that is not WordNet 3.0)."""
    category = {n: cat for n, _, cat in LEXNAMES}
    counts: dict[str, int] = {}
    for pos, cat in _POS_OF_DATA.items():
        n = 0
        with open(directory / f"data.{pos}", "rb") as f:
            for line in f:
                if line.startswith(b"  "):  # licence header
                    continue
                parts = line.split(b" ", 3)
                filenum = int(parts[1])
                if category.get(filenum) != cat:
                    raise WordNetMissing(f"{directory}/data.{pos}: synset {parts[0].decode()} has lex_filenum "
                                         f"{filenum}, not a {pos} file of WordNet 3.0's lexnames")
                n += 1
        counts[pos] = n
    return counts


# ---- install -------------------------------------------------------------------------------------------
def _complete(target: Path) -> bool:
    return not _missing(target) and (target / "lexnames").is_file() \
        and (target / "lexnames").read_text() == lexnames_text()


def install(source: Path | None = None, data_dir: Path | None = None, *, force: bool = False) -> Path:
    """Copy the WordNet database from ``source`` (default :func:`find_database`) into
    ``<data_dir>/corpora/wordnet`` with a checked ``lexnames``; returns that directory. Idempotent: an
    existing complete copy is kept unless ``force``. The copy is assembled in a temporary directory and
    renamed into place, so an interrupted install leaves no half corpus behind."""
    target = corpus_dir(data_dir)
    if _complete(target) and not force:
        return target
    src = Path(source) if source is not None else find_database()
    missing = _missing(src)
    if missing:
        raise WordNetMissing(f"{src} lacks WordNet database files {missing}. "
                             + INSTALL_HINT.format(files=", ".join(DB_FILES)))
    check_lexnames(src)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".wordnet.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in DB_FILES + tuple(f for f in OPTIONAL_FILES if (src / f).is_file()):
        shutil.copyfile(src / name, tmp / name)  # regular files (NLTK refuses symlinked corpus files)
    (tmp / "lexnames").write_text(lexnames_text())
    (tmp / "SOURCE").write_text(f"copied from {src.resolve()} by grounding.teachers.wordnet_db\n")
    old = target.with_name(f".wordnet.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def ensure_installed() -> Path:
    """The NLTK-layout corpus directory, installing it from the system database when missing."""
    target = corpus_dir()
    if _complete(target):
        return target
    return install()


# ---- reader ----------------------------------------------------------------------------------------------
def load() -> Any:
    """NLTK's ``WordNetCorpusReader`` over the project's WordNet 3.0 copy (made on first use); cached per
    process. Raises :class:`WordNetMissing` with install instructions when the database is absent."""
    global _reader
    with _lock:
        if _reader is not None:
            return _reader
        try:
            import nltk
            from nltk.corpus.reader.wordnet import WordNetCorpusReader
        except ImportError as e:  # pragma: no cover - nltk is a dependency
            raise WordNetMissing(f"nltk is not installed ({e}); run `make install`") from None
        target = ensure_installed()
        data_dir = str(target.parent.parent)
        if data_dir in nltk.data.path:
            nltk.data.path.remove(data_dir)
        nltk.data.path.insert(0, data_dir)  # NLTK opens corpus files only under its data path
        class _Reader(WordNetCorpusReader):
            def map_wn(self, version: str = "wordnet") -> Any:
                # NLTK maps sense keys of the corpus named "wordnet" (3.0) onto the loaded database by
                # parsing index.sense twice (half the start-up time). Here both are this same 3.0 copy,
                # so the map is the identity, which NLTK spells None.
                if version == "wordnet" and self.get_version() == WORDNET_VERSION:
                    return None
                return super().map_wn(version)

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*multilingual functions are not available.*")
            reader = _Reader(nltk.data.find("corpora/wordnet"), None)
        version = reader.get_version()
        if version != WORDNET_VERSION:
            raise WordNetMissing(f"{target}: NLTK reads WordNet version {version!r}, expected {WORDNET_VERSION}. "
                                 + INSTALL_HINT.format(files=", ".join(DB_FILES)))
        _reader = reader
        return reader


def database_digest(directory: Path | None = None) -> str:
    """sha256 over the database files the matcher reads (part of the teacher identity)."""
    d = directory or corpus_dir()
    h = hashlib.sha256()
    for name in (*DB_FILES, "lexnames"):
        h.update(name.encode() + b"\0")
        with open(d / name, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    """``install`` (copy + check), ``check`` (load and print the version), ``where`` (print directories)."""
    args = sys.argv[1:] if argv is None else argv
    cmd = args[0] if args else "check"
    try:
        if cmd == "install":
            target = install(force="--force" in args)
            reader = load()
            print(f"WordNet {reader.get_version()} ready for NLTK at {target}")
        elif cmd == "check":
            reader = load()
            print(f"WordNet {reader.get_version()} at {corpus_dir()}")
        elif cmd == "where":
            print(f"nltk data dir: {nltk_data_dir()}\ncorpus: {corpus_dir()}")
        else:
            print(f"unknown command {cmd!r}; use install | check | where", file=sys.stderr)
            return 2
    except WordNetMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
