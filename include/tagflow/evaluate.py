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
`candidate` (mAP: macro over the labels with >= 1 positive; micro_mAP; micro_f1/macro_f1 at the per-label
F1-maximising thresholds and micro_f1_at_0.5/macro_f1_at_0.5; accuracy: Hamming accuracy at 0.5; per_label: name,
ap, support, threshold, f1, baseline_ap; `model`; `training`: the model's per-epoch record from its metrics.json, None
for a SageMaker built-in model, which writes none), `baselines` (label_frequency_mAP, label_frequency_micro_mAP,
all_negative_accuracy), `label_names`, `split`, `model`, `champion` (the same, or what is known of a model that
cannot be scored on this split), `gate` (tagflow.deploy.gate_by_evaluation) and `leakage` (`split_leakage`: the
validation images within a few bits of a training image's perceptual hash, tagflow.leakage; computed once per pair
of train.rec and val.rec digests and cached beside the scores, at `DATASET/evaluation-cache/leakage-PAIR-HASH-vN.npz`).

Beside it `write_evaluation` puts the report a person reads (tagflow.report): `report.html`, one self-contained file,
and the PNGs it embeds. It rereads what is not in the document: the candidate's scores from the cache, the
manifest's label counts, a sample of validation images from val.rec (ranged GETs through val.idx), and each
leakage example's two images (ranged GETs of val.rec and train.rec through their .idx).
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
import time
from collections import deque
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from tagflow import leakage, s3
from tagflow.deploy import DEFAULT_LIFT, DEFAULT_THRESHOLD, DEFAULT_TOLERANCE, gate_by_evaluation
from tagflow.errors import InputError, TagflowError, quote
from tagflow.layout import DatasetLayout
from tagflow.local import REPO, process
from tagflow.names import check_dataset_uri

if TYPE_CHECKING:
    from tagflow.s3 import S3Client

log = logging.getLogger(__name__)

EVALUATOR = REPO / "algo" / "ic_eval.py"
SCORES_FORMAT = 1  # bump when ic_eval's scores change meaning (preprocessing), so old cached scores are not reused
DEFAULT_BATCH_SIZE = 64
MAX_EXTRACTED_BYTES = 4 * 1024**3  # as the endpoint's limit (algo/ic_serve.py)
REPORT_NAME = "report.html"
LEAKAGE_FORMAT = 1  # bump when the cached nearest distances change meaning (leakage.HASH names the hash itself)
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
        layout = DatasetLayout.of(dataset)
        self.rec_uri, self.idx_uri, manifest_uri = layout.val_rec, layout.val_idx, layout.manifest
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
            self.label_counts = {split: [int(counts[name]) for name in self.label_names]
                                 for split, counts in self.manifest["label_counts"].items()}  # fmt: skip
            train_count = int(self.manifest["counts"]["train"])
            train_labels = self.manifest["label_counts"]["train"]
            self.frequency = [train_labels[name] / max(train_count, 1) for name in self.label_names]
            self.images = int(self.manifest["counts"]["val"])
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(
                f"{manifest_uri}: missing or bad field {err} (expected the output of `tagflow pack`)"
            ) from None
        self.rec_bytes = int(head["ContentLength"])
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


def cache_uri(dataset: s3.S3Uri, model_sha256: str, split_digest: str) -> s3.S3Uri:
    """Where a model's scores on one split are cached (module docstring)."""
    name = f"{model_sha256[:32]}-{split_digest[:40]}-v{SCORES_FORMAT}.npz"
    return DatasetLayout.of(dataset).evaluation_cache.join(name)


def put_scores(client: S3Client, uri: s3.S3Uri, info: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Cache `arrays` (scores, labels, ids) and the model's description at `uri`, whole (one PUT)."""
    buffer = io.BytesIO()
    np.savez(buffer, model=np.array(json.dumps(info)), **arrays)
    client.put_object(Bucket=uri.bucket, Key=uri.key, Body=buffer.getvalue())


def read_scores(client: S3Client, uri: s3.S3Uri) -> dict[str, Any] | None:
    """{"model": info, "scores", "labels", "ids"} cached at `uri`, or None when there is none."""
    cached = _read_cached(client, uri)
    if cached is None:
        return None
    return {"model": json.loads(str(cached["model"])), "scores": cached["scores"], "labels": cached["labels"],
            "ids": cached["ids"]}  # fmt: skip


def _read_cached(client: S3Client, uri: s3.S3Uri) -> dict[str, np.ndarray] | None:
    """The arrays of the .npz cached at `uri` (put_scores wrote it), or None when there is none."""
    try:
        body = client.get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    with np.load(io.BytesIO(body)) as cached:
        return {name: cached[name] for name in cached.files}


def leakage_cache_uri(dataset: s3.S3Uri, train_digest: str, val_digest: str) -> s3.S3Uri:
    """Where the leakage check of one (train.rec, val.rec) pair is cached: beside the scores, keyed by both
    records' digests (a model's scores depend on val.rec only; the check on both)."""
    pair = hashlib.sha256(f"{train_digest}\n{val_digest}".encode()).hexdigest()
    return DatasetLayout.of(dataset).evaluation_cache.join(f"leakage-{pair[:40]}-{leakage.HASH}-v{LEAKAGE_FORMAT}.npz")


def split_leakage(
    client: S3Client, split: Split, *, max_distance: int = leakage.DEFAULT_MAX_DISTANCE, workers: int = 4
) -> dict[str, Any]:
    """The evaluation's `leakage` block: the validation images within `max_distance` bits of a training image
    (tagflow.leakage.summarize: method, max_distance, validation_images, training_images, leaked, fraction,
    by_distance, examples), plus `train` (train.rec's URI and digest), `cached` (the cache object read, or None
    when computed here) and `seconds` (hashing and comparing, when it was computed).

    The dataset's train.rec and val.rec are hashed and compared once per pair of digests: each validation image's
    nearest distance and training ID go to the evaluation cache (one PUT), so the candidate, the champion and every
    later run on the same data read them, for any max distance."""
    layout = DatasetLayout.of(split.dataset)
    train_rec, train_idx = layout.train_rec, layout.train_idx
    head = _head(client, train_rec, f"{split.dataset}: no training/train.rec beside the validation split")
    train_digest = _record_digest(head)
    cache = leakage_cache_uri(split.dataset, train_digest, split.digest)
    cached = _read_cached(client, cache)
    if cached is None:
        started = time.perf_counter()
        local = split.folder / "training" / "train.rec"
        s3.get_file(client, train_rec, local)
        fetched = time.perf_counter()
        train = leakage.record_hashes(local, workers)
        local.unlink()
        val = leakage.record_hashes(split.files()[0], workers)
        hashed = time.perf_counter()
        distance, nearest_ids = leakage.match(val, train)
        seconds = {"download": round(fetched - started, 3), "hash": round(hashed - fetched, 3),
                   "compare": round(time.perf_counter() - hashed, 3)}  # fmt: skip
        info = {"train": train_digest, "val": split.digest, "training_images": len(train[0]), "seconds": seconds}
        cached = {"info": np.array(json.dumps(info)), "val_ids": val[0], "distance": distance,
                  "nearest_ids": nearest_ids}  # fmt: skip
        buffer = io.BytesIO()
        np.savez(buffer, **cached)
        client.put_object(Bucket=cache.bucket, Key=cache.key, Body=buffer.getvalue())
        hit = None
    else:
        info, hit = json.loads(str(cached["info"])), str(cache)
        log.info("leakage check of this dataset read from %s", cache)
    block = leakage.summarize(cached["val_ids"], cached["distance"], cached["nearest_ids"], info["training_images"],
                              max_distance)  # fmt: skip
    return {**block, "train": {"uri": str(train_rec), "idx": str(train_idx), "digest": train_digest},
            "cached": hit, "seconds": info["seconds"]}  # fmt: skip


def _head(client: S3Client, uri: s3.S3Uri, missing: str) -> dict[str, Any]:
    """HeadObject of `uri`; InputError(`missing`, naming `uri`) when it is not there."""
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=uri.bucket, Key=uri.key)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code", "") in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            raise InputError(f"{missing} ({uri} is expected; publish it with `tagflow run` or the DAG)") from None
        raise


def _record_digest(head: dict[str, Any]) -> str:
    """A record file's digest from its HeadObject: the sha256 tagflow recorded on it, else its ETag (as Split's)."""
    etag = head["ETag"].strip('"')
    return head.get("Metadata", {}).get(s3.SHA256_METADATA_KEY) or f"etag-{etag}"


def leakage_line(doc: dict[str, Any]) -> str | None:
    """One line for a summary when the evaluation found likely leaks (None when none or not checked)."""
    block = doc.get("leakage")
    if not block or not block.get("leaked"):
        return None
    return (
        f"leakage: {block['leaked']} of {block['validation_images']} validation images "
        f"({100 * block['fraction']:.1f} %) within {block['max_distance']} bits of a training image — the validation "
        "figures are optimistic; give the split a group key (form: split_group_regex, CLI: --group-regex)"
    )


HISTORY_FIELDS = ("epoch", "train_accuracy", "validation_accuracy", "validation_mAP", "validation_micro_f1",
                  "validation_macro_f1")  # fmt: skip


def training_record(archive: Path) -> dict[str, Any] | None:
    """The training curves the local trainer records in the model's metrics.json (`history`: one entry per epoch,
    numbered as the log's Epoch[E]; `best_epoch`, `selected_by`), or None: SageMaker's built-in writes no
    metrics.json, and a metrics.json without a history records no curve either."""
    try:
        with tarfile.open(archive) as tar:
            member = next((m for m in tar if m.isfile() and m.name.lstrip("./") == "metrics.json"), None)
            raw = tar.extractfile(member).read() if member is not None else None  # type: ignore[union-attr]
    except (tarfile.TarError, EOFError, OSError):
        return None  # an unreadable archive is reported by _extract, which names it
    if raw is None:
        return None
    try:
        metrics = json.loads(raw)
        history = [{k: h[k] for k in HISTORY_FIELDS if isinstance(h.get(k), (int, float))}
                   for h in metrics.get("history") or []]  # fmt: skip
    except (ValueError, TypeError, AttributeError):
        return None
    if not history:
        return None
    best = metrics.get("best_epoch")
    return {"history": history, "best_epoch": best if isinstance(best, int) else None,
            "selected_by": metrics.get("selected_by")}  # fmt: skip


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
    cache = cache_uri(split.dataset, digest, split.digest)
    model = {"uri": model_uri, "sha256": digest}
    training = training_record(archive)
    cached = read_scores(client, cache)
    if cached is not None:
        log.info("%s model %s: scores on this split read from %s", role, model_uri, cache)
        return {**cached, "model": {**model, **cached["model"], "cached": str(cache)}, "training": training}
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
            return {"model": {**model, **info}, "problem": problem, "training": training}
        if code == 2 and problem:
            raise InputError(f"the {role} model {model_uri} cannot be evaluated: {problem}")
        raise TagflowError(
            f"evaluating the {role} model {model_uri} failed (exit status {code}):\n  " + "\n  ".join(tail[-8:])
        )
    assert info is not None
    arrays = {name: np.load(out / f"{name}.npy") for name in ("scores", "labels", "ids")}
    put_scores(client, cache, info, arrays)
    return {"model": {**model, **info, "cached": None}, "training": training, **arrays}


def section(scored: dict[str, Any], split: Split) -> dict[str, Any]:
    """One model's part of the evaluation document, from its scores (or what is known of a model not scored)."""
    info = scored["model"]
    names = info.get("label_names")
    if names is None and info["num_outputs"] == len(split.label_names):
        names = split.label_names  # the trainer did not record its labels: the dataset's are the model's
    out: dict[str, Any] = {"model": info, "labels": info["num_outputs"], "label_names": names,
                           "training": scored.get("training")}  # fmt: skip
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
        candidate = score(model_uri, split, work, role="candidate", **common)
        if "scores" not in candidate:
            raise InputError(
                f"the candidate model {model_uri} has {candidate['model']['num_outputs']} outputs but the dataset "
                f"{dataset} has {len(split.label_names)} labels: it was not trained on this dataset"
            )
        champion = None if champion_uri is None else score(champion_uri, split, work, role="champion", **common)
        leaks = split_leakage(client, split)
    return document(model_uri, split, candidate, champion, lift=lift, threshold=threshold, tolerance=tolerance,
                    leakage=leaks)  # fmt: skip


def document(
    model_uri: str,
    split: Split,
    scored: dict[str, Any],
    champion_scored: dict[str, Any] | None,
    *,
    lift: float = DEFAULT_LIFT,
    threshold: float = DEFAULT_THRESHOLD,
    tolerance: float = DEFAULT_TOLERANCE,
    leakage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The evaluation document (module docstring) of the candidate's and the champion's scores on `split`, with
    `leakage` (split_leakage's block; None: not checked)."""
    candidate = section(scored, split)
    champion = None if champion_scored is None else section(champion_scored, split)
    baselines = candidate.pop("baselines")
    if champion is not None:
        champion.pop("baselines", None)
    decision = gate_by_evaluation(
        candidate, champion, baseline=baselines["label_frequency_mAP"], lift=lift, threshold=threshold,
        tolerance=tolerance,
    )  # fmt: skip
    return {
        "dataset": str(split.dataset),
        "split": split.describe(),
        "label_names": split.label_names,
        "model": {"uri": model_uri, "sha256": candidate["model"]["sha256"]},
        "candidate": candidate,
        "baselines": baselines,
        "champion": champion,
        "gate": {**decision, "rule": {"metric": "mAP", "lift": lift, "threshold": threshold, "tolerance": tolerance}},
        "leakage": leakage,
    }


def evaluation_uri(dataset_uri: str, job: str) -> s3.S3Uri:
    from tagflow.names import check_job_name
    from tagflow.sagemaker_config import TRAINING_NAME_MAX

    check_job_name(job, TRAINING_NAME_MAX, "job")
    return DatasetLayout.of(check_dataset_uri(dataset_uri, "--dataset")).evaluation(job)


def report_uri(dataset_uri: str, job: str) -> s3.S3Uri:
    """DATASET/output/JOB/evaluation/report.html, beside evaluation.json."""
    return _beside(evaluation_uri(dataset_uri, job), REPORT_NAME)


def _beside(uri: s3.S3Uri, name: str) -> s3.S3Uri:
    return s3.S3Uri(uri.bucket, f"{uri.key.rsplit('/', 1)[0]}/{name}")


def sample_images(client: S3Client, split: Split, ids: np.ndarray, count: int) -> list[dict[str, Any]]:
    """`count` validation images evenly spaced over the split (file order), each {"position", "id", "labels",
    "image"}: val.idx read whole, then one ranged GET of val.rec per record (`_ranged_records`). The records must
    be the ones `ids` (the scores' rows) name."""
    if count < 1 or len(ids) == 0:
        return []
    with tempfile.TemporaryDirectory(prefix="tagflow-report-") as tmp:
        ranked = _ranked_index(client, split.idx_uri, Path(tmp) / "val.idx")
        if [key for _, key in ranked] != [int(i) for i in ids]:
            raise TagflowError(f"{split.idx_uri} does not list the images the evaluation scored: evaluate again")
        positions = sorted({int(p) for p in np.linspace(0, len(ranked) - 1, min(count, len(ranked))).round()})
        records = _ranged_records(client, split.rec_uri, split.rec_bytes, ranked, positions, Path(tmp))
    return [{"position": p, "id": int(header.id), "labels": labels, "image": image}
            for p, (header, labels, image) in zip(positions, records, strict=True)]  # fmt: skip


def _ranked_index(client: S3Client, idx_uri: s3.S3Uri, dest: Path) -> list[tuple[int, int]]:
    """A .idx file's (offset, image ID) pairs in file order."""
    from tagflow.recordio import read_index

    s3.get_file(client, idx_uri, dest)
    try:
        return sorted((offset, key) for key, offset in read_index(dest).items())
    except ValueError as err:
        raise InputError(f"{idx_uri}: {err}") from None


def _ranged_records(
    client: S3Client, rec_uri: s3.S3Uri, rec_bytes: int, ranked: list[tuple[int, int]], positions: list[int],
    folder: Path,
) -> list[tuple[Any, np.ndarray, bytes]]:  # fmt: skip
    """The records at `positions` of `ranked` (`_ranked_index`), one ranged GET each (a record runs from its offset
    to the next one's), decoded by tagflow.recordio: (header, labels, image) in the order of `positions`."""
    from tagflow.recordio import RecordReader, unpack_payload

    ends = [offset for offset, _ in ranked[1:]] + [rec_bytes]
    rec = folder / f"picked-{rec_uri.key.rsplit('/', 1)[-1]}"
    with rec.open("wb") as out:  # the chosen records back to back: a .rec file of their own
        for p in positions:
            got = client.get_object(Bucket=rec_uri.bucket, Key=rec_uri.key, Range=f"bytes={ranked[p][0]}-{ends[p] - 1}")
            out.write(got["Body"].read())
    records = []
    try:
        with RecordReader(rec) as reader:
            for p, (_, payload) in zip(positions, reader, strict=True):
                header, labels, image = unpack_payload(payload)
                if header.id != ranked[p][1]:
                    raise ValueError(f"record {p} has ID {header.id}, its .idx says {ranked[p][1]}")
                records.append((header, labels, image))
    except ValueError as err:
        raise InputError(f"{rec_uri}: {err}") from None
    return records


def leak_images(client: S3Client, split: Split, block: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The leakage block's examples, each with both images: {"val_id", "train_id", "distance", "val_image",
    "train_image"} (ranged GETs through val.idx and train.idx); refuses when train.rec changed since the check."""
    examples = (block or {}).get("examples") or []
    if not examples:
        return []
    train = block["train"]  # type: ignore[index]
    train_rec, train_idx = s3.S3Uri.parse(train["uri"]), s3.S3Uri.parse(train["idx"])
    head = _head(client, train_rec, f"{split.dataset}: no training/train.rec beside the validation split")
    digest = _record_digest(head)
    if digest != train["digest"]:
        raise TagflowError(
            f"{train_rec} changed since the evaluation (digest {digest[:16]}, checked {train['digest'][:16]}): "
            "evaluate again before writing its report"
        )
    with tempfile.TemporaryDirectory(prefix="tagflow-report-") as tmp:
        images: dict[str, dict[int, bytes]] = {}
        for side, rec_uri, idx_uri, size in (("val", split.rec_uri, split.idx_uri, split.rec_bytes),
                                             ("train", train_rec, train_idx, int(head["ContentLength"]))):  # fmt: skip
            ranked = _ranked_index(client, idx_uri, Path(tmp) / f"{side}.idx")
            where = {key: p for p, (_, key) in enumerate(ranked)}
            wanted = sorted({int(e[f"{side}_id"]) for e in examples})
            missing = [key for key in wanted if key not in where]
            if missing:
                raise TagflowError(
                    f"{idx_uri} does not list image {missing[0]} the leakage check found: evaluate again"
                )
            records = _ranged_records(client, rec_uri, size, ranked, [where[k] for k in wanted], Path(tmp))
            images[side] = {int(header.id): image for header, _, image in records}
    return [{**e, "val_image": images["val"][e["val_id"]], "train_image": images["train"][e["train_id"]]}
            for e in examples]  # fmt: skip


def build_report(doc: dict[str, Any], dataset_uri: str, job: str, client: S3Client, *, thumbnails: int = 24
                 ) -> dict[str, bytes]:  # fmt: skip
    """The report's files (tagflow.report.render) for `doc`, from the candidate's cached scores, the manifest and
    `thumbnails` validation images; refuses when the split changed since `doc` was computed."""
    from tagflow import report

    dataset = s3.S3Uri.parse(check_dataset_uri(dataset_uri, "--dataset"))
    if doc.get("dataset") != str(dataset):
        raise InputError(f"the evaluation is of the dataset {doc.get('dataset')}, not {dataset}")
    with tempfile.TemporaryDirectory(prefix="tagflow-report-") as tmp:
        split = Split(client, dataset, Path(tmp))
    if split.digest != doc["split"]["digest"]:
        raise TagflowError(
            f"{split.rec_uri} changed since the evaluation (digest {split.digest[:16]}, evaluated "
            f"{str(doc['split']['digest'])[:16]}): evaluate again before writing its report"
        )
    cache = cache_uri(dataset, doc["candidate"]["model"]["sha256"], split.digest)
    scored = read_scores(client, cache)
    if scored is None:
        raise TagflowError(f"the candidate's scores {cache} are gone (deleted since the evaluation): evaluate again")
    images = sample_images(client, split, scored["ids"], thumbnails)
    return report.render(doc, scores=scored["scores"], labels=scored["labels"], label_counts=split.label_counts,
                         images=images, leaks=leak_images(client, split, doc.get("leakage")), job=job)  # fmt: skip


def write_evaluation(
    doc: dict[str, Any],
    dataset_uri: str,
    job: str,
    client: S3Client | None = None,
    *,
    report: bool = True,
    thumbnails: int = 24,
) -> str:
    """Put `doc` at DATASET/output/JOB/evaluation/evaluation.json, whole (one PUT), and beside it the report
    (report.html and its PNGs; `report=False`: none); returns evaluation.json's URI.

    Everything is rendered before anything is written, so a bad input writes nothing. Then, in this order: any
    report.html of an earlier try is deleted, the PNGs put (stale ones deleted), evaluation.json put, report.html
    put last: a report.html present is whole and shows the evaluation.json beside it, and one that failed
    half-way leaves none (a retry writes all again). The HTML embeds its PNGs, so it never shows another try's."""
    client = client or s3.make_client()
    uri = evaluation_uri(dataset_uri, job)
    data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
    files = build_report(doc, dataset_uri, job, client, thumbnails=thumbnails) if report else {}
    page = _beside(uri, REPORT_NAME)
    client.delete_object(Bucket=page.bucket, Key=page.key)
    for name, body in files.items():
        if name != REPORT_NAME:
            _put(client, _beside(uri, name), body, "image/png")
    folder = uri.key.rsplit("/", 1)[0] + "/"
    for key in s3.list_objects(client, s3.S3Uri(uri.bucket, folder)):
        name = key.rsplit("/", 1)[-1]
        if key.startswith(folder) and name.endswith(".png") and name not in files:
            client.delete_object(Bucket=uri.bucket, Key=key)
    _put(client, uri, data, "application/json")
    if report:
        _put(client, page, files[REPORT_NAME], "text/html; charset=utf-8")
    return str(uri)


def _put(client: S3Client, uri: s3.S3Uri, data: bytes, content_type: str) -> None:
    client.put_object(Bucket=uri.bucket, Key=uri.key, Body=data, ContentType=content_type,
                      Metadata={s3.SHA256_METADATA_KEY: hashlib.sha256(data).hexdigest()})  # fmt: skip
