"""The per-label thresholds recorded for a model: they travel with it from the evaluation to predict and the endpoint.

The evaluation stage (tagflow.evaluate) chooses for each label the threshold that maximises F1 on the validation split
and `write_evaluation` stores it with the evaluation, beside the model in the training job's folder:

    PREFIX/output/JOB/output/model.tar.gz            the model (where SageMaker and the local runner put it)
    PREFIX/output/JOB/evaluation/evaluation.json     its evaluation: `model.sha256` (the archive's sha256),
                                                     `candidate.per_label[i].name` / `.threshold`, `label_names`

`recorded(model_uri)` reads that evaluation and checks it describes this very archive (the sha256 it recorded equals
the archive's): a retrained model under the same job name, or an evaluation copied from elsewhere, is refused naming
both, never used. A label is predicted when its probability is >= its threshold (`above`), as ic_metrics chose them.

There is no silent fallback: without an evaluation (`NoEvaluation`) or with another model's (`StaleEvaluation`)
callers say so; `tagflow predict` then needs `--threshold X`, and the local endpoint answers a request for labels
with 406 and the reason.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tagflow import s3
from tagflow.errors import InputError, quote
from tagflow.layout import EVALUATION_TAIL, MODEL_TAIL

if TYPE_CHECKING:
    from tagflow.s3 import S3Client


class NoEvaluation(InputError):
    """No evaluation is recorded for the model (not in the job layout, or nothing written beside it)."""


class StaleEvaluation(InputError):
    """The evaluation beside the model describes another archive (another sha256)."""


@dataclass(frozen=True)
class Thresholds:
    """One threshold per label, in the model's output order, and where they were recorded."""

    label_names: list[str]
    thresholds: list[float]
    evaluation: str  # the evaluation.json's URI
    model_sha256: str  # the archive they were chosen for

    def to_dict(self) -> dict[str, Any]:
        """What the endpoint is given with a model and reports at /metadata under `thresholds`."""
        return {"evaluation": self.evaluation, "model_sha256": self.model_sha256,
                "label_names": list(self.label_names), "thresholds": list(self.thresholds)}  # fmt: skip


def evaluation_beside(model_uri: str) -> s3.S3Uri:
    """Where the evaluation of `model_uri` (s3://…/JOB/output/model.tar.gz) is: s3://…/JOB/evaluation/evaluation.json.
    NoEvaluation for a model elsewhere (a local file, a URL, another key): nothing records thresholds for it."""
    expected = "s3://BUCKET/PREFIX/output/JOB/output/model.tar.gz, where training puts a model"
    if not model_uri.startswith("s3://"):
        raise NoEvaluation(f"model {quote(model_uri)} is not in S3: thresholds are kept beside models at {expected}")
    uri = s3.S3Uri.parse(model_uri)
    parts = uri.key.split("/")
    if len(parts) < 3 or tuple(parts[-2:]) != MODEL_TAIL:
        raise NoEvaluation(f"model {model_uri} is not at {expected}: no evaluation is recorded beside it")
    return s3.S3Uri(uri.bucket, "/".join([*parts[:-2], *EVALUATION_TAIL]))


def archive_sha256(model_uri: str, client: S3Client) -> str:
    """The sha256 of the model.tar.gz at `model_uri` (fetched to a temporary file, as the evaluation hashes it)."""
    from botocore.exceptions import ClientError

    with tempfile.TemporaryDirectory(prefix="tagflow-thresholds-") as tmp:
        path = Path(tmp) / "model.tar.gz"
        try:
            s3.get_file(client, s3.S3Uri.parse(model_uri), path)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code", "") in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
                raise InputError(f"model {model_uri}: no such object") from None
            raise
        return s3.file_sha256(path)


def parse(doc: Any, where: str) -> Thresholds:
    """The thresholds in an evaluation document (tagflow.evaluate's); InputError naming the field otherwise."""
    expected = "expected the evaluation.json `tagflow evaluate --job` writes"
    try:
        sha = doc["model"]["sha256"]
        per_label = doc["candidate"]["per_label"]
        names = [entry["name"] for entry in per_label]
        values = [entry["threshold"] for entry in per_label]
    except (KeyError, TypeError) as err:
        raise InputError(f"{where}: missing or bad field {err} ({expected})") from None
    if not isinstance(sha, str) or len(sha) != 64:
        raise InputError(f"{where}: model.sha256 is {quote(sha)}; {expected}")
    for i, (name, value) in enumerate(zip(names, values, strict=True)):
        if not isinstance(name, str):
            raise InputError(f"{where}: candidate.per_label[{i}].name is {quote(name)}; expected a label name")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InputError(f"{where}: candidate.per_label[{i}].threshold is {quote(value)}; expected a number")
    if not names:
        raise InputError(f"{where}: candidate.per_label is empty; {expected}")
    return Thresholds(names, [float(v) for v in values], where, sha)


def recorded(model_uri: str, *, client: S3Client | None = None, sha256: str | None = None) -> Thresholds:
    """The thresholds recorded for the model.tar.gz at `model_uri`, from the evaluation beside it, checked to
    describe this archive. `sha256` is the archive's digest when the caller has it (else the archive is fetched and
    hashed). NoEvaluation when none is recorded, StaleEvaluation when it describes another archive."""
    from botocore.exceptions import ClientError

    where = evaluation_beside(model_uri)
    client = client or s3.make_client()
    try:
        body = client.get_object(Bucket=where.bucket, Key=where.key)["Body"].read()
    except ClientError as err:
        if err.response.get("Error", {}).get("Code", "") in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            job = where.key.split("/")[-3]
            raise NoEvaluation(
                f"no evaluation is recorded for {model_uri} (expected {where}; write one with "
                f"`tagflow evaluate {model_uri} --dataset s3://BUCKET/PREFIX --job {job}`)"
            ) from None
        raise
    try:
        doc = json.loads(body)
    except ValueError as err:
        raise InputError(f"{where}: not JSON ({err})") from None
    found = parse(doc, str(where))
    actual = sha256 or archive_sha256(model_uri, client)
    if found.model_sha256 != actual:
        described = (doc.get("model") or {}).get("uri") or "another model"
        raise StaleEvaluation(
            f"{where} describes {described} with sha256 {found.model_sha256}, but {model_uri} has sha256 {actual} "
            "(the model changed since it was evaluated): evaluate this model again"
        )
    return found


def above(probabilities: Sequence[float], thresholds: Sequence[float]) -> list[int]:
    """The labels predicted: the indices whose probability is >= their threshold (as ic_metrics chose them)."""
    if len(probabilities) != len(thresholds):
        raise InputError(f"{len(probabilities)} probabilities for {len(thresholds)} thresholds: expected one each")
    return [i for i, (p, t) in enumerate(zip(probabilities, thresholds, strict=True)) if p >= t]
