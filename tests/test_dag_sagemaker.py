"""The SageMaker backend end to end: the whole DAG against moto's SageMaker and the session's real S3 server.

moto stands in for SageMaker (tests/moto_sagemaker.py: served in this process, every request it receives checked
against botocore's service model, SageMaker's behaviour where moto lacks it). A test plays the algorithm's part
through it: report the final metrics a real job would, and write the model.tar.gz it would (a real one, which the
evaluation stage scores), make a job fail, or read what the DAG asked for. The DAG itself runs in a subprocess
(`dag.test` through `tagflow.local.airflow.run_once`); the tests of one operator's retries and failures call
`execute` in this process, as Airflow would on a worker.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from moto_sagemaker import (
    IMAGE,
    METRIC,
    REGION,
    ROLE,
    Moto,
    finishes_tuning,
    reports_metrics,
    request_errors,
    service_model,
    shape_errors,
)
from tagflow import demo, deploy, jobs, runconfig, s3
from tagflow.local import airflow as local_airflow
from tagflow.local.endpoint import content_type_of
from test_dag import _facts


def test_the_validator_catches_what_botocore_lets_through():
    good = {"EndpointName": "tagflow-x", "EndpointConfigName": "tagflow-x-config"}
    assert request_errors("sagemaker", "CreateEndpoint", good) == []
    bad = {"EndpointName": "x" * 64, "EndpointConfigName": "bad_name", "Extra": 1}
    assert request_errors("sagemaker", "CreateEndpoint", bad) == [
        "EndpointName: length 64 is above the maximum 63",
        f"EndpointName: {'x' * 64!r} does not match [a-zA-Z0-9](-*[a-zA-Z0-9]){{0,62}}",
        "EndpointConfigName: 'bad_name' does not match [a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}",
        "Extra: not a member of CreateEndpointInput",
    ]
    resource = {"InstanceType": "ml.bogus.large", "InstanceCount": 1, "VolumeSizeInGB": 5}
    shape = service_model("sagemaker").operation_model("CreateTrainingJob").input_shape.members["ResourceConfig"]
    assert shape_errors(resource, shape, "ResourceConfig")[0].startswith(
        "ResourceConfig.InstanceType: 'ml.bogus.large' is not one of"
    )


@pytest.fixture(scope="module")
def moto():
    from moto.server import ThreadedMotoServer

    state = Moto()
    with pytest.MonkeyPatch.context() as mp:
        state.install(mp)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        state.url = f"http://{host}:{port}"
        try:
            yield state
        finally:
            server.stop()


# --- whole DAG runs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def airflow_env(s3_server, moto, tmp_path_factory):
    home = tmp_path_factory.mktemp("tagflow-home")
    env = local_airflow.environment(
        s3_server,
        home=home / "airflow",
        services={"sagemaker": moto.url, "sagemaker-runtime": moto.url, "logs": moto.url},
        variables={"tagflow_sagemaker_role_arn": ROLE},
        extra={"TAGFLOW_HOME": str(home)},
    )
    local_airflow.migrate(env)
    return env


def _publish(s3_client, bucket: str, seed: int) -> dict[str, Any]:
    data = demo.publish(60, s3.S3Uri(bucket, "raw"), seed=seed, client=s3_client, workers=1)
    return {
        "preset": "custom",
        "list_uri": data.list_uri,
        "images_uri": data.images_uri,
        "labels_uri": data.labels_uri,
        "num_labels": data.num_labels,
        "resize": 32,
        "bucket": bucket,
        "dataset_prefix": "designs",
        "shard_size": 20,
        "backend": "sagemaker",
        "hyperparameters": {"num_layers": 18, "epochs": 2, "mini_batch_size": 4, "learning_rate": 0.01},
        "instance_type": "ml.p3.2xlarge",
        "gate_lift": 0.0,  # one epoch on 54 images: the tests judge the plumbing, not the model
        "gate_threshold": 0.0,
    }


def _run(env, conf, log_file):
    result = local_airflow.run_once(env, conf, log_file=log_file)
    assert result["state"] == "success", log_file.read_text()[-6000:]
    return result


def _all_valid(requests: list[tuple[str, dict[str, Any]]]) -> None:
    errors = [f"{op}: {e}" for op, params in requests for e in request_errors("sagemaker", op, params)]
    assert errors == []


def _answer(num_labels: int) -> str:
    return json.dumps([round(0.05 + 0.9 * (i % 7) / 6, 3) for i in range(num_labels)])


@pytest.fixture(scope="module")
def model_archive(s3_client, mxnet_python, tmp_path_factory) -> bytes:
    """A real model.tar.gz in the built-in's layout (ResNet-18, one epoch of the local trainer on 60 demo designs
    at 32 px, 50 labels): what the moto jobs "produce", so the evaluation stage scores a real model."""
    from tagflow import pipeline
    from tagflow.local.runner import run_training_job
    from tagflow.sagemaker_config import LOCAL_IMAGE_URI, LOCAL_ROLE_ARN

    bucket = f"t-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=bucket)
    conf = {**_publish(s3_client, bucket, seed=20), "backend": "local", "endpoint_name": "tagflow-sm-model"}
    conf["hyperparameters"] = {**conf["hyperparameters"], "epochs": 1}
    cfg = runconfig.resolve(conf)
    pipeline.run(cfg.dataset_spec(), s3_client)
    request = jobs.training_request(cfg, jobs.read_manifest(cfg.dataset_uri, s3_client), job_name="tagflow-sm-model",
                                    image_uri=LOCAL_IMAGE_URI, role_arn=LOCAL_ROLE_ARN)  # fmt: skip
    described = run_training_job(request, workdir=tmp_path_factory.mktemp("model"), client=s3_client,
                                 mxnet_python=mxnet_python)  # fmt: skip
    assert described["TrainingJobStatus"] == "Completed", described.get("FailureReason")
    where = s3.S3Uri.parse(described["ModelArtifacts"]["S3ModelArtifacts"])
    return s3_client.get_object(Bucket=where.bucket, Key=where.key)["Body"].read()


def produces_model(archive: bytes, s3_client, then: Callable[[Any], None]) -> Callable[[Any], None]:
    """Play the algorithm's part in a moto training job (`then`) and write its model.tar.gz where SageMaker puts
    it, OUTPUT/JOB/output/model.tar.gz, as the built-in would."""

    def finish(job) -> None:
        then(job)
        put_model(s3_client, job.output_data_config["S3OutputPath"], job.training_job_name, archive)

    return finish


def put_model(s3_client, output: str, job: str, archive: bytes) -> str:
    uri = s3.S3Uri.parse(f"{output.rstrip('/')}/{job}/output/model.tar.gz")
    s3_client.put_object(Bucket=uri.bucket, Key=uri.key, Body=archive)
    return str(uri)


@pytest.fixture(scope="module")
def first_deploy(airflow_env, moto, s3_client, model_archive, tmp_path_factory):
    """One whole train run on a fresh endpoint; its job reports validation:accuracy 0.62."""
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=bucket)
    conf = {**_publish(s3_client, bucket, seed=21), "mode": "train", "endpoint_name": "tagflow-sm-train"}
    moto.on_training_job = produces_model(
        model_archive, s3_client, reports_metrics(validation_accuracy=0.62, train_accuracy=0.7)
    )
    moto.queue_answer(_answer(conf["num_labels"]))
    requests, invocations = len(moto.requests), len(moto.invocations)
    result = _run(airflow_env, conf, tmp_path_factory.mktemp("logs") / "first.log")
    return SimpleNamespace(
        conf=conf,
        result=result,
        env=airflow_env,
        requests=moto.requests[requests:],
        invocations=moto.invocations[invocations:],
    )


@pytest.mark.mxnet
@pytest.mark.slow
@pytest.mark.timeout(1800)  # with the module's model to train and each run's evaluation
def test_train_run_uses_the_provider_operators_and_deploys_on_sagemaker(first_deploy, moto, s3_client):
    conf, result = first_deploy.conf, first_deploy.result
    tasks = result["tasks"]
    ran = [
        "sagemaker_training_request",
        "sagemaker_train",
        "evaluate_gate",
        "sagemaker_endpoint_config",
        "sagemaker_model",
        "sagemaker_deploy",
        "smoke_test",
    ]
    assert {t: tasks[t] for t in ran} == dict.fromkeys(ran, "success")
    skipped = ["local_train", "local_tune", "sagemaker_tuning_request", "sagemaker_tune", "deploy_local"]
    assert {t: tasks[t] for t in skipped} == dict.fromkeys(skipped, "skipped")

    # The request the DAG built is what SageMaker received, and the service would accept it.
    request = result["results"]["sagemaker_training_request"]
    assert request_errors("sagemaker", "CreateTrainingJob", request) == []
    assert [params for op, params in first_deploy.requests if op == "CreateTrainingJob"] == [request]
    assert request["TrainingJobName"] == jobs.job_names(result["run_id"], 1)["training"]
    assert request["HyperParameters"]["num_classes"] == "50"
    assert request["AlgorithmSpecification"]["TrainingImage"].endswith("/image-classification:1")
    assert request["RoleArn"] == ROLE
    _all_valid(first_deploy.requests)
    sent = {op for op, _ in first_deploy.requests}
    assert sent >= {"CreateTrainingJob", "CreateModel", "CreateEndpointConfig", "CreateEndpoint", "DescribeEndpoint"}

    # The gate judged the model by its evaluation on the dataset's validation split; nothing was serving yet.
    gate = result["results"]["evaluate_gate"]
    output = f"s3://{conf['bucket']}/designs/output/{request['TrainingJobName']}/output/model.tar.gz"
    assert gate["candidate"] == {
        "job": request["TrainingJobName"],
        "model_data_url": output,
        "metric": METRIC,
        "value": 0.62,
        # SageMaker's built-in logs no saved-model line: the value is the last epoch's.
        "value_of": "last epoch",
        "saved_model": None,
        "last_epoch": {"epoch": None, "metrics": {"validation:accuracy": 0.62, "train:accuracy": 0.7}},
    }
    assert (gate["deploy"], gate["champion"], gate["route"]) == (True, None, "sagemaker")
    assert gate["reason"].startswith(f"mAP {gate['mAP']:.4f} passes")
    doc = json.loads(s3_client.get_object(Bucket=conf["bucket"], Key=f"designs/output/{request['TrainingJobName']}"
                                          "/evaluation/evaluation.json")["Body"].read())  # fmt: skip
    assert doc["candidate"]["mAP"] == gate["mAP"] and doc["model"]["uri"] == output
    assert doc["lineage"]["settings"]["backend"] == "sagemaker"

    # Extra links: the SageMaker console for the job and the endpoint; S3 objects through the Airflow S3 view (the
    # connection's S3 is the local server, which a browser cannot reach with its credentials).
    facts = _facts(first_deploy.env, result["run_id"])
    console = f"https://{REGION}.console.aws.amazon.com/sagemaker/home?region={REGION}#"
    assert facts["links"]["sagemaker_train"] == {
        "_link_TrainingJobConsoleLink": f"{console}/jobs/{request['TrainingJobName']}",
        "_link_ModelLink": f"/tagflow/s3/{conf['bucket']}/designs/output/{request['TrainingJobName']}/output/"
        "model.tar.gz",
    }
    assert facts["links"]["evaluate_gate"]["_link_EndpointConsoleLink"] == f"{console}/endpoints/tagflow-sm-train"
    assert facts["links"]["sagemaker_deploy"]["_link_EndpointConsoleLink"] == f"{console}/endpoints/tagflow-sm-train"
    assert facts["note"].startswith("**Deployed** — mAP")

    # The endpoint serves the new model through a config tagged with its objective.
    sagemaker = moto.client()
    endpoint = sagemaker.describe_endpoint(EndpointName="tagflow-sm-train")
    assert endpoint["EndpointStatus"] == "InService"
    config = sagemaker.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    model = sagemaker.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
    assert model["PrimaryContainer"]["ModelDataUrl"] == output
    assert model["PrimaryContainer"]["Image"] == request["AlgorithmSpecification"]["TrainingImage"]
    tags = sagemaker.list_tags(ResourceArn=config["EndpointConfigArn"])["Tags"]
    assert deploy.tagged_value(tags, METRIC) == 0.62
    assert {t["Key"]: t["Value"] for t in tags}[deploy.JOB_TAG] == request["TrainingJobName"]

    # The smoke test sent the first validation image as it is and checked the answer.
    image_id, image = deploy.smoke_image(f"s3://{conf['bucket']}/designs", s3_client)
    [invoked] = first_deploy.invocations
    assert invoked["EndpointName"] == "tagflow-sm-train" and invoked["Body"] == image
    assert invoked["headers"]["Content-Type"] == content_type_of(image) == "image/jpeg"
    invoke = {"EndpointName": "tagflow-sm-train", "ContentType": "image/jpeg", "Body": image}
    assert request_errors("sagemaker-runtime", "InvokeEndpoint", invoke) == []
    assert result["results"]["smoke_test"]["endpoint"] == "tagflow-sm-train"
    assert result["results"]["smoke_test"]["image_id"] == image_id


@pytest.mark.mxnet
@pytest.mark.slow
@pytest.mark.timeout(1800)  # with the module's model to train and each run's evaluation
def test_a_model_as_good_updates_the_endpoint_to_a_new_config(
    first_deploy, airflow_env, moto, s3_client, model_archive, tmp_path
):
    moto.on_training_job = produces_model(model_archive, s3_client, reports_metrics(validation_accuracy=0.7))
    since = len(moto.requests)
    second = _run(airflow_env, first_deploy.conf, tmp_path / "second.log")
    _all_valid(moto.requests[since:])

    # The champion is the model the form's endpoint serves (DescribeEndpoint → config → model's ModelDataUrl),
    # re-scored on this run's split: the same archive scores the same, and "not worse" deploys it.
    gate = second["results"]["evaluate_gate"]
    first_gate = first_deploy.result["results"]["evaluate_gate"]
    assert gate["champion"] == first_gate["candidate"]["model_data_url"]
    assert gate["deploy"] is True and gate["champion_mAP"] == gate["mAP"] == first_gate["mAP"]
    assert len(moto.sent("DescribeModel", since)) >= 1
    first_config = first_deploy.result["results"]["sagemaker_endpoint_config"]["EndpointConfig"]["EndpointConfigName"]
    new_config = second["results"]["sagemaker_endpoint_config"]["EndpointConfig"]["EndpointConfigName"]
    assert new_config != first_config
    assert [p["EndpointName"] for p in moto.sent("CreateEndpoint", since)] == ["tagflow-sm-train"]  # refused
    assert moto.sent("UpdateEndpoint", since) == [
        {"EndpointName": "tagflow-sm-train", "EndpointConfigName": new_config}
    ]

    sagemaker = moto.client()
    assert sagemaker.describe_endpoint(EndpointName="tagflow-sm-train")["EndpointConfigName"] == new_config
    old = sagemaker.describe_endpoint_config(EndpointConfigName=first_config)  # kept: blue/green, never deleted
    assert deploy.tagged_value(sagemaker.list_tags(ResourceArn=old["EndpointConfigArn"])["Tags"], METRIC) == 0.62
    assert second["tasks"]["smoke_test"] == "success"


@pytest.mark.mxnet
@pytest.mark.slow
@pytest.mark.timeout(1800)  # with the module's model to train and each run's evaluation
def test_tune_run_sends_a_valid_tuning_job_and_deploys_its_best_trial(
    airflow_env, moto, s3_client, model_archive, bucket, tmp_path
):
    conf = {
        **_publish(s3_client, bucket, seed=22),
        "mode": "tune",
        "max_jobs": 4,
        "max_parallel_jobs": 2,
        "endpoint_name": "tagflow-sm-tune",
    }
    tuning = finishes_tuning(0.66)

    def finish(job) -> None:
        tuning(job)
        output = job.training_job_definition["OutputDataConfig"]["S3OutputPath"]
        put_model(s3_client, output, job.best_training_job["TrainingJobName"], model_archive)

    moto.on_tuning_job = finish
    moto.queue_answer(_answer(conf["num_labels"]))
    since = len(moto.requests)
    result = _run(airflow_env, conf, tmp_path / "tune.log")
    _all_valid(moto.requests[since:])

    tasks = result["tasks"]
    assert (tasks["sagemaker_tuning_request"], tasks["sagemaker_tune"]) == ("success", "success")
    assert (tasks["sagemaker_training_request"], tasks["sagemaker_train"]) == ("skipped", "skipped")
    request = result["results"]["sagemaker_tuning_request"]
    assert request_errors("sagemaker", "CreateHyperParameterTuningJob", request) == []
    assert moto.sent("CreateHyperParameterTuningJob", since) == [request]
    assert request["HyperParameterTuningJobName"] == jobs.job_names(result["run_id"], 1)["tuning"]
    assert request["HyperParameterTuningJobConfig"]["HyperParameterTuningJobObjective"]["MetricName"] == METRIC

    best = f"{request['HyperParameterTuningJobName']}-003-1a2b3c4d"
    candidate = result["results"]["evaluate_gate"]["candidate"]
    assert (candidate["job"], candidate["metric"], candidate["value"]) == (best, METRIC, 0.66)
    assert candidate["model_data_url"] == f"s3://{bucket}/designs/output/{best}/output/model.tar.gz"
    sagemaker = moto.client()
    config = sagemaker.describe_endpoint_config(
        EndpointConfigName=sagemaker.describe_endpoint(EndpointName="tagflow-sm-tune")["EndpointConfigName"]
    )
    tags = {t["Key"]: t["Value"] for t in sagemaker.list_tags(ResourceArn=config["EndpointConfigArn"])["Tags"]}
    assert tags[deploy.JOB_TAG] == best and tags[deploy.METRIC_TAG] == METRIC
    assert tasks["smoke_test"] == "success"


# --- one operator, its retries and failures (in this process, as on a worker) ---------------------------------


@pytest.fixture(scope="module")
def worker(s3_server, moto, tmp_path_factory):
    """Airflow in this process, with the same `aws_default` connection the DAG runs get."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow")))
        connection = local_airflow.aws_connection(
            s3_server, services={"sagemaker": moto.url, "sagemaker-runtime": moto.url, "logs": moto.url}
        )
        mp.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(connection))
        mp.syspath_prepend(str(local_airflow.PLUGINS))
        yield


@pytest.fixture
def dataset(s3_client, bucket) -> str:
    """A dataset location whose channels exist (the provider checks they do; moto never reads them)."""
    for key in ("designs/training/train.rec", "designs/validation/val.rec"):
        s3_client.put_object(Bucket=bucket, Key=key, Body=b"records")
    return f"s3://{bucket}/designs"


MANIFEST = {"num_labels": 50, "counts": {"train": 540, "val": 60}, "pack_params": {"resize": 32}}


def _job_operator(dataset: str, run_id: str, mode: str = "train"):
    """The DAG's training (mode "train") or tuning ("tune") operator for this run's try-1 request: deferrable,
    with the operator's defaults otherwise."""
    from tagflow_ops.training import TagflowSageMakerTrainingOperator, TagflowSageMakerTuningOperator

    bucket = s3.S3Uri.parse(dataset).bucket
    cfg = runconfig.resolve({"bucket": bucket, "dataset_prefix": "designs", "backend": "sagemaker", "mode": mode})
    names = jobs.job_names(run_id, 1)
    if mode == "train":
        request = jobs.training_request(cfg, MANIFEST, job_name=names["training"], image_uri=IMAGE, role_arn=ROLE)
        return TagflowSageMakerTrainingOperator(task_id="sagemaker_train", config=request, deferrable=True)
    request = jobs.tuning_request(cfg, MANIFEST, tuning_name=names["tuning"], image_uri=IMAGE, role_arn=ROLE)
    return TagflowSageMakerTuningOperator(task_id="sagemaker_tune", config=request, deferrable=True)


def _context(run_id: str, try_number: int) -> dict[str, Any]:
    return {"dag_run": SimpleNamespace(run_id=run_id), "ti": SimpleNamespace(try_number=try_number)}


def _run_id(request) -> str:
    return f"manual__{request.node.name}"


def _trigger_event(deferred) -> dict[str, Any]:
    """Run the trigger a deferred task handed over, as the triggerer would, up to its first event."""

    async def first():
        async for event in deferred.trigger.run():
            return event.payload

    return asyncio.run(first())


def _set_status(moto: Moto, name: str, status: str, reason: str | None = None) -> None:
    job = moto.backend.training_jobs[name]
    job.training_job_status = job.secondary_status = status
    if reason:
        job.failure_reason = reason


REASON = "AlgorithmError: num_classes 50 does not match the labels in the record files (exit code 1)"


def _failed(job) -> None:
    job.training_job_status = job.secondary_status = "Failed"
    job.failure_reason = REASON


def _in_progress(job) -> None:
    job.training_job_status, job.secondary_status = "InProgress", "Training"


def test_a_failed_training_job_fails_the_task_with_sagemakers_reason(worker, moto, dataset, request):
    """An AlgorithmError fails the task without a retry (AirflowFailException): the same job would fail again."""
    from airflow.sdk.exceptions import AirflowFailException

    moto.on_training_job = _failed
    run_id = _run_id(request)
    with pytest.raises(AirflowFailException, match=re.escape(REASON)):
        _job_operator(dataset, run_id).execute(_context(run_id, 1))
    assert moto.backend.training_jobs[jobs.job_names(run_id, 1)["training"]].training_job_status == "Failed"


def test_a_job_failed_by_sagemaker_itself_is_retried(worker, moto, dataset, request):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    capacity = "InternalServerError: We encountered an internal error. Please try again."

    def fail_internally(job) -> None:
        job.training_job_status, job.secondary_status, job.failure_reason = "Failed", "Failed", capacity

    moto.on_training_job = fail_internally
    run_id = _run_id(request)
    with pytest.raises(AirflowException, match=re.escape(capacity)) as failed:
        _job_operator(dataset, run_id).execute(_context(run_id, 1))
    assert not isinstance(failed.value, AirflowFailException)  # Airflow retries it


def test_a_job_that_fails_while_the_task_is_deferred_fails_it_with_the_reason(worker, moto, dataset, request):
    from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

    moto.on_training_job = _in_progress
    run_id = _run_id(request)
    operator = _job_operator(dataset, run_id)
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(_context(run_id, 1))
    _set_status(moto, jobs.job_names(run_id, 1)["training"], "Failed", REASON)
    event = _trigger_event(deferred.value)
    assert event["status"] == "failed" and event["message"] == REASON
    with pytest.raises(AirflowFailException, match=re.escape(REASON)):
        getattr(operator, deferred.value.method_name)(_context(run_id, 1), event)


def _jobs(moto: Moto, run_id: str, kind: str = "training") -> list[str]:
    """The jobs of `kind` this run's first three tries could have started."""
    names = {jobs.job_names(run_id, t)[kind] for t in (1, 2, 3)}
    table = moto.backend.training_jobs if kind == "training" else moto.backend.hyper_parameter_tuning_jobs
    return sorted(name for name in table if name in names)


def test_a_retry_waits_for_the_job_its_first_try_started(worker, moto, dataset, request):
    from airflow.sdk.exceptions import TaskDeferred

    run_id = _run_id(request)
    first = jobs.job_names(run_id, 1)["training"]
    moto.on_training_job = _in_progress
    with pytest.raises(TaskDeferred):  # try 1 starts the job; then its worker dies while the task is deferred
        _job_operator(dataset, run_id).execute(_context(run_id, 1))
    since = len(moto.requests)

    retry = _job_operator(dataset, run_id)
    with pytest.raises(TaskDeferred) as deferred:
        retry.execute(_context(run_id, 2))
    assert deferred.value.trigger.job_name == first
    assert moto.sent("CreateTrainingJob", since) == []
    assert _jobs(moto, run_id) == [first]

    _set_status(moto, first, "Completed")
    moto.backend.training_jobs[first].final_metric_data_list = [{"MetricName": METRIC, "Value": 0.6}]
    result = getattr(retry, deferred.value.method_name)(_context(run_id, 2), _trigger_event(deferred.value))
    assert jobs.candidate(result, METRIC)["job"] == first
    assert jobs.candidate(result, METRIC)["value"] == 0.6


def test_a_retry_after_a_completed_job_returns_it_without_starting_another(worker, moto, dataset, request):
    run_id = _run_id(request)
    moto.on_training_job = reports_metrics(validation_accuracy=0.7)
    first = _job_operator(dataset, run_id).execute(_context(run_id, 1))
    since = len(moto.requests)
    again = _job_operator(dataset, run_id).execute(_context(run_id, 2))
    assert moto.sent("CreateTrainingJob", since) == []
    assert again["Training"]["TrainingJobName"] == first["Training"]["TrainingJobName"]
    assert _jobs(moto, run_id) == [jobs.job_names(run_id, 1)["training"]]


def test_a_retry_after_a_failed_job_starts_a_new_differently_named_one(worker, moto, dataset, request):
    from airflow.sdk.exceptions import AirflowException

    run_id = _run_id(request)
    moto.on_training_job = _failed
    with pytest.raises(AirflowException, match=re.escape(REASON)):
        _job_operator(dataset, run_id).execute(_context(run_id, 1))
    moto.on_training_job = reports_metrics(validation_accuracy=0.7)
    since = len(moto.requests)
    result = _job_operator(dataset, run_id).execute(_context(run_id, 2))
    second = jobs.job_names(run_id, 2)["training"]
    assert [p["TrainingJobName"] for p in moto.sent("CreateTrainingJob", since)] == [second]
    assert result["Training"]["TrainingJobName"] == second
    assert _jobs(moto, run_id) == sorted([jobs.job_names(run_id, 1)["training"], second])
    _all_valid(moto.requests[since:])


@pytest.mark.timeout(120)  # waiting on the worker instead would poll until the job ends
def test_a_tuning_retry_defers_on_the_job_its_first_try_started(worker, moto, dataset, request):
    from airflow.sdk.exceptions import TaskDeferred

    run_id = _run_id(request)
    first = jobs.job_names(run_id, 1)["tuning"]
    moto.on_tuning_job = lambda job: setattr(job, "hyper_parameter_tuning_job_status", "InProgress")
    with pytest.raises(TaskDeferred):
        _job_operator(dataset, run_id, "tune").execute(_context(run_id, 1))
    since = len(moto.requests)

    retry = _job_operator(dataset, run_id, "tune")
    with pytest.raises(TaskDeferred) as deferred:  # waits in the triggerer, not on the worker
        retry.execute(_context(run_id, 2))
    assert deferred.value.trigger.job_name == first
    assert moto.sent("CreateHyperParameterTuningJob", since) == []

    moto.backend.hyper_parameter_tuning_jobs[first].hyper_parameter_tuning_job_status = "Completed"
    finishes_tuning(0.66)(moto.backend.hyper_parameter_tuning_jobs[first])
    result = getattr(retry, deferred.value.method_name)(_context(run_id, 2), _trigger_event(deferred.value))
    assert jobs.candidate(result, METRIC)["tuning_job"] == first
    assert _jobs(moto, run_id, "tuning") == [first]


def test_a_deploy_retry_uses_what_its_first_try_created(worker, moto, request):
    """Model and endpoint-config names are per run, so a retried deploy meets its own first try's resources:
    it uses them instead of failing on "already existing", and creates nothing twice."""
    from tagflow_ops.deployment import TagflowSageMakerEndpointOperator, TagflowSageMakerModelOperator

    name = f"retry-{uuid.uuid4().hex[:8]}"
    candidate = {"job": "j", "metric": "validation:accuracy", "value": 0.7, "model_data_url": "s3://b/m.tar.gz"}
    requests = deploy.sagemaker_endpoint_config(
        candidate, run_key=_run_id(request), endpoint_name=name, image_uri=IMAGE, role_arn=ROLE,
        instance_type="ml.m5.large",
    )  # fmt: skip
    since = len(moto.requests)
    for _ in range(2):  # the first try, then its retry
        TagflowSageMakerModelOperator(task_id="sagemaker_model", config=dict(requests["Model"])).execute({})
        done = TagflowSageMakerEndpointOperator(
            task_id="sagemaker_deploy",
            config={k: dict(v) for k, v in requests.items() if k != "Model"},
            operation="create",
            deferrable=False,
        ).execute({})
        assert done["Endpoint"]["EndpointConfigName"] == requests["EndpointConfig"]["EndpointConfigName"]
    created = [op for op, _ in moto.requests[since:] if op.startswith("Create")]
    assert created == ["CreateModel", "CreateEndpointConfig", "CreateEndpoint"]
