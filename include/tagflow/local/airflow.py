"""Airflow on this machine: the environment that points it at this project, the local S3 server and the
algorithm environment, and the commands `make demo` (one DAG run) and `make up` / `make down` use.

Airflow reads everything from the environment built here: its home under `$TAGFLOW_HOME/airflow` (SQLite +
LocalExecutor, the embedded default), this repository's `dags/` and `plugins/`, and the `aws_default` connection
(the local S3 server's endpoint and keys, SigV4, path-style addressing) as `AIRFLOW_CONN_AWS_DEFAULT`, so no
secret is written to the metadata DB or the DAG code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tagflow import local
from tagflow.errors import TagflowError
from tagflow.local import REPO
from tagflow.local.s3server import ServerInfo

DAGS = REPO / "dags"
PLUGINS = REPO / "plugins"
RUN_ONCE = PLUGINS / "tagflow_ops" / "run_once.py"


def aws_connection(s3: ServerInfo, *, services: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The `aws_default` connection for the local S3 server; `services` adds per-service endpoints
    (e.g. {"sagemaker": URL}) through the provider's `service_config` extra."""
    extra: dict[str, Any] = {
        "endpoint_url": s3.endpoint,
        "region_name": s3.region,
        "config_kwargs": {
            "signature_version": "s3v4",
            "s3": {"addressing_style": "path"},
            "retries": {"mode": "standard", "max_attempts": 5},
        },
    }
    if services:
        extra["service_config"] = {name: {"endpoint_url": url} for name, url in services.items()}
    return {"conn_type": "aws", "login": s3.access_key, "password": s3.secret_key, "extra": extra}


def environment(
    s3: ServerInfo,
    *,
    home: Path | None = None,
    database_url: str | None = None,
    executor: str = "LocalExecutor",
    services: Mapping[str, str] | None = None,
    variables: Mapping[str, str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment an Airflow process (CLI, standalone, worker) needs to run the tagflow DAG here."""
    home = (home or local.home() / "airflow").resolve()
    home.mkdir(parents=True, exist_ok=True)
    # Tasks reach AWS (or the local S3 server) only through aws_default: no AWS_* settings leak in from the shell.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_", "AWS_"))
    }
    venv_bin = str(Path(sys.executable).parent)
    env.update(
        {
            "PATH": f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",  # airflow standalone starts `airflow ...`
            "TAGFLOW_HOME": str(local.home()),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": executor,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url or f"sqlite:///{home / 'airflow.db'}",
            # a new DAG waits to be unpaused: its weekly schedule must not start a run before there is data
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(aws_connection(s3, services=services)),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGINS), env.get("PYTHONPATH")])),
        }
    )
    for name, value in (variables or {}).items():
        env[f"AIRFLOW_VAR_{name.upper()}"] = value
    env.update(extra or {})
    return env


def _airflow(env: Mapping[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    airflow = Path(sys.executable).parent / "airflow"
    return subprocess.run(
        [str(airflow), *args], env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
    )


def migrate(env: Mapping[str, str]) -> None:
    """Create or upgrade the metadata database (idempotent)."""
    done = _airflow(env, "db", "migrate")
    if done.returncode != 0:
        raise TagflowError(f"airflow db migrate failed:\n{done.stderr[-3000:] or done.stdout[-3000:]}")


def run_once(
    env: Mapping[str, str],
    conf: Mapping[str, Any],
    *,
    logical_date: str | None = None,
    timeout: float = 3600,
    log_file: Path | None = None,
) -> dict[str, Any]:
    """Run the tagflow DAG once in this machine's Airflow (`dag.test`: every task in one process, no scheduler)
    and return {"run_id", "state", "tasks": {task: state}, "results": {task: XCom}, "rendered": {task: fields}}."""
    args = [sys.executable, str(RUN_ONCE), "--conf", json.dumps(dict(conf))]
    if logical_date:
        args += ["--logical-date", logical_date]
    done = subprocess.run(args, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(done.stdout + done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("TAGFLOW_RESULT ")]
    if not lines:
        where = f"; full log in {log_file}" if log_file else ""
        raise TagflowError(f"the DAG run did not report a result (exit {done.returncode}){where}:\n"
                           f"{done.stderr[-4000:]}")  # fmt: skip
    return json.loads(lines[-1][len("TAGFLOW_RESULT ") :])
