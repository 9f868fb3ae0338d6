"""The tagflow DAG under Airflow: its integrity, the form's refusals, and whole runs on the local backend.

Airflow runs in subprocesses with the environment `tagflow.local.airflow.environment` builds (a temporary
AIRFLOW_HOME with SQLite, the session's real S3 server as `aws_default`), never in the pytest process.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tagflow import demo, deploy, s3
from tagflow.dag_id import DAG_ID
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
dag = bag.dags.get(sys.argv[1])
facts = {"errors": {k: v[-2000:] for k, v in bag.import_errors.items()}, "parse_s": parse_s,
         "loaded": sorted(set(sys.modules) - before)}
if dag is not None:
    facts.update(
        doc=dag.doc_md, tags=sorted(dag.tags),
        params={k: dag.params.get_param(k).schema for k in dag.params},
        tasks={t.task_id: {"retries": t.retries, "timeout": t.execution_timeout.total_seconds()
                           if t.execution_timeout else None, "trigger_rule": str(t.trigger_rule),
                           "unset_template_fields": [f for f in t.template_fields if not hasattr(t, f)],
                           "group": t.task_group.group_id if t.task_group else None} for t in dag.tasks},
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
        [sys.executable, "-c", INSPECT, DAG_ID],
        env=airflow_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_sagemaker_stages_are_groups_in_the_graph(facts):
    groups = {task: info["group"] for task, info in facts["tasks"].items() if info["group"]}
    training = ("sagemaker_training_request", "sagemaker_tuning_request", "sagemaker_train", "sagemaker_tune")
    assert {task: groups.get(task) for task in training} == dict.fromkeys(training, "sagemaker_training")
    deployment = ("sagemaker_endpoint_config", "sagemaker_model", "sagemaker_deploy")
    assert {task: groups.get(task) for task in deployment} == dict.fromkeys(deployment, "sagemaker_deployment")


def test_every_operators_template_fields_are_attributes_it_sets(facts):
    """A template field the operator does not set fails only when a run renders it: checked per task at parse."""
    unset = {task: info["unset_template_fields"] for task, info in facts["tasks"].items()}
    unset = {task: fields for task, fields in unset.items() if fields}
    assert unset == {}


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
    done = _airflow(airflow_env, "dags", "trigger", DAG_ID, "--conf", json.dumps(conf))
    assert done.returncode != 0
    assert field in done.stderr + done.stdout
    runs = _airflow(airflow_env, "dags", "list-runs", DAG_ID, "-o", "json")
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


# A scheduled run as the scheduler makes one (run_type scheduled, triggered by the timetable), then run_once's loop:
# dag.test itself only makes manual runs.
SCHEDULED = r"""
import runpy, sys
from sqlalchemy import select
import airflow.models.dagrun as dagrun
from airflow.utils.state import DagRunState
from airflow.utils.types import DagRunTriggeredByType, DagRunType

def scheduled(*, dag, logical_date, data_interval, run_after, conf, start_date, session, **_):
    old = session.scalar(select(dagrun.DagRun).where(dagrun.DagRun.dag_id == dag.dag_id,
                                                     dagrun.DagRun.logical_date == logical_date))
    if old:
        session.delete(old)
        session.commit()
    run_id = dagrun.DagRun.generate_run_id(run_type=DagRunType.SCHEDULED, logical_date=logical_date,
                                           run_after=run_after)
    return dag.create_dagrun(run_id=run_id, logical_date=logical_date, data_interval=data_interval,
                             run_after=run_after, conf=conf, run_type=DagRunType.SCHEDULED,
                             state=DagRunState.RUNNING, triggered_by=DagRunTriggeredByType.TIMETABLE,
                             start_date=start_date, session=session)

dagrun.get_or_create_dagrun = scheduled
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# What the UI shows of a run, read from Airflow's database: its note, the tasks' extra links, tagflow-model events.
RUN_FACTS = r"""
import json, sys
from sqlalchemy import select
from airflow.models.asset import AssetEvent, AssetModel
from airflow.models.dagrun import DagRun
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session

with create_session() as session:
    run = session.scalar(select(DagRun).where(DagRun.run_id == sys.argv[1]))
    links = {}
    for row in session.scalars(select(XComModel).where(XComModel.run_id == run.run_id,
                                                       XComModel.key.like("_link_%"))):
        links.setdefault(row.task_id, {})[row.key] = XComModel.deserialize_value(row)
    events = session.scalars(select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                             .where(AssetModel.name == "tagflow-model", AssetEvent.source_run_id == run.run_id))
    print(json.dumps({"note": run.note, "run_type": str(run.run_type), "links": links,
                      "model_events": [e.extra for e in events]}, default=str))
"""


def _run_scheduled(env, conf, logical_date: str, log_file) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", SCHEDULED, str(local_airflow.RUN_ONCE), "--conf", json.dumps(conf),
         "--logical-date", logical_date],
        env=env, capture_output=True, text=True, timeout=3600, check=False,
    )  # fmt: skip
    log_file.write_text(done.stdout + done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("TAGFLOW_RESULT ")]
    assert lines, log_file.read_text()[-5000:]
    return json.loads(lines[-1][len("TAGFLOW_RESULT ") :])


def _succeeded(result: dict, log_file) -> None:
    """Assert the run succeeded; else say which tasks failed and the log's error lines."""
    if result["state"] != "success":
        failed = {t: state for t, state in result["tasks"].items() if state not in ("success", "skipped")}
        errors = [line for line in log_file.read_text().splitlines() if "ERROR" in line or "Error" in line]
        raise AssertionError(f"run {result['state']}: {failed}\n" + "\n".join(errors[-40:]))


def _facts(env, run_id: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", RUN_FACTS, run_id], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _read_json(s3_client, uri: str) -> dict:
    where = s3.S3Uri.parse(uri)
    return json.loads(s3_client.get_object(Bucket=where.bucket, Key=where.key)["Body"].read())


@pytest.mark.mxnet
@pytest.mark.slow
@pytest.mark.timeout(2400)  # four runs, three of which train and evaluate
def test_whole_dag_runs_the_gate_judges_by_map_on_one_split_and_a_scheduled_run_trains_only_on_something_new(
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
        # not the name the endpoint service started with: the gate must read the model served under this one
        "endpoint_name": "tagflow-designs-t",
        "gate_lift": 0.0,  # two epochs on 144 images: judge by the comparison, not by how good the model is
        "gate_threshold": 0.0,
    }
    good = {"num_layers": 18, "epochs": 2, "mini_batch_size": 16, "learning_rate": 0.02}
    first = local_airflow.run_once(env, {**base, "hyperparameters": good}, log_file=tmp_path / "first.log")
    _succeeded(first, tmp_path / "first.log")
    downloads = [r for task, r in first["results"].items() if task.startswith("shard.download")]
    assert len(downloads) >= 2 and not any(r["reused"] for r in downloads)
    gate = first["results"]["evaluate_gate"]
    model = gate["candidate"]["model_data_url"]
    assert gate["deploy"] is True and gate["champion"] is None and gate["champion_mAP"] is None
    assert gate["reason"].startswith(f"mAP {gate['mAP']:.4f} passes") and "no serving model" in gate["reason"]
    doc = _read_json(s3_client, gate["evaluation"])
    job = gate["candidate"]["job"]
    assert gate["evaluation"] == f"s3://{bucket}/designs/output/{job}/evaluation/evaluation.json"
    assert doc["candidate"]["mAP"] == gate["mAP"] and doc["baselines"]["label_frequency_mAP"] == gate["baseline"]
    assert doc["gate"]["deploy"] is True and doc["lineage"]["settings"]["hyperparameters"] == good
    lineage = _read_json(s3_client, f"s3://{bucket}/designs/output/{job}/lineage.json")
    assert lineage["model"] == model and lineage["dataset"]["digest"] == doc["lineage"]["dataset"]["digest"]
    served = endpoint.metadata(local_endpoint.url)
    assert (served["source"], served["name"]) == (model, "tagflow-designs-t")
    assert deploy.local_champion(served, "tagflow-designs") is None  # the fixture's name serves nothing now
    assert first["results"]["smoke_test"]["endpoint"] == "tagflow-designs-t"
    facts = _facts(env, first["run_id"])
    assert facts["note"].startswith("**Deployed** — mAP") and gate["evaluation"] in facts["note"]
    [event] = facts["model_events"]
    assert (event["deploy"], event["mAP"], event["baseline"], event["model_data_url"]) == (
        True, gate["mAP"], gate["baseline"], model
    )  # fmt: skip
    assert event["lineage"]["dataset"]["digest"] == lineage["dataset"]["digest"]
    view = f"/tagflow/s3/{bucket}/designs"
    assert facts["links"]["evaluate_gate"]["_link_ReportLink"] == f"{view}/output/{job}/evaluation/report.html"
    assert facts["links"]["evaluate_gate"]["_link_EndpointConsoleLink"] == ""  # local backend: no console
    assert facts["links"]["publish"]["_link_DatasetLink"] == f"{view}/training/manifest.json"
    assert facts["links"]["local_train"]["_link_ModelLink"] == f"{view}/output/{job}/output/model.tar.gz"

    # Same data, another model, an absolute threshold no model reaches here: nothing is fetched again, the serving
    # model is re-scored on the same split (the same archive, the same images: the same mAP), and the gate refuses
    # the new one, saying why. (Which of two 2-epoch models on 16 validation images is better is a coin toss, so
    # the threshold, not the comparison, refuses it; the comparison's rule is tests/test_deploy.py's.)
    worse = {**good, "epochs": 1, "learning_rate": 0.0}
    second = local_airflow.run_once(
        env, {**base, "hyperparameters": worse, "gate_threshold": 0.99}, log_file=tmp_path / "second.log"
    )
    _succeeded(second, tmp_path / "second.log")
    downloads = [r for task, r in second["results"].items() if task.startswith("shard.download")]
    packs = [r for task, r in second["results"].items() if task.startswith("shard.pack")]
    assert downloads and all(r["reused"] for r in downloads) and all(r["reused"] for r in packs)
    gate2 = second["results"]["evaluate_gate"]
    assert gate2["deploy"] is False and "is below the absolute threshold 0.9900" in gate2["reason"]
    assert gate2["champion"] == model and gate2["champion_mAP"] == gate["mAP"]  # the same model on the same split
    assert second["tasks"]["deploy_local"] == "skipped" and second["tasks"]["smoke_test"] == "skipped"
    assert endpoint.metadata(local_endpoint.url)["source"] == model
    assert _facts(env, second["run_id"])["note"].startswith("**Kept the serving model** — mAP")

    # A scheduled run with the serving model's settings on unchanged data stops after publish.
    conf = {**base, "hyperparameters": good}
    third = _run_scheduled(env, conf, "2026-11-01T00:00:00+00:00", tmp_path / "third.log")
    _succeeded(third, tmp_path / "third.log")
    decision = third["results"]["choose_training"]
    assert decision["run_type"] == "scheduled" and decision["train"] is False
    assert decision["reason"].startswith(f"nothing new since {model}")
    later = ["local_train", "local_tune", "sagemaker_training_request", "evaluate_gate", "deploy_local", "smoke_test"]
    assert {t: third["tasks"][t] for t in later} == dict.fromkeys(later, "skipped")
    assert _facts(env, third["run_id"])["note"] == f"**Not trained** — {decision['reason']}"

    # New images: the next scheduled run trains, and the champion is re-scored on the grown validation split.
    demo.publish(200, s3.S3Uri(bucket, "raw"), seed=5, client=s3_client, workers=1)
    fourth = _run_scheduled(env, conf, "2026-11-08T00:00:00+00:00", tmp_path / "fourth.log")
    _succeeded(fourth, tmp_path / "fourth.log")
    assert fourth["results"]["choose_training"]["train"] is True
    assert "the dataset changed" in fourth["results"]["choose_training"]["reason"]
    gate4 = fourth["results"]["evaluate_gate"]
    grown = _read_json(s3_client, gate4["evaluation"])
    assert grown["split"]["digest"] != doc["split"]["digest"] and grown["split"]["images"] > doc["split"]["images"]
    assert grown["champion"]["model"]["uri"] == model and grown["champion"]["images"] == grown["split"]["images"]
    assert gate4["champion_mAP"] == grown["champion"]["mAP"]

    # The S3 keys travel only in the connection, the endpoint's token only in a Variable, the model's presigned URL
    # only to the endpoint: no task log, XCom or rendered template shows any of them.
    shown = "".join(p.read_text() for p in (tmp_path / "first.log", tmp_path / "second.log"))
    shown += json.dumps(first) + json.dumps(second)
    assert first["rendered"]["prepare"]["config"]["list_uri"] == data.list_uri  # rendered fields are in there
    assert s3_server.secret_key not in shown and s3_server.access_key not in shown
    assert ENDPOINT_TOKEN not in shown and "X-Amz-Signature" not in shown
