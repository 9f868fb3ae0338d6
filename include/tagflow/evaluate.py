"""The evaluation stage: score a model (and the serving one) on a dataset's current validation split, and judge.

`evaluate(model_uri, dataset_uri)` reads `DATASET/validation/val.rec` + `val.idx` and `DATASET/training/manifest.json`
(label names; the training split's label counts give the label-frequency baseline's scores), fetches the
model.tar.gz (`s3://` or a local path; the built-in's layout, so a SageMaker-trained model and a local one alike),
unpacks it (tarfile's "data" filter) and runs algo/ic_eval.py in the algorithm environment (batched inference, the
trainer's validation preprocessing). Metrics come from algo/ic_metrics.py, the trainer's own (see its docstring).

Scores are cached in S3 by (model digest, split digest), at `DATASET/evaluation-cache/MODEL-SPLIT-vN.npz` (written
whole by one PUT): S3 because the tasks of one run may run on different workers, so a champion is scored once per
split wherever the next evaluation runs. Metrics are recomputed from cached scores, never cached themselves. The
model digest is the archive's sha256; the split digest is the sha256 tagflow recorded on val.rec (else its ETag).

The document (`write_evaluation` puts it at `DATASET/output/JOB/evaluation/evaluation.json`):
`candidate` (mAP, micro_mAP, F1s, accuracy, per_label: name, ap, support, threshold, f1, baseline_ap; `model`),
`baselines`, `label_names`, `split`, `model`, `champion` (the same, or what is known of a model that cannot be
scored on this split) and `gate` (tagflow.deploy.gate_by_evaluation).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
from collections import deque
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from tagflow import s3
from tagflow.deploy import DEFAULT_LIFT, DEFAULT_THRESHOLD, DEFAULT_TOLERANCE, gate_by_evaluation
from tagflow.errors import InputError, TagflowError, quote
from tagflow.local import REPO, process
from tagflow.names import check_dataset_uri

if TYPE_CHECKING:
    from tagflow.s3 import S3Client

log = logging.getLogger(__name__)

EVALUATOR = REPO / "algo" / "ic_eval.py"
SCORES_FORMAT = 1  # bump when ic_eval's scores change meaning (preprocessing), so old cached scores are not reused
CACHE_FOLDER = "evaluation-cache"
DEFAULT_BATCH_SIZE = 64
MAX_EXTRACTED_BYTES = 4 * 1024**3  # as the endpoint's limit (algo/ic_serve.py)
MODEL_FIELDS = ("mAP", "micro_mAP", "micro_f1", "macro_f1", "micro_f1_at_0.5", "macro_f1_at_0.5", "accuracy")


def metrics_module() -> ModuleType:
    """algo/ic_metrics.py loaded by path (plain numpy: it imports neither MXNet nor tagflow)."""
    name = "tagflow_algo_ic_metrics"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "algo" / "ic_metrics.py")
    if spec is None or spec.loader is None:
        raise TagflowError(f"cannot load the evaluation metrics {REPO / 'algo' / 'ic_metrics.py'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _fetch(client: S3Client, location: str, dest: Path, what: str) -> None:
    """Copy `location` (s3:// or a local file) to `dest`; InputError naming it when it is not there."""
    from botocore.exceptions import ClientError

    if location.startswith("s3://"):
        uri = s3.S3Uri.parse(location)
        try:
            s3.get_file(client, uri, dest)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
                raise InputError(f"{what} {location}: no such object") from None
            raise
        return
    path = Path(location)
    if not path.is_file():
        raise InputError(f"{what} {quote(location)}: {'a folder' if path.is_dir() else 'no such file'}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(path.read_bytes())


def _extract(archive: Path, dest: Path, source: str) -> None:
    """Unpack a model.tar.gz with tarfile's "data" filter (no absolute paths, links out of `dest` or devices)."""
    total = 0
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                total += member.size
                if total > MAX_EXTRACTED_BYTES:
                    raise InputError(f"model {source}: the archive unpacks to over {MAX_EXTRACTED_BYTES} bytes")
                tar.extract(member, dest, filter="data")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise InputError(f"model {source}: not a readable model.tar.gz ({str(err).splitlines()[0]})") from None


class Split:
    """The dataset's current validation split and its manifest, fetched once into `folder`."""

    def __init__(self, client: S3Client, dataset: s3.S3Uri, folder: Path) -> None:
        from botocore.exceptions import ClientError

        self.client, self.dataset, self.folder = client, dataset, folder
        self.rec_uri, self.idx_uri = dataset.join("validation", "val.rec"), dataset.join("validation", "val.idx")
        manifest_uri = dataset.join("training", "manifest.json")
        try:
            self.manifest = json.loads(
                client.get_object(Bucket=manifest_uri.bucket, Key=manifest_uri.key)["Body"].read()
            )
            head = client.head_object(Bucket=self.rec_uri.bucket, Key=self.rec_uri.key)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
                raise InputError(
                    f"{dataset}: no published dataset here ({manifest_uri} and {self.rec_uri} are expected; "
                    "publish one with `tagflow run` or the DAG)"
                ) from None
            raise
        try:
            self.label_names = list(self.manifest["label_names"])
            train_count = int(self.manifest["counts"]["train"])
            train_labels = self.manifest["label_counts"]["train"]
            self.frequency = [train_labels[name] / max(train_count, 1) for name in self.label_names]
            self.images = int(self.manifest["counts"]["val"])
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(
                f"{manifest_uri}: missing or bad field {err} (expected the output of `tagflow pack`)"
            ) from None
        self.etag = head["ETag"].strip('"')
        self.sha256 = head.get("Metadata", {}).get(s3.SHA256_METADATA_KEY)
        self.digest = self.sha256 or f"etag-{self.etag}"
        self._fetched = False

    def files(self) -> tuple[Path, Path, Path]:
        """(val.rec, val.idx, label-frequency JSON), downloaded on first use (a cached evaluation needs none)."""
        folder = self.folder / "validation"
        if not self._fetched:
            s3.get_file(self.client, self.rec_uri, folder / "val.rec")
            s3.get_file(self.client, self.idx_uri, folder / "val.idx")
            (self.folder / "label-frequency.json").write_text(json.dumps(self.frequency))
            self._fetched = True
        return folder / "val.rec", folder / "val.idx", self.folder / "label-frequency.json"

    def describe(self) -> dict[str, Any]:
        return {"uri": str(self.rec_uri), "etag": self.etag, "sha256": self.sha256, "digest": self.digest,
                "images": self.images}  # fmt: skip


def run_evaluator(python: Path, args: list[str]) -> tuple[int, list[str]]:
    """Run algo/ic_eval.py (its own process group, ending with this process; stopped by a task's on_kill through
    `process.owned`): (exit status, the last lines of its output)."""
    tail: deque[str] = deque(maxlen=20)
    with process.owned(
        subprocess.Popen(
            [str(python), str(EVALUATOR), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=process.child_env({**os.environ, "PYTHONUNBUFFERED": "1"}),
            start_new_session=True,
        )
    ) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line.rstrip("\n"))
                log.info("[ic_eval] %s", tail[-1])
            proc.wait()
        finally:
            if proc.poll() is None:  # interrupted here: never leave the evaluator behind
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return proc.returncode, list(tail)


def score(
    model_uri: str,
    split: Split,
    work: Path,
    *,
    client: S3Client,
    python: Path,
    batch_size: int,
    role: str,
) -> dict[str, Any]:
    """Scores of `model_uri` on `split`: {"model": {...}, "scores", "labels", "ids"} (arrays), or without the
    arrays and with "problem" when the model cannot be scored on this split (another number of labels)."""
    archive = work / f"{role}.tar.gz"
    _fetch(client, model_uri, archive, f"the {role} model")
    digest = s3.file_sha256(archive)
    cache = split.dataset.join(CACHE_FOLDER, f"{digest[:32]}-{split.digest[:40]}-v{SCORES_FORMAT}.npz")
    model = {"uri": model_uri, "sha256": digest}
    try:
        body = client.get_object(Bucket=cache.bucket, Key=cache.key)["Body"].read()
    except client.exceptions.NoSuchKey:
        body = None
    if body is not None:
        with np.load(io.BytesIO(body)) as cached:
            info = json.loads(str(cached["model"]))
            log.info("%s model %s: scores on this split read from %s", role, model_uri, cache)
            return {"model": {**model, **info, "cached": str(cache)}, "scores": cached["scores"],
                    "labels": cached["labels"], "ids": cached["ids"]}  # fmt: skip
    model_dir, out = work / f"{role}-model", work / f"{role}-out"
    _extract(archive, model_dir, model_uri)
    rec, idx, frequency = split.files()
    code, tail = run_evaluator(
        python,
        ["--model-dir", str(model_dir), "--rec", str(rec), "--idx", str(idx), "--label-frequency", str(frequency),
         "--batch-size", str(batch_size), "--out", str(out)],
    )  # fmt: skip
    info = json.loads((out / "model.json").read_text()) if (out / "model.json").is_file() else None
    if code != 0:
        problem = next((line.split(": ", 1)[1] for line in reversed(tail) if line.startswith("ClientError: ")), None)
        if code == 2 and info is not None and info["num_outputs"] != len(split.label_names):
            return {"model": {**model, **info}, "problem": problem}
        if code == 2 and problem:
            raise InputError(f"the {role} model {model_uri} cannot be evaluated: {problem}")
        raise TagflowError(
            f"evaluating the {role} model {model_uri} failed (exit status {code}):\n  " + "\n  ".join(tail[-8:])
        )
    assert info is not None
    arrays = {name: np.load(out / f"{name}.npy") for name in ("scores", "labels", "ids")}
    buffer = io.BytesIO()
    np.savez(buffer, model=np.array(json.dumps(info)), **arrays)
    client.put_object(Bucket=cache.bucket, Key=cache.key, Body=buffer.getvalue())
    return {"model": {**model, **info, "cached": None}, **arrays}


def section(scored: dict[str, Any], split: Split) -> dict[str, Any]:
    """One model's part of the evaluation document, from its scores (or what is known of a model not scored)."""
    info = scored["model"]
    names = info.get("label_names")
    if names is None and info["num_outputs"] == len(split.label_names):
        names = split.label_names  # the trainer did not record its labels: the dataset's are the model's
    out: dict[str, Any] = {"model": info, "labels": info["num_outputs"], "label_names": names}
    if "scores" not in scored:
        return {**out, "scored": False, "problem": scored.get("problem")}
    doc = metrics_module().evaluation(scored["scores"], scored["labels"], np.asarray(split.frequency))
    per_label = [{"name": name, **entry} for name, entry in zip(split.label_names, doc["per_label"], strict=True)]
    return {**out, "scored": True, **{k: doc[k] for k in MODEL_FIELDS}, "images": doc["images"],
            "labels_with_positives": doc["labels_with_positives"], "per_label": per_label,
            "baselines": doc["baselines"]}  # fmt: skip


def evaluate(
    model_uri: str,
    dataset_uri: str,
    *,
    client: S3Client | None = None,
    champion_uri: str | None = None,
    lift: float = DEFAULT_LIFT,
    threshold: float = DEFAULT_THRESHOLD,
    tolerance: float = DEFAULT_TOLERANCE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    mxnet_python: Path | None = None,
) -> dict[str, Any]:
    """Score `model_uri` (and `champion_uri`, the serving model) on the dataset's current validation split and
    decide with the default gate rule; returns the evaluation document (module docstring)."""
    from tagflow.pack import mxnet_python as default_python

    check_dataset_uri(dataset_uri, "--dataset")
    if batch_size < 1:
        raise InputError(f"batch size {batch_size}: expected at least 1")
    client = client or s3.make_client()
    python = Path(mxnet_python or default_python())
    if not python.exists():
        raise TagflowError(f"the algorithm environment {python} does not exist (make venvs)")
    dataset = s3.S3Uri.parse(dataset_uri)
    with tempfile.TemporaryDirectory(prefix="tagflow-evaluate-") as tmp:
        work = Path(tmp)
        split = Split(client, dataset, work)
        common = {"client": client, "python": python, "batch_size": batch_size}
        candidate = section(score(model_uri, split, work, role="candidate", **common), split)
        if not candidate["scored"]:
            raise InputError(
                f"the candidate model {model_uri} has {candidate['labels']} outputs but the dataset {dataset} has "
                f"{len(split.label_names)} labels: it was not trained on this dataset"
            )
        champion = None
        if champion_uri is not None:
            champion = section(score(champion_uri, split, work, role="champion", **common), split)
    baselines = candidate.pop("baselines")
    if champion is not None:
        champion.pop("baselines", None)
    decision = gate_by_evaluation(
        candidate, champion, baseline=baselines["label_frequency_mAP"], lift=lift, threshold=threshold,
        tolerance=tolerance,
    )  # fmt: skip
    return {
        "dataset": str(dataset),
        "split": split.describe(),
        "label_names": split.label_names,
        "model": {"uri": model_uri, "sha256": candidate["model"]["sha256"]},
        "candidate": candidate,
        "baselines": baselines,
        "champion": champion,
        "gate": {**decision, "rule": {"metric": "mAP", "lift": lift, "threshold": threshold, "tolerance": tolerance}},
    }


def evaluation_uri(dataset_uri: str, job: str) -> s3.S3Uri:
    from tagflow.names import check_job_name
    from tagflow.sagemaker_config import TRAINING_NAME_MAX

    check_job_name(job, TRAINING_NAME_MAX, "job")
    return s3.S3Uri.parse(check_dataset_uri(dataset_uri, "--dataset")).join("output", job, "evaluation",
                                                                             "evaluation.json")  # fmt: skip


def write_evaluation(doc: dict[str, Any], dataset_uri: str, job: str, client: S3Client | None = None) -> str:
    """Put `doc` at DATASET/output/JOB/evaluation/evaluation.json, whole (one PUT); returns its URI."""
    uri = evaluation_uri(dataset_uri, job)
    data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
    (client or s3.make_client()).put_object(
        Bucket=uri.bucket, Key=uri.key, Body=data, ContentType="application/json",
        Metadata={s3.SHA256_METADATA_KEY: hashlib.sha256(data).hexdigest()},
    )  # fmt: skip
    return str(uri)
