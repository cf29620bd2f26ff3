"""Serve every deployment of the `grounding` flow from this process (run from the repository root):

    eval "$(grounding prefect up)"      # a local server; or point PREFECT_API_URL at a running one
    python -m pipelines.serve &
    prefect deployment run grounding/refclip-teacher --param dataset=synthetic

Before serving it waits (``--wait``, default 120 s) for ``$PREFECT_API_URL/health``: a server just started
needs about 18 s to answer, and a client that comes earlier dies with ``httpx.ConnectError``.
"""

from __future__ import annotations

import argparse
import os
import sys


def deployments() -> list:
    """One deployment per target; parameters can be overridden per run (`--param` / `--params`)."""
    from pipelines.flow import TARGETS, grounding_flow

    return [grounding_flow.to_deployment(name=t, parameters={"target": t}, tags=["grounding", t],
                                         description=f"grounding: bring the {t} stages up to date")
            for t in TARGETS]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__.splitlines()[0],
                                 epilog="Deployments: grounding/<target> for every target of pipelines.flow.")
    ap.add_argument("--wait", type=float, default=120, metavar="S",
                    help="seconds to wait for $PREFECT_API_URL/health before serving (default 120)")
    a = ap.parse_args(argv)
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        print("error: PREFECT_API_URL is not set; start a local server with `eval \"$(grounding prefect up)\"` "
              "or export the URL of a running one", file=sys.stderr)
        return 1
    from grounding.prefect_server import wait_healthy

    try:
        wait_healthy(url, a.wait)
    except TimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from prefect import serve

    serve(*deployments())
    return 0


if __name__ == "__main__":
    sys.exit(main())
