"""Training's operators: whether to train (or stop: nothing new since the serving model), a local job (train or
tune, in the algorithm environment), and SageMaker's requests and job operators (the provider's, named per run and
try, adopting an earlier try's job).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.amazon.aws.operators.sagemaker import (
    SageMakerTrainingOperator,
    SageMakerTuningOperator,
    serialize,
)
from airflow.sdk import BaseBranchOperator

from tagflow_ops.base import (
    ROLE_VARIABLE,
    TagflowOperator,
    bad_input_fails_fast,
    config_of,
    required_variable,
    run_id_of,
    run_type_of,
    serving_model,
)
from tagflow_ops.links import ModelLink, TrainingJobConsoleLink, TuningJobConsoleLink

if TYPE_CHECKING:
    from airflow.sdk import Context


class ChooseTrainingOperator(TagflowOperator, BaseBranchOperator):
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

        cfg = config_of(self.config)
        key = f"{cfg.backend}/{cfg.mode}"
        if key not in self.branches:
            raise ValueError(f"{self.task_id}: no branch for {key!r}; expected one of {sorted(self.branches)}")
        manifest = jobs.read_manifest(cfg.dataset_uri, self.aws.s3)
        current = jobs.lineage(cfg, jobs.dataset_digest(cfg.dataset_uri, manifest, self.aws.s3))
        run_type = run_type_of(context["dag_run"])
        serving = serving_model(self, cfg) if run_type in jobs.RETRAIN_RUN_TYPES else None
        decision = jobs.training_decision(
            run_type, force=cfg.force_training, current=current, serving_model=serving,
            serving=jobs.read_lineage(serving, self.aws.s3),
        )  # fmt: skip
        return {**decision, "branch": self.branches[key], "run_type": run_type, "serving_model": serving,
                "lineage": current}  # fmt: skip


class LocalJobOperator(TagflowOperator):
    """Run this run's training job (`kind="training"`) or tuning job (`kind="tuning"`) in the local algorithm
    environment, from the same request SageMaker would get; returns the candidate model."""

    operator_extra_links = (ModelLink(),)

    def __init__(self, *, kind: str, **kwargs: Any):
        super().__init__(**kwargs)
        if kind not in ("training", "tuning"):
            raise ValueError(f"kind {kind!r}: expected 'training' or 'tuning'")
        self.kind = kind

    def run(self, context: Context) -> dict[str, Any]:
        from tagflow import jobs
        from tagflow.sagemaker_config import LOCAL_IMAGE_URI, LOCAL_ROLE_ARN

        cfg = config_of(self.config)
        name = jobs.job_names(run_id_of(context), context["ti"].try_number)[self.kind]
        manifest = jobs.read_manifest(cfg.dataset_uri, self.aws.s3)
        local = {"image_uri": LOCAL_IMAGE_URI, "role_arn": LOCAL_ROLE_ARN}
        with tempfile.TemporaryDirectory(prefix=f"tagflow-{self.kind}-") as tmp:
            if self.kind == "training":
                from tagflow.local.runner import run_training_job

                request = jobs.training_request(cfg, manifest, job_name=name, **local)
                self.log.info("training job %s: %s", name, request["HyperParameters"])
                describe = run_training_job(request, workdir=Path(tmp), client=self.aws.s3)  # it logs the lines
                return jobs.training_candidate(describe, cfg.objective_metric)
            from tagflow.local.tuner import run_tuning_job

            request = jobs.tuning_request(cfg, manifest, tuning_name=name, **local)
            self.log.info("tuning job %s over %s", name, sorted(cfg.tuning_ranges))
            return jobs.tuning_candidate(run_tuning_job(request, workdir=Path(tmp), client=self.aws.s3))


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

        cfg = config_of(self.config)
        image_uri = self.aws.image_uri()
        role_arn = required_variable(self.role_variable, "the SageMaker execution role's ARN")
        manifest = jobs.read_manifest(cfg.dataset_uri, self.aws.s3)
        names = jobs.job_names(run_id_of(context), 1)  # the job operator names each try itself
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

        run_id, try_number = run_id_of(context), context["ti"].try_number
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
