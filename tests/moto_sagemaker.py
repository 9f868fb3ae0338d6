"""moto's SageMaker for the SageMaker-backend tests: served in the test process, every request it receives checked
against botocore's service model (moto does not validate), and the parts of SageMaker's behaviour moto lacks.

There is no AWS here, so moto stands in for SageMaker, SageMaker Runtime and CloudWatch Logs. It runs in the test's
process (`ThreadedMotoServer`), so a test can reach its backend objects: to play the algorithm's part (report the
final metrics a real job would, write the model.tar.gz it would), to make a job fail, or to read what was asked.
Where moto 5.2.5 behaves unlike SageMaker in ways the DAG depends on, `Moto.install` gives it SageMaker's
behaviour and says so.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import botocore.session
import pytest
import regex

ACCOUNT, REGION = "123456789012", "us-east-1"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/tagflow-sagemaker"
IMAGE = "811284229777.dkr.ecr.us-east-1.amazonaws.com/image-classification:1"
METRIC = "validation:accuracy"

# --- strict validation against botocore's service models ------------------------------------------------------

_SERVICES: dict[str, Any] = {}


def service_model(service: str):
    if service not in _SERVICES:
        _SERVICES[service] = botocore.session.get_session().get_service_model(service)
    return _SERVICES[service]


def _java_pattern(pattern: str) -> regex.Pattern:
    # The models' patterns are Java regexes; `regex` knows \p{...} classes, only \z needs spelling as \Z.
    return regex.compile(pattern.replace(r"\z", r"\Z"))


def _bounds(value_len: float, shape, where: str, what: str) -> list[str]:
    low, high = shape.metadata.get("min"), shape.metadata.get("max")
    if low is not None and value_len < low:
        return [f"{where}: {what} {value_len} is below the minimum {low}"]
    if high is not None and value_len > high:
        return [f"{where}: {what} {value_len} is above the maximum {high}"]
    return []


def shape_errors(value: Any, shape, where: str = "") -> list[str]:
    """What the service would refuse in `value` for `shape`: botocore's own client checks (types, required members,
    minimums) plus those only the service applies (maximums, enums, patterns, unknown members)."""
    kind, at = shape.type_name, where or shape.name
    if kind == "structure":
        if not isinstance(value, dict):
            return [f"{at}: expected a structure, got {type(value).__name__}"]
        prefix = f"{where}." if where else ""
        errors = [f"{prefix}{name}: required member missing" for name in shape.required_members if name not in value]
        for name, item in value.items():
            if name not in shape.members:
                errors.append(f"{prefix}{name}: not a member of {shape.name}")
            else:
                errors += shape_errors(item, shape.members[name], prefix + name)
        return errors
    if kind == "list":
        if not isinstance(value, list):
            return [f"{at}: expected a list, got {type(value).__name__}"]
        errors = _bounds(len(value), shape, at, "length")
        for i, item in enumerate(value):
            errors += shape_errors(item, shape.member, f"{at}[{i}]")
        return errors
    if kind == "map":
        if not isinstance(value, dict):
            return [f"{at}: expected a map, got {type(value).__name__}"]
        errors = _bounds(len(value), shape, at, "size")
        for key, item in value.items():
            errors += shape_errors(key, shape.key, f"{at} key {key!r}")
            errors += shape_errors(item, shape.value, f"{at}[{key!r}]")
        return errors
    if kind == "string":
        if not isinstance(value, str):
            return [f"{at}: expected a string, got {type(value).__name__} {value!r}"]
        errors = _bounds(len(value), shape, at, "length")
        if shape.enum and value not in shape.enum:
            errors.append(f"{at}: {value!r} is not one of {shape.enum}")
        pattern = shape.metadata.get("pattern")
        if pattern and not _java_pattern(pattern).fullmatch(value):
            errors.append(f"{at}: {value!r} does not match {pattern}")
        return errors
    if kind in ("integer", "long"):
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{at}: expected an integer, got {type(value).__name__} {value!r}"]
        return _bounds(value, shape, at, "value")
    if kind in ("float", "double"):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return [f"{at}: expected a number, got {type(value).__name__} {value!r}"]
        return _bounds(value, shape, at, "value")
    if kind == "boolean":
        return [] if isinstance(value, bool) else [f"{at}: expected a boolean, got {value!r}"]
    if kind == "timestamp":
        return [] if isinstance(value, (datetime, int, float, str)) else [f"{at}: expected a time, got {value!r}"]
    if kind == "blob":
        if not isinstance(value, (bytes, bytearray, str)):
            return [f"{at}: expected bytes, got {type(value).__name__}"]
        return _bounds(len(value), shape, at, "size")
    return [f"{at}: shape type {kind} is not checked here"]


def request_errors(service: str, operation: str, params: dict[str, Any]) -> list[str]:
    return shape_errors(params, service_model(service).operation_model(operation).input_shape)


# --- moto, in this process --------------------------------------------------------------------------------------


class Moto:
    """moto's SageMaker, SageMaker Runtime and CloudWatch Logs served from this process, plus what it received."""

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[tuple[str, dict[str, Any]]] = []  # (SageMaker operation, its JSON input)
        self.invocations: list[dict[str, Any]] = []  # InvokeEndpoint calls: name, headers, raw body
        self.on_training_job: Callable[[Any], None] | None = None  # plays the algorithm's part
        self.on_tuning_job: Callable[[Any], None] | None = None

    @property
    def backend(self):
        from moto.sagemaker.models import sagemaker_backends

        return sagemaker_backends[ACCOUNT][REGION]

    def sent(self, operation: str, since: int) -> list[dict[str, Any]]:
        """The inputs of the `operation` requests received since request number `since`."""
        return [params for op, params in self.requests[since:] if op == operation]

    def client(self, service: str = "sagemaker"):
        import boto3

        return boto3.client(
            service, endpoint_url=self.url, region_name=REGION, aws_access_key_id="moto", aws_secret_access_key="moto"
        )

    def queue_answer(self, body: str) -> None:
        """What the next new InvokeEndpoint request gets back (moto's static-results API)."""
        import requests

        answer = {"Body": body, "ContentType": "application/json", "InvokedProductionVariant": "AllTraffic"}
        done = requests.post(
            f"{self.url}/moto-api/static/sagemaker/endpoint-results",
            json={"account_id": ACCOUNT, "region": REGION, "results": [answer]},
            timeout=10,
        )
        done.raise_for_status()

    def install(self, mp: pytest.MonkeyPatch) -> None:
        """Record every request, and give moto the SageMaker behaviour the DAG relies on that moto 5.2.5 lacks:

        - CreateTrainingJob, CreateModel, CreateEndpointConfig and CreateEndpoint refuse an existing name
          (moto silently replaces it), so a name reused across runs or tries fails here as it would on AWS;
        - UpdateEndpoint switches an endpoint to another config (moto answers 500, not implemented);
        - InvokeEndpoint takes a binary body (moto decodes every body as UTF-8 and answers 500 for a JPEG).
        """
        from moto.core.responses import BaseResponse
        from moto.sagemaker.exceptions import ResourceInUseException, ValidationError
        from moto.sagemaker.models import FakeEndpoint, SageMakerModelBackend, arn_formatter
        from moto.sagemaker.responses import SageMakerResponse
        from moto.sagemakerruntime.responses import SageMakerRuntimeResponse

        moto = self

        def record(self):
            moto.requests.append((self._get_action(), json.loads(self.body or "{}")))
            return BaseResponse.call_action(self)

        mp.setattr(SageMakerResponse, "call_action", record)

        def refuse_existing(method: str, table: str, name_arg: str, error: Callable[[str, Any], Exception]):
            original = getattr(SageMakerModelBackend, method)

            def create(self, *args, **kwargs):
                name = kwargs[name_arg]
                if name in getattr(self, table):
                    raise error(name, self)
                created = original(self, *args, **kwargs)
                finish = {"training_jobs": moto.on_training_job, "hyper_parameter_tuning_jobs": moto.on_tuning_job}
                if finish.get(table):
                    finish[table](getattr(self, table)[name])
                return created

            mp.setattr(SageMakerModelBackend, method, create)

        def exists(kind: str, what: str, message: str = 'Cannot create already existing {what} "{arn}".'):
            def error(name: str, backend) -> Exception:
                arn = arn_formatter(kind, name, backend.account_id, backend.region_name)
                cls = ValidationError if message.startswith("Cannot") else ResourceInUseException
                return cls(message=message.format(what=what, arn=arn))

            return error

        in_use = "Training job names must be unique within an AWS account and region, and a {what} with this name "
        refuse_existing(
            "create_training_job",
            "training_jobs",
            "training_job_name",
            exists("training-job", "training job", in_use + "already exists ({arn})"),
        )
        refuse_existing(
            "create_hyper_parameter_tuning_job",
            "hyper_parameter_tuning_jobs",
            "hyper_parameter_tuning_job_name",
            exists("hyper-parameter-tuning-job", "tuning job", "Resource Already Exists: {arn}"),
        )
        refuse_existing("create_model", "_models", "model_name", exists("model", "model"))
        refuse_existing(
            "create_endpoint_config",
            "endpoint_configs",
            "endpoint_config_name",
            exists("endpoint-config", "endpoint configuration"),
        )
        refuse_existing("create_endpoint", "endpoints", "endpoint_name", exists("endpoint", "endpoint"))

        def update_endpoint(self):
            from moto.core.responses import ActionResult

            name, config_name = self._get_param("EndpointName"), self._get_param("EndpointConfigName")
            backend = self.sagemaker_backend
            if name not in backend.endpoints:
                arn = FakeEndpoint.arn_formatter(name, backend.account_id, backend.region_name)
                raise ValidationError(message=f"Could not find endpoint '{arn}'.")
            config = backend.describe_endpoint_config(config_name)
            endpoint = backend.endpoints[name]
            endpoint.endpoint_config_name = config_name
            endpoint.production_variants = endpoint._process_production_variants(config["ProductionVariants"])
            endpoint.last_modified_time = datetime.now(UTC)
            return ActionResult({"EndpointArn": endpoint.arn})

        mp.setattr(SageMakerResponse, "update_endpoint", update_endpoint, raising=False)

        original_invoke = SageMakerRuntimeResponse.invoke_endpoint

        def invoke_endpoint(self):
            moto.invocations.append(
                {"EndpointName": self.path.split("/")[2], "headers": dict(self.headers), "Body": self.raw_body}
            )
            self.body = base64.b64encode(self.raw_body).decode()  # moto keys its cached answers on the body
            return original_invoke(self)

        mp.setattr(SageMakerRuntimeResponse, "use_raw_body", True)
        mp.setattr(SageMakerRuntimeResponse, "invoke_endpoint", invoke_endpoint)


def reports_metrics(**values: float) -> Callable[[Any], None]:
    """Play the built-in algorithm's part in a moto training job: it ends with these final metrics."""

    def finish(job) -> None:
        job.final_metric_data_list = [
            {"MetricName": name.replace("_", ":", 1), "Value": value, "Timestamp": job.creation_time}
            for name, value in values.items()
        ]

    return finish


def finishes_tuning(best_value: float) -> Callable[[Any], None]:
    """Play SageMaker's part in a moto tuning job: moto's BestTrainingJob is a constant ("FakeTrainingJobName",
    metric "Accuracy"); a real one names one of the job's trials and reports the job's objective metric."""

    def finish(job) -> None:
        name = job.hyper_parameter_tuning_job_name
        config = job.hyper_parameter_tuning_job_config
        tuned = {r["Name"]: r["Values"][0] for r in config["ParameterRanges"].get("CategoricalParameterRanges", [])}
        tuned |= {r["Name"]: r["MinValue"] for r in config["ParameterRanges"].get("ContinuousParameterRanges", [])}
        objective = config["HyperParameterTuningJobObjective"]
        job.best_training_job = job.OverallBestTrainingJob = {
            "TrainingJobName": f"{name}-003-1a2b3c4d",
            "TrainingJobArn": arn(f"training-job/{name}-003-1a2b3c4d"),
            "TuningJobName": name,
            "CreationTime": job.creation_time,
            "TrainingJobStatus": "Completed",
            "TunedHyperParameters": tuned,
            "FinalHyperParameterTuningJobObjectiveMetric": {
                "Type": objective["Type"],
                "MetricName": objective["MetricName"],
                "Value": best_value,
            },
            "ObjectiveStatus": "Succeeded",
        }

    return finish


def arn(resource: str) -> str:
    return f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:{resource}"
