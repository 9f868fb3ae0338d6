"""Running tagflow on one machine: the local S3 server, the algorithm environment's jobs and endpoint, Airflow."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def home() -> Path:
    """Where local state lives (S3 data, endpoints, Airflow's home): $TAGFLOW_HOME, else the repository's .tagflow,
    wherever the command runs from."""
    return Path(os.environ.get("TAGFLOW_HOME") or REPO / ".tagflow").resolve()
