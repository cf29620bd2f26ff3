"""Serve every deployment of the `grounding` flow from this process (run from the repository root):

    python -m pipelines.serve
    prefect deployment run grounding/refclip-teacher --param dataset=synthetic
"""

from __future__ import annotations

from prefect import serve

from pipelines.flow import TARGETS, grounding_flow


def deployments() -> list:
    """One deployment per target; parameters can be overridden per run (`--param` / `--params`)."""
    return [grounding_flow.to_deployment(name=t, parameters={"target": t}, tags=["grounding", t],
                                         description=f"grounding: bring the {t} stages up to date")
            for t in TARGETS]


if __name__ == "__main__":
    serve(*deployments())
