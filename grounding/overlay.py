"""A params overlay file (e.g. ``params-full.yaml``) as ``--set`` overrides of ``params.yaml``.

An overlay holds only the keys it changes, nested as in ``params.yaml``. ``python -m grounding.overlay
FILE`` prints them as ``--set key.path=value`` words for ``grounding run|demo`` (``make demo-full`` does
this), and ``-S`` words with ``--dvc`` for ``dvc exp run``. Every leaf becomes one override, so lists and
mappings under a leaf key are written as compact JSON (valid YAML flow); values must not contain spaces
(the words go through a shell unquoted).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from grounding.config import ConfigError


def read_overlay(path: str | Path) -> dict[str, Any]:
    """The overlay's mapping; a missing file, bad YAML or a non-mapping top level is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: overlay file not found")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: top level must be a mapping of params.yaml keys")
    return doc


def _value(v: Any) -> str:
    """A leaf as YAML text the way ``--set`` parses it: null/true/false, numbers, JSON lists, bare strings."""
    if v is None or isinstance(v, (bool, int, float, list)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def overrides(doc: dict[str, Any], prefix: str = "") -> list[str]:
    """``key.path=value`` for every leaf of ``doc`` (mappings recurse; lists are leaves), in file order."""
    out: list[str] = []
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.extend(overrides(v, key + "."))
        else:
            text = _value(v)
            if any(c.isspace() for c in text):
                raise ConfigError(f"overlay key {key}: value {text!r} has spaces (not allowed in an overlay)")
            out.append(f"{key}={text}")
    return out


def main(argv: list[str]) -> int:
    """``python -m grounding.overlay FILE [--dvc]``: print the overrides as command-line words."""
    args = [a for a in argv if a != "--dvc"]
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m grounding.overlay FILE [--dvc]  (prints --set k=v words; -S with --dvc)",
              file=sys.stderr if len(args) != 1 else sys.stdout)
        return 0 if args and args[0] in ("-h", "--help") else 2
    flag = "-S" if "--dvc" in argv else "--set"
    try:
        words = overrides(read_overlay(args[0]))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(" ".join(f"{flag} {w}" for w in words))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
