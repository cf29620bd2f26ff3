"""Prefect orchestration of the grounding stages (see flow.py)."""

import os

# Nothing in this project may send traffic off the machine: Prefect's anonymous server analytics are off
# unless the user explicitly turns them on.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
