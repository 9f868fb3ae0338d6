"""A DAG run's configuration: the trigger form's fields, the two seed presets, and their resolution.

`PARAMS` holds one JSON schema per form field (plain dicts; the DAG file wraps each in an Airflow `Param`, which
validates the form before the run is created). `resolve` turns the submitted values into a `RunConfig`: fields
left empty take the chosen preset's value, and the rules that span several fields are checked there, in the
run's first task, before anything touches data. `num_classes` and `num_training_samples` are not form fields:
they are read from the packed dataset's manifest (`sagemaker_config.dataset_hyperparameters`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tagflow import names
from tagflow.deploy import DEFAULT_LIFT, DEFAULT_THRESHOLD, DEFAULT_TOLERANCE, GATE_METRICS
from tagflow.errors import InputError, quote
from tagflow.sagemaker_config import TUNING_STRATEGIES

if TYPE_CHECKING:
    from tagflow.pipeline import DatasetSpec

S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$"
# Segments of S3-safe characters, none of them `.` or `..` (tagflow.names says why).
_SEGMENT = r"(?!\.\.?(/|$))[A-Za-z0-9!_.*'()\-]+"
PREFIX_PATTERN = rf"^{_SEGMENT}(/{_SEGMENT})*$"
OBJECTIVES = ("validation:accuracy", "validation:mAP", "validation:micro_f1", "validation:macro_f1")
SAGEMAKER_OBJECTIVES = ("validation:accuracy",)  # what the built-in algorithm itself reports
# The objective when the form leaves it empty: the local trainer keeps and ranks by mAP; the built-in reports only
# accuracy (on SageMaker the evaluation stage, not the objective, judges the model).
DEFAULT_OBJECTIVES = {"local": "validation:mAP", "sagemaker": "validation:accuracy"}
RENAMED = {"metric_gate": "gate_threshold"}  # old field → its successor (the gate now compares macro mAP)

# Fields a preset fills when the form leaves them empty. The source locations are where `tagflow demo-data`
# and the seed's notebooks put them; on AWS, type your own bucket's.
PRESETS: dict[str, dict[str, Any]] = {
    "50-label-rs96": {
        "list_uri": "s3://tagflow-raw/designs/lists/",
        "images_uri": "s3://tagflow-raw/designs/images",
        "labels_uri": "s3://tagflow-raw/designs/lists/labels.txt",
        "dataset_prefix": "50-label-rs96",
        "num_labels": 50,
        "resize": 96,
        "endpoint_name": "tagflow-designs-50",
    },
    "ic-multi-label": {
        "list_uri": "s3://tagflow-raw/ic-multi-label/lists/",
        "images_uri": "s3://tagflow-raw/ic-multi-label/images",
        "labels_uri": "s3://tagflow-raw/ic-multi-label/lists/labels.txt",
        "dataset_prefix": "ic-multi-label",
        "num_labels": 334,
        "resize": 96,
        "endpoint_name": "tagflow-designs-334",
    },
}
CUSTOM = "custom"
PRESET_FIELDS = ("list_uri", "images_uri", "labels_uri", "dataset_prefix", "num_labels", "resize", "endpoint_name")

# Epochs and learning rate chosen by measurement on real multi-label images (BENCHMARKS.md, "Default epochs and
# learning rate"): 0.01 beat 0.001, 0.05 and 0.1 on a 50- and a 321-label set, whose best-mAP epochs were 17-18.
DEFAULT_HYPERPARAMETERS: dict[str, Any] = {
    "num_layers": 18,
    "epochs": 20,
    "mini_batch_size": 32,
    "learning_rate": 0.01,
    "optimizer": "sgd",
    "augmentation_type": "crop_color_transform",
}
DEFAULT_TUNING_RANGES: dict[str, Any] = {
    "learning_rate": {"type": "Continuous", "min": 0.001, "max": 0.1, "scaling": "Logarithmic"},
    "mini_batch_size": [16, 32, 64],
}
# Never typed in the form: the packed data decides them.
DATA_HYPERPARAMETERS = ("num_classes", "num_training_samples", "multi_label", "image_shape")


def _nullable(kind: str, **schema: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], "default": None, **schema}


PARAMS: dict[str, dict[str, Any]] = {
    "preset": {
        "default": "50-label-rs96",
        "enum": [*PRESETS, CUSTOM],
        "title": "Preset",
        "description": "The seed's datasets: 50-label-rs96 (50 labels) or ic-multi-label (334 labels). Fields "
        "of the Dataset section left empty take the preset's value; `custom` needs them all.",
        "section": "Dataset",
    },
    "list_uri": _nullable(
        "string",
        pattern=S3_URI_PATTERN,
        title="List file",
        description="s3://BUCKET/KEY of a list file (ID, labels…, path per line), or a prefix ending in / "
        "holding dt=YYYY-MM-DD/*.lst partitions: a run reads every partition dated before its interval's end.",
        section="Dataset",
    ),
    "images_uri": _nullable(
        "string",
        pattern=S3_URI_PATTERN,
        title="Source images prefix",
        description="s3://BUCKET/PREFIX the list's relative paths are under.",
        section="Dataset",
    ),
    "labels_uri": _nullable(
        "string",
        pattern=S3_URI_PATTERN,
        title="Label names",
        description="Optional s3:// text file, one label name per line in column order.",
        section="Dataset",
    ),
    "bucket": {
        "type": "string",
        "default": "tagflow-data",
        "pattern": r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$",
        "title": "Bucket",
        "description": "Where the dataset and models go: s3://BUCKET/PREFIX/{training,validation,output}/.",
        "section": "Dataset",
    },
    "dataset_prefix": _nullable(
        "string",
        pattern=PREFIX_PATTERN,
        title="Dataset prefix",
        description="PREFIX in s3://BUCKET/PREFIX/{training,validation,output}/.",
        section="Dataset",
    ),
    "num_labels": _nullable(
        "integer", minimum=1, maximum=10000, title="Labels", description="Label columns per line.", section="Dataset"
    ),
    "resize": _nullable(
        "integer", minimum=8, maximum=1024, title="Resize", description="Shorter side in pixels.", section="Packing"
    ),
    "quality": {
        "type": "integer",
        "default": 95,
        "minimum": 1,
        "maximum": 100,
        "title": "JPEG quality",
        "description": "Quality of the re-encoded JPEGs in the RecordIO files (im2rec --quality).",
        "section": "Packing",
    },
    "train_ratio": {
        "type": "number",
        "default": 0.9,
        "exclusiveMinimum": 0,
        "exclusiveMaximum": 1,
        "title": "Train ratio",
        "description": "Share of images in training/; the rest go to validation/.",
        "section": "Packing",
    },
    "split_group_regex": _nullable(
        "string",
        maxLength=500,
        title="Split group regex",
        description="Keep variants of one design on one side of the split: a regular expression over each list "
        "path whose first capture group (else its whole match) is the image's group, e.g. ^designs/([^/]+)/. "
        "A path it does not match is refused. Empty: the split hashes the image ID.",
        section="Packing",
    ),
    "split_group_file": _nullable(
        "string",
        pattern=S3_URI_PATTERN,
        title="Split group file",
        description="Instead of the regex: s3:// text file of ID<TAB>GROUP lines, one per image of the list.",
        section="Packing",
    ),
    "max_pixels": _nullable(
        "integer",
        minimum=1,
        maximum=2**40,
        title="Largest source image (pixels)",
        description="Source images above this many pixels (width × height, read from the header) are bad images, "
        "refused before decoding; empty: the packer's default, 4096 × 4096. Packing needs about 18 bytes per pixel "
        "of this per worker.",
        section="Packing",
    ),
    "shard_size": {
        "type": "integer",
        "default": 5000,
        "minimum": 10,
        "maximum": 1000000,
        "title": "Shard size",
        "description": "Images per download/pack task (raised automatically beyond 1,024 shards).",
        "section": "Packing",
    },
    "mode": {
        "type": "string",
        "default": "train",
        "enum": ["train", "tune"],
        "title": "Mode",
        "description": "One training job, or a hyperparameter tuning job over the ranges below.",
        "section": "Training",
    },
    "backend": {
        "type": "string",
        "default": "local",
        "enum": ["local", "sagemaker"],
        "title": "Backend",
        "description": "local: the algorithm environment on this machine; sagemaker: the built-in algorithm on AWS.",
        "section": "Training",
    },
    "instance_type": {
        "type": "string",
        "default": "ml.p3.2xlarge",
        "pattern": r"^ml\.[a-z0-9]+\.[a-z0-9]+$",
        "title": "Training instance type",
        "description": "SageMaker ML instance for each training job (GPU instances for the built-in algorithm).",
        "section": "Training",
    },
    "instance_count": {
        "type": "integer",
        "default": 1,
        "minimum": 1,
        "maximum": 16,
        "title": "Training instance count",
        "description": "Instances per training job (distributed training on SageMaker; the local backend uses one).",
        "section": "Training",
    },
    "max_runtime_s": {
        "type": "integer",
        "default": 86400,
        "minimum": 60,
        "maximum": 2419200,
        "title": "Max runtime (s)",
        "description": "Per training job; the job is stopped after this long.",
        "section": "Training",
    },
    "hyperparameters": {
        "type": "object",
        "default": DEFAULT_HYPERPARAMETERS,
        "title": "Hyperparameters",
        "description": "The built-in algorithm's hyperparameters. num_classes, num_training_samples, multi_label "
        "and image_shape come from the packed data and may not be set here.",
        "section": "Training",
    },
    "objective_metric": _nullable(
        "string",
        enum=[*OBJECTIVES, None],
        title="Objective metric",
        description="What the local trainer keeps its best epoch by and tuning ranks trials by; empty: "
        "validation:mAP locally, validation:accuracy on SageMaker (the only one its built-in algorithm reports). "
        "The deploy gate does not use it: it judges every model by the evaluation (Gate metric).",
        section="Training",
    ),
    "tuning_ranges": {
        "type": "object",
        "default": DEFAULT_TUNING_RANGES,
        "title": "Tuning ranges",
        "description": 'name: [values…] (categorical) or {"type": "Continuous"|"Integer", "min", "max", "scaling"}.',
        "section": "Tuning",
    },
    "max_jobs": {
        "type": "integer",
        "default": 4,
        "minimum": 1,
        "maximum": 500,
        "title": "Max training jobs",
        "description": "Trials the tuning job runs in all.",
        "section": "Tuning",
    },
    "max_parallel_jobs": {
        "type": "integer",
        "default": 1,
        "minimum": 1,
        "maximum": 100,
        "title": "Parallel training jobs",
        "description": "Trials running at once (at most max jobs).",
        "section": "Tuning",
    },
    "tuning_strategy": {
        "type": "string",
        "default": "Bayesian",
        "enum": list(TUNING_STRATEGIES),
        "title": "Tuning strategy",
        "description": "How the next trial's hyperparameters are chosen.",
        "section": "Tuning",
    },
    "deploy": {
        "type": "boolean",
        "default": True,
        "title": "Deploy",
        "description": "Deploy the new model if it passes the gate.",
        "section": "Deployment",
    },
    "endpoint_name": _nullable(
        "string",
        pattern=names.ENDPOINT_NAME_PATTERN,
        title="Endpoint name",
        description="The SageMaker endpoint (or the local endpoint's name) the model is deployed to, and whose "
        "serving model the gate compares with. Empty: the preset's (tagflow-designs-50, tagflow-designs-334), so "
        "the two presets never replace each other's model; a custom run names its own.",
        section="Deployment",
    ),
    "endpoint_instance_type": {
        "type": "string",
        "default": "ml.m5.large",
        "pattern": r"^ml\.[a-z0-9]+\.[a-z0-9]+$",
        "title": "Endpoint instance type",
        "description": "SageMaker ML instance serving the endpoint (the local backend ignores it).",
        "section": "Deployment",
    },
    "approval": {
        "type": "string",
        "default": "auto",
        "enum": ["auto", "manual"],
        "title": "Approval",
        "description": "auto: a model that passes the gate is deployed. manual: it waits for a person to approve "
        "it on the run's Required actions (the comparison table and the report link are shown); reject or no "
        "answer within the approval timeout leaves the endpoint as it is.",
        "section": "Deployment",
    },
    "approval_timeout_h": {
        "type": "number",
        "default": 24,
        "exclusiveMinimum": 0,
        "maximum": 720,
        "title": "Approval timeout (hours)",
        "description": "With manual approval: how long the approval waits before it counts as rejected.",
        "section": "Deployment",
    },
    "gate_metric": {
        "type": "string",
        "default": "mAP",
        "enum": list(GATE_METRICS),
        "title": "Gate metric",
        "description": "What the gate judges, on the dataset's current validation split, for the new and the "
        "serving model alike. mAP: macro mean average precision over the labels with a positive (the default). "
        "accuracy: the built-in's Hamming accuracy, which an all-negative model scores high on: it must beat the "
        "all-negative predictor's accuracy (the lift is then not used).",
        "section": "Deployment",
    },
    "gate_lift": {
        "type": "number",
        "default": DEFAULT_LIFT,
        "minimum": 0,
        "maximum": 1000,
        "title": "Gate lift",
        "description": "Deploy only if the new model's mAP is at least this many times the label-frequency "
        "baseline's (every image scored with each label's training frequency) on the same split.",
        "section": "Deployment",
    },
    "gate_threshold": {
        "type": "number",
        "default": DEFAULT_THRESHOLD,
        "minimum": 0,
        "maximum": 1,
        "title": "Gate threshold",
        "description": "Deploy only if the gate metric is at least this (0–1), whatever the baseline.",
        "section": "Deployment",
    },
    "gate_tolerance": {
        "type": "number",
        "default": DEFAULT_TOLERANCE,
        "minimum": 0,
        "maximum": 1,
        "title": "Gate tolerance",
        "description": "How much worse than the serving model (re-scored on the same images) the new model may be "
        "and still replace it. 0: it must be at least as good.",
        "section": "Deployment",
    },
    "force_training": {
        "type": "boolean",
        "default": False,
        "title": "Force training",
        "description": "Train even if neither the published dataset nor the training settings changed since the "
        'serving model was trained. Scheduled and backfill runs otherwise stop after publish with "nothing new '
        'since MODEL"; a run triggered by hand always trains.',
        "section": "Training",
    },
}


@dataclass(frozen=True)
class RunConfig:
    """One run's resolved configuration: plain values, so it travels through XCom as a dict."""

    preset: str
    list_uri: str
    images_uri: str | None
    labels_uri: str | None
    bucket: str
    dataset_prefix: str
    num_labels: int
    resize: int
    quality: int
    train_ratio: float
    shard_size: int
    mode: str
    backend: str
    instance_type: str
    instance_count: int
    max_runtime_s: int
    hyperparameters: dict[str, Any]
    objective_metric: str
    tuning_ranges: dict[str, Any]
    max_jobs: int
    max_parallel_jobs: int
    tuning_strategy: str
    deploy: bool
    endpoint_name: str
    endpoint_instance_type: str
    gate_metric: str
    gate_lift: float
    gate_threshold: float
    gate_tolerance: float
    force_training: bool
    max_pixels: int | None = None  # None: tagflow.pack's default
    split_group_regex: str | None = None  # None with split_group_file None: split by image ID
    split_group_file: str | None = None
    approval: str = "auto"
    approval_timeout_h: float = 24
    list_until: str | None = None  # ISO time: partitions dated before it are read

    @property
    def dataset_uri(self) -> str:
        return f"s3://{self.bucket}/{self.dataset_prefix.strip('/')}"

    def dataset_spec(self, *, pack_workers: int | None = None) -> DatasetSpec:
        """The data plane's spec for this run (staging below the dataset prefix, so shards are reused across runs)."""
        from tagflow.packparams import PackParams
        from tagflow.pipeline import DatasetSpec

        return DatasetSpec(
            list_uri=self.list_uri,
            dataset_uri=self.dataset_uri,
            num_labels=self.num_labels,
            source_uri=self.images_uri,
            labels_uri=self.labels_uri,
            shard_size=self.shard_size,
            pack=PackParams(
                resize=self.resize,
                quality=self.quality,
                train_ratio=self.train_ratio,
                **({} if self.max_pixels is None else {"max_pixels": self.max_pixels}),
            ),
            pack_workers=pack_workers,
            list_until=self.list_until,
            split_group_regex=self.split_group_regex,
            split_group_file=self.split_group_file,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        return cls(**data)


def partition_cutoff(run_type: str, data_interval_end: datetime | None, run_after: datetime | None) -> datetime:
    """Which partitions a run reads: scheduled and backfill runs read up to their interval's end (so a backfill
    over past days trains on what existed then); a manual run reads everything up to when it was triggered."""
    if run_type in ("scheduled", "backfill") and data_interval_end is not None:
        return data_interval_end
    return run_after or data_interval_end or datetime.now(UTC)


def resolve(params: Mapping[str, Any], *, list_until: datetime | None = None) -> RunConfig:
    """The run's configuration from the form's values: presets applied, cross-field rules checked.

    Raises InputError naming the field and what was expected.
    """
    renamed = sorted(set(params) & set(RENAMED))
    if renamed:
        raise InputError("; ".join(f"{old}: renamed {RENAMED[old]} (the gate now compares the evaluation's macro "
                                   "mAP by default; see gate_metric)" for old in renamed))  # fmt: skip
    values = {name: params.get(name, spec.get("default")) for name, spec in PARAMS.items()}
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise InputError(f"params: unknown field(s) {', '.join(unknown)}; expected some of {', '.join(PARAMS)}")
    preset = values.pop("preset")
    if preset != CUSTOM:
        if preset not in PRESETS:
            raise InputError(f"preset: {preset!r} is not one of {', '.join([*PRESETS, CUSTOM])}")
        for name in PRESET_FIELDS:
            if values.get(name) is None:
                values[name] = PRESETS[preset][name]
    missing = [
        name
        for name in ("list_uri", "dataset_prefix", "num_labels", "resize", "endpoint_name")
        if values.get(name) is None
    ]
    if missing:
        raise InputError(f"preset {preset}: set {', '.join(missing)} (a custom run has no preset to fill them)")
    if not values["list_uri"].endswith("/") and values["list_uri"].rstrip("/").count("/") < 3:
        raise InputError(f"list_uri: {values['list_uri']!r} names a bucket, not a list file or a prefix ending in /")
    set_by_data = sorted(set(values["hyperparameters"]) & set(DATA_HYPERPARAMETERS))
    if set_by_data:
        raise InputError(
            f"hyperparameters: {', '.join(set_by_data)} come from the packed data (its manifest); remove them"
        )
    if values["mode"] == "tune":
        if not values["tuning_ranges"]:
            raise InputError("tuning_ranges: mode is tune but no range is given")
        clash = sorted(set(values["tuning_ranges"]) & set(DATA_HYPERPARAMETERS))
        if clash:
            raise InputError(f"tuning_ranges: {', '.join(clash)} come from the packed data and cannot be tuned")
        if values["max_parallel_jobs"] > values["max_jobs"]:
            raise InputError(
                f"max_parallel_jobs: {values['max_parallel_jobs']} is more than max_jobs ({values['max_jobs']})"
            )
    if values["objective_metric"] is None:
        values["objective_metric"] = DEFAULT_OBJECTIVES[values["backend"]]
    if values["backend"] == "sagemaker" and values["objective_metric"] not in SAGEMAKER_OBJECTIVES:
        raise InputError(
            f"objective_metric: {values['objective_metric']} is reported only by the local trainer; "
            f"on SageMaker use one of {', '.join(SAGEMAKER_OBJECTIVES)}"
        )
    if values["split_group_regex"] is not None and values["split_group_file"] is not None:
        raise InputError("split_group_regex and split_group_file: both were given; choose one group key")
    if values["split_group_regex"] is not None:
        from tagflow.shards import compile_group_regex  # here: shards imports numpy, which the form needs not

        try:
            compile_group_regex(values["split_group_regex"])
        except InputError as err:
            raise InputError(f"split_group_regex: {err}") from None
    names.check_endpoint_name(values["endpoint_name"], "endpoint_name:")
    if problem := names.prefix_problem(values["dataset_prefix"]):
        raise InputError(f"dataset_prefix: {quote(values['dataset_prefix'])} {problem}")
    return RunConfig(
        preset=preset,
        **values,
        list_until=list_until.isoformat() if list_until else None,
    )
