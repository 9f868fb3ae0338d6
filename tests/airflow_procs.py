"""Airflow's components as real processes for tests, and two hooks the components load from this folder.

`Components` starts each component (`airflow api-server`, `scheduler`, `celery worker`, ...) as the leader of a new
session with its output in a log file, notices when one dies, and stops every process each one started, whatever
happened: Airflow runs each task in a process group of its own, so the session, not the group, holds them all.

Hooks (the components find this module on PYTHONPATH; both import nothing beyond the standard library):

- `worker_name`, for `[core] hostname_callable`: the name in $TAGFLOW_WORKER_NAME, so that `task_instance.hostname`
  tells apart two Celery workers on one machine.
- `task_policy`, a cluster policy (re-exported by an `airflow_local_settings.py` in `$AIRFLOW_HOME/config`): sends
  the tasks named in $TAGFLOW_TASK_QUEUES (JSON {task_id: queue}) to those queues; other tasks keep theirs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tagflow.local import process

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

AIRFLOW = Path(sys.executable).parent / "airflow"
LOCAL_SETTINGS = "from airflow_procs import task_policy\n\n__all__ = ['task_policy']\n"


def worker_name() -> str:
    return os.environ["TAGFLOW_WORKER_NAME"]


def task_policy(task: Any) -> None:
    queue = json.loads(os.environ.get("TAGFLOW_TASK_QUEUES", "{}")).get(task.task_id)
    if queue:
        task.queue = queue


def install_task_policy(airflow_home: Path) -> None:
    """Make the components that use `airflow_home` apply `task_policy` (Airflow puts $AIRFLOW_HOME/config on
    sys.path and imports `airflow_local_settings` from there)."""
    config = airflow_home / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "airflow_local_settings.py").write_text(LOCAL_SETTINGS)


class Components:
    """Airflow components started here, each leading its own session; `stop()` ends them all."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen:
        """Run `airflow ARGS` as component `name`, its output in LOG_DIR/NAME.log."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log(name).open("ab") as log_fh:
            proc = subprocess.Popen(
                [str(AIRFLOW), *args],
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env),
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def tail(self, name: str, chars: int = 3000) -> str:
        return self.log(name).read_text(errors="replace")[-chars:]

    def check_alive(self) -> None:
        """Raise, with the end of its log, if a component has exited."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"airflow {name} exited with status {proc.returncode}:\n{self.tail(name)}")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM every component's process group at once; SIGKILL whatever is left in their sessions (tasks
        included) after `timeout`."""
        sessions = [proc.pid for proc in self.procs.values()]
        for sid in sessions:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(process.session_members(sid) for sid in sessions) and time.monotonic() < deadline:
            time.sleep(0.2)
        for sid in sessions:
            for pid in process.session_members(sid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.procs.clear()


@contextlib.contextmanager
def fresh_stack(home: Path, mp: Any):
    """`make up` in a fresh TAGFLOW_HOME `home` (its own S3 server: the session's AWS_* variables are removed through
    the MonkeyPatch `mp`); yields the stack, `make down` whatever happens."""
    from tagflow.local import stack

    mp.setenv("TAGFLOW_HOME", str(home))
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        mp.delenv(name)
    try:
        yield stack.up(port=process.free_ports(1)[0])
    finally:
        stack.down()
