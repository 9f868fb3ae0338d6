"""
# tagflow — train and ship the multi-label design tagger

One run: **resolve the form** → **prepare** (parse and validate the list file, plan shards) → per shard
**download** and **pack** (mapped, any worker) → **publish** `PREFIX/training/train.rec`,
`PREFIX/validation/val.rec` and the manifest → **train** or **tune** (local algorithm environment, or SageMaker's
built-in image-classification algorithm) → **evaluate gate** (score the new and the serving model on the current
validation split, write the evaluation and its report, decide) → **approve deploy** (with `approval` manual only:
a person approves or rejects on the run's Required actions) → **deploy** → **smoke test** the endpoint.

- Trigger it with the form (**Trigger DAG**): pick a preset (`50-label-rs96`, `ic-multi-label`) and override any
  field; empty Dataset fields take the preset's values. `num_classes` and `num_training_samples` always come from
  the packed data.
- It retrains on its schedule (`TAGFLOW_SCHEDULE`, default weekly). A list URI ending in `/` reads the date
  partitions `dt=YYYY-MM-DD/*.lst` dated before the run's interval end, so `airflow backfill create` over past days
  trains on what existed each day; shards already downloaded and packed are reused, so a run pays only for new
  images.
- Tasks hand each other S3 keys, never data: any worker can run any task.
- The gate deploys only a model whose macro mAP (`gate_metric`) is at least `gate_lift` × the label-frequency
  baseline's and `gate_threshold`, and not worse than the serving model's on the same images (`gate_tolerance`).
  Its decision and reason are the run's note. With `approval` manual a model the gate passes waits for a
  person (the comparison table and the report link are shown); reject, or no answer within
  `approval_timeout_h`, leaves the endpoint as it is, and the note says "rejected by USER" or "approval timed
  out". With `approval` auto, or when the gate refuses, nobody is asked (`approve_deploy` is skipped).
- A scheduled or backfill run whose dataset and training settings equal the serving model's stops after publish
  ("nothing new since MODEL"); `force_training` trains anyway, and a manual run always trains.
- Assets: `tagflow-dataset` (each publish) and `tagflow-model` (each evaluated model: the gate's decision, mAP,
  baseline, the serving model's mAP and the model's lineage in the event's extra).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import DAG, Asset, CronDataIntervalTimetable, Param, TaskGroup, TriggerRule, chain, task_group

from tagflow.dag_id import DAG_ID
from tagflow.runconfig import PARAMS
from tagflow_ops.base import ChooseBranchOperator
from tagflow_ops.data import (
    DownloadShardOperator,
    PackShardOperator,
    PrepareDatasetOperator,
    PublishDatasetOperator,
    ResolveConfigOperator,
)
from tagflow_ops.deployment import (
    LocalDeployOperator,
    SageMakerEndpointConfigOperator,
    SmokeTestOperator,
    TagflowSageMakerEndpointOperator,
    TagflowSageMakerModelOperator,
)
from tagflow_ops.gate import DeployApprovalOperator, EvaluateGateOperator
from tagflow_ops.training import (
    ChooseTrainingOperator,
    LocalJobOperator,
    SageMakerRequestOperator,
    TagflowSageMakerTrainingOperator,
    TagflowSageMakerTuningOperator,
)

SCHEDULE = os.environ.get("TAGFLOW_SCHEDULE", "@weekly")
AWS_CONN_ID = "aws_default"
DATASET = Asset("tagflow-dataset")
MODEL = Asset("tagflow-model")
TRAINING_TASKS = ["local_train", "local_tune", "sagemaker_train", "sagemaker_tune"]
CONFIG = "{{ ti.xcom_pull(task_ids='resolve_config') }}"
TRAINING_TIMEOUT = timedelta(hours=48)
TUNING_TIMEOUT = timedelta(hours=96)
TRIGGER_POLLS = 480  # SageMakerTrigger's default waiter_max_attempts

with DAG(
    dag_id=DAG_ID,
    description="List file → RecordIO → SageMaker image-classification (multi-label) → endpoint",
    doc_md=__doc__,
    schedule=CronDataIntervalTimetable(SCHEDULE, timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["tagflow", "ml", "sagemaker"],
    params={name: Param(**spec) for name, spec in PARAMS.items()},
    render_template_as_native_obj=True,
    default_args={
        "aws_conn_id": AWS_CONN_ID,
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "execution_timeout": timedelta(hours=2),
    },
) as dag:
    config = ResolveConfigOperator(task_id="resolve_config", execution_timeout=timedelta(minutes=5))
    prepare = PrepareDatasetOperator(task_id="prepare", config=CONFIG)

    @task_group(group_id="shard")
    def shard(index: int) -> None:
        download = DownloadShardOperator(task_id="download", config=CONFIG, plan=prepare.output["plan"], shard=index)
        pack = PackShardOperator(task_id="pack", config=CONFIG, plan=prepare.output["plan"], shard=index)
        download >> pack

    shards = shard.expand(index=prepare.output)
    publish = PublishDatasetOperator(task_id="publish", config=CONFIG, plan=prepare.output["plan"], outlets=[DATASET])

    choose_training = ChooseTrainingOperator(
        task_id="choose_training",
        config=CONFIG,
        branches={
            "local/train": "local_train",
            "local/tune": "local_tune",
            "sagemaker/train": "sagemaker_training_request",
            "sagemaker/tune": "sagemaker_tuning_request",
        },
    )
    local_train = LocalJobOperator(
        task_id="local_train", kind="training", config=CONFIG, execution_timeout=TRAINING_TIMEOUT
    )
    local_tune = LocalJobOperator(task_id="local_tune", kind="tuning", config=CONFIG, execution_timeout=TUNING_TIMEOUT)
    # Groups show the stages in the graph; prefix_group_id=False keeps the task IDs the XCom pulls name.
    with TaskGroup("sagemaker_training", prefix_group_id=False, tooltip="The built-in algorithm on SageMaker"):
        training_request = SageMakerRequestOperator(
            task_id="sagemaker_training_request", config=CONFIG, kind="training"
        )
        tuning_request = SageMakerRequestOperator(task_id="sagemaker_tuning_request", config=CONFIG, kind="tuning")
        # The deferred waits last as long as the task may: polls x interval = the execution timeout.
        sagemaker_train = TagflowSageMakerTrainingOperator(
            task_id="sagemaker_train", config=training_request.output, deferrable=True,
            execution_timeout=TRAINING_TIMEOUT, check_interval=60,
            max_attempts=TRAINING_TIMEOUT // timedelta(seconds=60),
        )  # fmt: skip
        sagemaker_tune = TagflowSageMakerTuningOperator(
            task_id="sagemaker_tune", config=tuning_request.output, deferrable=True, execution_timeout=TUNING_TIMEOUT,
            check_interval=int(TUNING_TIMEOUT.total_seconds()) // TRIGGER_POLLS,  # its trigger polls ≤ 480 times
        )  # fmt: skip

    gate = EvaluateGateOperator(
        task_id="evaluate_gate",
        config=CONFIG,
        candidates=TRAINING_TASKS,
        training="choose_training",
        trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,
        outlets=[MODEL],
    )
    # Asks only when the gate's XCom says approval_required (manual approval, a model the gate passes); else skipped.
    # Reject or timeout: it skips choose_deploy. Skipped itself: choose_deploy follows the gate's route.
    approve = DeployApprovalOperator(
        task_id="approve_deploy", config=CONFIG, decision=gate.output, outlets=[MODEL],
        execution_timeout=timedelta(minutes=10),  # asking; the wait is the form's approval_timeout_h
    )  # fmt: skip
    choose_deploy = ChooseBranchOperator(
        task_id="choose_deploy",
        key="{{ ti.xcom_pull(task_ids='evaluate_gate')['route'] }}",
        branches={"local": "deploy_local", "sagemaker": "sagemaker_endpoint_config", "keep": None},
        trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,
    )
    deploy_local = LocalDeployOperator(task_id="deploy_local", config=CONFIG, decision=gate.output)
    with TaskGroup("sagemaker_deployment", prefix_group_id=False, tooltip="Model, endpoint config, endpoint"):
        endpoint_config = SageMakerEndpointConfigOperator(
            task_id="sagemaker_endpoint_config", config=CONFIG, decision=gate.output
        )
        sagemaker_model = TagflowSageMakerModelOperator(
            task_id="sagemaker_model", config=endpoint_config.output["model"]
        )
        sagemaker_deploy = TagflowSageMakerEndpointOperator(
            task_id="sagemaker_deploy", config=endpoint_config.output, operation="create", deferrable=True
        )
    smoke_test = SmokeTestOperator(
        task_id="smoke_test", config=CONFIG, trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS
    )

    chain(config, prepare, shards, publish, choose_training)
    choose_training >> [local_train, local_tune, training_request, tuning_request]
    training_request >> sagemaker_train
    tuning_request >> sagemaker_tune
    [local_train, local_tune, sagemaker_train, sagemaker_tune] >> gate >> approve
    [gate, approve] >> choose_deploy
    choose_deploy >> [deploy_local, endpoint_config]
    chain(endpoint_config, sagemaker_model, sagemaker_deploy)
    [deploy_local, sagemaker_deploy] >> smoke_test
