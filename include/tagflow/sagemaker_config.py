"""SageMaker request builders shared by both backends: AWS and the local algorithm environment.

`training_job_request` returns the exact dict boto3's `create_training_job(**request)` takes; the local runner
(`tagflow.local.runner.run_training_job`) takes the same dict, so a job description is written once. Job names are
deterministic per (prefix, run key), within SageMaker's limits (training 63, tuning 32 characters,
`[a-zA-Z0-9](-*[a-zA-Z0-9])*`), so a re-run of the same Airflow run finds its own job instead of starting another.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from tagflow import names
from tagflow.errors import InputError
from tagflow.layout import DatasetLayout
from tagflow.local import REPO
from tagflow.s3 import S3Uri

RECORDIO = "application/x-recordio"
CHANNELS = ("train", "validation")
TRAINING_NAME_MAX = 63
TUNING_NAME_MAX = 32
_NAME_RE = re.compile(names.SAGEMAKER_NAME)
_ROLE_RE = re.compile(r"arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+")

# The built-in image-classification algorithm's metric regexes (what SageMaker fills into MetricDefinitions for it);
# the local trainer logs the same lines, so the local runner reads its metrics with these very patterns.
METRIC_DEFINITIONS: tuple[dict[str, str], ...] = (
    {"Name": "train:accuracy", "Regex": r"Epoch\S* Train-accuracy=(\S*)"},
    {"Name": "validation:accuracy", "Regex": r"Epoch\S* Validation-accuracy=(\S*)"},
    {"Name": "train:accuracy:epoch", "Regex": r"Epoch\S* Train-accuracy=(\S*)"},
    {"Name": "validation:accuracy:epoch", "Regex": r"Epoch\S* Validation-accuracy=(\S*)"},
)
# Extra metrics only the local trainer logs (multi-label quality the built-in does not report).
LOCAL_METRIC_DEFINITIONS: tuple[dict[str, str], ...] = (
    {"Name": "validation:mAP", "Regex": r"Epoch\S* Validation-mAP=(\S*)"},
    {"Name": "validation:micro_f1", "Regex": r"Epoch\S* Validation-micro_f1=(\S*)"},
    {"Name": "validation:macro_f1", "Regex": r"Epoch\S* Validation-macro_f1=(\S*)"},
    # the saved (best-epoch) model's values, logged once at the end: what the deploy gate judges
    {"Name": "saved-model:validation:accuracy", "Regex": r"Saved-model \(epoch \d+\) Validation-accuracy=(\S*)"},
    {"Name": "saved-model:validation:mAP", "Regex": r"Saved-model \(epoch \d+\) Validation-mAP=(\S*)"},
    {"Name": "saved-model:validation:micro_f1", "Regex": r"Saved-model \(epoch \d+\) Validation-micro_f1=(\S*)"},
    {"Name": "saved-model:validation:macro_f1", "Regex": r"Saved-model \(epoch \d+\) Validation-macro_f1=(\S*)"},
)


def _slug(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-zA-Z0-9]+", "-", text)).strip("-")


def job_name(prefix: str, run_key: str, *, max_len: int = TRAINING_NAME_MAX) -> str:
    """`PREFIX-RUNKEY-HASH8` cut to `max_len`: readable, and distinct for distinct keys (hash of the raw key).

    `run_key` is whatever identifies the run (an Airflow run ID, a date, a trial number).
    """
    digest = hashlib.sha256(f"{prefix}\0{run_key}".encode()).hexdigest()[:8]
    head = _slug(f"{_slug(prefix)}-{_slug(run_key)}")
    room = max_len - len(digest) - 1
    if room < 1:
        raise InputError(f"job name limit {max_len}: too short for a name with an 8-character hash")
    head = head[:room].rstrip("-")
    name = f"{head}-{digest}" if head else digest
    if not name[0].isalnum():
        name = name.lstrip("-")
    return name


def training_job_name(prefix: str, run_key: str) -> str:
    """A CreateTrainingJob name (≤ 63 characters)."""
    return job_name(prefix, run_key, max_len=TRAINING_NAME_MAX)


def tuning_job_name(prefix: str, run_key: str) -> str:
    """A CreateHyperParameterTuningJob name (≤ 32 characters)."""
    return job_name(prefix, run_key, max_len=TUNING_NAME_MAX)


def hyperparameter_strings(hyperparameters: Mapping[str, Any]) -> dict[str, str]:
    """Hyperparameters as SageMaker passes them: every value a string; None means "use the default" and is left out.

    Booleans become `True`/`False` (the built-in's `early_stopping` spelling), sequences `a,b,c` (`image_shape`,
    `lr_scheduler_step`).
    """
    out: dict[str, str] = {}
    for name, value in hyperparameters.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = str(value)
        elif isinstance(value, (list, tuple)):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, (str, int, float)):
            text = str(value)
        else:
            raise InputError(
                f"HyperParameters.{name}: {value!r} is a {type(value).__name__}; expected str, number or list"
            )
        if len(name) > 256 or len(text) > 2500:
            raise InputError(f"HyperParameters.{name}: names are limited to 256 and values to 2,500 characters")
        out[str(name)] = text
    return out


HYPERPARAMS_SPEC = REPO / "algo" / "ic_hyperparams.py"


@functools.cache
def hyperparameter_spec() -> ModuleType:
    """The built-in algorithm's hyperparameter rules (algo/ic_hyperparams.py), loaded as plain Python: it imports
    neither MXNet nor tagflow, so the trainer, the tuner and a run's first task judge hyperparameters alike."""
    path = HYPERPARAMS_SPEC
    name = "tagflow_algo_ic_hyperparams"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InputError(f"cannot load the algorithm's hyperparameter spec {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def check_hyperparameters(hyperparameters: Mapping[str, str], where: str = "HyperParameters") -> None:
    """InputError with the algorithm's own message (the name, the value, what is valid) unless the built-in would
    accept these string hyperparameters."""
    spec = hyperparameter_spec()
    try:
        spec.parse(dict(hyperparameters))
    except spec.HyperparameterError as err:
        raise InputError(f"{where}: {err}") from None


def _check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise InputError(f"{field}: {message}")


def training_job_request(
    job_name: str,
    *,
    image_uri: str,
    role_arn: str,
    train_uri: str,
    validation_uri: str,
    output_uri: str,
    hyperparameters: Mapping[str, Any],
    instance_type: str = "ml.p3.2xlarge",
    instance_count: int = 1,
    volume_gb: int = 50,
    max_runtime_s: int = 86_400,
) -> dict[str, Any]:
    """A CreateTrainingJob request for the built-in image-classification algorithm on RecordIO channels.

    File input mode, channels `train` and `validation` (S3Prefix, FullyReplicated, application/x-recordio). The
    model lands at `output_uri/JOB_NAME/output/model.tar.gz`, on SageMaker and locally alike.
    """
    _check(
        1 <= len(job_name) <= TRAINING_NAME_MAX and _NAME_RE.fullmatch(job_name) is not None,
        "TrainingJobName",
        f"{job_name!r} must be 1-{TRAINING_NAME_MAX} letters, digits and inner hyphens (see training_job_name)",
    )
    _check(_ROLE_RE.fullmatch(role_arn) is not None, "RoleArn", f"{role_arn!r} is not an IAM role ARN")
    _check(bool(image_uri), "AlgorithmSpecification.TrainingImage", "empty image URI")
    for field, uri in (
        ("train", train_uri),
        ("validation", validation_uri),
        ("OutputDataConfig.S3OutputPath", output_uri),
    ):
        try:
            S3Uri.parse(uri)
        except InputError as err:
            raise InputError(f"{field}: {err}") from None
    _check(isinstance(instance_count, int) and instance_count >= 1, "ResourceConfig.InstanceCount", "expected ≥ 1")
    _check(isinstance(volume_gb, int) and volume_gb >= 1, "ResourceConfig.VolumeSizeInGB", "expected ≥ 1")
    _check(
        isinstance(max_runtime_s, int) and max_runtime_s >= 1,
        "StoppingCondition.MaxRuntimeInSeconds",
        f"{max_runtime_s!r}: expected a whole number of seconds ≥ 1",
    )
    channels = [
        {
            "ChannelName": name,
            "DataSource": {
                "S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}
            },
            "ContentType": RECORDIO,
            "CompressionType": "None",
            "InputMode": "File",
        }
        for name, uri in zip(CHANNELS, (train_uri, validation_uri), strict=True)
    ]
    return {
        "TrainingJobName": job_name,
        "AlgorithmSpecification": {"TrainingImage": image_uri, "TrainingInputMode": "File"},
        "RoleArn": role_arn,
        "HyperParameters": hyperparameter_strings(hyperparameters),
        "InputDataConfig": channels,
        "OutputDataConfig": {"S3OutputPath": output_uri},
        "ResourceConfig": {"InstanceType": instance_type, "InstanceCount": instance_count, "VolumeSizeInGB": volume_gb},
        "StoppingCondition": {"MaxRuntimeInSeconds": max_runtime_s},
    }


# --- hyperparameter tuning -------------------------------------------------------------------------------------

TUNING_STRATEGIES = ("Bayesian", "Random")
SCALING_TYPES = ("Auto", "Linear", "Logarithmic", "ReverseLogarithmic")
EARLY_STOPPING_TYPES = ("Off", "Auto")


def parameter_ranges(ranges: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """SageMaker's ParameterRanges from `{name: spec}`.

    A spec is a list of values (Categorical) or a mapping `{"type": "Continuous" | "Integer", "min": ..,
    "max": .., "scaling": "Auto" | "Linear" | "Logarithmic" | "ReverseLogarithmic"}` (scaling defaults to Auto).
    Values become strings, as the API wants them.
    """
    out: dict[str, list[dict[str, Any]]] = {
        "IntegerParameterRanges": [],
        "ContinuousParameterRanges": [],
        "CategoricalParameterRanges": [],
    }
    for name, spec in ranges.items():
        if isinstance(spec, (list, tuple)):
            _check(len(spec) >= 1, f"ParameterRanges.{name}", "a categorical range needs at least one value")
            values = [hyperparameter_strings({name: value})[name] for value in spec]
            out["CategoricalParameterRanges"].append({"Name": name, "Values": values})
            continue
        _check(isinstance(spec, Mapping), f"ParameterRanges.{name}", f"{spec!r}: expected a list or a mapping")
        kind = spec.get("type")
        _check(kind in ("Continuous", "Integer"), f"ParameterRanges.{name}.type", f"{kind!r}: Continuous or Integer")
        scaling = spec.get("scaling", "Auto")
        _check(scaling in SCALING_TYPES, f"ParameterRanges.{name}.scaling", f"{scaling!r}: one of {SCALING_TYPES}")
        low, high = spec.get("min"), spec.get("max")
        _check(
            all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)),
            f"ParameterRanges.{name}",
            f"min={low!r}, max={high!r}: expected numbers",
        )
        _check(low <= high, f"ParameterRanges.{name}", f"min={low!r} is greater than max={high!r}")
        if kind == "Integer":
            _check(int(low) == low and int(high) == high, f"ParameterRanges.{name}", "expected whole-number bounds")
            low, high = int(low), int(high)
        out[f"{kind}ParameterRanges"].append(
            {"Name": name, "MinValue": str(low), "MaxValue": str(high), "ScalingType": scaling}
        )
    return out


def tuning_job_request(
    tuning_name: str,
    *,
    training: Mapping[str, Any],
    ranges: Mapping[str, Any],
    strategy: str = "Bayesian",
    max_jobs: int = 10,
    max_parallel: int = 1,
    early_stopping: str = "Off",
    objective_metric: str = "validation:accuracy",
    objective_type: str = "Maximize",
    random_seed: int | None = None,
) -> dict[str, Any]:
    """A CreateHyperParameterTuningJob request tuning `ranges` around the `training` job (training_job_request's
    output): its hyperparameters not being tuned become StaticHyperParameters, its TrainingJobName is dropped
    (SageMaker names the trials). boto3's `create_hyperparameter_tuning_job(**request)` and the local
    `tagflow.local.tuner.run_tuning_job` take the same dict.
    """
    _check(
        1 <= len(tuning_name) <= TUNING_NAME_MAX and _NAME_RE.fullmatch(tuning_name) is not None,
        "HyperParameterTuningJobName",
        f"{tuning_name!r} must be 1-{TUNING_NAME_MAX} letters, digits and inner hyphens (see tuning_job_name)",
    )
    _check(strategy in TUNING_STRATEGIES, "Strategy", f"{strategy!r}: expected one of {TUNING_STRATEGIES}")
    _check(
        early_stopping in EARLY_STOPPING_TYPES,
        "TrainingJobEarlyStoppingType",
        f"{early_stopping!r}: expected one of {EARLY_STOPPING_TYPES}",
    )
    _check(objective_type in ("Maximize", "Minimize"), "HyperParameterTuningJobObjective.Type", "Maximize or Minimize")
    _check(isinstance(max_jobs, int) and max_jobs >= 1, "ResourceLimits.MaxNumberOfTrainingJobs", "expected ≥ 1")
    _check(
        isinstance(max_parallel, int) and max_parallel >= 1, "ResourceLimits.MaxParallelTrainingJobs", "expected ≥ 1"
    )
    _check(bool(ranges), "ParameterRanges", "nothing to tune: give at least one range")
    static = {k: v for k, v in training.get("HyperParameters", {}).items() if k not in ranges}
    definition: dict[str, Any] = {
        "StaticHyperParameters": static,
        "AlgorithmSpecification": dict(training["AlgorithmSpecification"]),
        "RoleArn": training["RoleArn"],
        "InputDataConfig": training["InputDataConfig"],
        "OutputDataConfig": training["OutputDataConfig"],
        "ResourceConfig": training["ResourceConfig"],
        "StoppingCondition": training["StoppingCondition"],
    }
    config: dict[str, Any] = {
        "Strategy": strategy,
        "HyperParameterTuningJobObjective": {"Type": objective_type, "MetricName": objective_metric},
        "ResourceLimits": {"MaxNumberOfTrainingJobs": max_jobs, "MaxParallelTrainingJobs": max_parallel},
        "ParameterRanges": parameter_ranges(ranges),
        "TrainingJobEarlyStoppingType": early_stopping,
    }
    if random_seed is not None:
        config["RandomSeed"] = random_seed
    return {
        "HyperParameterTuningJobName": tuning_name,
        "HyperParameterTuningJobConfig": config,
        "TrainingJobDefinition": definition,
    }


# --- from a packed dataset -------------------------------------------------------------------------------------

LOCAL_IMAGE_URI = "tagflow-local/image-classification:1"
LOCAL_ROLE_ARN = "arn:aws:iam::000000000000:role/tagflow-local"


def dataset_channels(dataset_uri: str) -> dict[str, str]:
    """The seed layout's channel and output URIs below `s3://BUCKET/PREFIX`.

    Each channel names its .rec object itself (an S3 prefix matching one key), so the .idx and manifest.json
    beside it are not handed to the algorithm as training data.
    """
    layout = DatasetLayout.of(dataset_uri)
    return {"train_uri": str(layout.train_rec), "validation_uri": str(layout.val_rec), "output_uri": str(layout.output)}


def dataset_hyperparameters(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters a packed dataset decides: never typed in a form, always read from its manifest.json."""
    try:
        num_classes = int(manifest["num_labels"])
        num_training_samples = int(manifest["counts"]["train"])
        resize = int(manifest["pack_params"]["resize"])
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"manifest.json: missing or bad field {err} (expected the output of `tagflow pack`)") from None
    return {
        "num_classes": num_classes,
        "num_training_samples": num_training_samples,
        "multi_label": 1,
        "image_shape": f"3,{resize},{resize}",
    }
