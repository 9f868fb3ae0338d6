"""Run a SageMaker CreateTrainingJob request on this machine, with the algorithm environment as the container.

`run_training_job(request, workdir=...)` takes the dict `tagflow.sagemaker_config.training_job_request` builds (the
one boto3's `create_training_job` takes) and does what SageMaker does with it:

1. validates it against botocore's SageMaker service model, then what the local backend supports
   (File mode, S3Prefix channels `train` and `validation`): a bad request raises `InputError` naming the field;
2. lays out `WORKDIR/JOB_NAME/` like the container's /opt/ml (`input/config/*.json`, `input/data/CHANNEL/`,
   `model/`, `output/`) and downloads each channel's objects under its prefix, keeping their paths relative to the
   prefix's folder (as SageMaker does);
3. runs `algo/ic_train.py` in the algorithm environment as its own process group, streaming its log to this
   logger and to `WORKDIR/JOB_NAME/training.log`;
4. enforces `StoppingCondition.MaxRuntimeInSeconds` (counted from the job's start, download included): SIGTERM to
   the group, SIGKILL after a grace period; the job ends `Stopped` with SecondaryStatus `MaxRuntimeExceeded`.
   A caller's `stop` event (StopTrainingJob; the tuner's early stopping) stops it the same way and the job ends
   `Stopped` / `Stopped`. On SIGTERM the trainer finishes its batch, saves the best model so far and exits 143, so
   a stopped job still uploads `model.tar.gz` when an epoch completed, as SageMaker does; `on_line` sees each log
   line as it streams (the tuner reads per-epoch objective values there);
5. uploads `model/` as `S3OutputPath/JOB_NAME/output/model.tar.gz` and `output/data/` as `.../output.tar.gz`,
   exactly where SageMaker puts them;
6. returns (and saves as `WORKDIR/JOB_NAME/describe.json`) a dict shaped like DescribeTrainingJob, with
   FinalMetricDataList read from the log by the built-in algorithm's metric regexes: the plain names hold the
   last epoch's values, the `saved-model:*` names those of the model in model.tar.gz (the trainer keeps its best
   epoch), and `epoch` / `saved-model:epoch` say which epochs those are (EPOCH_DEFINITIONS).

A job that fails (bad hyperparameters, data that does not match them, an algorithm error) is not an exception: it
returns `TrainingJobStatus: Failed` and the trainer's one-paragraph `FailureReason`, as SageMaker would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tagflow import local, s3
from tagflow.errors import InputError
from tagflow.layout import MODEL_TAIL
from tagflow.local import process
from tagflow.sagemaker_config import CHANNELS, LOCAL_METRIC_DEFINITIONS, METRIC_DEFINITIONS, RECORDIO

if TYPE_CHECKING:
    from collections.abc import Callable

    from tagflow.s3 import S3Client

log = logging.getLogger(__name__)

TRAINER = local.REPO / "algo" / "ic_train.py"
STOP_GRACE_S = 20.0
POLL_S = 0.2  # how often the runner looks at the stop event and the deadline
FAILURE_REASON_MAX = 1024  # DescribeTrainingJob.FailureReason's length limit
DEFAULT_MAX_RUNTIME_S = 86_400
ARN_PREFIX = "arn:aws:sagemaker:local:000000000000:training-job/"
# Beside the metric regexes, FinalMetricDataList carries two epoch numbers (counted from 0, as the log's Epoch[E]):
# `epoch`, the last epoch validated, whose values the plain metric names hold, and `saved-model:epoch`, the epoch
# the trainer saved, whose values the `saved-model:*` names hold. Not objectives: the tuner does not accept them.
EPOCH_DEFINITIONS: tuple[dict[str, str], ...] = (
    {"Name": "epoch", "Regex": r"Epoch\[(\d+)\] Validation-accuracy="},
    {"Name": "saved-model:epoch", "Regex": r"Saved-model \(epoch (\d+)\) Validation-accuracy="},
)
# The trainer's lines worth a person's eye while a job runs (epoch ends, the best model stored, stops, errors).
PROGRESS = re.compile(
    r"Epoch\[\d+\] (Batch|Train-|Validation-)|Saved-model|Storing the best|Saved checkpoint|Early stopping|"
    r"Stop requested|ClientError|AlgorithmError|^training |the saved model will be"
)
_LOG_PREFIX = re.compile(r"^\[[^\]]*\] ")  # the trainer's "[date time LEVEL thread] "


# --- request validation ----------------------------------------------------------------------------------------


def validate_request(request: dict[str, Any]) -> None:
    """Raise InputError naming the field when `request` is not a valid CreateTrainingJob request or asks for
    something the local backend does not do."""
    import botocore.session
    from botocore.validate import ParamValidator

    model = botocore.session.get_session().get_service_model("sagemaker")
    shape = model.operation_model("CreateTrainingJob").input_shape
    report = ParamValidator().validate(request, shape)
    if report.has_errors():
        raise InputError(f"CreateTrainingJob request is invalid:\n{report.generate_report()}")
    for field in ("TrainingJobName", "RoleArn"):
        pattern = shape.members[field].metadata.get("pattern")
        if pattern and not re.fullmatch(pattern, request[field]):
            raise InputError(f"{field}: {request[field]!r} does not match SageMaker's pattern {pattern}")
    algo = request.get("AlgorithmSpecification") or {}
    if algo.get("TrainingInputMode") != "File":
        raise InputError(
            f"AlgorithmSpecification.TrainingInputMode: {algo.get('TrainingInputMode')!r}; the local backend runs "
            "File mode only"
        )
    channels = request.get("InputDataConfig") or []
    names = [c["ChannelName"] for c in channels]
    if sorted(names) != sorted(CHANNELS):
        raise InputError(f"InputDataConfig: channels {names}; image classification needs exactly {list(CHANNELS)}")
    for i, channel in enumerate(channels):
        where = f"InputDataConfig[{i}] ({channel['ChannelName']})"
        source = channel["DataSource"].get("S3DataSource")
        if source is None:
            raise InputError(f"{where}.DataSource: only S3DataSource is supported locally")
        if source["S3DataType"] != "S3Prefix":
            raise InputError(f"{where}.DataSource.S3DataSource.S3DataType: {source['S3DataType']!r}; expected S3Prefix")
        try:
            s3.S3Uri.parse(source["S3Uri"])
        except InputError as err:
            raise InputError(f"{where}.DataSource.S3DataSource.S3Uri: {err}") from None
        if channel.get("ContentType", RECORDIO) != RECORDIO:
            raise InputError(f"{where}.ContentType: {channel['ContentType']!r}; the local backend reads {RECORDIO}")
        if channel.get("InputMode", "File") != "File":
            raise InputError(f"{where}.InputMode: {channel['InputMode']!r}; the local backend runs File mode only")
    try:
        s3.S3Uri.parse(request["OutputDataConfig"]["S3OutputPath"])
    except InputError as err:
        raise InputError(f"OutputDataConfig.S3OutputPath: {err}") from None
    runtime = (request.get("StoppingCondition") or {}).get("MaxRuntimeInSeconds", DEFAULT_MAX_RUNTIME_S)
    if runtime < 1:
        raise InputError(f"StoppingCondition.MaxRuntimeInSeconds: {runtime}; expected ≥ 1")


# --- the job folder --------------------------------------------------------------------------------------------


def _relative_key(prefix: str, key: str) -> str:
    """The path SageMaker gives `key` under the channel folder: relative to the prefix's last '/'."""
    base = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
    return key[len(base) :]


def stage_channel(client: S3Client, uri: str, dest: Path) -> int:
    """Download every object under the prefix `uri` into `dest`; returns how many. Raises _JobFailure if none."""
    prefix = s3.S3Uri.parse(uri)
    objects = s3.list_objects(client, prefix)
    keys = [k for k in objects if not k.endswith("/")]
    if not keys:
        raise _JobFailure(
            f'ClientError: Data download failed: no S3 objects found under S3 URL "{uri}" given in input data source. '
            "Please ensure that the bucket exists and that objects exist under that S3 prefix."
        )
    for key in sorted(keys):
        relative = _relative_key(prefix.key, key)
        target = (dest / relative).resolve()
        if not target.is_relative_to(dest.resolve()):
            raise _JobFailure(f"ClientError: S3 key {key!r} would be written outside the channel folder")
        s3.get_file(client, s3.S3Uri(prefix.bucket, key), target)
    log.info("staged %d object(s) from %s into %s", len(keys), uri, dest)
    return len(keys)


def write_config(job_dir: Path, request: dict[str, Any]) -> None:
    config = job_dir / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "hyperparameters.json").write_text(json.dumps(request.get("HyperParameters", {}), indent=2))
    channels = {
        c["ChannelName"]: {
            "ContentType": c.get("ContentType", RECORDIO),
            "TrainingInputMode": "File",
            "S3DistributionType": c["DataSource"]["S3DataSource"].get("S3DataDistributionType", "FullyReplicated"),
            "RecordWrapperType": c.get("RecordWrapperType", "None"),
        }
        for c in request["InputDataConfig"]
    }
    (config / "inputdataconfig.json").write_text(json.dumps(channels, indent=2))
    (config / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    for sub in ("model", "output/data"):
        (job_dir / sub).mkdir(parents=True, exist_ok=True)


def _tar(folder: Path, archive: Path) -> None:
    """Pack the files of `folder` at the archive's root, as SageMaker does with /opt/ml/model."""
    tmp = archive.with_name(f".{archive.name}.part")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.startswith("."):  # skip a save the stop interrupted
                tar.add(path, arcname=str(path.relative_to(folder)))
    os.replace(tmp, archive)


# --- running ---------------------------------------------------------------------------------------------------


class _JobFailure(Exception):
    """The job failed before or around the algorithm (for example, no data); the message is the FailureReason."""


def parse_metrics(lines: list[tuple[datetime, str]]) -> list[dict[str, Any]]:
    """FinalMetricDataList: the last value each metric regex found in the log, with the time it was logged."""
    found: dict[str, dict[str, Any]] = {}
    for definition in (*METRIC_DEFINITIONS, *LOCAL_METRIC_DEFINITIONS, *EPOCH_DEFINITIONS):
        regex = re.compile(definition["Regex"])
        for stamp, line in lines:
            match = regex.search(line)
            if match:
                try:
                    value = float(match.group(1))
                except ValueError:
                    continue
                found[definition["Name"]] = {"MetricName": definition["Name"], "Value": value, "Timestamp": stamp}
    return list(found.values())


def progress_line(line: str) -> str | None:
    """The trainer's log `line` without its timestamp, if it is one that shows progress; else None. For a caller
    whose `on_line` echoes progress (`tagflow train` on stderr)."""
    text = _LOG_PREFIX.sub("", line).replace("\t", "  ")
    return text if PROGRESS.search(text) else None


def _run_trainer(
    python: Path,
    job_dir: Path,
    deadline: float,
    grace_s: float,
    log_path: Path,
    on_line: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> tuple[int | None, Literal["deadline", "stop"] | None, list[tuple[datetime, str]]]:
    """Run the trainer until it exits, the deadline passes or `stop` is set: (exit status, why it was stopped,
    timestamped log lines)."""
    lines: list[tuple[datetime, str]] = []
    env = process.child_env({**os.environ, "PYTHONUNBUFFERED": "1"})  # the trainer ends if this process is killed
    with (
        log_path.open("w") as sink,
        process.owned(
            subprocess.Popen(
                [str(python), str(TRAINER), "--job-dir", str(job_dir)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                env=env,
                start_new_session=True,  # its own process group, so a stop reaches the decoder threads' children too
            )
        ) as proc,
    ):

        def pump() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                lines.append((datetime.now(UTC), line))
                sink.write(raw)
                sink.flush()
                log.info("[%s] %s", job_dir.name, line)
                if on_line is not None:
                    try:
                        on_line(line)
                    except Exception:  # the caller's bug must not stop the log (and so block the trainer's pipe)
                        log.exception("job %s: on_line callback failed on %r", job_dir.name, line)

        reader = threading.Thread(target=pump, name=f"log-{job_dir.name}", daemon=True)
        reader.start()
        why: Literal["deadline", "stop"] | None = None
        try:
            while proc.poll() is None:
                if stop is not None and stop.is_set():
                    why = "stop"
                    log.info("job %s: stop requested: stopping it", job_dir.name)
                elif time.monotonic() >= deadline:
                    why = "deadline"
                    log.warning("job %s reached MaxRuntimeInSeconds: stopping it", job_dir.name)
                else:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=max(min(POLL_S, deadline - time.monotonic()), 0.01))
                    continue
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
        finally:
            if proc.poll() is None:  # an exception in this thread: never leave the trainer behind
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            reader.join(timeout=10)
    return proc.returncode, why, lines


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def run_training_job(
    request: dict[str, Any],
    *,
    workdir: Path,
    client: S3Client | None = None,
    mxnet_python: Path | None = None,
    stop_grace_s: float = STOP_GRACE_S,
    on_line: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Run the CreateTrainingJob `request` locally to the end; return a DescribeTrainingJob-shaped dict.

    `on_line` is called (from a reader thread) with each line of the trainer's log as it streams. Setting `stop`
    (from any thread) stops the job like StopTrainingJob: it ends `Stopped` and keeps the best model of the epochs
    it completed. Re-running the same job name starts over in a fresh `workdir/JOB_NAME` folder and overwrites its
    S3 outputs. Raises InputError for an invalid request; a failed or stopped job is reported in the returned dict.
    Stages: stage the channels and config, run the trainer, classify how it ended, upload the model, describe.
    """
    validate_request(request)
    name = request["TrainingJobName"]
    created = datetime.now(UTC)
    max_runtime = int((request.get("StoppingCondition") or {}).get("MaxRuntimeInSeconds", DEFAULT_MAX_RUNTIME_S))
    deadline = time.monotonic() + max_runtime
    python = Path(mxnet_python or local.mxnet_python())
    client = client or s3.make_client()
    output = s3.S3Uri.parse(request["OutputDataConfig"]["S3OutputPath"]).join(name, MODEL_TAIL[0])

    job_dir = Path(workdir) / name
    status, secondary, reason = "Completed", "Completed", None
    lines: list[tuple[datetime, str]] = []
    training_start = training_end = None
    model_uri = None
    try:
        _stage(request, client, job_dir)
        if not python.exists():
            raise _JobFailure(f"AlgorithmError: the algorithm environment {python} does not exist (make venvs)")
        training_start = datetime.now(UTC)
        if stop is not None and stop.is_set():  # stopped while its data was staged: the trainer never starts
            rc, why = None, "stop"
        else:
            rc, why, lines = _run_trainer(
                python, job_dir, deadline, stop_grace_s, job_dir / "training.log", on_line, stop
            )
        training_end = datetime.now(UTC)
        status, secondary, reason = _classify(rc, why, job_dir, max_runtime)
        if status != "Failed":
            model_uri = _upload(client, job_dir, output)
        if model_uri is None and status == "Stopped":
            if reason:
                reason = f"{reason} No model was saved before the stop."
            else:
                log.info("job %s was stopped before an epoch completed: no model to upload", name)
    except _JobFailure as err:
        status, secondary, reason = "Failed", "Failed", str(err)

    describe = _describe(request, status, secondary, reason, max_runtime, created, lines, model_uri)
    if training_start is not None:
        describe["TrainingStartTime"] = training_start
        describe["TrainingEndTime"] = training_end or describe["LastModifiedTime"]
        describe["TrainingTimeInSeconds"] = max(
            1, round((describe["TrainingEndTime"] - training_start).total_seconds())
        )
    (job_dir / "describe.json").write_text(json.dumps(describe, indent=2, default=str))
    log.info("training job %s: %s%s", name, status, f" ({reason})" if reason else "")
    return describe


def _stage(request: dict[str, Any], client: S3Client, job_dir: Path) -> None:
    """A fresh job folder in the container's layout: the config files and every channel's data."""
    if job_dir.exists():
        shutil.rmtree(job_dir)
    job_dir.mkdir(parents=True)
    write_config(job_dir, request)
    for channel in request["InputDataConfig"]:
        uri = channel["DataSource"]["S3DataSource"]["S3Uri"]
        stage_channel(client, uri, job_dir / "input" / "data" / channel["ChannelName"])


def _classify(rc: int | None, why: str | None, job_dir: Path, max_runtime: int) -> tuple[str, str, str | None]:
    """(TrainingJobStatus, SecondaryStatus, FailureReason) from how the trainer ended."""
    failure = job_dir / "output" / "failure"
    if why == "deadline":
        return (
            "Stopped",
            "MaxRuntimeExceeded",
            (
                f"MaxRuntimeExceeded: Training job ran longer than StoppingCondition.MaxRuntimeInSeconds "
                f"({max_runtime} s) and was stopped."
            ),
        )
    if why == "stop" and rc != 0 and not failure.exists():
        # 143 (the trainer's own SIGTERM exit), -15/-9 (stopped before its handler was set, or killed after the
        # grace period) or None (never started). A trainer that finished before it saw the stop exited 0 and
        # stays Completed, as a job SageMaker could not stop in time does.
        return "Stopped", "Stopped", None
    if rc != 0:
        text = failure.read_text().strip() if failure.exists() else ""
        return (
            "Failed",
            "Failed",
            (text or f"AlgorithmError: the trainer exited with status {rc}; see {job_dir / 'training.log'}"),
        )
    return "Completed", "Completed", None


def _upload(client: S3Client, job_dir: Path, output: s3.S3Uri) -> s3.S3Uri | None:
    """model.tar.gz (and output.tar.gz when the trainer wrote output data) to the job's output; None without a
    saved model."""
    model_dir = job_dir / "model"
    if not any(p.is_file() and not p.name.startswith(".") for p in model_dir.rglob("*")):
        return None
    model_uri = output.join(MODEL_TAIL[1])
    archive = job_dir / "model.tar.gz"
    _tar(model_dir, archive)
    client.upload_file(str(archive), model_uri.bucket, model_uri.key)
    data_dir = job_dir / "output" / "data"
    if any(data_dir.iterdir()):
        _tar(data_dir, job_dir / "output.tar.gz")
        out_uri = output.join("output.tar.gz")
        client.upload_file(str(job_dir / "output.tar.gz"), out_uri.bucket, out_uri.key)
    log.info("uploaded %s", model_uri)
    return model_uri


def _describe(
    request: dict[str, Any],
    status: str,
    secondary: str,
    reason: str | None,
    max_runtime: int,
    created: datetime,
    lines: list[tuple[datetime, str]],
    model_uri: s3.S3Uri | None,
) -> dict[str, Any]:
    """The DescribeTrainingJob answer for a job that has ended (without its training times)."""
    describe: dict[str, Any] = {
        "TrainingJobName": request["TrainingJobName"],
        "TrainingJobArn": ARN_PREFIX + request["TrainingJobName"].lower(),
        "TrainingJobStatus": status,
        "SecondaryStatus": secondary,
        "HyperParameters": dict(request.get("HyperParameters", {})),
        "AlgorithmSpecification": {
            **request["AlgorithmSpecification"],
            "MetricDefinitions": [dict(d) for d in METRIC_DEFINITIONS],
        },
        "RoleArn": request["RoleArn"],
        "InputDataConfig": request["InputDataConfig"],
        "OutputDataConfig": request["OutputDataConfig"],
        "ResourceConfig": request.get("ResourceConfig", {}),
        "StoppingCondition": {"MaxRuntimeInSeconds": max_runtime},
        "CreationTime": created,
        "LastModifiedTime": datetime.now(UTC),
        "FinalMetricDataList": parse_metrics(lines),
    }
    if model_uri is not None:
        describe["ModelArtifacts"] = {"S3ModelArtifacts": str(model_uri)}
    if reason:
        describe["FailureReason"] = reason[:FAILURE_REASON_MAX]
    return describe
