"""The CreateTrainingJob request builder, checked against botocore's real SageMaker service model."""

from __future__ import annotations

import re

import botocore.session
import pytest
from botocore.validate import ParamValidator

from tagflow.errors import InputError
from tagflow.sagemaker_config import (
    TRAINING_NAME_MAX,
    TUNING_NAME_MAX,
    hyperparameter_strings,
    training_job_name,
    training_job_request,
    tuning_job_name,
)

ROLE = "arn:aws:iam::123456789012:role/tagflow-training"
IMAGE = "811284229777.dkr.ecr.us-east-1.amazonaws.com/image-classification:1"


@pytest.fixture(scope="module")
def sagemaker_model():
    return botocore.session.get_session().get_service_model("sagemaker")


def _request(**overrides):
    args = {
        "image_uri": IMAGE,
        "role_arn": ROLE,
        "train_uri": "s3://bucket/packed/train/",
        "validation_uri": "s3://bucket/packed/val/",
        "output_uri": "s3://bucket/models",
        "hyperparameters": {
            "num_classes": 50,
            "num_training_samples": 900,
            "multi_label": 1,
            "image_shape": (3, 96, 96),
            "learning_rate": 0.05,
            "early_stopping": True,
            "lr_scheduler_step": [10, 20],
            "augmentation_type": None,
        },
        "instance_type": "ml.p3.2xlarge",
        "instance_count": 1,
        "volume_gb": 50,
        "max_runtime_s": 3600,
    }
    args.update(overrides)
    return training_job_request(training_job_name("tagflow", "scheduled__2024-05-01T00:00:00+00:00"), **args)


def test_request_is_valid_for_botocore(sagemaker_model):
    request = _request()
    shape = sagemaker_model.operation_model("CreateTrainingJob").input_shape
    report = ParamValidator().validate(request, shape)
    assert not report.has_errors(), report.generate_report()
    assert request["AlgorithmSpecification"] == {"TrainingImage": IMAGE, "TrainingInputMode": "File"}
    channels = {c["ChannelName"]: c for c in request["InputDataConfig"]}
    assert set(channels) == {"train", "validation"}
    assert channels["validation"]["DataSource"]["S3DataSource"]["S3Uri"] == "s3://bucket/packed/val/"
    assert all(c["ContentType"] == "application/x-recordio" for c in channels.values())
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600}
    assert request["ResourceConfig"] == {"InstanceType": "ml.p3.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 50}
    name_pattern = shape.members["TrainingJobName"].metadata["pattern"]
    assert re.fullmatch(name_pattern, request["TrainingJobName"])


def test_hyperparameters_become_strings():
    hp = _request()["HyperParameters"]
    assert hp == {
        "num_classes": "50",
        "num_training_samples": "900",
        "multi_label": "1",
        "image_shape": "3,96,96",
        "learning_rate": "0.05",
        "early_stopping": "True",
        "lr_scheduler_step": "10,20",
    }
    with pytest.raises(InputError, match=r"HyperParameters\.weights"):
        hyperparameter_strings({"weights": {"a": 1}})


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"role_arn": "not-an-arn"}, "RoleArn"),
        ({"train_uri": "bucket/train"}, "train"),
        ({"output_uri": "http://x"}, "OutputDataConfig.S3OutputPath"),
        ({"max_runtime_s": 0}, "StoppingCondition.MaxRuntimeInSeconds"),
        ({"instance_count": 0}, "ResourceConfig.InstanceCount"),
    ],
)
def test_bad_arguments_name_the_field(override, field):
    with pytest.raises(InputError, match=re.escape(field)):
        _request(**override)


def test_bad_job_name_is_rejected():
    with pytest.raises(InputError, match="TrainingJobName"):
        training_job_request("-bad_name", **{k: v for k, v in _kwargs().items()})


def _kwargs():
    return {
        "image_uri": IMAGE,
        "role_arn": ROLE,
        "train_uri": "s3://b/t/",
        "validation_uri": "s3://b/v/",
        "output_uri": "s3://b/o",
        "hyperparameters": {"num_classes": 2, "num_training_samples": 10},
    }


def test_job_names_are_deterministic_distinct_and_within_limits(sagemaker_model):
    training_pattern = sagemaker_model.operation_model("CreateTrainingJob").input_shape.members["TrainingJobName"]
    tuning_shape = sagemaker_model.operation_model("CreateHyperParameterTuningJob").input_shape
    tuning_pattern = tuning_shape.members["HyperParameterTuningJobName"].metadata["pattern"]
    keys = ["manual__2024-05-01T10:00:00+00:00", "manual__2024-05-01T10:00:00.000001+00:00", "x" * 300, "_", "ü"]
    names = [training_job_name("tagflow-image-classification-with-a-long-prefix", k) for k in keys]
    tunings = [tuning_job_name("tagflow-tune-with-a-long-prefix", k) for k in keys]
    assert len(set(names)) == len(keys) and len(set(tunings)) == len(keys)
    for name in names:
        assert len(name) <= TRAINING_NAME_MAX
        assert re.fullmatch(training_pattern.metadata["pattern"], name), name
    for name in tunings:
        assert len(name) <= TUNING_NAME_MAX
        assert re.fullmatch(tuning_pattern, name), name
    assert training_job_name("tagflow", keys[0]) == training_job_name("tagflow", keys[0])
    assert training_job_name("tagflow", "2024-05-01").startswith("tagflow-2024-05-01-")
