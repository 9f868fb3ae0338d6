"""End with the parent: a job process (trainer, evaluator) that the kernel stops when the process that started it dies.

tagflow.local (runner, evaluate) starts these processes with `tagflow.local.process.child_env`, which sets
PARENT_ENV to its own PID; without it (SageMaker's container) nothing is done.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

PARENT_ENV = "TAGFLOW_PARENT_PID"  # set by tagflow.local.process.child_env
PR_SET_PDEATHSIG = 1


def end_with_parent() -> bool:
    """Have the kernel SIGKILL this process when the process that started it dies, however it dies (a killed
    Airflow task cannot stop its children after SIGKILL, and a job whose log pipe is gone works on unseen).
    False if that process is already gone. Without PARENT_ENV nothing is done."""
    expected = os.environ.get(PARENT_ENV)
    if not expected:
        return True
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this process may outlive its parent",
                    ctypes.get_errno())  # fmt: skip
    if os.getppid() != int(expected):  # the parent died before the line above took effect
        log.error("the process that started this job (pid %s) is gone: not starting", expected)
        return False
    return True
