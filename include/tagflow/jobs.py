"""From a run's configuration and its packed dataset to training/tuning requests, and from a finished job to the
model candidate the deploy gate judges. Both backends use these: the provider's SageMaker operators send the
requests to AWS, the local operators hand the very same dicts to `tagflow.local.runner` / `tagflow.local.tuner`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from tagflow import s3
from tagflow.errors import InputError, TagflowError
from tagflow.layout import MODEL_TAIL, DatasetLayout
from tagflow.runconfig import RunConfig
from tagflow.sagemaker_config import (
    dataset_channels,
    dataset_hyperparameters,
    training_job_name,
    training_job_request,
    tuning_job_name,
    tuning_job_request,
)

JOB_PREFIX = "tagflow"
DEFAULT_MINI_BATCH = 32  # the built-in algorithm's default mini_batch_size
# FailureReason prefixes SageMaker uses for a problem with the request, the data or the hyperparameters: running the
# same job again would fail the same way (and cost another job), so these are not retried.
NOT_RETRYABLE = ("ClientError", "AlgorithmError")


def job_failure(what: str, reason: str) -> TagflowError:
    """The error for a job that ended without a model: InputError (fail, do not retry) when the reason says the
    request or data is at fault; TagflowError (retry) for anything else, such as capacity or internal errors."""
    kind = InputError if reason.lstrip().startswith(NOT_RETRYABLE) else TagflowError
    return kind(f"{what}: {reason}")


def read_manifest(dataset_uri: str, client=None) -> dict[str, Any]:
    """The packed dataset's manifest.json (written last by publish, so the .rec files it describes exist)."""
    uri = str(DatasetLayout.of(dataset_uri).manifest)
    data, name = s3.read_location(uri, client)
    try:
        return json.loads(data)
    except ValueError as err:
        raise InputError(f"{name}: not JSON ({err})") from None


def job_names(run_id: str, try_number: int) -> dict[str, str]:
    """This try's training and tuning job names: deterministic, so a re-executed try finds its own job, and
    different per try, so a retry after a failed job never collides with it."""
    key = f"{run_id}-t{try_number}"
    return {"training": training_job_name(JOB_PREFIX, key), "tuning": tuning_job_name(JOB_PREFIX, key)}


def training_request(
    cfg: RunConfig, manifest: Mapping[str, Any], *, job_name: str, image_uri: str, role_arn: str
) -> dict[str, Any]:
    """CreateTrainingJob for this run: the form's hyperparameters plus those the packed data decides."""
    return _training_request(cfg, manifest, job_name=job_name, image_uri=image_uri, role_arn=role_arn)


def check_batch(hyperparameters: Mapping[str, Any], manifest: Mapping[str, Any], dataset_uri: str) -> None:
    """Refuse a mini-batch larger than either split: the algorithm would fail on it only after the job started."""
    batch = int(hyperparameters.get("mini_batch_size", DEFAULT_MINI_BATCH))
    counts = manifest.get("counts", {})
    for split in ("train", "val"):
        if split in counts and int(counts[split]) < batch:
            raise InputError(
                f"hyperparameters.mini_batch_size: {batch} is more than the {counts[split]} {split} images of "
                f"{dataset_uri}; lower it or add images"
            )


def _training_request(
    cfg: RunConfig, manifest: Mapping[str, Any], *, job_name: str, image_uri: str, role_arn: str, check: bool = True
) -> dict[str, Any]:
    return dataset_request(
        cfg.dataset_uri,
        manifest,
        cfg.hyperparameters,
        job_name=job_name,
        image_uri=image_uri,
        role_arn=role_arn,
        instance_type=cfg.instance_type,
        instance_count=cfg.instance_count,
        max_runtime_s=cfg.max_runtime_s,
        check_batch_size=check,
    )


def dataset_request(
    dataset_uri: str,
    manifest: Mapping[str, Any],
    hyperparameters: Mapping[str, Any],
    *,
    job_name: str,
    image_uri: str,
    role_arn: str,
    instance_type: str,
    max_runtime_s: int,
    instance_count: int = 1,
    check_batch_size: bool = True,
    override_data: bool = False,
) -> dict[str, Any]:
    """The one CreateTrainingJob builder for a packed dataset (the DAG's and the CLI's): its channels, the
    hyperparameters its manifest decides (num_classes, num_training_samples, multi_label, image_shape) and
    `hyperparameters`. The data's values win, unless `override_data`: the CLI's `--hp` may replace them on purpose
    (the form refuses those names instead). `check_batch_size` refuses a mini-batch larger than either split
    before any job starts (off only where the batch size is tuned: each trial's own)."""
    data = dataset_hyperparameters(manifest)
    merged = {**data, **hyperparameters} if override_data else {**hyperparameters, **data}
    if check_batch_size:
        check_batch(merged, manifest, dataset_uri)
    return training_job_request(
        job_name,
        image_uri=image_uri,
        role_arn=role_arn,
        **dataset_channels(dataset_uri),
        hyperparameters=merged,
        instance_type=instance_type,
        instance_count=instance_count,
        max_runtime_s=max_runtime_s,
    )


def tuning_request(
    cfg: RunConfig, manifest: Mapping[str, Any], *, tuning_name: str, image_uri: str, role_arn: str
) -> dict[str, Any]:
    """CreateHyperParameterTuningJob for this run, tuning `cfg.tuning_ranges` around `training_request`."""
    training = _training_request(
        cfg, manifest, job_name=f"{tuning_name}-def", image_uri=image_uri, role_arn=role_arn,
        check="mini_batch_size" not in cfg.tuning_ranges,  # a tuned batch size is each trial's own
    )  # fmt: skip
    return tuning_job_request(
        tuning_name,
        training=training,
        ranges=cfg.tuning_ranges,
        strategy=cfg.tuning_strategy,
        max_jobs=cfg.max_jobs,
        max_parallel=cfg.max_parallel_jobs,
        objective_metric=cfg.objective_metric,
    )


PREFLIGHT_COUNT = 1_000_000  # a stand-in split size: the batch-size check needs the real data, so it waits for it


def preflight(cfg: RunConfig) -> dict[str, Any]:
    """Check in the run's first task what the training or tuning request can be checked for without data: the
    hyperparameters (with the algorithm's own rules and messages), the tuning ranges (every end a range can reach)
    and the request's shape. Raises InputError as the training task would, before any image is fetched; returns
    the request checked (with stand-in counts where the data decides)."""
    from tagflow.local import runner, tuner
    from tagflow.sagemaker_config import LOCAL_IMAGE_URI, LOCAL_ROLE_ARN, check_hyperparameters

    stand_in = {
        "num_labels": cfg.num_labels,
        "counts": {"train": PREFLIGHT_COUNT, "val": PREFLIGHT_COUNT},
        "pack_params": {"resize": cfg.resize},
    }
    names = {"image_uri": LOCAL_IMAGE_URI, "role_arn": LOCAL_ROLE_ARN}
    if cfg.mode == "tune":
        request = tuning_request(cfg, stand_in, tuning_name="tagflow-preflight", **names)
        tuner.validate_request(request)
        return request
    request = _training_request(cfg, stand_in, job_name="tagflow-preflight", **names)
    check_hyperparameters(request["HyperParameters"], "hyperparameters")
    runner.validate_request(request)
    return request


def training_candidate(describe: Mapping[str, Any], metric: str) -> dict[str, Any]:
    """The model a finished training job produced and its objective value (DescribeTrainingJob's shape).

    A job that did not complete raises TagflowError with SageMaker's FailureReason.
    """
    name, status = describe["TrainingJobName"], describe["TrainingJobStatus"]
    if status != "Completed":
        raise job_failure(f"training job {name} {status}", describe.get("FailureReason", "no reason given"))
    values = {m["MetricName"]: float(m["Value"]) for m in describe.get("FinalMetricDataList", [])}
    # The local trainer saves its best epoch and reports that model's values as saved-model:* (and its epoch as
    # saved-model:epoch); the plain names are the last epoch's. The built-in reports only the plain names, and its
    # saved model need not be its last epoch: then the value is the last epoch's, and `saved_model` is None.
    saved = {k.removeprefix("saved-model:"): v for k, v in values.items() if k.startswith("saved-model:")}
    last = {k: v for k, v in values.items() if not k.startswith("saved-model:")}
    saved_epoch, last_epoch = (
        None if e is None else int(e) for e in (saved.pop("epoch", None), last.pop("epoch", None))
    )
    return {
        "job": name,
        "model_data_url": describe["ModelArtifacts"]["S3ModelArtifacts"],
        "metric": metric,
        "value": saved.get(metric, values.get(metric)),
        "value_of": "saved model" if metric in saved else "last epoch",
        "saved_model": {"epoch": saved_epoch, "metrics": saved} if saved else None,
        "last_epoch": {"epoch": last_epoch, "metrics": last},
    }


def tuning_candidate(describe: Mapping[str, Any]) -> dict[str, Any]:
    """The best trial of a finished tuning job (DescribeHyperParameterTuningJob's shape) as a model candidate.

    Locally a trial's objective value is its saved model's (`saved-model:<objective>`), so `value` is the model in
    the best trial's model.tar.gz; on SageMaker it is the built-in's final (last-epoch) value."""
    name = describe["HyperParameterTuningJobName"]
    best = describe.get("BestTrainingJob")
    if describe["HyperParameterTuningJobStatus"] != "Completed" or not best:
        reason = describe.get("FailureReason", "no trial produced the objective metric")
        raise job_failure(f"tuning job {name} {describe['HyperParameterTuningJobStatus']}", reason)
    objective = best.get("FinalHyperParameterTuningJobObjectiveMetric") or {}
    output = describe["TrainingJobDefinition"]["OutputDataConfig"]["S3OutputPath"].rstrip("/")
    config = describe["HyperParameterTuningJobConfig"]
    return {
        "job": best["TrainingJobName"],
        "tuning_job": name,
        "model_data_url": str(s3.S3Uri.parse(output).join(best["TrainingJobName"], *MODEL_TAIL)),
        "metric": config["HyperParameterTuningJobObjective"]["MetricName"],  # what the trials were ranked by
        "value": objective.get("Value"),
        "hyperparameters": best.get("TunedHyperParameters", {}),
    }


def candidate(result: Mapping[str, Any], metric: str) -> dict[str, Any]:
    """A model candidate from whichever training branch ran: a local operator's candidate as is, the provider
    operators' `{"Training": describe}` / `{"Tuning": describe}` converted."""
    if "Training" in result:
        return training_candidate(result["Training"], metric)
    if "Tuning" in result:
        return tuning_candidate(result["Tuning"])
    return dict(result)


def adoptable(earlier: list[tuple[str, str]]) -> str | None:
    """Of the jobs earlier tries of this run started, (name, status) oldest first, the one a retry should wait for
    instead of starting another: the latest in progress or completed. Failed or stopped jobs are not adopted."""
    for name, status in reversed(earlier):
        if status in ("InProgress", "Completed"):
            return name
    return None


def evaluation_batch_size(manifest: Mapping[str, Any]) -> int:
    """The evaluator's batch: its default, or the whole validation split when that is smaller (MXNet's record
    iterator refuses a split with fewer images than the batch, as on a first day of a few images)."""
    from tagflow.evaluate import DEFAULT_BATCH_SIZE

    return max(1, min(DEFAULT_BATCH_SIZE, int(manifest.get("counts", {}).get("val", DEFAULT_BATCH_SIZE))))


# --- lineage: what a model was trained from, and whether a run has anything new to train on --------------------

LINEAGE_FORMAT = 1
LINEAGE_NAME = "lineage.json"
MODEL_SUFFIX = "/" + "/".join(MODEL_TAIL)  # the built-in's (and the local runner's) OUTPUT/JOB/output/model.tar.gz
RETRAIN_RUN_TYPES = ("scheduled", "backfill")  # the runs that stop when nothing changed; manual runs always train


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def dataset_digest(dataset_uri: str, manifest: Mapping[str, Any], client=None) -> dict[str, Any]:
    """The published dataset's identity: one sha256 over the train and validation records' sha256 (what publish
    recorded on each object, else its ETag) and the label names (the manifest's). Any image, label, resize or split
    change changes a record file, so it changes the digest; re-publishing the same data does not."""
    client = client or s3.make_client()
    layout = DatasetLayout.of(dataset_uri)
    records: dict[str, str] = {}
    for split, uri in (("train", layout.train_rec), ("val", layout.val_rec)):
        head = client.head_object(Bucket=uri.bucket, Key=uri.key)
        etag = head["ETag"].strip('"')
        records[split] = head.get("Metadata", {}).get(s3.SHA256_METADATA_KEY) or f"etag-{etag}"
    names = list(manifest.get("label_names") or [])
    return {
        "uri": str(s3.S3Uri.parse(dataset_uri)),
        "digest": _digest({"records": records, "label_names": names}),
        "records": records,
        "num_labels": manifest.get("num_labels"),
        "counts": {k: manifest.get("counts", {}).get(k) for k in ("train", "val")},
    }


def training_settings(cfg: RunConfig) -> dict[str, Any]:
    """What, besides the data, decides the model a run trains: backend, mode, objective, hyperparameters, and in
    tune mode the search (ranges, strategy, trial count). Instance types and runtime limits do not change it."""
    settings: dict[str, Any] = {
        "backend": cfg.backend,
        "mode": cfg.mode,
        "objective_metric": cfg.objective_metric,
        "hyperparameters": {k: cfg.hyperparameters[k] for k in sorted(cfg.hyperparameters)},
    }
    if cfg.mode == "tune":
        settings["tuning"] = {"ranges": cfg.tuning_ranges, "strategy": cfg.tuning_strategy, "max_jobs": cfg.max_jobs}
    return settings


def lineage(cfg: RunConfig, dataset: Mapping[str, Any]) -> dict[str, Any]:
    """A model's lineage: the dataset it came from (`dataset_digest`) and the training settings."""
    settings = training_settings(cfg)
    return {"format_version": LINEAGE_FORMAT, "dataset": dict(dataset), "settings": settings,
            "settings_digest": _digest(settings)}  # fmt: skip


def lineage_uri(model_uri: str) -> s3.S3Uri | None:
    """Where a model's lineage lives: s3://B/PREFIX/output/JOB/lineage.json beside OUTPUT/JOB/output/model.tar.gz;
    None for a model not in that layout (a hand-swapped local archive), which then has no known lineage."""
    if not model_uri.startswith("s3://") or not model_uri.endswith(MODEL_SUFFIX):
        return None
    uri = s3.S3Uri.parse(model_uri)
    return s3.S3Uri(uri.bucket, uri.key[: -len(MODEL_SUFFIX)] + "/" + LINEAGE_NAME)


def write_lineage(doc: Mapping[str, Any], model_uri: str, client=None) -> str | None:
    """Put `doc` beside the model (one PUT, so whole or not at all); its URI, or None outside the layout."""
    uri = lineage_uri(model_uri)
    if uri is None:
        return None
    body = (json.dumps({**doc, "model": model_uri}, indent=1, sort_keys=True) + "\n").encode()
    (client or s3.make_client()).put_object(Bucket=uri.bucket, Key=uri.key, Body=body,
                                            ContentType="application/json")  # fmt: skip
    return str(uri)


def read_lineage(model_uri: str | None, client=None) -> dict[str, Any] | None:
    """The lineage recorded beside `model_uri`; None when there is none (an older model, another layout) or it is
    unreadable: then nothing is known to be unchanged, and the run trains."""
    from botocore.exceptions import ClientError

    uri = lineage_uri(model_uri) if model_uri else None
    if uri is None:
        return None
    try:
        body = (client or s3.make_client()).get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read()
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            return None
        raise
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and doc.get("format_version") == LINEAGE_FORMAT else None


def _changed(old: Any, new: Any, path: str = "") -> list[str]:
    """The leaves that differ between two JSON values, as `path: old → new`."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            out += _changed(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if old == new else [f"{path or 'value'}: {json.dumps(old)} → {json.dumps(new)}"]


def training_decision(
    run_type: str,
    *,
    force: bool,
    current: Mapping[str, Any],
    serving_model: str | None,
    serving: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Whether this run trains: {"train": bool, "reason": str}. A scheduled or backfill run whose dataset digest
    and training settings equal the serving model's lineage does not ("nothing new since MODEL"); a manual run, a
    run with `force`, and any run without a serving model or without its lineage do."""
    if run_type not in RETRAIN_RUN_TYPES:
        return {"train": True, "reason": f"a {run_type} run trains whatever changed"}
    if force:
        return {"train": True, "reason": "force_training is on"}
    if serving_model is None:
        return {"train": True, "reason": "no model is serving"}
    if serving is None:
        return {"train": True, "reason": f"the serving model {serving_model} has no recorded lineage"}
    changes = []
    if serving.get("dataset", {}).get("digest") != current["dataset"]["digest"]:
        old = serving.get("dataset", {})
        changes.append(f"the dataset changed (digest {str(old.get('digest'))[:12]} → "
                       f"{current['dataset']['digest'][:12]}; images {old.get('counts')} → "
                       f"{current['dataset']['counts']})")  # fmt: skip
    if serving.get("settings_digest") != current["settings_digest"]:
        changes.append("the training settings changed (" + "; ".join(
            _changed(serving.get("settings"), current["settings"])[:5]) + ")")  # fmt: skip
    if changes:
        return {"train": True, "reason": f"since {serving_model}: " + " and ".join(changes)}
    return {
        "train": False,
        "reason": f"nothing new since {serving_model}: the same dataset (digest {current['dataset']['digest'][:12]})"
        " and training settings; set force_training to train anyway",
    }
