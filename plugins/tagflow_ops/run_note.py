"""The gate's decision on the run itself: a listener that sets a tagflow run's note when the run ends.

Why a listener: the note lives in Airflow's metadata database, and a task in Airflow 3 has no database access (the
task SDK talks to the execution API, which has no route for a run's note); the REST API could set it, but a task
would need credentials for it. The scheduler, which decides that a run has ended, has the database: DagRun's
state change calls the `on_dag_run_success` / `on_dag_run_failed` listener hooks in the scheduler's own session,
whatever executor ran the tasks (LocalExecutor, CeleryExecutor, and `dag.test`, which plays the scheduler's part),
so the note is written in the same transaction that ends the run. A note someone already wrote is kept.

The text comes from the tasks' XComs: `evaluate_gate` (decision, reason, mAP, baseline, the serving model's mAP)
with, under manual approval, `approve_deploy`'s answer ("approved by USER", "rejected by USER", "approval timed
out"), or, for a run that stopped after publish, `choose_training`'s "nothing new since MODEL"
(`tagflow.deploy.run_note`, `tagflow.deploy.with_approval`).
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

from tagflow.dag_id import DAG_ID

if TYPE_CHECKING:
    from airflow.models.dagrun import DagRun

log = logging.getLogger(__name__)

GATE_TASK, TRAINING_TASK, APPROVAL_TASK = "evaluate_gate", "choose_training", "approve_deploy"


def _results(dag_run: DagRun, session) -> dict[str, Any]:
    from airflow.models.xcom import XComModel

    query = XComModel.get_many(
        run_id=dag_run.run_id, dag_ids=dag_run.dag_id, key="return_value",
        task_ids=[GATE_TASK, TRAINING_TASK, APPROVAL_TASK], map_indexes=-1,
    )  # fmt: skip
    rows = session.scalars(query)
    return {row.task_id: XComModel.deserialize_value(row) for row in rows}


def set_note(dag_run: DagRun) -> str | None:
    """Write the decision into `dag_run`'s note, in the session that ends the run (committed with its new state):
    the scheduler's, which holds the run; under `dag.test` the run object is detached, and the thread's scoped
    session (`settings.Session`, the one dag.test's loop commits) loads it again. A second session would wait on
    the first's lock on the run's row."""
    from airflow import settings
    from airflow.models.dagrun import DagRun as DagRunModel
    from sqlalchemy.orm import object_session

    from tagflow.deploy import run_note, with_approval

    if dag_run.dag_id != DAG_ID:
        return None
    session = object_session(dag_run)
    if session is None:
        session = settings.Session()
        dag_run = session.get(DagRunModel, dag_run.id)
        if dag_run is None:
            return None
    if dag_run.note:
        return None  # a person's note is kept
    results = _results(dag_run, session)
    gate = results.get(GATE_TASK)
    if gate and results.get(APPROVAL_TASK):
        gate = with_approval(gate, results[APPROVAL_TASK])
    note = run_note(gate, results.get(TRAINING_TASK))
    if note:
        dag_run.note = note
        session.flush()
    return note


@hookimpl
def on_dag_run_success(dag_run: DagRun, msg: str) -> None:
    set_note(dag_run)


@hookimpl
def on_dag_run_failed(dag_run: DagRun, msg: str) -> None:
    set_note(dag_run)


class TagflowRunNotePlugin(AirflowPlugin):
    name = "tagflow_run_note"
    listeners = [sys.modules[__name__]]  # noqa: RUF012 (Airflow reads a plain list)
