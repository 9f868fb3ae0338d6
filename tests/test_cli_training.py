"""`tagflow train` and `tagflow tune` on a dataset the data plane packed: counts come from its manifest."""

from __future__ import annotations

import json
import re

import pytest

from tagflow import demo, pipeline, s3
from test_cli import tagflow

pytestmark = [pytest.mark.mxnet, pytest.mark.slow]


@pytest.fixture(scope="module")
def dataset(s3_server, s3_client):
    bucket = "cli-training"
    s3_client.create_bucket(Bucket=bucket)
    data = demo.publish(120, s3.S3Uri(bucket, "raw"), seed=11, client=s3_client, workers=2)
    spec = pipeline.DatasetSpec(
        list_uri=data.list_uri,
        source_uri=data.images_uri,
        labels_uri=data.labels_uri,
        dataset_uri=f"s3://{bucket}/ds",
        num_labels=demo.NUM_LABELS,
        shard_size=200,
    )
    summary = pipeline.run(spec, s3_client)
    return f"s3://{bucket}/ds", summary


def test_a_batch_larger_than_a_split_is_refused_before_the_job_starts(dataset, tmp_path):
    """The CLI builds its request as the DAG does, batch-size check included (it once skipped it)."""
    uri, summary = dataset
    val = summary["counts"]["val"]
    done = tagflow("train", "--dataset", uri, "--hp", f"mini_batch_size={val + 1}", "--workdir", str(tmp_path))
    assert done.returncode == 2, done.stderr
    assert f"mini_batch_size: {val + 1} is more than the {val} val images of {uri}" in done.stderr
    assert not any(tmp_path.iterdir())  # no job folder: refused before it started


def test_train_reads_counts_from_the_manifest_and_writes_the_model_where_sagemaker_would(dataset, s3_client, tmp_path):
    uri, summary = dataset
    done = tagflow(
        "train",
        "--dataset",
        uri,
        "--job-name",
        "cli-train-1",
        "--workdir",
        str(tmp_path),
        "--hp",
        "epochs=1",
        "--hp",
        "num_layers=18",
        "--hp",
        "mini_batch_size=8",
        "--json",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    described = json.loads(done.stdout)
    assert described["TrainingJobStatus"] == "Completed"
    assert described["HyperParameters"]["num_training_samples"] == str(summary["counts"]["train"])
    assert described["HyperParameters"]["num_classes"] == "50"
    assert described["ModelArtifacts"]["S3ModelArtifacts"] == f"{uri}/output/cli-train-1/output/model.tar.gz"
    bucket, key = described["ModelArtifacts"]["S3ModelArtifacts"][5:].split("/", 1)
    assert s3_client.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in described["InputDataConfig"]}
    assert channels == {"train": f"{uri}/training/train.rec", "validation": f"{uri}/validation/val.rec"}


def test_train_with_a_wrong_class_count_fails_naming_both_numbers(dataset, tmp_path):
    uri, _ = dataset
    done = tagflow(
        "train",
        "--dataset",
        uri,
        "--job-name",
        "cli-train-bad",
        "--workdir",
        str(tmp_path),
        "--hp",
        "num_classes=10",
        "--hp",
        "epochs=1",
        "--hp",
        "mini_batch_size=8",  # under the 13 validation images: the batch check passes, the trainer judges
    )
    assert done.returncode == 1
    said = done.stdout + done.stderr
    assert "num_classes=10 does not match the data" in said and "carry 50 labels each" in said
    assert "Traceback" not in done.stderr


def test_bad_hp_syntax_is_a_usage_error(dataset, tmp_path):
    uri, _ = dataset
    done = tagflow("train", "--dataset", uri, "--hp", "epochs", "--workdir", str(tmp_path))
    assert done.returncode == 2 and "expected NAME=VALUE" in done.stderr


def test_train_serve_predict_session(dataset, tmp_path):
    uri, _ = dataset
    env = {"TAGFLOW_HOME": str(tmp_path / "home")}
    done = tagflow(
        "train",
        "--dataset",
        uri,
        "--job-name",
        "cli-serve-1",
        "--workdir",
        str(tmp_path / "jobs"),
        "--hp",
        "epochs=1",
        "--hp",
        "num_layers=18",
        "--hp",
        "mini_batch_size=8",
        "--json",
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    model = json.loads(done.stdout)["ModelArtifacts"]["S3ModelArtifacts"]
    try:
        started = tagflow("serve", "start", model, "--name", "cli-ep", "--json", env=env)
        assert started.returncode == 0, started.stderr[-3000:]
        assert json.loads(started.stdout)["model_source"] == model
        image = tmp_path / "design.jpg"
        data, ext, _ = demo.render_design(5, seed=99)
        image = image.with_suffix(f".{ext}")
        image.write_bytes(data)
        # No evaluation was written beside this model: no per-label thresholds, and predict says so (never 0.5).
        refused = tagflow("predict", str(image), "--name", "cli-ep", env=env)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert f"serves {model} without recorded thresholds: no evaluation is recorded for {model}" in refused.stderr
        assert "give --threshold X" in refused.stderr
        predicted = tagflow(
            "predict",
            str(image),
            "--name",
            "cli-ep",
            "--threshold",
            "0.3",
            "--labels",
            f"{uri}/training/manifest.json",
            "--json",
            env=env,
        )
        assert predicted.returncode == 0, predicted.stderr[-3000:]
        answer = json.loads(predicted.stdout)
        assert answer["thresholds_from"] == "--threshold 0.3"
        (prediction,) = answer["predictions"]
        probabilities = prediction["probabilities"]
        assert len(probabilities) == demo.NUM_LABELS and all(0 <= p <= 1 for p in probabilities)
        assert prediction["labels"] == [n for n, p in zip(demo.LABEL_NAMES, probabilities, strict=True) if p >= 0.3]
        # --dataset reads the names from the dataset's training/manifest.json: the same answer.
        by_dataset = tagflow("predict", str(image), "--name", "cli-ep", "--threshold", "0.3", "--dataset", uri,
                             "--json", env=env)  # fmt: skip
        assert by_dataset.returncode == 0, by_dataset.stderr[-3000:]
        answer = json.loads(by_dataset.stdout)
        assert answer["predictions"][0]["labels"] == prediction["labels"]
        assert answer["label_names_from"] == f"{uri}/training/manifest.json"
        # The channel is the .rec file's prefix, so the model recorded no names: numbered ones, and said so.
        plain = json.loads(tagflow("predict", str(image), "--name", "cli-ep", "--threshold", "0", "--json",
                                   env=env).stdout)  # fmt: skip
        assert plain["label_names_from"] == "numbered names"
        assert plain["predictions"][0]["labels"] == [f"label_{i}" for i in range(demo.NUM_LABELS)]
        both = tagflow("predict", str(image), "--name", "cli-ep", "--dataset", uri, "--labels", "x.txt", env=env)
        assert both.returncode == 2 and "at most one of --labels and --dataset" in both.stderr
        assert tagflow("serve", "status", "--name", "cli-ep", env=env).returncode == 0
    finally:
        stopped = tagflow("serve", "stop", "--name", "cli-ep", env=env)
    assert stopped.stdout.strip() == "stopped"
    assert tagflow("serve", "status", "--name", "cli-ep", env=env).returncode == 1


def test_train_leads_with_the_saved_model_and_prints_epochs_on_a_pipe(dataset, tmp_path):
    """stderr is a pipe here (not a terminal): the epochs appear there as the job runs; the summary on stdout says
    first what model.tar.gz holds (its epoch and values), then the last epoch's."""
    uri, _ = dataset
    done = tagflow(
        "train", "--dataset", uri, "--job-name", "cli-train-saved", "--workdir", str(tmp_path),
        "--hp", "epochs=2", "--hp", "num_layers=18", "--hp", "mini_batch_size=8",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    log = (tmp_path / "cli-train-saved" / "training.log").read_text()
    saved = re.search(r"Saved-model \(epoch (\d+)\) Validation-mAP=(\S+)", log)
    assert saved
    lines = done.stdout.splitlines()
    assert lines[0] == "cli-train-saved: Completed"
    assert lines[1].startswith(f"  saved model (epoch {saved[1]}): validation:mAP = {float(saved[2]):.4f}, ")
    last_map = float(re.findall(r"Epoch\[1\] Validation-mAP=(\S+)", log)[0])
    assert lines[2].startswith(f"  last epoch (epoch 1): validation:mAP = {last_map:.4f}, ")
    assert lines[3] == f"  model: {uri}/output/cli-train-saved/output/model.tar.gz"
    progress = [line for line in done.stderr.splitlines() if line.startswith("cli-train-saved: ")]
    shown = [line.removeprefix("cli-train-saved: ") for line in progress]
    for expected in (
        "Epoch[0] Validation-accuracy=",
        "Epoch[0] Validation-mAP=",
        "Epoch[1] Validation-mAP=",
        "Storing the best model with validation mAP: ",
        f"Saved-model (epoch {saved[1]}) Validation-mAP=",
    ):
        assert any(line.startswith(expected) for line in shown), (expected, done.stderr[-2000:])  # fmt: skip
    first, second = (
        next(i for i, line in enumerate(shown) if line.startswith(f"Epoch[{e}] Validation-mAP")) for e in (0, 1)
    )
    assert first < second  # as they happened
    assert not any(line.startswith("[") for line in shown)  # the trainer's timestamps are cut


def test_tune_ranks_by_the_saved_model_and_prints_each_trials_epochs(dataset, tmp_path):
    uri, _ = dataset
    ranges = tmp_path / "ranges.json"
    ranges.write_text(json.dumps({"learning_rate": {"type": "Continuous", "min": 0.01, "max": 0.05}}))
    done = tagflow(
        "tune", "--dataset", uri, "--ranges", str(ranges), "--max-jobs", "1", "--strategy", "Random",
        "--job-name", "cli-tune-saved", "--workdir", str(tmp_path / "jobs"),
        "--hp", "epochs=2", "--hp", "num_layers=18", "--hp", "mini_batch_size=8",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "cli-tune-saved: Completed (trials ranked by their saved model's validation:accuracy)"
    (trial,) = (tmp_path / "jobs" / "cli-tune-saved").glob("cli-tune-saved-001-*")
    log = (trial / "training.log").read_text()
    saved = re.search(r"Saved-model \(epoch (\d+)\) Validation-accuracy=(\S+)", log)
    last = float(re.findall(r"Epoch\[1\] Validation-accuracy=(\S+)", log)[0])
    assert saved
    assert f"saved model (epoch {saved[1]}) {float(saved[2]):.4f}, last epoch (epoch 1) {last:.4f}" in lines[1]
    assert lines[-1] == f"best: {trial.name} (saved model's validation:accuracy {float(saved[2]):.4f})"
    assert any(line.startswith(f"{trial.name}: Epoch[1] Validation-accuracy=") for line in done.stderr.splitlines())
