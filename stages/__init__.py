"""Thin DVC entry points: each parses params.yaml (plus `key=value` overrides from argv) and calls
grounding.stages.run. No logic lives here. A known error (grounding.errors) is printed as one line naming
the file or key and the fix; exit code 2 for bad parameters, 1 otherwise."""

from __future__ import annotations

import sys


def main(stage: str, argv: list[str] | None = None) -> None:
    """Run ``stage`` with ``params.yaml`` and ``key.path=value`` overrides from ``argv``."""
    import logging

    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(f"usage: python -m stages.{stage.replace('-', '_')} [key.path=value ...]\n\nRun stage {stage} with "
              "params.yaml and these overrides (what `dvc repro` calls); `grounding run --help` has more.")
        return
    from grounding import config, errors, stages

    # the engine's and the stages' INFO lines ("<stage>: up to date ...") show in `dvc repro`'s log; other libraries stay quiet
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("grounding").setLevel(logging.INFO)
    try:
        params = config.load("params.yaml", args)
        result = stages.run(stage, params, deps=False)  # DVC runs the upstream stages first
    except errors.KNOWN as e:
        msg, code = errors.one_line(e, f"stage {stage}")
        print(f"error: {msg}", file=sys.stderr, flush=True)
        raise SystemExit(code) from None
    print(result.path)
