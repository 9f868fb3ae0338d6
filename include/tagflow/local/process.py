"""Background servers started by tagflow (S3, endpoints): liveness by PID and stopping a whole process group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def read_pid(pid_file: Path) -> int:
    """The PID recorded in `pid_file`, 0 when the file is absent or empty."""
    try:
        return int(pid_file.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def stop_group(pid: int, timeout: float = 20, *, reap: bool = True) -> bool:
    """SIGTERM the process group led by `pid`, SIGKILL it after `timeout`; True if it was running. `reap=False`
    leaves the exit status to the Popen that waits for it (stopping from a signal handler)."""
    if not pid or not pid_alive(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    if reap:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)  # reap it when it was our child
    return True


# Process groups this process started for a job (a trainer, a tuning trial) and still waits for: what a task's
# `on_kill` stops, so that killing a task never leaves its work running.
_owned: set[int] = set()
_owned_lock = threading.Lock()
KILL_GRACE_S = 3.0  # Airflow escalates SIGTERM to SIGKILL after 5 s: stop the children within that


@contextlib.contextmanager
def owned(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """Register `proc` (the leader of its own process group) for `stop_owned` while the block runs."""
    with _owned_lock:
        _owned.add(proc.pid)
    try:
        yield proc
    finally:
        with _owned_lock:
            _owned.discard(proc.pid)


def stop_owned(grace: float = KILL_GRACE_S) -> list[int]:
    """Stop every process group registered with `owned` (SIGTERM, SIGKILL after `grace`); returns their PIDs.
    Safe in a signal handler: it does not reap, so the Popen waiting for each one still gets its exit status."""
    with _owned_lock:
        pids = sorted(_owned)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    return pids


PARENT_ENV = "TAGFLOW_PARENT_PID"  # set for a job's process: it exits when this process dies (algo/ic_train.py)


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) plus PARENT_ENV, so the job's process can stop itself if we are killed
    with SIGKILL, which no handler of ours can see."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports the OS reports free right now (held together so none repeats)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((host, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        # as servers bind: a port in TIME_WAIT after a stop is free to them
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`. A server that starts children in process groups of their own
    (Airflow runs each task so) keeps them in its session, not in its process group."""
    members = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat_file.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
            if int(fields[3]) == sid and fields[0] != "Z":
                members.append(int(stat_file.parent.name))
    return members


def stop_session(sid: int, timeout: float = 20) -> bool:
    """Stop the process group `sid` leads (SIGTERM, then SIGKILL), then whatever else still runs in its session;
    True if anything was running."""
    was_running = stop_group(sid, timeout) or bool(session_members(sid))
    deadline = time.monotonic() + timeout
    while session_members(sid) and time.monotonic() < deadline:  # children still shutting down
        time.sleep(0.2)
    for member in session_members(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
    return was_running
