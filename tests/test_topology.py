"""The tagflow DAG under the production topology, on this machine: a backfill over three daily partitions.

One deployment for the module, every part a real process: PostgreSQL as the metadata DB (a fresh database), Redis
as the Celery broker (a key prefix of its own), `airflow api-server`, `scheduler`, `dag-processor`, `triggerer`,
and two `airflow celery worker`s, each with its own AIRFLOW_HOME, TMPDIR and TAGFLOW_HOME: two machines' disks.
A cluster policy pins the tasks that pass data along to alternate workers (prepare on A, download on B, pack on A,
publish on B, train on A, deploy on B, smoke test on A), so a run succeeds only if every handoff goes through S3;
`task_instance.hostname` names the worker that ran each task.

`airflow backfill create` then runs the DAG for 2026-11-01..03 (TAGFLOW_SCHEDULE=@daily), one run at a time, on a
list prefix of daily partitions `lists/dt=YYYY-MM-DD/part.lst` of PER_DAY new images each: the run for day k reads
the partitions dated before its interval's end (days 1..k), so each run downloads and packs only the new images.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import secrets
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis

from airflow_procs import AIRFLOW, Components, install_task_policy
from tagflow import demo, runconfig, s3
from tagflow.dag_id import DAG_ID
from tagflow.local import airflow as local_airflow
from tagflow.local import endpoint, process

pytestmark = [pytest.mark.slow, pytest.mark.mxnet, pytest.mark.timeout(1200)]

TESTS = Path(__file__).resolve().parent
PER_DAY = 30
SHARD_SIZE = 10
FIRST_DAY = date(2026, 11, 1)
DAYS = 3
WORKERS = ("worker-a", "worker-b")
# Task → the worker (queue) it must run on: each task that writes data for the next runs on the other worker.
ROUTES = {
    "prepare": "worker-a",
    "shard.download": "worker-b",
    "shard.pack": "worker-a",
    "publish": "worker-b",
    "local_train": "worker-a",
    "deploy_local": "worker-b",
    "smoke_test": "worker-a",
}
POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
REDIS_URL = "redis://127.0.0.1:6379/0"
START_TIMEOUT_S = 300
RUNS_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def metadata_db():
    """A fresh PostgreSQL database for Airflow's metadata (and Celery's results); dropped afterwards."""
    name = f"tagflow_topology_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(dbname="postgres", **POSTGRES)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield name
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


@pytest.fixture(scope="module")
def broker_prefix():
    """A key prefix of this module's own on the shared Redis (every Celery key carries it); its keys are deleted
    afterwards."""
    prefix = f"tagflow-topology-{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="module")
def topology_bucket(s3_client) -> str:
    name = f"t-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def served(s3_server, tmp_path_factory):
    """The local endpoint, started empty: the runs' deploy task loads their models into it."""
    state = tmp_path_factory.mktemp("endpoint")
    info = endpoint.start(None, name="tagflow-designs", state_dir=state)
    try:
        yield info
    finally:
        endpoint.stop(state)


@dataclass
class Topology:
    env: dict[str, str]
    db: str
    components: Components
    worker_dirs: dict[str, Path]

    def sql(self, query: str, *args: Any) -> list[tuple]:
        conn = psycopg2.connect(dbname=self.db, **POSTGRES)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(query, args)
                return cur.fetchall()
        finally:
            conn.close()

    def airflow(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(AIRFLOW), *args], env=self.env, capture_output=True, text=True, timeout=300, check=False
        )


def _healthy(url: str) -> str | None:
    """Why the api-server is not ready yet (None: it is and reports every component healthy)."""
    try:
        with urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=5) as resp:
            health = json.loads(resp.read())
    except (OSError, ValueError) as err:
        return f"/api/v2/monitor/health: {err}"
    unhealthy = sorted(name for name, part in health.items() if (part or {}).get("status") != "healthy")
    return f"not yet healthy: {', '.join(unhealthy)}" if unhealthy else None


def _wait_ready(topo: Topology, url: str) -> None:
    """Until the api-server reports the scheduler, dag-processor and triggerer healthy and the DAG is parsed."""
    deadline = time.monotonic() + START_TIMEOUT_S
    reason: str | None = "not started"
    while time.monotonic() < deadline:
        topo.components.check_alive()
        errors = topo.sql("SELECT filename, stacktrace FROM import_error")
        assert not errors, f"the DAG processor could not import {errors[0][0]}:\n{errors[0][1]}"
        reason = _healthy(url)
        if reason is None and topo.sql("SELECT 1 FROM serialized_dag WHERE dag_id = %s", DAG_ID):
            return
        reason = reason or f"the DAG {DAG_ID!r} is not parsed yet"
        time.sleep(1)
    pytest.fail(f"Airflow was not ready within {START_TIMEOUT_S}s: {reason}")


@pytest.fixture(scope="module")
def topology(s3_server, metadata_db, broker_prefix, served, tmp_path_factory):
    root = tmp_path_factory.mktemp("topology")
    port = process.free_ports(1)[0]
    database_url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{metadata_db}"
    env = local_airflow.environment(
        s3_server,
        home=root / "airflow",
        database_url=database_url,
        executor="CeleryExecutor",
        variables={
            "tagflow_endpoint_url": served.url,
            "tagflow_endpoint_token": endpoint.admin_token(served.state_dir),
        },
        extra={
            "TAGFLOW_HOME": str(root / "home"),
            "TAGFLOW_SCHEDULE": "@daily",  # backfill dates map to daily data intervals
            "TAGFLOW_TASK_QUEUES": json.dumps(ROUTES),
            "AIRFLOW__CELERY__BROKER_URL": REDIS_URL,
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": broker_prefix,
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{database_url}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),  # one for all: tasks' tokens
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            # The only runs are the backfill's: unpaused, the schedule would also start a run for the latest
            # interval, which reads all three days at once.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        },
    )
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(TESTS)])  # airflow_procs' hooks
    if importlib.util.find_spec("asyncpg") is None:
        pytest.fail("Airflow 3 opens a PostgreSQL metadata DB with asyncpg too (its async engine): install asyncpg")
    install_task_policy(root / "airflow")
    local_airflow.migrate(env)

    components = Components(root / "logs")
    topo = Topology(env, metadata_db, components, {name: root / name for name in WORKERS})
    try:
        components.start(
            "api-server", ["api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], env
        )
        components.start("scheduler", ["scheduler", "--skip-serve-logs"], env)
        components.start("dag-processor", ["dag-processor"], env)
        components.start("triggerer", ["triggerer", "--skip-serve-logs"], env)
        for name, folder in topo.worker_dirs.items():
            for sub in ("airflow", "tmp", "home"):
                (folder / sub).mkdir(parents=True)
            worker_env = {
                **env,
                "AIRFLOW_HOME": str(folder / "airflow"),  # its task logs, pid file and config
                "TMPDIR": str(folder / "tmp"),  # every task's scratch space
                "TAGFLOW_HOME": str(folder / "home"),
                "TAGFLOW_WORKER_NAME": name,
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "airflow_procs.worker_name",
            }
            args = ["celery", "worker", "--celery-hostname", f"{name}@%h", "--queues", f"default,{name}"]
            components.start(name, [*args, "--skip-serve-logs"], worker_env)
        _wait_ready(topo, f"http://127.0.0.1:{port}")
        done = topo.airflow("dags", "unpause", DAG_ID)
        assert done.returncode == 0, done.stderr[-3000:]
        yield topo
    finally:
        components.stop()


@dataclass
class Run:
    run_id: str
    logical_date: datetime
    interval_end: datetime
    run_type: str
    state: str
    tasks: dict[str, str] = field(default_factory=dict)  # "task" or "task[map_index]" → state
    hosts: dict[str, str | None] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)  # return values

    def shard_results(self, task_id: str) -> list[dict[str, Any]]:
        """The mapped task's results, in shard order."""
        prefix = f"{task_id}["
        found = {int(key[len(prefix) : -1]): value for key, value in self.results.items() if key.startswith(prefix)}
        return [found[i] for i in sorted(found)]


def _key(task_id: str, map_index: int) -> str:
    return task_id if map_index < 0 else f"{task_id}[{map_index}]"


def _task_logs(topo: Topology, run_id: str, task_id: str) -> str:
    """Every attempt's log of a task, from whichever worker's disk holds it."""
    parts = []
    for name, folder in topo.worker_dirs.items():
        for log in sorted((folder / "airflow" / "logs").glob(f"**/run_id={run_id}/task_id={task_id}/**/*.log")):
            parts.append(f"--- {name}: {log}\n{log.read_text(errors='replace')[-4000:]}")
    return "\n".join(parts) or f"(no log of {task_id} in {run_id} on any worker)"


def _wait_for_runs(topo: Topology, count: int) -> None:
    """Until `count` runs have finished; fails at once, with the task's log, when a task fails or is retried
    (a retry here means a task could not do its work on the worker it landed on)."""
    deadline = time.monotonic() + RUNS_TIMEOUT_S
    while time.monotonic() < deadline:
        topo.components.check_alive()
        failed = topo.sql(
            "SELECT run_id, task_id, map_index, state, hostname FROM task_instance "
            "WHERE dag_id = %s AND state IN ('failed', 'up_for_retry', 'upstream_failed')",
            DAG_ID,
        )
        if failed:
            run_id, task_id, map_index, state, host = failed[0]
            pytest.fail(f"{_key(task_id, map_index)} in {run_id} is {state} (on {host}):\n"
                        f"{_task_logs(topo, run_id, task_id)}")  # fmt: skip
        states = [state for (state,) in topo.sql("SELECT state FROM dag_run WHERE dag_id = %s", DAG_ID)]
        if len(states) >= count and all(state in ("success", "failed") for state in states):
            return
        time.sleep(2)
    running = topo.sql(
        "SELECT run_id, task_id, map_index, state FROM task_instance "
        "WHERE dag_id = %s AND state IN ('running', 'queued', 'scheduled')",
        DAG_ID,
    )
    logs = "\n".join(
        _task_logs(topo, run_id, task_id)[-3000:] for run_id, task_id, _, state in running if state == "running"
    )
    pytest.fail(f"the backfill's runs did not finish within {RUNS_TIMEOUT_S}s; unfinished: {running}\n{logs}")


def _runs(topo: Topology) -> list[Run]:
    runs = {
        run_id: Run(run_id, logical, end, run_type, state)
        for run_id, logical, end, run_type, state in topo.sql(
            "SELECT run_id, logical_date, data_interval_end, run_type, state FROM dag_run WHERE dag_id = %s", DAG_ID
        )
    }
    for run_id, task_id, map_index, state, host in topo.sql(
        "SELECT run_id, task_id, map_index, state, hostname FROM task_instance WHERE dag_id = %s", DAG_ID
    ):
        runs[run_id].tasks[_key(task_id, map_index)] = state
        runs[run_id].hosts[_key(task_id, map_index)] = host
    for run_id, task_id, map_index, value in topo.sql(
        "SELECT run_id, task_id, map_index, value FROM xcom WHERE dag_id = %s AND key = 'return_value'", DAG_ID
    ):
        runs[run_id].results[_key(task_id, map_index)] = value
    return sorted(runs.values(), key=lambda run: run.logical_date)


@pytest.fixture(scope="module")
def backfill(topology, topology_bucket, s3_client) -> list[Run]:
    """The three backfill runs, oldest first, with each task's state, worker and result."""
    raw = s3.S3Uri(topology_bucket, "raw")
    demo.make_partitioned(PER_DAY, raw, FIRST_DAY, days=DAYS, client=s3_client, workers=1)
    conf = {
        "list_uri": f"s3://{topology_bucket}/raw/lists/",  # a prefix: the dt=YYYY-MM-DD partitions below it
        "images_uri": f"s3://{topology_bucket}/raw/images",
        "labels_uri": f"s3://{topology_bucket}/raw/lists/labels.txt",
        "bucket": topology_bucket,
        "dataset_prefix": "designs",
        "shard_size": SHARD_SIZE,
        # The first day's validation split holds 5 images; MXNet's iterator needs more images than the batch size.
        "hyperparameters": {"num_layers": 18, "epochs": 1, "mini_batch_size": 4, "learning_rate": 0.01},
        # The first run's model is served whatever one epoch on 30 images scores: no lift, no threshold.
        "gate_lift": 0.0,
        "gate_threshold": 0.0,
    }
    last_day = FIRST_DAY + timedelta(days=DAYS - 1)
    done = topology.airflow(
        "backfill", "create", "--dag-id", DAG_ID, "--from-date", FIRST_DAY.isoformat(),
        "--to-date", last_day.isoformat(), "--dag-run-conf", json.dumps(conf), "--max-active-runs", "1",
        "--reprocess-behavior", "none",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    _wait_for_runs(topology, DAYS)
    return _runs(topology)


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def test_the_backfill_runs_one_run_per_day_and_each_succeeds_with_the_same_tasks(backfill):
    assert [run.logical_date for run in backfill] == [_midnight(FIRST_DAY + timedelta(days=k)) for k in range(DAYS)]
    assert [(run.run_type, run.state) for run in backfill] == [("backfill", "success")] * DAYS
    for run in backfill:
        # Each run reads the partitions dated before its data interval's end: days 1..k.
        assert run.interval_end == run.logical_date + timedelta(days=1)
        assert datetime.fromisoformat(run.results["resolve_config"]["list_until"]) == run.interval_end
        deployed = run.results["evaluate_gate"]["deploy"]
        skipped = {task for task, state in run.tasks.items() if state == "skipped"}
        # approve_deploy: approval is auto (the form's default), so nobody is asked and the task is skipped.
        expected = {task for task in run.tasks if task.startswith("sagemaker_")} | {"local_tune", "approve_deploy"}
        if not deployed:  # the gate keeps the serving model when the new one scores lower
            expected |= {"deploy_local", "smoke_test"}
        assert skipped == expected, run.run_id
        assert {state for task, state in run.tasks.items() if task not in skipped} == {"success"}, run.tasks
    assert backfill[0].results["evaluate_gate"]["deploy"] is True  # nothing served yet, gate 0


def test_every_handoff_between_tasks_crosses_workers_through_s3(backfill, topology):
    ran = {
        (run.run_id, task): host for run in backfill for task, host in run.hosts.items() if run.tasks[task] == "success"
    }
    assert set(ran.values()) == set(WORKERS)
    for (run_id, task), host in ran.items():
        routed = ROUTES.get(task.split("[")[0])
        assert host == (routed or host), f"{task} in {run_id} ran on {host}, not {routed}"
    for run in backfill:
        shards = len(run.shard_results("shard.download"))
        assert shards >= 2
        for i in range(shards):  # each shard's images reach its pack task only through the staged tar in S3
            assert run.hosts[f"shard.download[{i}]"] != run.hosts[f"shard.pack[{i}]"]
    for name, folder in topology.worker_dirs.items():  # and tasks leave nothing behind on a worker's disk
        leftovers = sorted(p.name for p in (folder / "tmp").glob("tagflow-*"))
        assert leftovers == [], f"{name}: {leftovers}"


def test_each_run_downloads_only_its_new_images(backfill):
    assert [run.results["publish"]["counts"]["listed"] for run in backfill] == [PER_DAY * k for k in (1, 2, 3)]
    first = backfill[0].shard_results("shard.download")
    assert not any(r["reused"] for r in first)
    assert sum(r["fetched"] for r in first) == sum(r["images"] for r in first) == PER_DAY
    for before, run in itertools.pairwise(backfill):
        old = before.shard_results("shard.download")
        new = run.shard_results("shard.download")
        packs = run.shard_results("shard.pack")
        assert sum(r["images"] for r in new) == sum(r["images"] for r in old) + PER_DAY
        staged = {r["staged"]: r for r in new}
        # Shard boundaries are content-defined and the new day's IDs come after the old ones, so every earlier
        # shard but the last keeps its content, digest and staged tar: reused, not fetched again. The earlier
        # last shard (fewer than 4 * SHARD_SIZE images: a shard's maximum) grows with the first new IDs, unless
        # it happened to end on a cut point; only its images are fetched again.
        assert all(staged.get(r["staged"], {}).get("reused") for r in old[:-1]), run.run_id
        refetched = 0 if old[-1]["staged"] in staged else old[-1]["images"]
        assert refetched < 4 * SHARD_SIZE
        fresh = [r for r in new if not r["reused"]]
        assert sum(r["fetched"] for r in new) == sum(r["images"] for r in fresh) == PER_DAY + refetched
        assert [p["reused"] for p in packs] == [r["reused"] for r in new]  # packed again exactly where fetched


def test_the_endpoint_serves_the_last_model_the_gate_deployed(backfill, served):
    deployed = [run for run in backfill if run.results["evaluate_gate"]["deploy"]]
    metadata = endpoint.metadata(served.url)
    assert metadata is not None
    # The service started empty; each deploy named it after the run's endpoint (the preset's, as the form left it).
    assert metadata["name"] == runconfig.PRESETS[runconfig.PARAMS["preset"]["default"]]["endpoint_name"]
    for run in deployed:
        assert run.results["smoke_test"]["endpoint"] == metadata["name"]
    assert metadata["source"] == deployed[-1].results["deploy_local"]["model"]
