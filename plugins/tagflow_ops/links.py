"""Operator extra links: from a task to what it made — the dataset, the model, the evaluation report — and, for
SageMaker jobs and endpoints, to their AWS console pages.

Airflow 3 computes a task's links on its worker when the task ends (`BaseOperatorLink.get_link`, stored in XCom
under `_link_<class>`) and the UI shows the stored URL, so a link is built here from the task's own return value
and its `aws_default` connection. An S3 object is linked with `s3_link`: through the Airflow API server's
`/tagflow/s3/BUCKET/KEY` route (plugins/tagflow_ops/s3_view.py, which reads with the connection and requires
Airflow's login) when the connection names an S3 endpoint of its own (the local S3 server, which a browser cannot
reach with its credentials), else the AWS S3 console. A link whose target the task did not produce (it failed,
skipped, or the run stopped earlier) is empty, and the UI hides it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

CONSOLE = "https://{region}.console.aws.amazon.com/sagemaker/home?region={region}#/{kind}/{name}"


def s3_link(uri: str, *, local: bool, region: str | None = None, base_url: str | None = None) -> str:
    """A browser URL for the S3 object (or prefix, ending in /) `uri`: on the local S3 server, the Airflow API
    server's S3 view at `base_url` (Airflow's [api] base_url; empty: the UI's own origin); on AWS, the S3 console."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if local:
        from tagflow_ops.s3_view import view_path

        return f"{(base_url or '').rstrip('/')}{view_path(uri)}"
    where = f"region={quote(region)}&" if region else ""
    if not key or key.endswith("/"):
        return f"https://s3.console.aws.amazon.com/s3/buckets/{quote(bucket)}?{where}prefix={quote(key)}"
    return f"https://s3.console.aws.amazon.com/s3/object/{quote(bucket)}?{where}prefix={quote(key)}"


def console_link(kind: str, name: str, region: str) -> str:
    """The SageMaker console page of a training job (`jobs`), tuning job (`hyper-tuning-jobs`) or endpoint."""
    return CONSOLE.format(region=quote(region), kind=kind, name=quote(name))


def _result(ti_key: Any) -> Any:
    from airflow.sdk.execution_time.xcom import XCom

    return XCom.get_value(ti_key=ti_key, key="return_value")


def _connection(operator: BaseOperator) -> tuple[bool, str | None]:
    """(whether S3 is a server of the connection's own rather than AWS, the connection's region)."""
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    hook = AwsBaseHook(aws_conn_id=getattr(operator, "aws_conn_id", "aws_default"), client_type="s3")
    config = hook.conn_config
    local = bool(config.endpoint_url or (config.service_config or {}).get("s3", {}).get("endpoint_url"))
    return local, hook.region_name


def _base_url() -> str | None:
    from airflow.configuration import conf

    return conf.get("api", "base_url", fallback=None)


def operator_s3_link(operator: BaseOperator, uri: str) -> str:
    """`s3_link` for an S3 URI through the operator's connection: the local S3 view or the S3 console."""
    local, region = _connection(operator)
    return s3_link(uri, local=local, region=region, base_url=_base_url())


class _TagflowLink(BaseOperatorLink):
    """Base: `target(result)` picks the S3 URI (or console page) from the task's return value."""

    name: ClassVar[str] = ""

    def target(self, result: Any) -> str | None:
        raise NotImplementedError

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        result = _result(ti_key)
        uri = self.target(result) if result else None
        return operator_s3_link(operator, uri) if uri else ""


class ReportLink(_TagflowLink):
    """evaluate_gate → PREFIX/output/JOB/evaluation/report.html."""

    name = "Evaluation report"

    def target(self, result: Any) -> str | None:
        return result.get("report")


class EvaluationLink(_TagflowLink):
    """evaluate_gate → the evaluation document (evaluation.json)."""

    name = "Evaluation (JSON)"

    def target(self, result: Any) -> str | None:
        return result.get("evaluation")


class DatasetLink(_TagflowLink):
    """publish → the dataset's manifest (the UI can open an object, not a prefix)."""

    name = "Dataset"

    def target(self, result: Any) -> str | None:
        dataset = result.get("dataset")
        return f"{dataset}/training/manifest.json" if dataset else None


class ModelLink(_TagflowLink):
    """A training task → the model.tar.gz it produced (the local operators' candidate, or the provider's
    DescribeTrainingJob / DescribeHyperParameterTuningJob result)."""

    name = "Model"

    def target(self, result: Any) -> str | None:
        from tagflow import jobs

        try:
            return jobs.candidate(result, "validation:accuracy")["model_data_url"]
        except (KeyError, TypeError, ValueError):
            return None


class _ConsoleLink(BaseOperatorLink):
    """Base: a SageMaker console page on AWS; empty when the connection's SageMaker is not AWS's."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def resource(self, operator: BaseOperator, result: Any) -> str | None:
        raise NotImplementedError

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

        result = _result(ti_key)
        name = self.resource(operator, result) if result else None
        if not name:
            return ""
        hook = AwsBaseHook(aws_conn_id=getattr(operator, "aws_conn_id", "aws_default"), client_type="sagemaker")
        return console_link(self.kind, name, hook.region_name or "us-east-1")


class TrainingJobConsoleLink(_ConsoleLink):
    name, kind = "SageMaker training job", "jobs"

    def resource(self, operator: BaseOperator, result: Any) -> str | None:
        return (result.get("Training") or {}).get("TrainingJobName")


class TuningJobConsoleLink(_ConsoleLink):
    name, kind = "SageMaker tuning job", "hyper-tuning-jobs"

    def resource(self, operator: BaseOperator, result: Any) -> str | None:
        return (result.get("Tuning") or {}).get("HyperParameterTuningJobName")


class EndpointConsoleLink(_ConsoleLink):
    """A SageMaker deploy (or the gate of a SageMaker run) → the endpoint's console page."""

    name, kind = "SageMaker endpoint", "endpoints"

    def resource(self, operator: BaseOperator, result: Any) -> str | None:
        config = getattr(operator, "config", None) or {}
        if "Endpoint" in result:
            return (result.get("Endpoint") or {}).get("EndpointName")
        if isinstance(config, dict) and config.get("backend") == "sagemaker":
            return config.get("endpoint_name")
        return None
