"""Killing a running task never leaves its work running: the trainer a `local_train` task started stops with it.

Two ways a task dies, both real: Airflow's own (the run is marked failed through the REST API, as the UI's "Mark as
failed" does, under `make up`'s `airflow standalone`: the supervisor sends SIGTERM, the operator's `on_kill` stops the
trainer's process group, SIGKILL follows) and SIGKILL of the process that started the trainer (no handler runs;
the kernel ends the trainer, which asked for that with PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from airflow_procs import fresh_stack
from tagflow import demo, jobs, runconfig, s3
from tagflow.local import process, stack

pytestmark = [pytest.mark.slow, pytest.mark.mxnet, pytest.mark.timeout(900)]

WAIT_S = 600
# Long enough that training is still running when the test kills it; the run is killed long before it ends.
LONG_TRAINING = {"num_layers": 18, "epochs": 500, "mini_batch_size": 8, "learning_rate": 0.01}


def trainers(job_name: str) -> list[int]:
    """PIDs of live algo/ic_train.py processes working on `job_name` (other tests' trainers are not counted)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"ic_train.py") for a in argv) and any(a.endswith(job_name.encode()) for a in argv):
            pid = int(cmdline.parent.name)
            if process.pid_alive(pid):
                found.append(pid)
    return found


def wait_for(what: str, check, timeout: float = WAIT_S, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"waited {timeout:.0f}s for {what}")


@pytest.fixture
def running_stack(tmp_path, monkeypatch, mxnet_python):
    """`make up` in a fresh TAGFLOW_HOME (its own S3 server); `make down` whatever happens."""
    with fresh_stack(tmp_path / "home", monkeypatch) as up:
        yield up


def test_marking_a_running_run_failed_stops_its_trainer(running_stack):
    af, client = running_stack.airflow, running_stack.s3.client()
    preset = runconfig.PRESETS["50-label-rs96"]
    demo.publish(120, s3.S3Uri.parse(preset["images_uri"].rsplit("/", 1)[0]), client=client, workers=1,
                 list_key=demo.partition_key(demo_day()))  # fmt: skip
    token = stack.api_token(af)
    dag = f"{af.url}/api/v2/dags/{stack.DAG_ID}"
    code, body = stack._request("PATCH", dag, body={"is_paused": False}, token=token)
    assert code == 200, body
    run_id = f"kill-{uuid.uuid4().hex[:8]}"
    conf = {"hyperparameters": LONG_TRAINING, "shard_size": 60, "deploy": False}
    code, body = stack._request("POST", f"{dag}/dagRuns", body={"dag_run_id": run_id, "logical_date": None,
                                                                "conf": conf}, token=token)  # fmt: skip
    assert code == 200, body
    job = jobs.job_names(run_id, 1)["training"]

    def training_started():
        code, ti = stack._request("GET", f"{dag}/dagRuns/{run_id}/taskInstances/local_train", token=token)
        if code == 200 and ti["state"] in ("failed", "upstream_failed", "skipped"):
            pytest.fail(f"local_train ended {ti['state']} before the test could kill it")
        return trainers(job)

    pids = wait_for(f"the trainer of {job} to start", training_started)

    code, body = stack._request("PATCH", f"{dag}/dagRuns/{run_id}", body={"state": "failed"}, token=token)
    assert code == 200, body

    # Gone from the process table, not only from the trainer list: an exiting process loses its cmdline before it
    # is reaped (tearing down MXNet's memory takes a moment under load).
    def stopped():
        return not trainers(job) and not any(process.pid_alive(pid) for pid in pids)

    wait_for(f"the trainer of {job} to stop", stopped, timeout=120, every=0.5)
    assert not any(process.pid_alive(pid) for pid in pids)
    code, ti = stack._request("GET", f"{dag}/dagRuns/{run_id}/taskInstances/local_train", token=token)
    assert code == 200 and ti["state"] == "failed", ti
    code, run = stack._request("GET", f"{dag}/dagRuns/{run_id}", token=token)
    assert run["state"] == "failed"
    # the task's log says what on_kill did
    logs = sorted(Path(af.home, "logs").glob(f"**/run_id={run_id}/task_id=local_train/**/*.log"))
    assert logs and any("stopped the process group(s) it started" in p.read_text(errors="replace") for p in logs)


def demo_day():
    from tagflow.local.demo_run import DEMO_DAY

    return DEMO_DAY


RUNNER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from tagflow.local.runner import run_training_job
    run_training_job(json.loads(sys.argv[1]), workdir=Path(sys.argv[2]))
    """
)


@pytest.fixture(scope="module")
def small_dataset(s3_client, tmp_path_factory):
    """A packed 120-design dataset on the session's S3 server, through the data plane as the DAG runs it."""
    from tagflow import pipeline
    from tagflow.pack import PackParams

    bucket = f"t-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=bucket)
    data = demo.publish(120, s3.S3Uri(bucket, "raw"), client=s3_client, workers=1)
    spec = pipeline.DatasetSpec(list_uri=data.list_uri, dataset_uri=f"s3://{bucket}/designs", num_labels=50,
                                source_uri=data.images_uri, pack=PackParams(resize=32))  # fmt: skip
    pipeline.run(spec, client=s3_client)
    return spec.dataset_uri


def test_a_trainer_ends_when_the_process_that_started_it_is_killed(small_dataset, s3_server, tmp_path):
    from tagflow import sagemaker_config as smc

    manifest = jobs.read_manifest(small_dataset)
    job = f"orphan-{uuid.uuid4().hex[:8]}"
    request = smc.training_job_request(
        job, image_uri=smc.LOCAL_IMAGE_URI, role_arn=smc.LOCAL_ROLE_ARN,
        hyperparameters={**LONG_TRAINING, **smc.dataset_hyperparameters(manifest)},
        instance_type="ml.m5.large", max_runtime_s=3600, **smc.dataset_channels(small_dataset),
    )  # fmt: skip
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER, json.dumps(request), str(tmp_path / "jobs")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        pids = wait_for(f"the trainer of {job} to start", lambda: trainers(job), timeout=300, every=0.5)
        runner.send_signal(signal.SIGKILL)  # no handler of the runner's can run: only the kernel can stop the trainer
        runner.wait(timeout=30)
        wait_for(f"the trainer of {job} to end with its runner", lambda: not trainers(job), timeout=60, every=0.2)
        assert not any(process.pid_alive(pid) for pid in pids)
    finally:
        process.stop_group(runner.pid, timeout=5)
        for pid in trainers(job):
            os.kill(pid, signal.SIGKILL)
