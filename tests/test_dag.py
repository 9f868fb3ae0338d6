"""The tagflow DAG under Airflow: its integrity, the form's refusals, and whole runs on the local backend.

Airflow runs in subprocesses with the environment `tagflow.local.airflow.environment` builds (a temporary
AIRFLOW_HOME with SQLite, the session's real S3 server as `aws_default`), never in the pytest process.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tagflow import demo, s3
from tagflow.local import airflow as local_airflow
from tagflow.local import endpoint

INSPECT = r"""
import json, sys, time
started = time.perf_counter()
import airflow.sdk  # loaded once by Airflow's DAG processor before any DAG file
from airflow.dag_processing.dagbag import DagBag
before = set(sys.modules)
t0 = time.perf_counter()
bag = DagBag()
parse_s = time.perf_counter() - t0
dag = bag.dags.get("tagflow")
facts = {"errors": {k: v[-2000:] for k, v in bag.import_errors.items()}, "parse_s": parse_s,
         "loaded": sorted(set(sys.modules) - before)}
if dag is not None:
    facts.update(
        doc=dag.doc_md, tags=sorted(dag.tags),
        params={k: dag.params.get_param(k).schema for k in dag.params},
        tasks={t.task_id: {"retries": t.retries, "timeout": t.execution_timeout.total_seconds()
                           if t.execution_timeout else None, "trigger_rule": str(t.trigger_rule)} for t in dag.tasks},
    )
print(json.dumps(facts, default=str))
"""
# boto3/botocore are not listed: the amazon provider's operator modules import them, and the DAG uses those operators.
HEAVY = ("numpy", "cv2", "PIL", "mxnet", "optuna", "sagemaker", "simplejpeg", "tagflow.pipeline", "tagflow.pack")


@pytest.fixture(scope="module")
def airflow_env(s3_server, tmp_path_factory):
    home = tmp_path_factory.mktemp("tagflow-home")
    env = local_airflow.environment(s3_server, home=home / "airflow", extra={"TAGFLOW_HOME": str(home)})
    local_airflow.migrate(env)
    done = _airflow(env, "dags", "reserialize")  # what the DAG processor does: the trigger CLI needs it
    assert done.returncode == 0, done.stderr[-3000:]
    return env


def _airflow(env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(local_airflow.REPO / ".venv" / "bin" / "airflow"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def facts(airflow_env):
    done = subprocess.run(
        [sys.executable, "-c", INSPECT], env=airflow_env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_dag_imports_cleanly_and_declares_only(facts):
    assert facts["errors"] == {}
    heavy = [m for m in facts["loaded"] if m.split(".")[0] in HEAVY or m in HEAVY]
    assert heavy == [], f"the DAG file imports heavy modules at parse time: {heavy}"
    assert facts["doc"].lstrip().startswith("# tagflow")
    assert facts["tags"] == ["ml", "sagemaker", "tagflow"]


def test_every_task_has_retries_and_a_timeout(facts):
    missing = {name: t for name, t in facts["tasks"].items() if not t["retries"] or not t["timeout"]}
    assert missing == {}


def test_the_form_has_every_field_with_help_and_a_section(facts):
    from tagflow.runconfig import PARAMS

    assert set(facts["params"]) == set(PARAMS)
    for name, schema in facts["params"].items():
        assert schema.get("section") and schema.get("title"), name
    assert facts["params"]["preset"]["enum"] == ["50-label-rs96", "ic-multi-label", "custom"]


@pytest.mark.parametrize(
    ("conf", "field"),
    [({"num_labels": 0}, "num_labels"), ({"backend": "gcp"}, "backend"), ({"list_uri": "ftp://x/y"}, "list_uri")],
)
def test_invalid_form_values_are_refused_before_any_task_runs(airflow_env, conf, field):
    done = _airflow(airflow_env, "dags", "trigger", "tagflow", "--conf", json.dumps(conf))
    assert done.returncode != 0
    assert field in done.stderr + done.stdout
    runs = _airflow(airflow_env, "dags", "list-runs", "tagflow", "-o", "json")
    assert runs.returncode == 0, runs.stderr
    assert json.loads(runs.stdout.strip().splitlines()[-1]) == []  # no run was created, so no task ran


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"mode": "tune", "tuning_ranges": {}}, "tuning_ranges: mode is tune but no range is given"),
        # checked with the algorithm's own rules before any image is fetched, not in local_train
        ({"hyperparameters": {"epochs": "ten"}}, "hyperparameters: hyperparameter epochs='ten': expected a positive"),
        (
            {"mode": "tune", "tuning_ranges": {"learning_rate": {"type": "Bogus", "min": 0.01, "max": 0.1}}},
            "ParameterRanges.learning_rate.type: 'Bogus': Continuous or Integer",
        ),
    ],
)
def test_a_config_error_fails_the_first_task_and_nothing_else_runs(airflow_env, tmp_path, conf, message):
    result = local_airflow.run_once(airflow_env, conf, log_file=tmp_path / "run.log")
    assert result["state"] == "failed"
    assert result["tasks"]["resolve_config"] == "failed"
    ran = {task for task, state in result["tasks"].items() if state in ("success", "running", "failed")}
    assert ran == {"resolve_config"}
    assert message in (tmp_path / "run.log").read_text()


ENDPOINT_TOKEN = "test-endpoint-admin-token-5f1c"


@pytest.fixture
def local_endpoint(s3_server, tmp_path):
    """The endpoint service, empty, accepting model loads only with its admin token (as under docker compose)."""
    info = endpoint.start(None, name="tagflow-designs", state_dir=tmp_path / "endpoint", token=ENDPOINT_TOKEN)
    yield info
    endpoint.stop(tmp_path / "endpoint")


@pytest.mark.mxnet
@pytest.mark.slow
def test_whole_dag_twice_second_run_reuses_every_shard_and_the_gate_keeps_the_better_model(
    airflow_env, s3_server, s3_client, bucket, local_endpoint, tmp_path
):
    data = demo.publish(160, s3.S3Uri(bucket, "raw"), seed=5, client=s3_client, workers=1)
    env = {
        **airflow_env,
        "AIRFLOW_VAR_TAGFLOW_ENDPOINT_URL": local_endpoint.url,
        "AIRFLOW_VAR_TAGFLOW_ENDPOINT_TOKEN": ENDPOINT_TOKEN,
    }
    base = {
        "list_uri": data.list_uri,
        "images_uri": data.images_uri,
        "labels_uri": data.labels_uri,
        "bucket": bucket,
        "dataset_prefix": "designs",
        "shard_size": 40,
        "endpoint_name": local_endpoint.name,
    }
    good = {"num_layers": 18, "epochs": 2, "mini_batch_size": 16, "learning_rate": 0.02}
    first = local_airflow.run_once(env, {**base, "hyperparameters": good}, log_file=tmp_path / "first.log")
    assert first["state"] == "success", (tmp_path / "first.log").read_text()[-5000:]
    downloads = [r for task, r in first["results"].items() if task.startswith("shard.download")]
    assert len(downloads) >= 2 and not any(r["reused"] for r in downloads)
    gate = first["results"]["evaluate_gate"]
    assert gate["deploy"] is True and gate["serving_value"] is None
    served = endpoint.metadata(local_endpoint.url)
    assert served["source"] == gate["candidate"]["model_data_url"]
    assert first["results"]["smoke_test"]["endpoint"] == local_endpoint.name

    # Same data, a model that cannot learn (learning rate 0): nothing is fetched again, and the gate refuses it
    # for being worse than the serving model (the threshold is lowered to 0 so that comparison alone decides).
    worse = {**good, "epochs": 1, "learning_rate": 0.0}
    second = local_airflow.run_once(
        env, {**base, "hyperparameters": worse, "metric_gate": 0.0}, log_file=tmp_path / "second.log"
    )
    assert second["state"] == "success", (tmp_path / "second.log").read_text()[-5000:]
    downloads = [r for task, r in second["results"].items() if task.startswith("shard.download")]
    packs = [r for task, r in second["results"].items() if task.startswith("shard.pack")]
    assert downloads and all(r["reused"] for r in downloads) and all(r["reused"] for r in packs)
    gate = second["results"]["evaluate_gate"]
    assert gate["deploy"] is False and "is worse than the serving model's" in gate["reason"]
    assert second["tasks"]["deploy_local"] == "skipped" and second["tasks"]["smoke_test"] == "skipped"
    assert (
        endpoint.metadata(local_endpoint.url)["source"]
        == first["results"]["evaluate_gate"]["candidate"]["model_data_url"]
    )

    # The S3 keys travel only in the connection, the endpoint's token only in a Variable, the model's presigned URL
    # only to the endpoint: no task log, XCom or rendered template shows any of them.
    shown = "".join(p.read_text() for p in (tmp_path / "first.log", tmp_path / "second.log"))
    shown += json.dumps(first) + json.dumps(second)
    assert first["rendered"]["prepare"]["config"]["list_uri"] == data.list_uri  # rendered fields are in there
    assert s3_server.secret_key not in shown and s3_server.access_key not in shown
    assert ENDPOINT_TOKEN not in shown and "X-Amz-Signature" not in shown
