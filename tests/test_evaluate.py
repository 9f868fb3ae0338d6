"""The evaluation stage end to end: a real trained model, the real local S3 server, the algorithm environment, the
local endpoint as an independent scorer, and the default gate on a useless (all-negative) model.

The data set is tests/test_local_training.py's: 300 generated 96-px images with 10 learnable labels, 240 for
training and 60 for validation, published in a dataset's layout (training/, validation/, manifest.json).
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score

from conftest import write_records
from tagflow import cli, s3
from tagflow.errors import InputError
from tagflow.evaluate import evaluate, leakage_cache_uri, leakage_line, write_evaluation
from tagflow.local import endpoint
from tagflow.local.runner import run_training_job
from tagflow.recordio import RecordReader, RecordWriter, unpack_payload
from tagflow.sagemaker_config import training_job_name, training_job_request
from test_local_training import COLORS, N_IMAGES, N_TRAIN, NUM_LABELS, ROLE, SHAPES, render

pytestmark = [pytest.mark.slow, pytest.mark.mxnet]

LABEL_NAMES = [*(f"colour-{i}" for i in range(len(COLORS))), *SHAPES]

# Run under the algorithm environment: rewrite a model folder's params (and symbol) in place.
EDIT_MODEL = r"""
import json, sys
from pathlib import Path
import mxnet as mx
folder, mode = Path(sys.argv[1]), sys.argv[2]
params = json.loads((folder / "metrics.json").read_text())["params_file"]
saved = mx.nd.load(str(folder / params))
if mode == "all-negative":  # the last layer says "no" to every label, whatever the image
    saved["arg:fc1_weight"][:] = 0
    saved["arg:fc1_bias"][:] = -30.0
else:  # "drop-last": a model with one label fewer
    for key in ("arg:fc1_weight", "arg:fc1_bias"):
        saved[key] = saved[key][:-1].copy()
    symbol = json.loads((folder / "image-classification-symbol.json").read_text())
    for node in symbol["nodes"]:
        if node["name"] == "fc1":
            node["attrs"]["num_hidden"] = str(int(node["attrs"]["num_hidden"]) - 1)
    (folder / "image-classification-symbol.json").write_text(json.dumps(symbol))
mx.nd.save(str(folder / params), saved)
"""


# The data set and the trained model are built once per test session, whichever module asks first:
# tests/test_report.py imports these fixtures, and pytest would otherwise run them once per importing module.
_SESSION: dict[str, object] = {}


def _once(name: str, build):
    if name not in _SESSION:
        _SESSION[name] = build()
    return _SESSION[name]


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, s3_client) -> dict:
    """The generated set published at s3://BUCKET/ds in a dataset's layout, with its manifest."""
    return _once("dataset", lambda: publish_dataset(tmp_path_factory, s3_client))


def publish_dataset(tmp_path_factory, s3_client) -> dict:
    root = tmp_path_factory.mktemp("evaldata")
    bucket = "t-evaluate"
    s3.ensure_bucket(s3_client, bucket)
    counts, label_counts = {}, {}
    for split, folder, ids in (("train", "training", range(N_TRAIN)), ("val", "validation", range(N_TRAIN, N_IMAGES))):
        labels = write_records(root, split, ids, render)
        counts[split] = len(labels)
        label_counts[split] = dict(zip(LABEL_NAMES, np.sum(labels, axis=0).astype(int).tolist(), strict=True))
        for ext in ("rec", "idx"):
            s3.put_file(s3_client, root / f"{split}.{ext}", s3.S3Uri(bucket, f"ds/{folder}/{split}.{ext}"))
    manifest = {"format_version": 1, "counts": counts, "num_labels": NUM_LABELS, "label_names": LABEL_NAMES,
                "label_counts": label_counts}  # fmt: skip
    s3_client.put_object(Bucket=bucket, Key="ds/training/manifest.json", Body=json.dumps(manifest).encode())
    return {"bucket": bucket, "uri": f"s3://{bucket}/ds", "root": root, "manifest": manifest}


# Training images planted in the leaky set's validation split under new IDs: byte copies, and re-encodings at JPEG
# quality 95 (0-2 bits from their original's hash on these images; the clean split's nearest pair is 10 bits apart).
PLANTED_COPIES, PLANTED_REENCODED = (1, 2, 3), (4, 5, 6, 7)
PLANTED_BASE_ID = 9000


@pytest.fixture(scope="session")
def leaky(dataset, s3_client) -> dict:
    """The set published again at s3://BUCKET/ds-leaky with PLANTED_* training images added to validation; its URI,
    root and the planted {validation ID: training ID}."""
    return _once("leaky", lambda: publish_leaky(dataset, s3_client))


def publish_leaky(dataset: dict, s3_client) -> dict:
    root, bucket = dataset["root"], dataset["bucket"]
    planted: dict[int, int] = {}
    with RecordReader(root / "train.rec", root / "train.idx") as train:
        extra = []
        for k, train_id in enumerate((*PLANTED_COPIES, *PLANTED_REENCODED)):
            _, labels, image = unpack_payload(train.read(train_id))
            if train_id in PLANTED_REENCODED:
                out = io.BytesIO()
                Image.open(io.BytesIO(image)).save(out, "JPEG", quality=95)
                image = out.getvalue()
            planted[PLANTED_BASE_ID + k] = train_id
            extra.append((PLANTED_BASE_ID + k, labels, image))
    folder = root / "leaky"
    folder.mkdir()
    val_labels = []
    with RecordWriter(folder / "val.rec", folder / "val.idx") as writer, RecordReader(root / "val.rec") as val:
        for _, payload in val:
            header, labels, image = unpack_payload(payload)
            writer.write_image(header.id, labels, image)
            val_labels.append(labels)
        for image_id, labels, image in extra:
            writer.write_image(image_id, labels, image)
            val_labels.append(labels)
    prefix = f"s3://{bucket}/ds-leaky"
    for name in ("train.rec", "train.idx"):
        s3.put_file(s3_client, root / name, s3.S3Uri.parse(f"{prefix}/training/{name}"))
    for name in ("val.rec", "val.idx"):
        s3.put_file(s3_client, folder / name, s3.S3Uri.parse(f"{prefix}/validation/{name}"))
    manifest = json.loads(json.dumps(dataset["manifest"]))
    manifest["counts"]["val"] = len(val_labels)
    manifest["label_counts"]["val"] = dict(zip(LABEL_NAMES, np.sum(val_labels, axis=0).astype(int).tolist(),
                                               strict=True))  # fmt: skip
    s3_client.put_object(Bucket=bucket, Key="ds-leaky/training/manifest.json", Body=json.dumps(manifest).encode())
    return {"bucket": bucket, "uri": prefix, "root": root, "val_rec": folder / "val.rec", "planted": planted}


@pytest.fixture(scope="session")
def trained(dataset, s3_client, mxnet_python, tmp_path_factory) -> str:
    """A ResNet-18 trained for 5 epochs on the set; its model.tar.gz URI."""
    return _once("trained", lambda: train_model(dataset, s3_client, mxnet_python, tmp_path_factory))


def train_model(
    dataset,
    s3_client,
    mxnet_python,
    tmp_path_factory,
    *,
    job: str | None = None,
    output_uri: str | None = None,
    epochs: int = 5,
) -> str:
    """Train the test ResNet-18 on `dataset` with the local runner; its model.tar.gz URI (OUTPUT/JOB/output/)."""
    request = training_job_request(
        job or training_job_name("ic-eval", "trained"),
        image_uri="local/image-classification",
        role_arn=ROLE,
        train_uri=f"{dataset['uri']}/training/train.rec",
        validation_uri=f"{dataset['uri']}/validation/val.rec",
        output_uri=output_uri or f"s3://{dataset['bucket']}/models",
        hyperparameters={
            "num_classes": NUM_LABELS,
            "num_training_samples": N_TRAIN,
            "multi_label": 1,
            "image_shape": "3,96,96",
            "num_layers": 18,
            "epochs": epochs,
            "mini_batch_size": 16,
            "learning_rate": 0.05,
            "augmentation_type": "crop",
        },
        instance_type="ml.m5.large",
        max_runtime_s=1800,
    )
    described = run_training_job(
        request, workdir=tmp_path_factory.mktemp("evaljobs"), client=s3_client, mxnet_python=mxnet_python
    )
    assert described["TrainingJobStatus"] == "Completed", described.get("FailureReason")
    return described["ModelArtifacts"]["S3ModelArtifacts"]


def edited(model_uri: str, mode: str, s3_client, mxnet_python: Path, folder: Path, **metrics_extra) -> str:
    """A copy of the model with its params edited by EDIT_MODEL (and metrics.json fields set), as model.tar.gz."""
    uri = s3.S3Uri.parse(model_uri)
    body = s3_client.get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read()
    model_dir = folder / "model"
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        tar.extractall(model_dir, filter="data")
    if mode != "none":
        done = subprocess.run(
            [str(mxnet_python), "-c", EDIT_MODEL, str(model_dir), mode], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((model_dir / "metrics.json").read_text())
    (model_dir / "metrics.json").write_text(json.dumps({**metrics, **metrics_extra}))
    archive = folder / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(model_dir.iterdir()):
            tar.add(path, arcname=path.name)
    return str(archive)


def test_map_equals_an_independent_computation_from_the_endpoints_answers(
    dataset, trained, s3_client, mxnet_python, tmp_path
):
    doc = evaluate(trained, dataset["uri"], client=s3_client, mxnet_python=mxnet_python, batch_size=16)
    candidate = doc["candidate"]

    info = endpoint.start(trained, name="t-evaluate", state_dir=tmp_path / "ep", client=s3_client,
                          mxnet_python=mxnet_python)  # fmt: skip
    try:
        answers, truth = [], []
        with RecordReader(dataset["root"] / "val.rec", dataset["root"] / "val.idx") as reader:
            for _, payload in reader:
                _, labels, image = unpack_payload(payload)
                answers.append(endpoint.invoke(info, image))
                truth.append(labels)
    finally:
        endpoint.stop(tmp_path / "ep")
    answers, truth = np.array(answers), np.array(truth) > 0.5
    assert doc["split"]["images"] == len(answers) == N_IMAGES - N_TRAIN
    positive = truth.any(0)
    independent = average_precision_score(truth[:, positive], answers[:, positive], average="macro")
    assert candidate["mAP"] == pytest.approx(independent, abs=1e-4)
    assert candidate["micro_mAP"] == pytest.approx(average_precision_score(truth, answers, average="micro"), abs=1e-4)
    assert candidate["accuracy"] == pytest.approx(((answers >= 0.5) == truth).mean(), abs=1e-6)
    for c, entry in enumerate(candidate["per_label"]):
        assert entry["name"] == LABEL_NAMES[c] and entry["support"] == int(truth[:, c].sum())
        assert entry["baseline_ap"] == pytest.approx(truth[:, c].mean(), abs=1e-6)
    # It learnt: twice the label-frequency baseline (every label's prevalence), and the default gate says so.
    assert doc["baselines"]["label_frequency_mAP"] == pytest.approx(truth.mean(0).mean(), abs=1e-6)
    assert candidate["mAP"] >= 2 * doc["baselines"]["label_frequency_mAP"]
    assert doc["gate"]["deploy"] is True, doc["gate"]["reason"]
    assert doc["baselines"]["all_negative_accuracy"] == pytest.approx(1 - truth.mean(), abs=1e-6)

    # Written whole where the DAG's next task reads it.
    uri = write_evaluation(doc, dataset["uri"], "ic-eval-job", client=s3_client)
    assert uri == f"{dataset['uri']}/output/ic-eval-job/evaluation/evaluation.json"
    stored = json.loads(s3_client.get_object(Bucket=dataset["bucket"], Key=uri.split("/", 3)[3])["Body"].read())
    assert stored["candidate"]["mAP"] == candidate["mAP"]


def test_an_all_negative_model_is_refused_naming_the_baseline_and_the_trained_one_passes(
    dataset, trained, s3_client, mxnet_python, tmp_path
):
    useless = edited(trained, "all-negative", s3_client, mxnet_python, tmp_path)
    doc = evaluate(useless, dataset["uri"], client=s3_client, mxnet_python=mxnet_python, champion_uri=trained)
    # Its accuracy is the all-negative predictor's, which an accuracy gate at 0.5 would have deployed.
    assert doc["candidate"]["accuracy"] == pytest.approx(doc["baselines"]["all_negative_accuracy"], abs=1e-6)
    assert doc["candidate"]["accuracy"] > 0.5
    assert doc["gate"]["deploy"] is False
    assert "label-frequency baseline" in doc["gate"]["reason"], doc["gate"]["reason"]
    assert doc["champion"]["mAP"] > doc["candidate"]["mAP"]
    # The trained model against the useless one as the serving model: deployed.
    back = evaluate(trained, dataset["uri"], client=s3_client, mxnet_python=mxnet_python, champion_uri=useless)
    assert back["gate"]["deploy"] is True, back["gate"]["reason"]
    assert back["candidate"]["model"]["cached"] and back["champion"]["model"]["cached"]  # both scored once


def test_a_label_set_mismatch_is_refused_naming_both(dataset, trained, s3_client, mxnet_python, tmp_path):
    (tmp_path / "fewer").mkdir()
    fewer = edited(trained, "drop-last", s3_client, mxnet_python, tmp_path / "fewer")
    doc = evaluate(trained, dataset["uri"], client=s3_client, mxnet_python=mxnet_python, champion_uri=fewer)
    assert doc["gate"]["deploy"] is False
    reason = doc["gate"]["reason"]
    assert (
        f"the candidate has {NUM_LABELS} labels (colour-0" in reason
        and f"serving model {NUM_LABELS - 1} labels" in reason
    )
    assert doc["champion"]["scored"] is False and "9 outputs" in doc["champion"]["problem"]

    (tmp_path / "renamed").mkdir()
    other_names = [*LABEL_NAMES[:-1], "star"]
    renamed = edited(trained, "none", s3_client, mxnet_python, tmp_path / "renamed", label_names=other_names)
    doc = evaluate(trained, dataset["uri"], client=s3_client, mxnet_python=mxnet_python, champion_uri=renamed)
    assert doc["gate"]["deploy"] is False and "star" not in doc["gate"]["reason"].split("serving")[0]
    assert "the label sets differ" in doc["gate"]["reason"] and "(5 more)" in doc["gate"]["reason"]

    with pytest.raises(InputError, match=f"has {NUM_LABELS - 1} outputs but the dataset .* has {NUM_LABELS} labels"):
        evaluate(fewer, dataset["uri"], client=s3_client, mxnet_python=mxnet_python)


def test_the_cli_verb_json_has_the_documented_keys(dataset, trained, s3_client, capsys, monkeypatch):
    code = cli.main(["evaluate", trained, "--dataset", dataset["uri"], "--champion", trained, "--job", "cli-eval",
                     "--json"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    doc = json.loads(out.out)
    # Part 1's figures: macro mAP over labels with a positive, micro mAP, per-label AP with support and the
    # F1-maximising threshold, micro/macro F1 at those thresholds and at 0.5, Hamming accuracy, both baselines.
    for key in ("mAP", "micro_mAP", "per_label", "micro_f1", "macro_f1", "micro_f1_at_0.5", "macro_f1_at_0.5",
                "accuracy", "labels_with_positives"):  # fmt: skip
        assert isinstance(doc["candidate"][key], (int, float, list)), key
    # The local trainer's per-epoch record travels with the evaluation (the report draws it).
    training = doc["candidate"]["training"]
    assert [h["epoch"] for h in training["history"]] == list(range(5)) and training["selected_by"] == "validation:mAP"
    assert max(h["validation_mAP"] for h in training["history"]) == training["history"][training["best_epoch"]][
        "validation_mAP"]  # fmt: skip
    assert {"name", "ap", "support", "threshold", "baseline_ap"} <= set(doc["candidate"]["per_label"][0])
    assert {"label_frequency_mAP", "all_negative_accuracy"} <= set(doc["baselines"])
    assert doc["champion"]["mAP"] == doc["candidate"]["mAP"] and doc["gate"]["deploy"] is True  # equal: not worse
    assert doc["label_names"] == LABEL_NAMES and doc["split"]["images"] == N_IMAGES - N_TRAIN
    assert doc["model"]["uri"] == trained and len(doc["model"]["sha256"]) == 64
    assert doc["evaluation_uri"] == f"{dataset['uri']}/output/cli-eval/evaluation/evaluation.json"
    assert doc["leakage"]["leaked"] == 0 and doc["leakage"]["validation_images"] == N_IMAGES - N_TRAIN

    assert cli.main(["evaluate", trained, "--dataset", dataset["uri"]]) == 0
    sentence = capsys.readouterr().out
    assert "mAP" in sentence and "label-frequency baseline" in sentence and "gate: deploy" in sentence
    assert "leakage" not in sentence  # a clean split: nothing to say

    assert cli.main(["evaluate", trained, "--dataset", f"s3://{dataset['bucket']}/nothing-here"]) == 2
    assert "no published dataset here" in capsys.readouterr().err


def test_the_evaluation_counts_planted_near_duplicates_and_a_clean_split_none(
    dataset, leaky, trained, s3_client, mxnet_python, capsys
):
    clean = evaluate(trained, dataset["uri"], client=s3_client, mxnet_python=mxnet_python)["leakage"]
    assert (clean["leaked"], clean["fraction"], clean["examples"]) == (0, 0.0, [])
    assert (clean["validation_images"], clean["training_images"]) == (N_IMAGES - N_TRAIN, N_TRAIN)
    assert clean["method"] == "edge-phash-64" and clean["max_distance"] == 4

    doc = evaluate(trained, leaky["uri"], client=s3_client, mxnet_python=mxnet_python, champion_uri=trained)
    uri = write_evaluation(doc, leaky["uri"], "leaky-job", client=s3_client)
    stored = json.loads(s3_client.get_object(Bucket=leaky["bucket"], Key=uri.split("/", 3)[3])["Body"].read())
    block = stored["leakage"]
    planted = len(leaky["planted"])
    assert block["leaked"] == planted == 7 and block["validation_images"] == N_IMAGES - N_TRAIN + planted
    assert block["fraction"] == round(planted / block["validation_images"], 6)
    assert {e["val_id"]: e["train_id"] for e in block["examples"]} == leaky["planted"]
    assert [e["distance"] for e in block["examples"]] == sorted(e["distance"] for e in block["examples"])
    assert block["by_distance"]["0"] >= len(PLANTED_COPIES) and sum(block["by_distance"].values()) == planted
    assert block["train"]["uri"] == f"{leaky['uri']}/training/train.rec"

    # Computed once for this dataset: the next evaluation (another model, another run) reads the cache.
    again = evaluate(trained, leaky["uri"], client=s3_client, mxnet_python=mxnet_python)["leakage"]
    train_digest = s3.object_sha256(s3_client, s3.S3Uri.parse(block["train"]["uri"]))
    assert again["cached"] == str(leakage_cache_uri(s3.S3Uri.parse(leaky["uri"]), train_digest,
                                                    stored["split"]["digest"]))  # fmt: skip
    assert {k: v for k, v in again.items() if k != "cached"} == {k: v for k, v in block.items() if k != "cached"}

    # The summary line says so (and nothing for the clean split).
    line = leakage_line(stored)
    assert line is not None and f"{planted} of {block['validation_images']} validation images" in line
    assert "split_group_regex" in line and "--group-regex" in line
    assert leakage_line({"leakage": clean}) is None
    assert cli.main(["evaluate", trained, "--dataset", leaky["uri"]]) == 0
    assert f"  {line}\n" in capsys.readouterr().out  # and `tagflow evaluate` prints it
