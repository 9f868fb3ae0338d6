"""Requests from a run's config and its packed data; candidates from finished jobs; which earlier job a retry adopts."""

from __future__ import annotations

import hashlib

import pytest

from tagflow import jobs, runconfig
from tagflow.errors import InputError, TagflowError

MANIFEST = {"num_labels": 50, "counts": {"train": 1800, "val": 200}, "pack_params": {"resize": 96}}
ROLE = "arn:aws:iam::123456789012:role/tagflow"
IMAGE = "811284229777.dkr.ecr.us-east-1.amazonaws.com/image-classification:1"


def test_the_packed_data_decides_classes_samples_and_shape():
    cfg = runconfig.resolve({"hyperparameters": {"epochs": 3, "learning_rate": 0.05}})
    request = jobs.training_request(cfg, MANIFEST, job_name="tagflow-x", image_uri=IMAGE, role_arn=ROLE)
    assert request["HyperParameters"] == {
        "epochs": "3",
        "learning_rate": "0.05",
        "num_classes": "50",
        "num_training_samples": "1800",
        "multi_label": "1",
        "image_shape": "3,96,96",
    }
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in request["InputDataConfig"]}
    assert channels == {
        "train": "s3://tagflow-data/50-label-rs96/training/train.rec",
        "validation": "s3://tagflow-data/50-label-rs96/validation/val.rec",
    }
    assert request["OutputDataConfig"]["S3OutputPath"] == "s3://tagflow-data/50-label-rs96/output"


def test_a_tuning_request_tunes_the_form_ranges_around_the_training_request():
    cfg = runconfig.resolve({"mode": "tune", "max_jobs": 6, "max_parallel_jobs": 2})
    request = jobs.tuning_request(cfg, MANIFEST, tuning_name="tagflow-t", image_uri=IMAGE, role_arn=ROLE)
    config = request["HyperParameterTuningJobConfig"]
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 6, "MaxParallelTrainingJobs": 2}
    static = request["TrainingJobDefinition"]["StaticHyperParameters"]
    assert "learning_rate" not in static and "mini_batch_size" not in static
    assert static["num_classes"] == "50"


def test_names_are_deterministic_per_run_and_try_and_within_limits():
    first, again, retry = (jobs.job_names("scheduled__2026-11-01T00:00:00+00:00", t) for t in (1, 1, 2))
    assert first == again
    assert first["training"] != retry["training"] and first["tuning"] != retry["tuning"]
    assert len(first["training"]) <= 63 and len(first["tuning"]) <= 32


@pytest.mark.parametrize(
    ("earlier", "adopted"),
    [
        ([], None),
        ([("t1", "Failed")], None),
        ([("t1", "Stopped"), ("t2", "Failed")], None),
        ([("t1", "Completed")], "t1"),
        ([("t1", "InProgress"), ("t2", "Failed")], "t1"),
        ([("t1", "Completed"), ("t2", "InProgress")], "t2"),
    ],
)
def test_a_retry_adopts_a_live_or_finished_job_never_a_failed_one(earlier, adopted):
    assert jobs.adoptable(earlier) == adopted


def test_a_failed_job_raises_with_sagemakers_failure_reason():
    describe = {"TrainingJobName": "j", "TrainingJobStatus": "Failed", "FailureReason": "AlgorithmError: boom"}
    with pytest.raises(TagflowError, match="training job j Failed: AlgorithmError: boom"):
        jobs.candidate({"Training": describe}, "validation:accuracy")


def test_candidates_from_training_and_tuning_results():
    training = {
        "TrainingJobName": "j",
        "TrainingJobStatus": "Completed",
        "ModelArtifacts": {"S3ModelArtifacts": "s3://b/p/output/j/output/model.tar.gz"},
        "FinalMetricDataList": [{"MetricName": "validation:accuracy", "Value": 0.8}],
    }
    assert jobs.candidate({"Training": training}, "validation:accuracy") == {
        "job": "j",
        "model_data_url": "s3://b/p/output/j/output/model.tar.gz",
        "metric": "validation:accuracy",
        "value": 0.8,
        "value_of": "last epoch",  # the built-in reports no saved-model:* values
        "saved_model": None,
        "last_epoch": {"epoch": None, "metrics": {"validation:accuracy": 0.8}},
    }
    tuning = {
        "HyperParameterTuningJobName": "t",
        "HyperParameterTuningJobStatus": "Completed",
        "HyperParameterTuningJobConfig": {"HyperParameterTuningJobObjective": {"MetricName": "validation:accuracy"}},
        "TrainingJobDefinition": {"OutputDataConfig": {"S3OutputPath": "s3://b/p/output/"}},
        "BestTrainingJob": {
            "TrainingJobName": "t-003",
            "TunedHyperParameters": {"learning_rate": "0.02"},
            "FinalHyperParameterTuningJobObjectiveMetric": {"MetricName": "validation:accuracy", "Value": 0.7},
        },
    }
    best = jobs.candidate({"Tuning": tuning}, "validation:accuracy")
    assert best["model_data_url"] == "s3://b/p/output/t-003/output/model.tar.gz"
    assert (best["value"], best["tuning_job"]) == (0.7, "t")


def test_a_batch_larger_than_a_split_is_refused_before_any_job_starts():
    cfg = runconfig.resolve({"hyperparameters": {"mini_batch_size": 64}})
    small = {**MANIFEST, "counts": {"train": 540, "val": 60}}
    with pytest.raises(InputError, match=r"mini_batch_size: 64 is more than the 60 val images of s3://tagflow-data/"):
        jobs.training_request(cfg, small, job_name="j", image_uri=IMAGE, role_arn=ROLE)
    tuned = runconfig.resolve({"mode": "tune", "tuning_ranges": {"mini_batch_size": [16, 32]}})
    assert jobs.tuning_request(tuned, small, tuning_name="t", image_uri=IMAGE, role_arn=ROLE)


def test_one_builder_with_the_data_winning_unless_the_override_is_asked_for():
    """The DAG and the CLI build through jobs.dataset_request: the manifest's values win over the form's (which
    refuses those names anyway); the CLI's --hp replaces them only because it passes override_data."""
    build = {"job_name": "j", "image_uri": IMAGE, "role_arn": ROLE, "instance_type": "ml.m5.large",
             "max_runtime_s": 60}  # fmt: skip
    asked = {"num_training_samples": 100, "epochs": 2}
    dag = jobs.dataset_request("s3://b/ds", MANIFEST, asked, **build)["HyperParameters"]
    cli = jobs.dataset_request("s3://b/ds", MANIFEST, asked, override_data=True, **build)["HyperParameters"]
    assert (dag["num_training_samples"], cli["num_training_samples"]) == ("1800", "100")
    assert dag["epochs"] == cli["epochs"] == "2" and dag["num_classes"] == cli["num_classes"] == "50"
    small = {**MANIFEST, "counts": {"train": 540, "val": 60}}
    with pytest.raises(InputError, match=r"mini_batch_size: 64 is more than the 60 val images of s3://b/ds"):
        jobs.dataset_request("s3://b/ds", small, {"mini_batch_size": 64}, override_data=True, **build)
    assert jobs.dataset_request("s3://b/ds", small, {"mini_batch_size": 64}, check_batch_size=False, **build)


def test_a_local_job_is_judged_by_the_model_it_saved_not_its_last_epoch():
    describe = {
        "TrainingJobName": "j",
        "TrainingJobStatus": "Completed",
        "ModelArtifacts": {"S3ModelArtifacts": "s3://b/m.tar.gz"},
        "FinalMetricDataList": [
            {"MetricName": "validation:accuracy", "Value": 0.71},  # the last epoch
            {"MetricName": "saved-model:validation:accuracy", "Value": 0.74},  # the best epoch, in model.tar.gz
            {"MetricName": "epoch", "Value": 4.0},
            {"MetricName": "saved-model:epoch", "Value": 2.0},
        ],
    }
    found = jobs.candidate({"Training": describe}, "validation:accuracy")
    assert (found["value"], found["value_of"]) == (0.74, "saved model")
    assert found["saved_model"] == {"epoch": 2, "metrics": {"validation:accuracy": 0.74}}
    assert found["last_epoch"] == {"epoch": 4, "metrics": {"validation:accuracy": 0.71}}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"hyperparameters": {"epochs": "ten"}}, "hyperparameters: hyperparameter epochs='ten': expected a positive"),
        ({"hyperparameters": {"num_layers": 17}}, "hyperparameter num_layers='17': expected one of 18, 34"),
        ({"hyperparameters": {"optimiser": "sgd"}}, "unknown hyperparameter(s) 'optimiser'"),
        (
            {"mode": "tune", "tuning_ranges": {"learning_rate": {"type": "Bogus", "min": 0.01, "max": 0.1}}},
            "ParameterRanges.learning_rate.type: 'Bogus': Continuous or Integer",
        ),
        ({"mode": "tune", "tuning_ranges": {"optimizer": ["sgd", "adamw"]}}, "optimizer='adamw': expected one of"),
        (
            {"mode": "tune", "tuning_ranges": {"learning_rate": {"type": "Continuous", "min": 0.01, "max": 2}}},
            "learning_rate='2': expected a float in [0, 1]",
        ),
    ],
)
def test_preflight_refuses_what_the_training_task_would_with_the_same_message(params, message):
    cfg = runconfig.resolve(params)
    with pytest.raises(InputError) as err:
        jobs.preflight(cfg)
    assert message in str(err.value)


@pytest.mark.parametrize("params", [{}, {"mode": "tune"}, {"backend": "sagemaker"}, {"preset": "ic-multi-label"}])
def test_preflight_accepts_the_defaults_of_both_modes_backends_and_presets(params):
    cfg = runconfig.resolve(params)
    checked = jobs.preflight(cfg)
    hyperparameters = checked.get("HyperParameters") or checked["TrainingJobDefinition"]["StaticHyperParameters"]
    assert hyperparameters["num_classes"] == str(cfg.num_labels)
    assert hyperparameters["image_shape"] == f"3,{cfg.resize},{cfg.resize}"


def test_the_forms_pixel_limit_reaches_the_packer():
    from tagflow.pack import PackParams

    assert runconfig.resolve({}).dataset_spec().pack.max_pixels == PackParams().max_pixels
    assert runconfig.resolve({"max_pixels": 1_000_000}).dataset_spec().pack.max_pixels == 1_000_000


def _published(s3_client, bucket: str, train: bytes, val: bytes, names: list[str]) -> tuple[str, dict]:
    """Record files as publish leaves them (s3.put_file records each one's sha256) and their manifest."""
    import tempfile
    from pathlib import Path

    from tagflow import s3

    with tempfile.TemporaryDirectory() as tmp:
        for split, folder, body in (("train", "training", train), ("val", "validation", val)):
            path = Path(tmp) / f"{split}.rec"
            path.write_bytes(body)
            s3.put_file(s3_client, path, s3.S3Uri(bucket, f"ds/{folder}/{split}.rec"))
    return f"s3://{bucket}/ds", {"num_labels": len(names), "label_names": names, "counts": {"train": 9, "val": 1}}


def test_the_dataset_digest_changes_with_any_record_or_label_name_and_not_with_a_republish(s3_client, bucket):
    uri, manifest = _published(s3_client, bucket, b"train-1", b"val-1", ["a", "b"])
    first = jobs.dataset_digest(uri, manifest, s3_client)
    assert first["records"]["train"] == hashlib.sha256(b"train-1").hexdigest()
    _published(s3_client, bucket, b"train-1", b"val-1", ["a", "b"])
    assert jobs.dataset_digest(uri, manifest, s3_client)["digest"] == first["digest"]
    renamed = {**manifest, "label_names": ["a", "c"]}
    assert jobs.dataset_digest(uri, renamed, s3_client)["digest"] != first["digest"]
    _published(s3_client, bucket, b"train-1", b"val-2", ["a", "b"])
    assert jobs.dataset_digest(uri, manifest, s3_client)["digest"] != first["digest"]


def test_lineage_lives_beside_the_model_and_a_scheduled_run_with_nothing_new_does_not_train(s3_client, bucket):
    uri, manifest = _published(s3_client, bucket, b"t", b"v", ["a", "b"])
    cfg = runconfig.resolve({"bucket": bucket, "dataset_prefix": "ds"})
    current = jobs.lineage(cfg, jobs.dataset_digest(uri, manifest, s3_client))
    model = f"{uri}/output/tagflow-job-1/output/model.tar.gz"
    assert str(jobs.lineage_uri(model)) == f"{uri}/output/tagflow-job-1/lineage.json"
    assert jobs.lineage_uri("/tmp/model.tar.gz") is None
    assert jobs.read_lineage(model, s3_client) is None  # not written yet: nothing is known unchanged
    assert jobs.write_lineage(current, model, s3_client) == f"{uri}/output/tagflow-job-1/lineage.json"
    serving = jobs.read_lineage(model, s3_client)
    assert serving["model"] == model and serving["dataset"]["digest"] == current["dataset"]["digest"]

    def decide(run_type: str, now=current, force=False, model=model, serving=serving):
        return jobs.training_decision(run_type, force=force, current=now, serving_model=model, serving=serving)

    for run_type in ("scheduled", "backfill"):
        decision = decide(run_type)
        assert decision["train"] is False and decision["reason"].startswith(f"nothing new since {model}")
    assert decide("manual")["train"] is True
    assert decide("scheduled", force=True) == {"train": True, "reason": "force_training is on"}
    assert decide("scheduled", model=None, serving=None)["reason"] == "no model is serving"
    assert "has no recorded lineage" in decide("scheduled", serving=None)["reason"]
    more_epochs = jobs.lineage(
        runconfig.resolve({"hyperparameters": {**runconfig.DEFAULT_HYPERPARAMETERS, "epochs": 21}}),
        current["dataset"],
    )
    changed = decide("scheduled", now=more_epochs)
    assert changed["train"] is True and "hyperparameters.epochs: 20 → 21" in changed["reason"]
    _published(s3_client, bucket, b"t2", b"v", ["a", "b"])
    grown = jobs.lineage(cfg, jobs.dataset_digest(uri, manifest, s3_client))
    assert decide("scheduled", now=grown)["train"] is True
    assert "the dataset changed" in decide("scheduled", now=grown)["reason"]


def test_the_evaluation_batch_fits_a_small_validation_split():
    from tagflow.evaluate import DEFAULT_BATCH_SIZE

    assert jobs.evaluation_batch_size({"counts": {"val": 5}}) == 5
    assert jobs.evaluation_batch_size({"counts": {"val": 10_000}}) == DEFAULT_BATCH_SIZE
    assert jobs.evaluation_batch_size({}) == DEFAULT_BATCH_SIZE
