"""Deployment's operators: the local endpoint's load, SageMaker's Model / EndpointConfig / Endpoint (the
provider's, made safe to retry and strict about the switch), and the smoke test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.providers.amazon.aws.operators.sagemaker import (
    SageMakerEndpointOperator,
    SageMakerModelOperator,
    serialize,
)

from tagflow_ops.base import ROLE_VARIABLE, TagflowOperator, config_of, local_endpoint, required_variable, run_id_of
from tagflow_ops.links import EndpointConsoleLink

if TYPE_CHECKING:
    from airflow.sdk import Context


class _DeployOperator(TagflowOperator):
    """Base: deploys the candidate in the gate's `decision` (templated from the gate's XCom)."""

    template_fields: Sequence[str] = ("config", "decision")

    def __init__(self, *, decision: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.decision = decision


class LocalDeployOperator(_DeployOperator):
    """Serve the candidate on the local endpoint: the server loads it completely, then switches (no request is
    dropped; on failure the old model keeps serving)."""

    def run(self, context: Context) -> dict[str, Any]:
        from tagflow.local import endpoint

        cfg = config_of(self.config)
        model = self.decision["candidate"]["model_data_url"]
        url, token = local_endpoint()
        served = endpoint.load(url, model, name=cfg.endpoint_name, client=self.aws.s3, token=token)
        self.log.info("endpoint %s at %s serves %s", served["name"], url, model)
        return {"endpoint": served["name"], "url": url, "model": model}


class SageMakerEndpointConfigOperator(_DeployOperator):
    """Build the Model / EndpointConfig / Endpoint requests for the candidate (new names per run: blue/green)."""

    def run(self, context: Context) -> dict[str, Any]:
        from tagflow import deploy

        cfg = config_of(self.config)
        requests = deploy.sagemaker_endpoint_config(
            self.decision["candidate"],
            run_key=run_id_of(context),
            endpoint_name=cfg.endpoint_name,
            image_uri=self.aws.image_uri(),
            role_arn=required_variable(ROLE_VARIABLE, "the SageMaker execution role's ARN"),
            instance_type=cfg.endpoint_instance_type,
        )
        context["ti"].xcom_push(key="model", value=requests.pop("Model"))  # SageMakerModelOperator's config
        return requests


class TagflowSageMakerModelOperator(SageMakerModelOperator):
    """The provider's SageMakerModelOperator; a retry finds the model an earlier try created (same name per run)
    and uses it instead of failing on "already existing"."""

    def execute(self, context: Context) -> dict:
        from tagflow.deploy import described

        existing = described(self.hook.describe_model, self.config["ModelName"])
        if existing is None:
            return super().execute(context)
        self.log.info("model %s exists (an earlier try created it): using it", self.config["ModelName"])
        return {"Model": serialize(existing)}


class TagflowSageMakerEndpointOperator(SageMakerEndpointOperator):
    """The provider's SageMakerEndpointOperator (deferrable; creates the endpoint, or updates it blue/green), made
    safe to retry — an endpoint config an earlier try created is not created again, an endpoint already on this
    config is only waited for — and strict: it fails unless the endpoint ends up serving the new config."""

    operator_extra_links = (EndpointConsoleLink(),)

    def execute(self, context: Context) -> dict:
        from tagflow.deploy import described

        config_name = self.config["Endpoint"]["EndpointConfigName"]
        if described(self.hook.describe_endpoint_config, config_name) is not None:
            self.log.info("endpoint config %s exists (an earlier try created it)", config_name)
            self.config.pop("EndpointConfig", None)
        current = described(self.hook.describe_endpoint, self.config["Endpoint"]["EndpointName"])
        if current is not None and current["EndpointConfigName"] == config_name:
            self.log.info("endpoint already on %s (%s)", config_name, current["EndpointStatus"])
            if current["EndpointStatus"] not in ("InService", "Failed"):
                self.hook.get_waiter("endpoint_in_service").wait(EndpointName=current["EndpointName"])
            return self._checked(self._result(current["EndpointName"], config_name))
        return self._checked(super().execute(context))

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict:
        return self._checked(super().execute_complete(context, event))

    def _result(self, name: str, config_name: str) -> dict:

        return {
            "EndpointConfig": serialize(self.hook.describe_endpoint_config(config_name)),
            "Endpoint": serialize(self.hook.describe_endpoint(name)),
        }

    def _checked(self, result: dict) -> dict:
        from airflow.sdk.exceptions import AirflowException

        from tagflow import deploy
        from tagflow.errors import TagflowError

        try:
            deploy.check_switched(result["Endpoint"], self.config["Endpoint"]["EndpointConfigName"])
        except TagflowError as err:
            raise AirflowException(str(err)) from None
        return result


class SmokeTestOperator(TagflowOperator):
    """Send one validation image through sagemaker-runtime InvokeEndpoint and check the answer's shape."""

    def run(self, context: Context) -> dict[str, Any]:
        from tagflow import deploy, jobs

        cfg = config_of(self.config)
        num_classes = int(jobs.read_manifest(cfg.dataset_uri, self.aws.s3)["num_labels"])
        answer = deploy.smoke_test(
            cfg.backend, cfg.endpoint_name, cfg.dataset_uri, num_classes, self.aws.s3,
            local_url=lambda: local_endpoint()[0], runtime=lambda: self.aws.client("sagemaker-runtime"),
        )  # fmt: skip
        self.log.info("endpoint %s answered for image %d: top labels %s", cfg.endpoint_name, answer["image_id"],
                      list(zip(answer["top"], answer.pop("top_probabilities"), strict=True)))  # fmt: skip
        return answer
