"""Local hyperparameter tuning: CreateHyperParameterTuningJob request → Optuna → trials as local training jobs.

The data set is 128 generated 32-px images (96 train, 32 validation) with 4 colour labels, so a trial of one epoch
of a CIFAR-style ResNet-20 takes seconds.
"""

from __future__ import annotations

import io
import re

import botocore.session
import numpy as np
import pytest
from botocore.validate import ParamValidator
from PIL import Image, ImageDraw

from conftest import upload_folder, write_records
from tagflow import s3
from tagflow.errors import InputError
from tagflow.local.tuner import run_tuning_job, trial_name, validate_request
from tagflow.sagemaker_config import (
    training_job_name,
    training_job_request,
    tuning_job_name,
    tuning_job_request,
)

COLORS = ((220, 30, 30), (30, 170, 40), (30, 60, 220), (240, 220, 20))
N_IMAGES, N_TRAIN, SIZE = 128, 96, 32
ROLE = "arn:aws:iam::000000000000:role/tagflow-local"
RANGES = {
    "learning_rate": {"type": "Continuous", "min": 0.001, "max": 0.2, "scaling": "Logarithmic"},
    "momentum": {"type": "Continuous", "min": 0.5, "max": 0.99, "scaling": "ReverseLogarithmic"},
    "mini_batch_size": {"type": "Integer", "min": 8, "max": 32},
    "optimizer": ["sgd", "adam"],
}
SERVICE = botocore.session.get_session().get_service_model("sagemaker")


def _render(index: int) -> tuple[bytes, np.ndarray]:
    """1-2 coloured squares on grey; a label per colour drawn."""
    rng = np.random.default_rng(index)
    img = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    labels = np.zeros(len(COLORS), np.float32)
    for _ in range(int(rng.integers(1, 3))):
        color = int(rng.integers(len(COLORS)))
        x, y = (int(v) for v in rng.integers(0, SIZE - 12, 2))
        draw.rectangle((x, y, x + 11, y + 11), fill=COLORS[color])
        labels[color] = 1
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue(), labels


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, s3_client) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tunedata")
    bucket = "t-local-tuning"
    s3.ensure_bucket(s3_client, bucket)
    for split, ids in (("train", range(N_TRAIN)), ("validation", range(N_TRAIN, N_IMAGES))):
        write_records(root / split, split, ids, _render)
        upload_folder(s3_client, root / split, bucket, f"data/{split}")
    return {"bucket": bucket, "train": f"s3://{bucket}/data/train/", "validation": f"s3://{bucket}/data/validation/"}


def _request(dataset, run_key: str, *, ranges=None, train_uri: str | None = None, **options) -> dict:
    training = training_job_request(
        training_job_name("ic-tune", run_key),
        image_uri="local/image-classification",
        role_arn=ROLE,
        train_uri=train_uri or dataset["train"],
        validation_uri=dataset["validation"],
        output_uri=f"s3://{dataset['bucket']}/models",
        hyperparameters={
            "num_classes": len(COLORS),
            "num_training_samples": N_TRAIN,
            "multi_label": 1,
            "image_shape": f"3,{SIZE},{SIZE}",
            "num_layers": 20,
            "epochs": 1,
            "mini_batch_size": 16,
            "learning_rate": 0.05,
        },
        instance_type="ml.m5.large",
        max_runtime_s=600,
    )
    return tuning_job_request(tuning_job_name("ic-tune", run_key), training=training,
                              ranges=RANGES if ranges is None else ranges, **options)  # fmt: skip


def test_request_passes_botocore_validation(dataset):
    request = _request(dataset, "shape", strategy="Random", max_jobs=3, max_parallel=2, early_stopping="Auto",
                       random_seed=7)  # fmt: skip
    shape = SERVICE.operation_model("CreateHyperParameterTuningJob").input_shape
    report = ParamValidator().validate(request, shape)
    assert not report.has_errors(), report.generate_report()
    config = request["HyperParameterTuningJobConfig"]
    assert config["ParameterRanges"]["ContinuousParameterRanges"][0] == {
        "Name": "learning_rate", "MinValue": "0.001", "MaxValue": "0.2", "ScalingType": "Logarithmic",
    }  # fmt: skip
    assert config["ParameterRanges"]["CategoricalParameterRanges"] == [{"Name": "optimizer", "Values": ["sgd", "adam"]}]
    static = request["TrainingJobDefinition"]["StaticHyperParameters"]
    assert "learning_rate" not in static and "mini_batch_size" not in static and static["epochs"] == "1"
    validate_request(request)  # and the local backend accepts it


@pytest.mark.parametrize(
    ("ranges", "expected"),
    [
        ({"learning_rate": {"type": "Continuous", "min": 0.2, "max": 0.01}}, "min=0.2 is greater than max=0.01"),
        ({"learning_rat": {"type": "Continuous", "min": 0.01, "max": 0.2}}, "unknown hyperparameter 'learning_rat'"),
        ({"learning_rate": {"type": "Continuous", "min": 0.0, "max": 0.2, "scaling": "Logarithmic"}},
         r"Logarithmic needs MinValue > 0"),
        ({"momentum": {"type": "Continuous", "min": 0.5, "max": 1.0, "scaling": "ReverseLogarithmic"}},
         r"ReverseLogarithmic needs 0 ≤ MinValue ≤ MaxValue < 1"),
        ({"learning_rate": {"type": "Continuous", "min": 0.01, "max": 2}},
         r"ContinuousParameterRanges\[0\] \(learning_rate\)\.MaxValue: hyperparameter learning_rate='2': expected a "
         r"float in \[0, 1\]"),
        ({"num_layers": [18, 19]}, r"CategoricalParameterRanges\[0\] \(num_layers\)\.Values: .*num_layers='19'"),
        ({"optimizer": ["sgd", "adagrad"]}, r"optimizer='adagrad': expected one of sgd, adam, rmsprop, nag"),
        ({"mini_batch_size": {"type": "Integer", "min": 8.5, "max": 32}}, "expected whole-number bounds"),
    ],
)  # fmt: skip
def test_invalid_ranges_fail_naming_the_field(dataset, ranges, expected):
    with pytest.raises(InputError, match=expected):
        validate_request(_request(dataset, "invalid", ranges=ranges))


def test_hand_edited_request_is_checked_too(dataset):
    request = _request(dataset, "edited")
    rng = request["HyperParameterTuningJobConfig"]["ParameterRanges"]["IntegerParameterRanges"][0]
    rng["MinValue"], rng["MaxValue"] = "64", "8"
    with pytest.raises(InputError, match=r"IntegerParameterRanges\[0\] \(mini_batch_size\): MinValue 64 is greater"):
        validate_request(request)
    request = _request(dataset, "edited", strategy="Random")
    request["HyperParameterTuningJobConfig"]["Strategy"] = "Hyperband"
    with pytest.raises(InputError, match="Strategy: 'Hyperband'"):
        validate_request(request)
    request = _request(dataset, "edited")
    request["TrainingJobDefinition"]["StaticHyperParameters"]["optimizer"] = "sgd"
    with pytest.raises(InputError, match="'optimizer' is also a StaticHyperParameter"):
        validate_request(request)


def test_random_search_is_reproducible_and_failed_trials_are_reported(dataset, s3_client, mxnet_python, tmp_path):
    """Trials whose data is missing fail at once (no trainer run), which shows the proposals and the all-failed path."""
    empty = f"s3://{dataset['bucket']}/nothing/"

    def tune(seed: int, workdir) -> dict:
        request = _request(dataset, "random", train_uri=empty, strategy="Random", max_jobs=4, random_seed=seed)
        return run_tuning_job(request, workdir=workdir, client=s3_client, mxnet_python=mxnet_python)

    first, again, other = tune(11, tmp_path / "a"), tune(11, tmp_path / "b"), tune(12, tmp_path / "c")
    proposals = [s["TunedHyperParameters"] for s in first["TrainingJobSummaries"]]
    assert proposals == [s["TunedHyperParameters"] for s in again["TrainingJobSummaries"]]
    assert proposals != [s["TunedHyperParameters"] for s in other["TrainingJobSummaries"]]
    assert len({tuple(sorted(p.items())) for p in proposals}) == 4
    for tuned in proposals:
        assert 0.001 <= float(tuned["learning_rate"]) <= 0.2
        assert 0.5 <= float(tuned["momentum"]) <= 0.99
        assert 8 <= int(tuned["mini_batch_size"]) <= 32
        assert tuned["optimizer"] in ("sgd", "adam")

    assert first["HyperParameterTuningJobStatus"] == "Failed"
    assert "BestTrainingJob" not in first
    assert first["TrainingJobStatusCounters"]["NonRetryableError"] == 4
    assert first["ObjectiveStatusCounters"] == {"Succeeded": 0, "Pending": 0, "Failed": 4}
    assert "no S3 objects found" in first["FailureReason"]
    name = first["HyperParameterTuningJobName"]
    assert [s["TrainingJobName"] for s in first["TrainingJobSummaries"]] == [
        trial_name(name, i + 1, tuned) for i, tuned in enumerate(proposals)
    ]
    assert all(re.fullmatch(rf"{name}-00\d-[0-9a-f]{{8}}", s["TrainingJobName"]) for s in first["TrainingJobSummaries"])


@pytest.mark.slow
@pytest.mark.mxnet
def test_tuning_runs_three_trials_and_picks_the_best(dataset, s3_client, mxnet_python, tmp_path):
    ranges = {
        "learning_rate": {"type": "Continuous", "min": 0.0001, "max": 0.5, "scaling": "Logarithmic"},
        "optimizer": ["sgd", "adam"],
    }
    request = _request(dataset, "best", ranges=ranges, strategy="Bayesian", max_jobs=3, max_parallel=2, random_seed=3,
                       objective_metric="validation:mAP")  # fmt: skip
    request["TrainingJobDefinition"]["StaticHyperParameters"]["epochs"] = "3"
    streamed: dict[str, list[str]] = {}
    describe = run_tuning_job(request, workdir=tmp_path, client=s3_client, mxnet_python=mxnet_python,
                              on_line=lambda job, line: streamed.setdefault(job, []).append(line))  # fmt: skip

    summaries = describe.pop("TrainingJobSummaries")
    assert len(summaries) == 3
    assert describe["HyperParameterTuningJobStatus"] == "Completed", describe.get("FailureReason")
    assert describe["TrainingJobStatusCounters"]["Completed"] == 3, [s.get("FailureReason") for s in summaries]
    assert describe["ObjectiveStatusCounters"] == {"Succeeded": 3, "Pending": 0, "Failed": 0}
    values = [s["FinalHyperParameterTuningJobObjectiveMetric"]["Value"] for s in summaries]
    best = describe["BestTrainingJob"]
    assert best["FinalHyperParameterTuningJobObjectiveMetric"] == {
        "Type": "Maximize", "MetricName": "validation:mAP", "Value": max(values),
    }  # fmt: skip
    assert best["TrainingJobName"] == summaries[values.index(max(values))]["TrainingJobName"]

    # A trial's objective is the value of the model it saved (its best-mAP epoch, logged as Saved-model), not its
    # last epoch's: the best trial is the one whose model.tar.gz is best.
    for summary in summaries:
        log = tmp_path / describe["HyperParameterTuningJobName"] / summary["TrainingJobName"] / "training.log"
        text = log.read_text()
        assert streamed[summary["TrainingJobName"]] == text.splitlines()  # on_line saw every line of every trial
        per_epoch = [float(v) for v in re.findall(r"Epoch\[\d+\] Validation-mAP=(\S+)", text)]
        saved = re.findall(r"Saved-model \(epoch (\d+)\) Validation-mAP=(\S+)", text)
        assert len(per_epoch) == 3 and len(saved) == 1
        epoch, value = int(saved[0][0]), float(saved[0][1])
        assert value == pytest.approx(max(per_epoch)) and per_epoch[epoch] == pytest.approx(value)
        assert summary["FinalHyperParameterTuningJobObjectiveMetric"]["Value"] == pytest.approx(value)
        assert set(summary["TunedHyperParameters"]) == {"learning_rate", "optimizer"}
        key = f"models/{summary['TrainingJobName']}/output/model.tar.gz"
        assert s3_client.head_object(Bucket=dataset["bucket"], Key=key)["ContentLength"] > 0

    # Shaped like DescribeHyperParameterTuningJob and ListTrainingJobsForHyperParameterTuningJob.
    out = SERVICE.operation_model("DescribeHyperParameterTuningJob").output_shape
    report = ParamValidator().validate(describe, out)
    assert not report.has_errors(), report.generate_report()
    listing = SERVICE.operation_model("ListTrainingJobsForHyperParameterTuningJob").output_shape
    report = ParamValidator().validate({"TrainingJobSummaries": summaries}, listing)
    assert not report.has_errors(), report.generate_report()


@pytest.mark.slow
@pytest.mark.mxnet
def test_auto_early_stopping_stops_the_trial_below_the_median(dataset, s3_client, mxnet_python, tmp_path):
    """Seed 10 proposes a good learning rate, then a bad one (asserted below). Trials run one at a time, so the bad
    one is judged at epoch 1 against the completed first trial, and stopped there, long before its 4 epochs end.
    (Two trials only: a second good trial would be judged against the first too, and may fall below it by noise.)"""
    good, bad = "0.005", "1e-07"  # 1e-07 leaves the network at its random start: its accuracy stays near chance
    request = _request(dataset, "early", ranges={"learning_rate": [good, bad]}, strategy="Random", max_jobs=2,
                       max_parallel=1, early_stopping="Auto", random_seed=10)  # fmt: skip
    request["TrainingJobDefinition"]["StaticHyperParameters"].update(epochs="4", mini_batch_size="8")
    assert request["HyperParameterTuningJobConfig"]["TrainingJobEarlyStoppingType"] == "Auto"
    describe = run_tuning_job(request, workdir=tmp_path, client=s3_client, mxnet_python=mxnet_python)

    summaries = describe["TrainingJobSummaries"]
    assert [s["TunedHyperParameters"]["learning_rate"] for s in summaries] == [good, bad]
    assert [s["TrainingJobStatus"] for s in summaries] == ["Completed", "Stopped"], [
        s.get("FailureReason") for s in summaries
    ]
    assert describe["HyperParameterTuningJobStatus"] == "Completed"
    assert describe["TrainingJobStatusCounters"] == {
        "Completed": 1, "InProgress": 0, "RetryableError": 0, "NonRetryableError": 0, "Stopped": 1,
    }  # fmt: skip
    assert describe["ObjectiveStatusCounters"] == {"Succeeded": 2, "Pending": 0, "Failed": 0}

    root = tmp_path / describe["HyperParameterTuningJobName"]
    first, stopped = (s["TrainingJobName"] for s in summaries)
    logs = {job: (root / job / "training.log").read_text() for job in (first, stopped)}
    values = {job: [float(v) for v in re.findall(r"Epoch\[\d+\] Validation-accuracy=(\S+)", text)]
              for job, text in logs.items()}  # fmt: skip
    assert len(values[first]) == 4
    # Stopped once the pruner judged epoch 1 below the first trial's value there (the stop lands asynchronously: on a
    # busy machine a short epoch more may finish first), before its 4 epochs end; the trainer saved the best model so
    # far (by mAP, a multi-label job), and the objective is that saved model's accuracy.
    assert 2 <= len(values[stopped]) < 4, values
    assert max(values[stopped]) < values[first][1]
    assert "Stop requested (SIGTERM)" in logs[stopped]
    saved = [float(v) for v in re.findall(r"Saved-model \(epoch \d+\) Validation-accuracy=(\S+)", logs[stopped])]
    assert len(saved) == 1 and saved[0] in values[stopped]
    assert summaries[1]["FinalHyperParameterTuningJobObjectiveMetric"]["Value"] == pytest.approx(saved[0])
    key = f"models/{stopped}/output/model.tar.gz"
    assert s3_client.head_object(Bucket=dataset["bucket"], Key=key)["ContentLength"] > 0
    assert describe["BestTrainingJob"]["TrainingJobName"] == first
    out = SERVICE.operation_model("DescribeHyperParameterTuningJob").output_shape
    report = ParamValidator().validate({k: v for k, v in describe.items() if k != "TrainingJobSummaries"}, out)
    assert not report.has_errors(), report.generate_report()


def test_a_trial_is_ranked_by_the_model_it_saved_not_its_last_epoch():
    """Trial a's last epoch looks best, but the model it saved is worse than b's: b is the best trial. (The real
    trainer logs both values; this pins the rule on the summary itself, where a last-epoch reading would rank a.)"""
    from tagflow.local.tuner import _summary

    objective = {"Type": "Maximize", "MetricName": "validation:mAP"}

    def trial(name: str, last: float, saved: float) -> dict:
        describe = {
            "TrainingJobName": name, "TrainingJobArn": f"arn:{name}", "TrainingJobStatus": "Completed",
            "CreationTime": "2026-01-01T00:00:00Z",
            "FinalMetricDataList": [
                {"MetricName": "validation:mAP", "Value": last},
                {"MetricName": "saved-model:validation:mAP", "Value": saved},
            ],
        }  # fmt: skip
        return _summary("t", describe, {}, objective)

    a, b = trial("t-001", last=0.9, saved=0.5), trial("t-002", last=0.6, saved=0.7)
    assert a["FinalHyperParameterTuningJobObjectiveMetric"]["Value"] == 0.5
    assert b["FinalHyperParameterTuningJobObjectiveMetric"]["Value"] == 0.7
    # An objective already naming the saved model, or a describe without saved-model values, is read as is.
    c = _summary("t", {**a, "TrainingJobStatus": "Completed", "FinalMetricDataList": [
        {"MetricName": "validation:mAP", "Value": 0.4}]}, {}, objective)  # fmt: skip
    assert c["FinalHyperParameterTuningJobObjectiveMetric"]["Value"] == 0.4
