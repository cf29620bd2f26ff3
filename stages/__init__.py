"""Thin DVC entry points: each parses params.yaml (plus `key=value` overrides from argv) and calls
grounding.stages.run. No logic lives here."""

from __future__ import annotations

import sys


def main(stage: str, argv: list[str] | None = None) -> None:
    """Run ``stage`` with ``params.yaml`` and ``key.path=value`` overrides from ``argv``."""
    import logging

    from grounding import config, stages

    # the stages' own INFO lines ("<stage>: up to date ...") show in `dvc repro`'s log; other libraries stay quiet
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("grounding").setLevel(logging.INFO)
    params = config.load("params.yaml", sys.argv[1:] if argv is None else argv)
    print(stages.run(stage, params))
