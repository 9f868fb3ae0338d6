"""Manual approval of a deploy: the approval's text, and whole runs answered through Airflow's REST API.

The runs are test_dag.py's (`dag.test` in a subprocess, its fixtures), with a real `airflow api-server` on the same
metadata database: while `approve_deploy` waits (awaiting_input), the test reads the request and answers it with
`PATCH /api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/hitlDetails`, as the UI's
Required actions page does. A timeout is resolved by the scheduler (its awaiting-input sweep), so a real
`airflow scheduler` runs for that run; the DAG stays paused, so the scheduler runs none of its tasks itself.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from typing import Any

import pytest

from airflow_procs import Components
from tagflow import demo, deploy, s3
from tagflow.dag_id import DAG_ID
from tagflow.local import airflow as local_airflow
from tagflow.local import endpoint, process, stack
from test_dag import ENDPOINT_TOKEN, _facts, _succeeded, airflow_env, local_endpoint  # noqa: F401 (fixtures)

APPROVAL = "approve_deploy"
DOWNSTREAM = ("choose_deploy", "deploy_local", "smoke_test")


GATE = {
    "metric": "mAP",
    "mAP": 0.41234,
    "accuracy": 0.8325,
    "baseline": 0.1501,
    "baselines": {"label_frequency_mAP": 0.1501, "label_frequency_micro_mAP": 0.2, "all_negative_accuracy": 0.81},
    "champion_mAP": 0.39871,
    "champion_accuracy": 0.8299,
    "champion": "s3://b/designs/output/old-job/output/model.tar.gz",
    "deploy": True,
    "reason": "mAP 0.4123 passes: ≥ 2 × the label-frequency baseline's 0.1501, ≥ the threshold 0.1000, ≥ …",
    "candidate": {"model_data_url": "s3://b/designs/output/new-job/output/model.tar.gz", "job": "new-job"},
    "evaluation": "s3://b/designs/output/new-job/evaluation/evaluation.json",
    "report": "s3://b/designs/output/new-job/evaluation/report.html",
}


def _table(body: str) -> dict[str, list[str]]:
    """The markdown table's rows: first cell → the other cells."""
    rows = [line.strip("|").split("|") for line in body.splitlines() if line.startswith("|")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[2:]}


def test_the_approval_body_compares_candidate_serving_model_and_baselines_and_links_the_report():
    url = "/tagflow/s3/b/designs/output/new-job/evaluation/report.html"
    body = deploy.approval_body(GATE, url)
    assert _table(body) == {
        "**Candidate** (this run's model)": ["0.4123", "0.8325"],
        "Serving model": ["0.3987", "0.8299"],
        "Label-frequency baseline": ["0.1501", "—"],
        "All-negative predictor (no label)": ["—", "0.8100"],
    }
    assert f"**Gate (mAP):** {GATE['reason']}" in body
    assert f"[report.html]({url})" in body
    assert f"`{GATE['candidate']['model_data_url']}`" in body and f"`{GATE['champion']}`" in body

    first = deploy.approval_body({**GATE, "champion": None, "champion_mAP": None, "champion_accuracy": None}, None)
    assert _table(first)["Serving model: none"] == ["—", "—"]
    assert "the endpoint serves no model" in first and "- report:" not in first


def test_an_answer_nobody_gave_is_a_timeout_and_counts_as_rejected():
    admin = {"id": "admin", "name": "admin"}
    assert deploy.approval_outcome(["Approve"], admin) == {"approved": True, "by": "admin",
                                                            "outcome": "approved by admin"}  # fmt: skip
    assert deploy.approval_outcome(["Reject"], admin)["outcome"] == "rejected by admin"
    timed_out = deploy.approval_outcome(["Reject"], None, timeout_h=24)
    assert timed_out == {"approved": False, "by": None, "outcome": "approval timed out (no answer within 24 h)"}
    kept = deploy.with_approval(GATE, timed_out)
    assert kept["deploy"] is False and kept["reason"].startswith("approval timed out")
    assert deploy.run_note(kept, None).startswith("**Kept the serving model** — approval timed out")
    assert deploy.with_approval(GATE, None) == GATE


class Api:
    """Airflow's REST API on a real api-server, as SimpleAuthManager's admin (requests by make up's helper)."""

    def __init__(self, url: str, password: str):
        self.url = url
        code, body = stack._request("POST", f"{url}/auth/token", body={"username": "admin", "password": password})
        assert code == 201, body
        self.token = body["access_token"]

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
        return stack._request(method, self.url + path, body=body, token=self.token, timeout=30)

    def waiting(self) -> dict | None:
        """The approval request a run's approve_deploy is parked on, if any."""
        query = urllib.parse.urlencode({"task_id": APPROVAL, "response_received": "false"})
        code, body = self.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/~/hitlDetails?{query}")
        assert code == 200, body
        parked = [d for d in body["hitl_details"] if d["task_instance"]["state"] == "awaiting_input"]
        assert len(parked) <= 1, parked
        return parked[0] if parked else None

    def answer(self, detail: dict, option: str) -> dict:
        ti = detail["task_instance"]
        path = f"/api/v2/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(ti['dag_run_id'], safe='')}/taskInstances/"
        code, body = self.request("PATCH", f"{path}{APPROVAL}/{ti['map_index']}/hitlDetails",
                                  {"chosen_options": [option]})  # fmt: skip
        assert code == 200, body
        return body


def _wait_for_api(components: Components, url: str, deadline_s: float = 180) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        components.check_alive()
        try:
            if stack._request("GET", f"{url}/api/v2/monitor/health")[0] == 200:
                return
        except OSError:  # not listening yet
            pass
        time.sleep(1)
    pytest.fail(f"the api-server at {url} did not answer within {deadline_s:.0f}s:\n{components.tail('api-server')}")


@pytest.fixture(scope="module")
def airflow_api(airflow_env, tmp_path_factory):  # noqa: F811 (test_dag's fixture)
    """`airflow api-server` on the test DAG's metadata database; yields (Api, the env, Components)."""
    from pathlib import Path

    port = process.free_ports(1)[0]
    env = {**airflow_env, "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port),
           "AIRFLOW__CORE__PARALLELISM": "2"}  # fmt: skip
    components = Components(tmp_path_factory.mktemp("approval-logs"))
    try:
        components.start("api-server", ["api-server", "--host", "127.0.0.1", "--port", str(port)], env)
        url = f"http://127.0.0.1:{port}"
        _wait_for_api(components, url)
        passwords = Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
        yield Api(url, json.loads(passwords.read_text())["admin"]), env, components
    finally:
        components.stop()


def _run(env: dict, conf: dict, log_file, api: Api, option: str | None) -> tuple[dict, dict | None]:
    """One run (dag.test, in a thread); when approve_deploy waits, answer `option` through the REST API (None:
    leave it unanswered). Returns the run's result and the approval request as the API showed it while waiting."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = local_airflow.run_once(env, conf, log_file=log_file)
        except BaseException as err:  # reported below, in the test's thread
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    seen = None
    while thread.is_alive() and seen is None:
        seen = api.waiting()
        if seen is None:
            time.sleep(2)
        elif option:
            # waiting for the answer, the endpoint still serves what it served
            seen["served_while_waiting"] = endpoint.metadata(env["AIRFLOW_VAR_TAGFLOW_ENDPOINT_URL"])["source"]
            seen["response"] = api.answer(seen, option)
    thread.join(timeout=1800)
    if "error" in box:
        raise box["error"]
    return box["result"], seen


@pytest.mark.mxnet
@pytest.mark.slow
@pytest.mark.timeout(2400)  # four runs, each training one epoch on 144 images
def test_manual_approval_asks_a_person_and_only_approve_deploys(
    airflow_api,
    s3_client,
    bucket,
    local_endpoint,  # noqa: F811 (test_dag's fixture)
    tmp_path,
):
    api, api_env, components = airflow_api
    data = demo.publish(160, s3.S3Uri(bucket, "raw"), seed=5, client=s3_client, workers=1)
    env = {**api_env, "AIRFLOW_VAR_TAGFLOW_ENDPOINT_URL": local_endpoint.url,
           "AIRFLOW_VAR_TAGFLOW_ENDPOINT_TOKEN": ENDPOINT_TOKEN}  # fmt: skip
    base = {
        "list_uri": data.list_uri, "images_uri": data.images_uri, "labels_uri": data.labels_uri, "bucket": bucket,
        "dataset_prefix": "designs", "shard_size": 40, "endpoint_name": "tagflow-designs-a",
        "hyperparameters": {"num_layers": 18, "epochs": 1, "mini_batch_size": 16, "learning_rate": 0.02},
        # one epoch each: every model passes the gate, so each manual run asks
        "gate_lift": 0.0, "gate_threshold": 0.0, "gate_tolerance": 1.0,
    }  # fmt: skip

    # approval auto (the default): nobody is asked, the approval task is skipped and the deploy runs.
    auto, asked = _run(env, base, tmp_path / "auto.log", api, None)
    _succeeded(auto, tmp_path / "auto.log")
    assert asked is None and auto["tasks"][APPROVAL] == "skipped"
    assert {t: auto["tasks"][t] for t in DOWNSTREAM} == dict.fromkeys(DOWNSTREAM, "success")
    first = auto["results"]["evaluate_gate"]["candidate"]["model_data_url"]
    assert endpoint.metadata(local_endpoint.url)["source"] == first
    [event] = _facts(env, auto["run_id"])["model_events"]
    assert event["approval"] == "auto"
    code, dag = api.request("GET", f"/api/v2/dags/{DAG_ID}")
    assert code == 200 and dag["is_paused"] is True  # what keeps the scheduler (last run) from running tasks

    # manual, approved: the request shows the comparison and the report link; Approve deploys.
    manual = {**base, "approval": "manual"}
    approved, asked = _run(env, manual, tmp_path / "approved.log", api, "Approve")
    _succeeded(approved, tmp_path / "approved.log")
    gate = approved["results"]["evaluate_gate"]
    job, second = gate["candidate"]["job"], gate["candidate"]["model_data_url"]
    assert gate["approval_required"] is True and gate["champion"] == first
    assert asked["served_while_waiting"] == first
    assert asked["subject"] == f"Deploy {job} to the endpoint tagflow-designs-a?"
    assert asked["options"] == ["Approve", "Reject"] and asked["defaults"] == ["Reject"]
    rows = _table(asked["body"])
    assert rows["**Candidate** (this run's model)"][0] == f"{gate['mAP']:.4f}"
    assert rows["Serving model"][0] == f"{gate['champion_mAP']:.4f}"
    assert rows["Label-frequency baseline"][0] == f"{gate['baselines']['label_frequency_mAP']:.4f}"
    assert gate["reason"] in asked["body"]
    report = f"/tagflow/s3/{bucket}/designs/output/{job}/evaluation/report.html"
    assert f"]({report})" in asked["body"]
    assert asked["response"]["responded_by"]["name"] == "admin"
    assert approved["results"][APPROVAL] == {"approved": True, "by": "admin", "outcome": "approved by admin"}
    assert {t: approved["tasks"][t] for t in DOWNSTREAM} == dict.fromkeys(DOWNSTREAM, "success")
    assert endpoint.metadata(local_endpoint.url)["source"] == second
    facts = _facts(env, approved["run_id"])
    assert facts["note"].startswith("**Deployed** — approved by admin; the gate: mAP")
    pending, answered = facts["model_events"]  # the gate's, then the answer's
    assert pending["approval"] == "pending" and pending["model_data_url"] == second
    assert (answered["deploy"], answered["approval"]["outcome"]) == (True, "approved by admin")

    # manual, rejected: choose_deploy and what follows are skipped; the endpoint keeps serving the approved model.
    rejected, asked = _run(env, manual, tmp_path / "rejected.log", api, "Reject")
    _succeeded(rejected, tmp_path / "rejected.log")
    assert asked is not None and rejected["results"]["evaluate_gate"]["deploy"] is True
    assert rejected["results"][APPROVAL]["outcome"] == "rejected by admin"
    assert {t: rejected["tasks"][t] for t in DOWNSTREAM} == dict.fromkeys(DOWNSTREAM, "skipped")
    assert endpoint.metadata(local_endpoint.url)["source"] == second
    facts = _facts(env, rejected["run_id"])
    assert facts["note"].startswith("**Kept the serving model** — rejected by admin; the gate: mAP")
    assert [(e["deploy"], e["approval"]) for e in facts["model_events"]][1] == (
        False, {"approved": False, "by": "admin", "outcome": "rejected by admin"}
    )  # fmt: skip

    # manual, nobody answers within the (short) timeout: the scheduler applies the default, Reject.
    components.start("scheduler", ["scheduler", "--skip-serve-logs"],
                     {**env, "AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL": "1"})  # fmt: skip
    timed_out, asked = _run(env, {**manual, "approval_timeout_h": 0.005}, tmp_path / "timeout.log", api, None)
    components.check_alive()
    _succeeded(timed_out, tmp_path / "timeout.log")
    assert asked is not None  # it did wait
    assert timed_out["results"][APPROVAL] == {"approved": False, "by": None,
                                              "outcome": "approval timed out (no answer within 0.005 h)"}  # fmt: skip
    assert {t: timed_out["tasks"][t] for t in DOWNSTREAM} == dict.fromkeys(DOWNSTREAM, "skipped")
    assert endpoint.metadata(local_endpoint.url)["source"] == second
    assert _facts(env, timed_out["run_id"])["note"].startswith("**Kept the serving model** — approval timed out")
