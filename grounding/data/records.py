"""The canonical dataset's records: :class:`ImageRecord`, :class:`RefRecord`, :class:`DataError` and the
checks on their fields (see :mod:`grounding.data.schema` for the conventions)."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, fields
from pathlib import PurePosixPath
from typing import Any, Iterable, Literal


from grounding import boxes as B

FORMAT_VERSION = 1
DATASET_FILE = "dataset.json"
ORIENTATIONS = ("none", "raw", "exif")
OnError = Literal["fail", "skip"]


class DataError(ValueError):
    """A problem with user data: names the file (or id) and the problem."""


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image: ``width``/``height`` in pixels after the recorded ``orientation`` is applied."""

    image_id: str
    path: str
    width: int
    height: int
    sha256: str
    orientation: str = "none"

    def __post_init__(self) -> None:
        if not self.image_id:
            raise DataError("image record with an empty image_id")
        for name in ("image_id", "path"):
            why = unicode_problem(getattr(self, name))
            if why:
                raise DataError(f"image {printable(self.image_id)}: {name} {why}")
        if self.width <= 0 or self.height <= 0:
            raise DataError(f"image {self.image_id}: non-positive size {self.width}x{self.height}")
        if self.orientation not in ORIENTATIONS:
            raise DataError(f"image {self.image_id}: orientation {self.orientation!r} not in {ORIENTATIONS}")
        check_relative_path(self.path, what=f"image {self.image_id}")


@dataclass(frozen=True, slots=True)
class RefRecord:
    """One referring sentence or phrase; ``box`` float32 xyxy original pixels or ``None``."""

    ref_id: str
    image_id: str
    text: str
    split: str
    box: tuple[float, float, float, float] | None = None
    category: str | None = None
    mask: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.ref_id:
            raise DataError(f"sentence of image {self.image_id} has an empty ref_id")
        for name in ("ref_id", "image_id", "text", "split", "category"):
            value = getattr(self, name)
            why = unicode_problem(value) if isinstance(value, str) else None
            if why:
                raise DataError(f"ref {printable(self.ref_id)}: {name} {why}")
        if not self.split:
            raise DataError(f"ref {self.ref_id}: empty split")


def unicode_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as UTF-8 (a lone surrogate, e.g. from a JSON ``"\\ud800"`` escape or
    bytes decoded with ``surrogateescape``), or None when it can."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"is not valid Unicode (lone surrogate U+{ord(value[e.start]):04X} at character {e.start}); "
                f"fix the text in the source file")
    return None


def printable(value: object) -> str:
    """``str(value)`` made storable as UTF-8 (lone surrogates written as ``\\udXXX``): for error records."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def normalize_text(text: str) -> str:
    """NFC-normalise, collapse whitespace. Non-ASCII is kept (it is the user's text)."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def float32_box(box: Iterable[float]) -> tuple[float, float, float, float]:
    """Round a box to float32 values (as stored everywhere) and return them as a Python tuple."""
    arr = B.as_boxes(list(box))[0]
    return tuple(float(v) for v in arr)  # type: ignore[return-value]


def check_relative_path(path: str, *, what: str = "path") -> str:
    """Refuse absolute paths and paths that escape the root (``..``); returns the path unchanged."""
    p = PurePosixPath(path.replace("\\", "/"))
    if not path or p.is_absolute() or ".." in p.parts or (len(path) > 1 and path[1] == ":"):
        raise DataError(f"{what}: path {path!r} is absolute or escapes the image root; refused")
    return path
