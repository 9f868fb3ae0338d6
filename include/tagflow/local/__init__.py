"""Running tagflow on one machine: the local S3 server, the algorithm environment's jobs and endpoint, Airflow.

Local state is the user's only: $TAGFLOW_HOME is made 0700 (which also keeps out of reach whatever an earlier
version left readable in it), and the entry points that create state (the S3 server, an endpoint, `make up`,
`make demo`) run under `private_files()`, so the files they and their servers write are 0600 and folders 0700.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PRIVATE_UMASK = 0o077


def mxnet_python() -> Path:
    """The algorithm environment's interpreter: $TAGFLOW_MXNET_PYTHON, else <repo>/.venv-mxnet/bin/python."""
    return Path(os.environ.get("TAGFLOW_MXNET_PYTHON") or REPO / ".venv-mxnet" / "bin" / "python")


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity, which a container or taskset narrows), at least 1."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def home() -> Path:
    """Where local state lives (S3 data, endpoints, Airflow's home): $TAGFLOW_HOME, else the repository's .tagflow,
    wherever the command runs from."""
    return Path(os.environ.get("TAGFLOW_HOME") or REPO / ".tagflow").resolve()


def make_private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) for this user only (0700). When `path` is $TAGFLOW_HOME or under it, the
    home itself is made 0700 as well."""
    path = path.resolve()
    state = home()
    if path == state or path.is_relative_to(state):
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        state.chmod(0o700)
    with private_files():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


@contextlib.contextmanager
def private_files() -> Iterator[None]:
    """Inside, files and folders this process creates, and those of every subprocess it starts (they inherit it),
    are the user's only: umask 0o077. The umask is the process's: it is restored on the way out."""
    previous = os.umask(PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(previous)


def narrow_tree(path: Path) -> None:
    """Take group and other permissions off everything under `path` (for servers that chmod their own files wider
    than the umask allows: SeaweedFS writes its volume info files 0644)."""
    for entry in [path, *path.rglob("*")]:
        with contextlib.suppress(OSError):  # a file the server removed meanwhile
            if not entry.is_symlink() and (mode := entry.stat().st_mode) & 0o077:
                entry.chmod(mode & 0o7700)
