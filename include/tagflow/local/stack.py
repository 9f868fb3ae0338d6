"""`make up` / `make down`: Airflow with its UI, the local S3 server and the local endpoint, on this machine.

`up` starts (or finds running) three servers, each its own process group, and waits until they answer:

- the local S3 server (`s3server`), with the buckets the trigger form's defaults read and write;
- the local endpoint `tagflow-designs`, started empty: a run's deploy task loads its model into it, by the URL
  and with the admin token the DAG reads from the Airflow Variables `tagflow_endpoint_url` and
  `tagflow_endpoint_token` (the token the endpoint keeps in its state folder, 0600);
- `airflow standalone` (SQLite + LocalExecutor: api-server, scheduler, dag-processor, triggerer) on loopback, on
  the port it used last time, else 8080, else a free one, until every component reports healthy and the DAG
  `tagflow` is parsed. The DAG is created paused: the UI's trigger form unpauses it.

`down` stops all three by process id. Everything under $TAGFLOW_HOME is the user's only: `up` runs under
`tagflow.local.private_files` (umask 0o077, inherited by the three servers), so files are 0600 and folders 0700.
Airflow's files, under $TAGFLOW_HOME/airflow (its AIRFLOW_HOME):

    standalone.pid    process id of `airflow standalone` (it leads its own process group)
    standalone.json   the UI's URL and port, and the S3 and endpoint URLs Airflow was started with (AirflowInfo)
    standalone.log    the output of every Airflow component
    simple_auth_manager_passwords.json.generated   {"admin": PASSWORD}: SimpleAuthManager writes it once

The api-server's port decides two URLs: the UI's, and the execution API's (`[core] execution_api_server_url`),
which every task process calls; Airflow 3 looks for the latter on port 8080 unless told otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tagflow import local
from tagflow.dag_id import DAG_ID
from tagflow.errors import InputError, TagflowError
from tagflow.local import airflow, endpoint, process, s3server, services

ADMIN_USER = "admin"  # SimpleAuthManager's default `[core] simple_auth_manager_users` is admin:admin
PASSWORD_FILE = "simple_auth_manager_passwords.json.generated"
PREFERRED_PORT = 8080
START_TIMEOUT_S = 300
STOP_TIMEOUT_S = 30


@dataclass(frozen=True)
class AirflowInfo:
    """A running `airflow standalone`, and the servers it was configured for."""

    pid: int
    url: str
    port: int
    s3_endpoint: str
    endpoint_url: str
    home: str

    @property
    def log_file(self) -> Path:
        return Path(self.home) / "standalone.log"

    @property
    def password_file(self) -> Path:
        return Path(self.home) / PASSWORD_FILE


@dataclass(frozen=True)
class Stack:
    """What `up` found or started; `started` is False when Airflow was already running as configured."""

    airflow: AirflowInfo
    s3: s3server.ServerInfo
    endpoint: endpoint.EndpointInfo
    started: bool


def airflow_home() -> Path:
    return local.home() / "airflow"


def airflow_status(home: Path | None = None) -> AirflowInfo | None:
    """The `airflow standalone` running for `home`, or None (stale files are ignored)."""
    home = home or airflow_home()
    info_file = home / "standalone.json"
    pid = process.read_pid(home / "standalone.pid")
    if not (pid and info_file.exists() and process.pid_alive(pid)):
        return None
    return AirflowInfo(**json.loads(info_file.read_text()))


def _stop_airflow(home: Path) -> bool:
    """Stop `airflow standalone` and every process it started; True if any was running."""
    pid_file = home / "standalone.pid"
    pid = process.read_pid(pid_file)
    if not pid:
        return False
    was_running = process.stop_session(pid, STOP_TIMEOUT_S)  # its components run tasks in groups of their own
    pid_file.unlink(missing_ok=True)
    return was_running


def _request(
    method: str, url: str, *, body: dict[str, Any] | None = None, token: str | None = None, timeout: float = 10
) -> tuple[int, Any]:
    """HTTP status and decoded JSON body (None when not JSON) of one request."""
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            code, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        code, raw = err.code, err.read()
    try:
        return code, json.loads(raw)
    except ValueError:
        return code, None


def admin_password(info: AirflowInfo) -> str:
    """The generated password of the UI's admin user."""
    return json.loads(info.password_file.read_text())[ADMIN_USER]


def api_token(info: AirflowInfo) -> str:
    """A JWT for Airflow's REST API (`POST /auth/token`, SimpleAuthManager), as the admin user."""
    code, body = _request(
        "POST", f"{info.url}/auth/token", body={"username": ADMIN_USER, "password": admin_password(info)}
    )
    if code != 201 or not isinstance(body, dict):
        raise TagflowError(f"Airflow at {info.url} refused a token for {ADMIN_USER} (HTTP {code}): {body}")
    return body["access_token"]


def _not_ready(info: AirflowInfo, started_at: datetime) -> str | None:
    """Why Airflow is not ready yet (None: it is); raises when the DAG file failed to import since `started_at`."""
    code, health = _request("GET", f"{info.url}/api/v2/monitor/health")
    if code != 200 or not isinstance(health, dict):
        return f"{info.url}/api/v2/monitor/health answered HTTP {code}"
    unhealthy = sorted(name for name, part in health.items() if (part or {}).get("status") != "healthy")
    if unhealthy:
        return f"not yet healthy: {', '.join(unhealthy)}"
    if not info.password_file.exists():
        return f"{info.password_file} not written yet"
    token = api_token(info)
    code, _ = _request("GET", f"{info.url}/api/v2/dags/{DAG_ID}", token=token)
    if code == 200:
        return None
    _, errors = _request("GET", f"{info.url}/api/v2/importErrors", token=token)
    for error in (errors or {}).get("import_errors", []):
        if datetime.fromisoformat(error["timestamp"]) >= started_at:
            raise TagflowError(f"Airflow could not import {error['filename']}:\n{error['stack_trace']}")
    return f"the DAG {DAG_ID!r} is not parsed yet (GET /api/v2/dags/{DAG_ID}: HTTP {code})"


def _wait_ready(info: AirflowInfo, proc: subprocess.Popen, started_at: datetime, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    reason: object = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = info.log_file.read_text(errors="replace")[-3000:]
            raise TagflowError(
                f"airflow standalone exited with status {proc.returncode}; end of {info.log_file}:\n{tail}"
            )
        try:
            reason = _not_ready(info, started_at)
        except OSError as err:  # the api-server is not listening yet
            reason = f"{info.url} does not answer: {getattr(err, 'reason', err)}"
        if reason is None:
            return
        time.sleep(1)
    raise TagflowError(f"Airflow was not ready within {timeout:.0f}s ({reason}); see {info.log_file}")


def _choose_port(home: Path) -> int:
    """The port used last time if free (a stable URL), else 8080 if free, else any free one."""
    previous = 0
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
        previous = int(json.loads((home / "standalone.json").read_text())["port"])
    for port in (previous, PREFERRED_PORT):
        if port and process.port_free(port):
            return port
    return process.free_ports(1)[0]


def _start_airflow(home: Path, running: services.Services, port: int | None, timeout: float) -> AirflowInfo:
    s3_info, ep = running.s3, running.endpoint
    if port is None:
        port = _choose_port(home)
    elif not process.port_free(port):
        raise InputError(f"--port {port}: something already listens on 127.0.0.1:{port}; choose another port")
    url = f"http://127.0.0.1:{port}"
    env = airflow.environment(
        s3_info,
        home=home,
        variables=running.airflow_variables(),  # the endpoint's URL and admin token
        extra={
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
            # LocalExecutor keeps one worker process per slot (32 by default); tasks here share this machine's CPUs.
            "AIRFLOW__CORE__PARALLELISM": str(2 * len(os.sched_getaffinity(0))),
            "NO_COLOR": "1",  # standalone colours each component's name; the log is a file
        },
    )
    log_file = home / "standalone.log"
    started_at = datetime.now().astimezone()
    # The log shows the admin password the first time: it, and every file Airflow writes, is for this user only.
    log_file.touch(mode=0o600)
    log_file.chmod(0o600)
    with log_file.open("ab") as log_fh:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "airflow"), "standalone"],
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=home,
            start_new_session=True,
            umask=0o077,
        )
    info = AirflowInfo(
        pid=proc.pid, url=url, port=port, s3_endpoint=s3_info.endpoint, endpoint_url=ep.url, home=str(home)
    )
    (home / "standalone.pid").write_text(f"{proc.pid}\n")
    (home / "standalone.json").write_text(json.dumps(asdict(info), indent=2))
    try:
        _wait_ready(info, proc, started_at, timeout)
    except BaseException:
        _stop_airflow(home)
        raise
    return info


def up(port: int | None = None, timeout: float = START_TIMEOUT_S) -> Stack:
    """Start the S3 server, the endpoint and Airflow (its UI on `port`; None: the last one, 8080 or any free one),
    or return those already running as asked (idempotent). Everything they write under $TAGFLOW_HOME is the
    user's only (0600 files, 0700 folders)."""
    with local.private_files():
        home = local.make_private_dir(airflow_home())
        running_services = services.start()
        s3_info, ep = running_services.s3, running_services.endpoint
        running = airflow_status(home)
        if running:
            same = (running.s3_endpoint, running.endpoint_url) == (s3_info.endpoint, ep.url)
            if same and port in (None, running.port):
                return Stack(running, s3_info, ep, started=False)
            _stop_airflow(home)  # another port was asked for, or the S3 server or endpoint has moved since
        return Stack(_start_airflow(home, running_services, port, timeout), s3_info, ep, started=True)


def down() -> list[str]:
    """Stop Airflow, the endpoint and the S3 server (each by its PID); the names of those that were running."""
    stopped = []
    if _stop_airflow(airflow_home()):
        stopped.append("Airflow")
    was_running = services.stop()
    if was_running["endpoint"]:
        stopped.append(f"endpoint {services.ENDPOINT_NAME}")
    if was_running["s3"]:
        stopped.append("S3 server")
    return stopped


def _describe(
    af: AirflowInfo | None, s3_info: s3server.ServerInfo | None, ep: endpoint.EndpointInfo | None
) -> list[str]:
    lines = []
    if s3_info:
        lines.append(f"S3        {s3_info.endpoint}  (pid {s3_info.pid}; keys in {s3_info.state_dir}/s3.env)")
    else:
        lines.append("S3        not running")
    if ep:
        lines.append(f"endpoint  {ep.url}  ({ep.name}, pid {ep.pid}; log {ep.state_dir}/endpoint.log)")
    else:
        lines.append(f"endpoint  not running ({services.ENDPOINT_NAME})")
    if af:
        lines.append(f"Airflow   {af.url}  (pid {af.pid}; log {af.log_file})")
        lines.append(f"          user {ADMIN_USER}, password in {af.password_file}")
    else:
        lines.append("Airflow   not running")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tagflow.local.stack", description="Airflow's UI, the local S3 server and the local endpoint."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up_parser = commands.add_parser("up", help="start all three (or report those running); `make up`")
    up_parser.add_argument("--port", type=int, help="the UI's port (default: the last one, else 8080, else a free one)")
    up_parser.add_argument("--timeout", type=float, default=START_TIMEOUT_S, help="seconds to wait for Airflow")
    commands.add_parser("down", help="stop all three; `make down`")
    commands.add_parser("status", help="what runs where; exit status 1 unless all three run")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            stack = up(args.port, args.timeout)
            print("\n".join(_describe(stack.airflow, stack.s3, stack.endpoint)))
            if not stack.started:
                print("(Airflow was already running; `make down` stops everything)")
        elif args.command == "down":
            stopped = down()
            print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
        else:
            found = (airflow_status(), s3server.status(), endpoint.status(services.endpoint_state_dir()))
            print("\n".join(_describe(*found)))
            return 0 if all(found) else 1
    except TagflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
