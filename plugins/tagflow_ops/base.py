"""What every tagflow operator shares: the AWS connection's clients, the base operator (a user error fails the
task at once; `on_kill` stops the jobs it started), the branch operator, and the Airflow Variables the local and
SageMaker backends read. The stage modules (data, training, gate, deployment) hold the operators themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
from airflow.sdk import BaseBranchOperator, BaseOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from tagflow.runconfig import RunConfig

log = logging.getLogger(__name__)

S3_POOL = 40  # connections for a download shard's 32 threads plus headroom
ROLE_VARIABLE = "tagflow_sagemaker_role_arn"


@contextmanager
def bad_input_fails_fast():
    """A user error (bad list line, bad param, bad model archive) fails the task at once with its message:
    retrying cannot fix it. Anything else (network, S3, a crashed worker) raises as is and is retried."""
    from airflow.sdk.exceptions import AirflowFailException

    from tagflow.errors import InputError

    try:
        yield
    except InputError as err:
        raise AirflowFailException(str(err)) from None


def config_of(config: Mapping[str, Any]) -> RunConfig:
    from tagflow.runconfig import RunConfig

    return RunConfig.from_dict(config)


def run_id_of(context: Context) -> str:
    return context["dag_run"].run_id


def run_type_of(run) -> str:
    return str(getattr(run.run_type, "value", run.run_type))  # DagRunType is an enum: "scheduled", "backfill", …


class AwsClients:
    """The connection's boto3 clients, made once per task (the hook owns the session and endpoint settings)."""

    def __init__(self, aws_conn_id: str | None):
        self.aws_conn_id = aws_conn_id

    def client(self, service: str, **config: Any):
        hook = AwsBaseHook(aws_conn_id=self.aws_conn_id, client_type=service)
        if not config:
            return hook.get_conn()
        from botocore.config import Config

        return hook.get_client_type(config=hook.config.merge(Config(**config)))

    @cached_property
    def s3(self):
        return self.client("s3", max_pool_connections=S3_POOL)

    @cached_property
    def region(self) -> str:
        region = AwsBaseHook(aws_conn_id=self.aws_conn_id, client_type="sagemaker").region_name
        if not region:
            from tagflow.errors import InputError

            raise InputError(
                f'connection {self.aws_conn_id}: no region; set its extra region_name (e.g. {{"region_name": '
                '"eu-west-1"}): the algorithm image, the jobs and the endpoint must be in one region'
            )
        return region

    def image_uri(self) -> str:
        """The built-in image-classification algorithm's image in this connection's region (sagemaker SDK)."""
        from sagemaker.core import image_uris

        return image_uris.retrieve("image-classification", self.region)


class TagflowOperator(BaseOperator):
    """Base: `config` (templated, rendered as JSON) and the AWS connection."""

    template_fields: Sequence[str] = ("config",)
    template_fields_renderers: ClassVar[dict[str, str]] = {"config": "json"}
    ui_color = "#e8f1fb"

    def __init__(self, *, config: Any, aws_conn_id: str | None = "aws_default", **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.aws_conn_id = aws_conn_id

    @cached_property
    def aws(self) -> AwsClients:
        return AwsClients(self.aws_conn_id)

    def execute(self, context: Context) -> Any:
        with bad_input_fails_fast():
            return self.run(context)

    def run(self, context: Context) -> Any:
        raise NotImplementedError

    def on_kill(self) -> None:
        """The task is being killed (marked failed, timed out): stop the jobs it started (a trainer, tuning
        trials), which run as process groups of their own and would otherwise run on."""
        from tagflow.local import process

        stopped = process.stop_owned()
        if stopped:
            self.log.warning("task killed: stopped the process group(s) it started: %s", stopped)


class ChooseBranchOperator(BaseBranchOperator):
    """Follow the branch named by `key` (a value computed by an upstream task), e.g. backend/mode."""

    template_fields: Sequence[str] = ("key",)

    def __init__(self, *, key: Any, branches: Mapping[str, str | None], **kwargs: Any):
        super().__init__(**kwargs)
        self.key = key
        self.branches = dict(branches)

    def choose_branch(self, context: Context) -> str | list[str]:
        if self.key not in self.branches:
            raise ValueError(f"{self.task_id}: no branch for {self.key!r}; expected one of {sorted(self.branches)}")
        chosen = self.branches[self.key]
        self.log.info("%s → %s", self.key, chosen or "nothing")
        return [chosen] if chosen else []


def required_variable(name: str, what: str) -> str:
    """An Airflow Variable that must be set; InputError (no retry) saying what it is and where it is explained."""
    from airflow.sdk import Variable

    value = Variable.get(name, default=None)
    if not value:
        from tagflow.errors import InputError

        raise InputError(f"the Airflow Variable {name} is not set: {what} (README, 'On AWS')")
    return value


def local_endpoint() -> tuple[str, str | None]:
    """The local endpoint service's URL and admin token, from the Airflow Variables `tagflow_endpoint_url` and
    `tagflow_endpoint_token` (set by `make up`, `make demo` and docker-compose.yaml)."""
    from airflow.sdk import Variable

    url = Variable.get("tagflow_endpoint_url", default=None)
    if not url:
        from tagflow.errors import InputError

        raise InputError(
            "the Airflow Variable tagflow_endpoint_url is not set: the local backend deploys to the local endpoint "
            "service (`make up` starts one and sets it), or choose backend=sagemaker"
        )
    return url, Variable.get("tagflow_endpoint_token", default=None)


def serving_model(operator: TagflowOperator, cfg: RunConfig) -> str | None:
    """The model the run's endpoint (the form's endpoint_name) serves now, on the run's backend; None if none."""
    from tagflow import deploy

    return deploy.serving_model(
        cfg.backend, cfg.endpoint_name, local_url=lambda: local_endpoint()[0],
        sagemaker=lambda: operator.aws.client("sagemaker"),
    )  # fmt: skip
