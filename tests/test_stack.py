"""`make up` / `make down` for real: `airflow standalone`, the local S3 server and the local endpoint, started by
`python -m tagflow.local.stack` in a temporary TAGFLOW_HOME (its own S3 server, beside the session's)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tagflow.local import endpoint, process, s3server, services, stack

pytestmark = [pytest.mark.slow, pytest.mark.mxnet]

TASK_TIMEOUT_S = 300
TERMINAL = {"success", "failed", "upstream_failed", "skipped", "removed"}


def run_stack(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tagflow.local.stack", *args],
        capture_output=True,
        text=True,
        timeout=stack.START_TIMEOUT_S + 120,
        check=False,
    )


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def stack_home(tmp_path, monkeypatch, mxnet_python):
    """A fresh TAGFLOW_HOME, with no AWS_* variables from the session's S3 server; `down` whatever happens."""
    home = tmp_path / "home"
    monkeypatch.setenv("TAGFLOW_HOME", str(home))
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    try:
        yield home
    finally:
        run_stack("down")


def wait_task(af: stack.AirflowInfo, token: str, run_id: str, task_id: str) -> dict:
    deadline = time.monotonic() + TASK_TIMEOUT_S
    path = f"/api/v2/dags/{stack.DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}"
    while True:
        code, ti = stack._request("GET", af.url + path, token=token)
        assert code == 200, ti
        if ti["state"] in TERMINAL or time.monotonic() > deadline:
            return ti
        time.sleep(2)


def test_up_is_idempotent_and_down_stops_everything(stack_home):
    port = process.free_ports(1)[0]  # not 8080: the execution API's URL must follow the UI's port
    done = run_stack("up", "--port", str(port))
    assert done.returncode == 0, done.stderr[-4000:]
    af = stack.airflow_status()
    s3_info = s3server.status(stack_home / "s3")
    ep = endpoint.status(stack_home / "endpoints" / services.ENDPOINT_NAME)
    assert af is not None and s3_info is not None and ep is not None
    for shown in (af.url, str(af.password_file), s3_info.endpoint, ep.url):
        assert shown in done.stdout
    assert (af.home, af.url) == (str(stack_home / "airflow"), f"http://127.0.0.1:{port}")

    # The UI answers, every component is healthy, the admin's password logs in and the DAG is there, paused.
    with urllib.request.urlopen(af.url + "/", timeout=10) as resp:
        assert resp.status == 200
        assert b"<html" in resp.read().lower()
    code, health = stack._request("GET", af.url + "/api/v2/monitor/health")
    assert code == 200
    assert {name: part["status"] for name, part in health.items()} == {
        "metadatabase": "healthy",
        "scheduler": "healthy",
        "triggerer": "healthy",
        "dag_processor": "healthy",
    }
    assert set(json.loads(af.password_file.read_text())) == {"admin"}
    assert af.password_file.stat().st_mode & 0o077 == 0
    assert af.log_file.stat().st_mode & 0o077 == 0
    token = stack.api_token(af)
    code, dag = stack._request("GET", f"{af.url}/api/v2/dags/{stack.DAG_ID}", token=token)
    assert code == 200
    assert (dag["dag_id"], dag["is_paused"]) == ("tagflow", True)

    # The endpoint runs empty; the default preset's buckets exist on this home's S3 server.
    ep_health = endpoint.health(ep.url)
    assert (ep_health["name"], ep_health["loaded"]) == ("tagflow-designs", False)
    # Airflow holds the endpoint's admin token (the DAG's deploy task sends it); the home is the user's only.
    environ = dict(
        item.split("=", 1) for item in Path(f"/proc/{af.pid}/environ").read_text().split("\0") if "=" in item
    )
    assert environ["AIRFLOW_VAR_TAGFLOW_ENDPOINT_TOKEN"] == endpoint.admin_token(ep.state_dir)
    assert stack_home.stat().st_mode & 0o777 == 0o700
    client = s3_info.client()
    for bucket in ("tagflow-data", "tagflow-raw"):
        client.head_bucket(Bucket=bucket)

    # A triggered run's first task reports to the execution API on this port (not 8080) and succeeds.
    code, _ = stack._request("PATCH", f"{af.url}/api/v2/dags/{stack.DAG_ID}", body={"is_paused": False}, token=token)
    assert code == 200
    code, run = stack._request(
        "POST",
        f"{af.url}/api/v2/dags/{stack.DAG_ID}/dagRuns",
        body={"dag_run_id": "stack-test", "logical_date": None},
        token=token,
    )
    assert code == 200, run
    ti = wait_task(af, token, "stack-test", "resolve_config")
    assert ti["state"] == "success", ti

    # Up again: the same servers, reported as running.
    again = run_stack("up")
    assert again.returncode == 0, again.stderr[-4000:]
    assert "already running" in again.stdout
    assert stack.airflow_status() == af
    assert s3server.status(stack_home / "s3").pid == s3_info.pid
    assert endpoint.status(stack_home / "endpoints" / services.ENDPOINT_NAME).pid == ep.pid
    assert run_stack("status").returncode == 0

    # Down: every process is gone (Airflow's whole session, tasks included) and nothing listens on their ports.
    assert process.session_members(af.pid)
    down = run_stack("down")
    assert down.returncode == 0, down.stderr[-4000:]
    assert down.stdout.strip() == "stopped: Airflow, endpoint tagflow-designs, S3 server"
    assert not any(process.pid_alive(pid) for pid in (af.pid, s3_info.pid, ep.pid))
    assert process.session_members(af.pid) == []
    for port in (af.port, ep.port, *s3_info.ports.values()):
        assert not listening(port), port
    status = run_stack("status")
    assert status.returncode == 1
    assert "Airflow   not running" in status.stdout
    assert run_stack("down").stdout.strip() == "nothing was running"

    # Every file the three servers and the run wrote (airflow.db, the logs, S3 data, the token) is 0600, folders 0700.
    entries = [stack_home, *stack_home.rglob("*")]
    assert {"airflow.db", "standalone.log", "weed.log", "endpoint.log", "admin-token"} <= {p.name for p in entries}
    modes = {p: p.stat().st_mode & 0o777 for p in entries if not p.is_symlink()}
    exposed = [f"{p} {mode:o}" for p, mode in modes.items() if mode & 0o077]
    assert exposed == [], exposed


def test_services_restart_an_endpoint_that_accepts_models_from_elsewhere(stack_home):
    """An endpoint left running from before the S3 server moved would refuse every deploy (its --s3-endpoint is the
    old one): services.start starts it anew for the S3 server it finds, with the same admin token."""
    state = services.endpoint_state_dir()
    stale = endpoint.start(name=services.ENDPOINT_NAME, state_dir=state, s3_endpoints=["http://127.0.0.1:9"])
    token = endpoint.admin_token(state)
    try:
        running = services.start()
        assert running.endpoint.pid != stale.pid and not process.pid_alive(stale.pid)
        assert endpoint.s3_endpoints_of(state) == [running.s3.endpoint]
        assert running.airflow_variables() == {"tagflow_endpoint_url": running.endpoint.url,
                                               "tagflow_endpoint_token": token}  # fmt: skip
        assert services.start().endpoint.pid == running.endpoint.pid  # as it should be now: left alone
    finally:
        services.stop()
