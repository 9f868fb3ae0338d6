"""Operators binding the DAG's templated values to tagflow's functions; the logic lives in include/tagflow.

Every operator takes `config`, the run's resolved configuration (a `tagflow.runconfig.RunConfig` dict, pulled from
the first task), plus small references (plan URI, shard index, candidate model); none passes image data through
XCom. S3 and SageMaker clients come from the `aws_conn_id` connection through the amazon provider's hooks, so the
local S3 server and AWS are configured the same way (the connection's endpoint_url and config_kwargs).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
from airflow.providers.amazon.aws.operators.sagemaker import (
    SageMakerEndpointOperator,
    SageMakerModelOperator,
    SageMakerTrainingOperator,
    SageMakerTuningOperator,
    serialize,
)
from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import BaseBranchOperator, BaseOperator

from tagflow_ops.links import (
    DatasetLink,
    EndpointConsoleLink,
    EvaluationLink,
    ModelLink,
    ReportLink,
    TrainingJobConsoleLink,
    TuningJobConsoleLink,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

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


def _cfg(config: Mapping[str, Any]):
    from tagflow.runconfig import RunConfig

    return RunConfig.from_dict(config)


def _run_id(context: Context) -> str:
    return context["dag_run"].run_id


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


class ResolveConfigOperator(BaseOperator):
    """Validate the run's params across fields and fill presets; the result is every later task's `config`."""

    def execute(self, context: Context) -> dict[str, Any]:
        from tagflow import jobs, runconfig

        run = context["dag_run"]
        cutoff = runconfig.partition_cutoff(
            _run_type(run), context.get("data_interval_end"), getattr(run, "run_after", None)
        )
        with bad_input_fails_fast():
            cfg = runconfig.resolve(dict(context["params"]), list_until=cutoff)
            jobs.preflight(cfg)  # hyperparameters and tuning ranges fail here, not after the data plane ran
        self.log.info("run %s: preset %s, %s/%s, dataset %s, list %s (partitions before %s)", run.run_id,
                      cfg.preset, cfg.backend, cfg.mode, cfg.dataset_uri, cfg.list_uri, cfg.list_until)  # fmt: skip
        return cfg.to_dict()


class PrepareDatasetOperator(TagflowOperator):
    """Parse and validate the list, plan shards, stage the plan. Returns the shard indices (what the shard tasks
    map over) and pushes the plan reference under the XCom key `plan`."""

    def run(self, context: Context) -> list[int]:
        from tagflow import jobs, pipeline

        ref = pipeline.prepare(jobs.dataset_spec(_cfg(self.config)), self.aws.s3)
        context["ti"].xcom_push(key="plan", value=ref.to_dict())
        self.log.info("%d images in %d shards; plan %s", ref.num_images, ref.num_shards, ref.plan_uri)
        return list(range(ref.num_shards))


class _ShardOperator(TagflowOperator):
    template_fields: Sequence[str] = ("config", "plan", "shard")

    def __init__(self, *, plan: Any, shard: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.plan = plan
        self.shard = shard

    def _args(self):
        from tagflow import jobs, pipeline

        # Use this worker's cores for packing, whatever machine it is.
        spec = jobs.dataset_spec(_cfg(self.config), pack_workers=len(os.sched_getaffinity(0)))
        return spec, pipeline.PlanRef(**self.plan), int(self.shard)


class DownloadShardOperator(_ShardOperator):
    """Fetch one shard's images into one staged tar in S3 (reused when its content digest is already staged)."""

    def run(self, context: Context) -> dict[str, Any]:
        from tagflow import pipeline

        spec, ref, index = self._args()
        return pipeline.download_shard(spec, ref, index, self.aws.s3)


class PackShardOperator(_ShardOperator):
    """Pack one staged shard into train/val RecordIO parts, staged in S3 (reused when already packed)."""

    def run(self, context: Context) -> dict[str, Any]:
        from tagflow import pipeline

        spec, ref, index = self._args()
        result = pipeline.pack_shard(spec, ref, index, self.aws.s3)
        result.pop("counts", None)
        return result


class PublishDatasetOperator(TagflowOperator):
    """Merge the packed shards into DATASET/{training,validation}/ with the manifest; emits the dataset Asset."""

    operator_extra_links = (DatasetLink(),)

    template_fields: Sequence[str] = ("config", "plan")

    def __init__(self, *, plan: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.plan = plan

    def run(self, context: Context) -> dict[str, Any]:
        from tagflow import jobs, manifest, pipeline

        cfg = _cfg(self.config)
        summary = pipeline.publish(
            jobs.dataset_spec(cfg), pipeline.PlanRef(**self.plan), self.aws.s3, code_revision=manifest.code_revision()
        )
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = {"dataset_uri": summary["dataset"], **summary["counts"]}
        self.log.info("published %s: %s (%d bad objects skipped)", summary["dataset"], summary["counts"],
                      summary["errors"])  # fmt: skip
        return {"dataset": summary["dataset"], "counts": summary["counts"], "errors": summary["errors"]}


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


class LocalTrainingOperator(TagflowOperator):
    """Run this run's training job in the local algorithm environment (same request as on SageMaker)."""

    operator_extra_links = (ModelLink(),)

    def run(self, context: Context) -> dict[str, Any]:
        from tagflow import jobs
        from tagflow.local.runner import run_training_job
        from tagflow.sagemaker_config import LOCAL_IMAGE_URI, LOCAL_ROLE_ARN

        cfg = _cfg(self.config)
        name = jobs.job_names(_run_id(context), context["ti"].try_number)["training"]
        request = jobs.training_request(
            cfg, jobs.read_manifest(cfg.dataset_uri, self.aws.s3), job_name=name,
            image_uri=LOCAL_IMAGE_URI, role_arn=LOCAL_ROLE_ARN,
        )  # fmt: skip
        self.log.info("training job %s: %s", name, request["HyperParameters"])
        with tempfile.TemporaryDirectory(prefix="tagflow-train-") as tmp:
            describe = run_training_job(request, workdir=Path(tmp), client=self.aws.s3)  # it logs the trainer's lines
        return jobs.training_candidate(describe, cfg.objective_metric)


class LocalTuningOperator(TagflowOperator):
    """Run this run's tuning job in the local algorithm environment (same request as on SageMaker)."""

    operator_extra_links = (ModelLink(),)

    def run(self, context: Context) -> dict[str, Any]:
        from tagflow import jobs
        from tagflow.local.tuner import run_tuning_job
        from tagflow.sagemaker_config import LOCAL_IMAGE_URI, LOCAL_ROLE_ARN

        cfg = _cfg(self.config)
        name = jobs.job_names(_run_id(context), context["ti"].try_number)["tuning"]
        request = jobs.tuning_request(
            cfg, jobs.read_manifest(cfg.dataset_uri, self.aws.s3), tuning_name=name,
            image_uri=LOCAL_IMAGE_URI, role_arn=LOCAL_ROLE_ARN,
        )  # fmt: skip
        self.log.info("tuning job %s over %s", name, sorted(cfg.tuning_ranges))
        with tempfile.TemporaryDirectory(prefix="tagflow-tune-") as tmp:
            describe = run_tuning_job(request, workdir=Path(tmp), client=self.aws.s3)
        return jobs.tuning_candidate(describe)


class SageMakerRequestOperator(TagflowOperator):
    """Build this run's CreateTrainingJob or CreateHyperParameterTuningJob request (shown as JSON in the UI).

    Image URI from the sagemaker SDK for the connection's region; the execution role from the Airflow Variable
    `role_variable`.
    """

    def __init__(self, *, kind: str, role_variable: str = ROLE_VARIABLE, **kwargs: Any):
        super().__init__(**kwargs)
        if kind not in ("training", "tuning"):
            raise ValueError(f"kind {kind!r}: expected 'training' or 'tuning'")
        self.kind = kind
        self.role_variable = role_variable

    def run(self, context: Context) -> dict[str, Any]:
        from tagflow import jobs

        cfg = _cfg(self.config)
        image_uri = self.aws.image_uri()
        role_arn = required_variable(self.role_variable, "the SageMaker execution role's ARN")
        manifest = jobs.read_manifest(cfg.dataset_uri, self.aws.s3)
        names = jobs.job_names(_run_id(context), 1)  # the job operator names each try itself
        if self.kind == "training":
            request = jobs.training_request(cfg, manifest, job_name=names["training"], image_uri=image_uri,
                                            role_arn=role_arn)  # fmt: skip
        else:
            request = jobs.tuning_request(cfg, manifest, tuning_name=names["tuning"], image_uri=image_uri,
                                          role_arn=role_arn)  # fmt: skip
        self.log.info("%s request for image %s in %s", self.kind, image_uri, self.aws.region)
        return request


@contextmanager
def _job_failure_fails_fast():
    """A job SageMaker failed for a ClientError or AlgorithmError (bad data or hyperparameters) fails the task
    without a retry, which would only pay for the same failure again; other failures are retried."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    from tagflow.jobs import NOT_RETRYABLE

    try:
        yield
    except AirflowFailException:
        raise
    except AirflowException as err:
        if any(reason in str(err) for reason in NOT_RETRYABLE):
            raise AirflowFailException(str(err)) from err
        raise


class _AdoptingJobMixin:
    """Name the job per run and try, and adopt an earlier try's job that is still running or has completed,
    so a retry (say, after a worker died) never launches a second job; a failed earlier job is not adopted."""

    kind: str  # "training" | "tuning"
    name_field: str
    status_field: str

    def execute(self, context: Context) -> dict:
        with _job_failure_fails_fast():
            return self._execute(context)

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict:
        with _job_failure_fails_fast():
            return super().execute_complete(context, event)

    def _execute(self, context: Context) -> dict:
        raise NotImplementedError

    def _choose(self, context: Context) -> tuple[str, dict[str, Any] | None]:
        from tagflow import jobs

        run_id, try_number = _run_id(context), context["ti"].try_number
        earlier = [jobs.job_names(run_id, t)[self.kind] for t in range(1, try_number)]
        from tagflow.deploy import described

        describe = self.hook.describe_training_job if self.kind == "training" else self.hook.describe_tuning_job
        found = [(name, described(describe, name)) for name in earlier]
        adopted = jobs.adoptable([(name, d[self.status_field]) for name, d in found if d is not None])
        if adopted:
            return adopted, dict(found)[adopted]
        return jobs.job_names(run_id, try_number)[self.kind], None


class TagflowSageMakerTrainingOperator(_AdoptingJobMixin, SageMakerTrainingOperator):
    """The provider's SageMakerTrainingOperator (deferrable), named per run and try, adopting an earlier try's job."""

    operator_extra_links = (ModelLink(), TrainingJobConsoleLink())

    kind, name_field, status_field = "training", "TrainingJobName", "TrainingJobStatus"

    def __init__(self, **kwargs: Any):
        # Deferred, no worker stays to tail the job's CloudWatch log: printing it would only make the hook sleep
        # check_interval (30 s) after creating the job, before the task defers.
        kwargs.setdefault("print_log", not kwargs.get("deferrable", False))
        super().__init__(check_if_job_exists=True, action_if_job_exists="fail", **kwargs)

    def _execute(self, context: Context) -> dict:
        name, existing = self._choose(context)
        self.config[self.name_field] = name
        if existing is None:
            return SageMakerTrainingOperator.execute(self, context)
        self.log.info("adopting training job %s (%s) started by an earlier try", name, existing[self.status_field])
        if existing[self.status_field] == "Completed":
            return self.serialize_result(name)
        return self._wait_for(name, context)

    def _wait_for(self, name: str, context: Context) -> dict:
        if self.deferrable:
            from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger

            self.defer(
                trigger=SageMakerTrigger(job_name=name, job_type="Training", waiter_delay=self.check_interval,
                                         waiter_max_attempts=self.max_attempts, aws_conn_id=self.aws_conn_id),
                method_name="execute_complete",
            )  # fmt: skip
        self.hook.check_training_status_with_log(
            name, self.hook.non_terminal_states, self.hook.failed_states, True, self.check_interval,
            self.max_ingestion_time,
        )  # fmt: skip
        return self.serialize_result(name)


class TagflowSageMakerTuningOperator(_AdoptingJobMixin, SageMakerTuningOperator):
    """The provider's SageMakerTuningOperator (deferrable), named per run and try, adopting an earlier try's job."""

    operator_extra_links = (ModelLink(), TuningJobConsoleLink())

    kind, name_field, status_field = "tuning", "HyperParameterTuningJobName", "HyperParameterTuningJobStatus"

    def _execute(self, context: Context) -> dict:
        name, existing = self._choose(context)
        self.config[self.name_field] = name
        if existing is None:
            return SageMakerTuningOperator.execute(self, context)
        self.log.info("adopting tuning job %s (%s) started by an earlier try", name, existing[self.status_field])
        if existing[self.status_field] != "Completed" and self.deferrable:
            from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger

            self.defer(
                trigger=SageMakerTrigger(job_name=name, job_type="tuning", waiter_delay=self.check_interval,
                                         aws_conn_id=self.aws_conn_id),
                method_name="execute_complete",
            )  # fmt: skip
        if existing[self.status_field] != "Completed":
            self.hook.check_status(name, "HyperParameterTuningJobStatus", self.hook.describe_tuning_job,
                                   self.check_interval, self.max_ingestion_time)  # fmt: skip

        return {"Tuning": serialize(self.hook.describe_tuning_job(name))}


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


class _ServingModelMixin:
    """The model the run's endpoint (the form's endpoint_name) serves now, on either backend; None if none."""

    aws: AwsClients

    def serving_model(self, cfg) -> str | None:
        from tagflow import deploy

        if cfg.backend == "local":
            from tagflow.local import endpoint

            return deploy.local_champion(endpoint.metadata(local_endpoint()[0]), cfg.endpoint_name)
        return deploy.sagemaker_champion(self.aws.client("sagemaker"), cfg.endpoint_name)


class ChooseTrainingOperator(_ServingModelMixin, TagflowOperator, BaseBranchOperator):
    """Follow the training branch of the run's backend/mode, or none: a scheduled or backfill run whose published
    dataset and training settings equal the serving model's lineage stops here ("nothing new since MODEL"), and
    every later task is skipped. Returns the decision with this run's lineage (the gate records it with the model).
    """

    def __init__(self, *, branches: Mapping[str, str], **kwargs: Any):
        super().__init__(**kwargs)
        self.branches = dict(branches)

    def execute(self, context: Context) -> dict[str, Any]:
        with bad_input_fails_fast():
            decision = self._decide(context)
        self.log.info("%s", decision["reason"])
        # Pushed first: skipping the other branches ends execute (Airflow 3 raises DownstreamTasksSkipped).
        context["ti"].xcom_push(key="return_value", value=decision)
        self.do_branch(context, [decision["branch"]] if decision["train"] else [])
        return decision

    def _decide(self, context: Context) -> dict[str, Any]:
        from tagflow import jobs

        cfg = _cfg(self.config)
        key = f"{cfg.backend}/{cfg.mode}"
        if key not in self.branches:
            raise ValueError(f"{self.task_id}: no branch for {key!r}; expected one of {sorted(self.branches)}")
        manifest = jobs.read_manifest(cfg.dataset_uri, self.aws.s3)
        current = jobs.lineage(cfg, jobs.dataset_digest(cfg.dataset_uri, manifest, self.aws.s3))
        run_type = _run_type(context["dag_run"])
        serving = self.serving_model(cfg) if run_type in jobs.RETRAIN_RUN_TYPES else None
        decision = jobs.training_decision(
            run_type, force=cfg.force_training, current=current, serving_model=serving,
            serving=jobs.read_lineage(serving, self.aws.s3),
        )  # fmt: skip
        return {**decision, "branch": self.branches[key], "run_type": run_type, "serving_model": serving,
                "lineage": current}  # fmt: skip


def _run_type(run) -> str:
    return str(getattr(run.run_type, "value", run.run_type))  # DagRunType is an enum: "scheduled", "backfill", …


class EvaluateGateOperator(_ServingModelMixin, TagflowOperator):
    """Score the new model and the serving one on the dataset's current validation split (tagflow.evaluate, in
    the algorithm environment), write the evaluation (and its report) under PREFIX/output/JOB/evaluation/, record
    the model's lineage beside it, and decide by the form's gate rule. Returns the decision the deploy tasks use.

    One task, not two: the decision is a pure function of the evaluation document, so a separate gate task would
    only pass that document along; and the champion must be looked up in the same task that scores it, or a deploy
    in between could make the gate judge against a model that no longer serves. `candidates` are the training
    branches' task IDs; the one that ran left its result in XCom; `training` is the task that decided to train.
    """

    operator_extra_links = (ReportLink(), EvaluationLink(), EndpointConsoleLink())

    def __init__(self, *, candidates: Sequence[str], training: str = "choose_training", **kwargs: Any):
        super().__init__(**kwargs)
        self.candidates = list(candidates)
        self.training = training

    def run(self, context: Context) -> dict[str, Any]:
        from tagflow import deploy, evaluate, jobs

        cfg = _cfg(self.config)
        ti = context["ti"]
        results = [r for r in ti.xcom_pull(task_ids=self.candidates) if r]
        if len(results) != 1:
            raise ValueError(f"expected one training result among {self.candidates}, found {len(results)}")
        candidate = jobs.candidate(results[0], cfg.objective_metric)
        lineage = (ti.xcom_pull(task_ids=self.training) or {}).get("lineage")
        champion = self.serving_model(cfg)
        if champion == candidate["model_data_url"]:
            champion = None  # a retry after this model was deployed: it is no rival of itself
        self.log.info("evaluating %s against %s", candidate["model_data_url"], champion or "no serving model")
        batch = jobs.evaluation_batch_size(jobs.read_manifest(cfg.dataset_uri, self.aws.s3))
        doc = evaluate.evaluate(
            candidate["model_data_url"], cfg.dataset_uri, client=self.aws.s3, champion_uri=champion,
            lift=cfg.gate_lift, threshold=cfg.gate_threshold, tolerance=cfg.gate_tolerance, batch_size=batch,
        )  # fmt: skip
        decision = deploy.judge(doc, metric=cfg.gate_metric, lift=cfg.gate_lift, threshold=cfg.gate_threshold,
                                tolerance=cfg.gate_tolerance)  # fmt: skip
        if not cfg.deploy:
            decision = {**decision, "deploy": False, "reason": f"deploy is off for this run ({decision['reason']})"}
        doc = {**doc, "gate": decision, "lineage": lineage, "training": candidate}
        evaluation = evaluate.write_evaluation(doc, cfg.dataset_uri, candidate["job"], self.aws.s3)
        lineage_uri = jobs.write_lineage(lineage, candidate["model_data_url"], self.aws.s3) if lineage else None
        figures = deploy.summary(doc, decision, cfg.gate_metric)
        self.log.info("gate: %s", decision["reason"])
        # approve_deploy asks a person only for a model the gate would deploy, and only under manual approval.
        ask = bool(decision["deploy"]) and cfg.approval == "manual"
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = {
                "model_data_url": candidate["model_data_url"], "job": candidate["job"], **figures,
                "evaluation": evaluation, "lineage": lineage, "approval": "pending" if ask else cfg.approval,
            }  # fmt: skip
        route = cfg.backend if decision["deploy"] else "keep"  # choose_deploy's key
        return {**figures, "candidate": candidate, "route": route, "evaluation": evaluation,
                "report": report_uri(evaluation), "lineage_uri": lineage_uri, "rule": decision.get("rule"),
                "approval_required": ask}  # fmt: skip


def report_uri(evaluation_uri: str) -> str:
    """The report beside an evaluation document (tagflow.evaluate writes both to PREFIX/output/JOB/evaluation/)."""
    return evaluation_uri.rsplit("/", 1)[0] + "/report.html"


class DeployApprovalOperator(ApprovalOperator):
    """The standard provider's ApprovalOperator (Airflow's human-in-the-loop: the run's Required actions, or the
    REST API's hitlDetails) between the gate and the deploy, asked only when the gate's `decision` says so
    (`approval_required`: the gate would deploy and the form's approval is manual); otherwise it is skipped and the
    deploy goes on. Its body is the comparison table and the report's link (`tagflow.deploy.approval_body`).

    Approve: the deploy runs. Reject, or no answer within the form's approval_timeout_h (the timeout's default is
    Reject, applied by the scheduler): the provider skips `choose_deploy`, so the endpoint is untouched. Either way
    the task succeeds, returns the answer (`tagflow.deploy.approval_outcome`, which the run's note shows) and emits
    a `tagflow-model` asset event with the final decision."""

    template_fields: Sequence[str] = (*ApprovalOperator.template_fields, "config", "decision")
    template_fields_renderers: ClassVar[dict[str, str]] = {"config": "json", "decision": "json", "body": "md"}
    ui_color = "#fdf3e1"

    def __init__(self, *, config: Any, decision: Any, aws_conn_id: str | None = "aws_default", **kwargs: Any):
        from tagflow.deploy import REJECT

        # The run's form sets the wait (approval_timeout_h) in execute; given here, the provider leaves the task's
        # execution_timeout alone (else it would take that for the wait, and clear it).
        kwargs.setdefault("response_timeout", timedelta(hours=24))
        super().__init__(subject="Deploy the new model?", defaults=REJECT, **kwargs)
        self.config = config
        self.decision = decision
        self.aws_conn_id = aws_conn_id  # the report link's connection, as the gate's extra link uses

    def execute(self, context: Context) -> Any:
        from airflow.sdk.exceptions import AirflowSkipException

        from tagflow import deploy

        gate = self.decision
        if not gate.get("approval_required"):
            why = "the gate keeps the serving model" if not gate.get("deploy") else "approval is auto"
            raise AirflowSkipException(f"nobody is asked: {why}")
        cfg = _cfg(self.config)
        candidate = gate["candidate"]
        self.subject = f"Deploy {candidate['job']} to the endpoint {cfg.endpoint_name}?"
        self.body = deploy.approval_body(gate, self._report_url(gate.get("report")))
        self.response_timeout = timedelta(hours=cfg.approval_timeout_h)
        self.log.info("asking for approval of %s (answer within %g h, else it counts as rejected)",
                      candidate["model_data_url"], cfg.approval_timeout_h)  # fmt: skip
        return super().execute(context)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        from tagflow import deploy

        if "error" in event:
            return super().execute_complete(context, event)  # raises, saying what went wrong
        cfg = _cfg(self.config)
        answer = deploy.approval_outcome(
            event.get("chosen_options") or [], event.get("responded_by_user"), timeout_h=cfg.approval_timeout_h
        )
        final = deploy.with_approval(self.decision, answer)
        self.log.info("%s", answer["outcome"])
        candidate = self.decision["candidate"]
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = {
                "model_data_url": candidate["model_data_url"], "job": candidate["job"],
                **{k: final.get(k) for k in ("metric", "mAP", "baseline", "champion_mAP", "champion", "deploy",
                                             "reason", "evaluation", "approval")},
            }  # fmt: skip
        # Pushed first: on Reject the provider skips choose_deploy, which ends execute_complete (Airflow 3 raises
        # DownstreamTasksSkipped) before a return value is pushed.
        context["ti"].xcom_push(key="return_value", value=answer)
        super().execute_complete(context, event)
        return answer

    def _report_url(self, report: str | None) -> str | None:
        """The report as the gate's extra link opens it (through the API server's S3 view on a local S3 server)."""
        if not report:
            return None
        from tagflow_ops.links import _base_url, _connection, s3_link

        local, region = _connection(self)
        return s3_link(report, local=local, region=region, base_url=_base_url())


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

        cfg = _cfg(self.config)
        model = self.decision["candidate"]["model_data_url"]
        url, token = local_endpoint()
        served = endpoint.load(url, model, name=cfg.endpoint_name, client=self.aws.s3, token=token)
        self.log.info("endpoint %s at %s serves %s", served["name"], url, model)
        return {"endpoint": served["name"], "url": url, "model": model}


class SageMakerEndpointConfigOperator(_DeployOperator):
    """Build the Model / EndpointConfig / Endpoint requests for the candidate (new names per run: blue/green)."""

    def run(self, context: Context) -> dict[str, Any]:
        from tagflow import deploy

        cfg = _cfg(self.config)
        requests = deploy.sagemaker_endpoint_config(
            self.decision["candidate"],
            run_key=_run_id(context),
            endpoint_name=cfg.endpoint_name,
            image_uri=self.aws.image_uri(),
            role_arn=required_variable(ROLE_VARIABLE, "the SageMaker execution role's ARN"),
            instance_type=cfg.endpoint_instance_type,
        )
        context["ti"].xcom_push(key="model", value=requests.pop("Model"))  # SageMakerModelOperator's config
        return requests


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


class SmokeTestOperator(TagflowOperator):
    """Send one validation image through sagemaker-runtime InvokeEndpoint and check the answer's shape."""

    def run(self, context: Context) -> dict[str, Any]:
        from tagflow import deploy, jobs
        from tagflow.local import endpoint

        cfg = _cfg(self.config)
        image_id, image = deploy.smoke_image(cfg.dataset_uri, self.aws.s3)
        num_classes = int(jobs.read_manifest(cfg.dataset_uri, self.aws.s3)["num_labels"])
        content_type = endpoint.content_type_of(image)
        if cfg.backend == "local":
            runtime = endpoint.runtime_client(local_endpoint()[0])
        else:
            runtime = self.aws.client("sagemaker-runtime")
        response = runtime.invoke_endpoint(EndpointName=cfg.endpoint_name, ContentType=content_type, Body=image)
        probabilities = deploy.check_prediction(response["Body"].read(), num_classes, cfg.endpoint_name)
        top = sorted(range(len(probabilities)), key=lambda i: -probabilities[i])[:3]
        self.log.info("endpoint %s answered for image %d: top labels %s", cfg.endpoint_name, image_id,
                      [(i, round(probabilities[i], 3)) for i in top])  # fmt: skip
        return {"endpoint": cfg.endpoint_name, "image_id": image_id, "top": top}
