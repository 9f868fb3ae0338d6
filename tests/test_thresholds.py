"""Thresholds travel with the model: the evaluation's per-label thresholds, found beside the model and checked to
describe it, used by `tagflow predict` and, on request, by the local endpoint.

One real model (ResNet-18, 3 epochs on tests/test_evaluate.py's 10-label set) trained where training puts it,
`PREFIX/output/JOB/output/model.tar.gz`, and its evaluation written by `write_evaluation` beside it; the real local S3
server, the real endpoint process, the CLI as a subprocess.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tagflow import s3, thresholds
from tagflow.evaluate import evaluate, write_evaluation
from tagflow.local import endpoint
from tagflow.sagemaker_config import training_job_name
from test_cli import tagflow
from test_evaluate import LABEL_NAMES, dataset, edited, train_model  # noqa: F401 (dataset: the module's fixture)
from test_local_training import N_TRAIN, NUM_LABELS, render

pytestmark = [pytest.mark.slow, pytest.mark.mxnet]

LABELS_ACCEPT = "application/json; verbose=true"
IMAGES = range(N_TRAIN, N_TRAIN + 12)  # validation images: some labels above their thresholds, some not


@pytest.fixture(scope="module")
def evaluated(dataset, s3_client, mxnet_python, tmp_path_factory) -> dict:  # noqa: F811 (the imported fixture)
    """The model at DATASET/output/JOB/output/model.tar.gz and its evaluation at DATASET/output/JOB/evaluation/."""
    job = training_job_name("thresholds", "trained")
    model = train_model(
        dataset, s3_client, mxnet_python, tmp_path_factory, job=job, output_uri=f"{dataset['uri']}/output", epochs=3
    )
    assert model == f"{dataset['uri']}/output/{job}/output/model.tar.gz"
    doc = evaluate(model, dataset["uri"], client=s3_client, mxnet_python=mxnet_python, batch_size=16)
    where = write_evaluation(doc, dataset["uri"], job, client=s3_client)
    per_label = doc["candidate"]["per_label"]
    return {"model": model, "job": job, "doc": doc, "evaluation": where,
            "names": [e["name"] for e in per_label], "thresholds": [e["threshold"] for e in per_label]}  # fmt: skip


@pytest.fixture(scope="module")
def stale(evaluated, dataset, s3_client, tmp_path_factory) -> dict:  # noqa: F811
    """Another archive (the same weights, packed again: another sha256) under another job, with the first model's
    evaluation copied beside it, as after a retrain under a job name whose old evaluation stayed."""
    other = edited(evaluated["model"], "none", s3_client, Path(), tmp_path_factory.mktemp("stale"))
    job = "thresholds-stale"
    model = s3.S3Uri.parse(f"{dataset['uri']}/output/{job}/output/model.tar.gz")
    s3.put_file(s3_client, Path(other), model)
    src = s3.S3Uri.parse(evaluated["evaluation"])
    where = s3.S3Uri.parse(f"{dataset['uri']}/output/{job}/evaluation/evaluation.json")
    s3_client.copy_object(Bucket=where.bucket, Key=where.key, CopySource={"Bucket": src.bucket, "Key": src.key})
    return {"model": str(model), "sha256": s3.file_sha256(Path(other)), "evaluation": str(where)}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i in IMAGES:
        path = folder / f"design-{i}.jpg"
        path.write_bytes(render(i)[0])
        paths.append(path)
    return paths


def served(model: str, home: Path, name: str, s3_client, mxnet_python) -> endpoint.EndpointInfo:
    """An endpoint started where `tagflow --name NAME` finds it under TAGFLOW_HOME=home."""
    return endpoint.start(
        model, name=name, state_dir=home / "endpoints" / name, client=s3_client, mxnet_python=mxnet_python
    )


def post(url: str, body: bytes, accept: str | None = None) -> tuple[int, object]:
    headers = {"Content-Type": "image/jpeg", **({"Accept": accept} if accept else {})}
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def expected_labels(probabilities: list[float], names: list[str], cuts: list[float]) -> list[str]:
    """Independently of tagflow.thresholds: the names whose probability is >= their threshold, in label order."""
    return [name for name, p, t in zip(names, probabilities, cuts, strict=True) if p >= t]


# --- the core function ----------------------------------------------------------------------------------------------


def test_the_thresholds_recorded_for_a_model_are_its_evaluations(evaluated, s3_client):
    found = thresholds.recorded(evaluated["model"], client=s3_client)
    assert found.evaluation == evaluated["evaluation"]
    assert found.evaluation.endswith(f"/output/{evaluated['job']}/evaluation/evaluation.json")
    assert found.label_names == evaluated["names"] == LABEL_NAMES
    assert found.thresholds == evaluated["thresholds"] and len(found.thresholds) == NUM_LABELS
    assert (
        found.model_sha256
        == evaluated["doc"]["model"]["sha256"]
        == thresholds.archive_sha256(evaluated["model"], s3_client)
    )
    # A digest the caller already has is used as the archive's: the same answer without fetching it.
    assert thresholds.recorded(evaluated["model"], client=s3_client, sha256=found.model_sha256) == found


def test_a_stale_evaluation_is_refused_naming_both(evaluated, stale, s3_client):
    with pytest.raises(thresholds.StaleEvaluation) as err:
        thresholds.recorded(stale["model"], client=s3_client)
    message = str(err.value)
    assert stale["evaluation"] in message and stale["model"] in message and evaluated["model"] in message
    assert evaluated["doc"]["model"]["sha256"] in message and stale["sha256"] in message
    assert "\n" not in message


def test_no_evaluation_is_a_message_never_a_default(evaluated, dataset, s3_client, tmp_path):  # noqa: F811
    bare = s3.S3Uri.parse(f"{dataset['uri']}/output/thresholds-bare/output/model.tar.gz")
    src = s3.S3Uri.parse(evaluated["model"])
    s3_client.copy_object(Bucket=bare.bucket, Key=bare.key, CopySource={"Bucket": src.bucket, "Key": src.key})
    with pytest.raises(thresholds.NoEvaluation) as err:
        thresholds.recorded(str(bare), client=s3_client)
    assert str(err.value) == (
        f"no evaluation is recorded for {bare} (expected {dataset['uri']}/output/thresholds-bare/evaluation/"
        f"evaluation.json; write one with `tagflow evaluate {bare} --dataset s3://BUCKET/PREFIX --job thresholds-bare`)"
    )
    for elsewhere in (f"s3://{dataset['bucket']}/models/model.tar.gz", str(tmp_path / "model.tar.gz")):
        with pytest.raises(thresholds.NoEvaluation, match=re.escape("PREFIX/output/JOB/output/model.tar.gz")):
            thresholds.recorded(elsewhere, client=s3_client)


def test_an_evaluation_without_thresholds_names_the_field(evaluated, dataset, s3_client):  # noqa: F811
    job = "thresholds-broken"
    model = s3.S3Uri.parse(f"{dataset['uri']}/output/{job}/output/model.tar.gz")
    src = s3.S3Uri.parse(evaluated["model"])
    s3_client.copy_object(Bucket=model.bucket, Key=model.key, CopySource={"Bucket": src.bucket, "Key": src.key})
    doc = json.loads(json.dumps(evaluated["doc"]))
    del doc["candidate"]["per_label"][3]["threshold"]
    where = s3.S3Uri.parse(f"{dataset['uri']}/output/{job}/evaluation/evaluation.json")
    s3_client.put_object(Bucket=where.bucket, Key=where.key, Body=json.dumps(doc).encode())
    with pytest.raises(thresholds.InputError, match=r"/evaluation/evaluation.json: missing or bad field 'threshold'"):
        thresholds.recorded(str(model), client=s3_client)


# --- the endpoint ---------------------------------------------------------------------------------------------------


def test_the_endpoint_loads_the_thresholds_and_answers_labels_on_request(
    evaluated, images, s3_client, mxnet_python, tmp_path
):
    info = served(evaluated["model"], tmp_path, "t-thresholds", s3_client, mxnet_python)
    try:
        meta = endpoint.metadata(info)
        assert meta["thresholds"] == thresholds.recorded(evaluated["model"], client=s3_client).to_dict()
        assert meta["thresholds_problem"] is None and meta["sha256"] == evaluated["doc"]["model"]["sha256"]
        runtime = endpoint.runtime_client(info)
        chosen = 0
        for path in images:
            body = path.read_bytes()
            default = json.loads(
                runtime.invoke_endpoint(EndpointName=info.name, ContentType="image/jpeg", Body=body)["Body"].read()
            )
            # The default answer is the built-in's array, whatever JSON Accept is sent.
            assert isinstance(default, list) and len(default) == NUM_LABELS
            assert post(info.invocations_url, body) == (200, default)
            assert post(info.invocations_url, body, "application/json") == (200, default)
            want = expected_labels(default, evaluated["names"], evaluated["thresholds"])
            assert post(info.invocations_url, body, LABELS_ACCEPT) == (
                200, {"labels": want, "probabilities": default}
            )  # fmt: skip
            verbose = runtime.invoke_endpoint(
                EndpointName=info.name, ContentType="image/jpeg", Accept="application/json;Verbose=True", Body=body
            )
            assert json.loads(verbose["Body"].read()) == {"labels": want, "probabilities": default}
            chosen += len(want)
        assert 0 < chosen < len(images) * NUM_LABELS  # the thresholds chose: not every label, not none
    finally:
        endpoint.stop(Path(info.state_dir))


def test_an_endpoint_without_thresholds_refuses_labels_and_says_why(
    evaluated, stale, images, s3_client, mxnet_python, tmp_path
):
    info = served(stale["model"], tmp_path, "t-stale", s3_client, mxnet_python)
    try:
        meta = endpoint.metadata(info)
        assert meta["thresholds"] is None and meta["sha256"] == stale["sha256"]
        problem = meta["thresholds_problem"]
        assert stale["sha256"] in problem and evaluated["doc"]["model"]["sha256"] in problem
        body = images[0].read_bytes()
        status, default = post(info.invocations_url, body)
        assert status == 200 and len(default) == NUM_LABELS  # the model serves: only labels need thresholds
        status, answer = post(info.invocations_url, body, LABELS_ACCEPT)
        assert status == 406 and answer["message"] == (
            f"Accept {LABELS_ACCEPT!r} asks for the labels above their thresholds, but {stale['model']} has no "
            f"thresholds: {problem}; ask without it for the probabilities"
        )
        # A local archive: nothing is recorded beside it, and the endpoint says so.
        local = endpoint.load(info, edited(evaluated["model"], "none", s3_client, Path(), tmp_path / "local"))
        assert local["thresholds"] is None and "is not in S3" in local["thresholds_problem"]
        assert post(info.invocations_url, body, LABELS_ACCEPT)[0] == 406
    finally:
        endpoint.stop(Path(info.state_dir))


# --- tagflow predict ------------------------------------------------------------------------------------------------


def test_predict_prints_the_labels_above_their_recorded_thresholds(
    evaluated, images, s3_client, mxnet_python, tmp_path
):
    home = tmp_path / "home"
    env = {"TAGFLOW_HOME": str(home)}
    info = served(evaluated["model"], home, "t-predict", s3_client, mxnet_python)
    try:
        probabilities = [endpoint.invoke(info, path.read_bytes()) for path in images]
        names, cuts = evaluated["names"], evaluated["thresholds"]
        args = ["predict", *map(str, images), "--name", "t-predict"]
        done = tagflow(*args, "--json", env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        answer = json.loads(done.stdout)
        assert answer["thresholds_from"] == evaluated["evaluation"]
        assert answer["label_names_from"] == f"the label names of its evaluation {evaluated['evaluation']}"
        assert answer["predictions"] == [
            {"image": str(path), "labels": expected_labels(probs, names, cuts), "probabilities": probs}
            for path, probs in zip(images, probabilities, strict=True)
        ]
        # The sentence: per image the labels at or above their threshold, most probable first, with probabilities.
        text = tagflow(*args, env=env)
        assert text.returncode == 0, text.stderr[-3000:]
        lines = text.stdout.strip().split("\n")
        assert len(lines) == len(images)
        for line, path, probs in zip(lines, images, probabilities, strict=True):
            picked = sorted((i for i in range(NUM_LABELS) if probs[i] >= cuts[i]), key=lambda i: -probs[i])
            said = ", ".join(f"{names[i]} {probs[i]:.2f}" for i in picked) or "no label at or above its threshold"
            assert line == f"{path}: {said}"
        # --threshold X: one threshold for every label instead.
        for x in (0.0, 0.5):
            over = json.loads(tagflow(*args, "--threshold", str(x), "--json", env=env).stdout)
            assert over["thresholds_from"] == f"--threshold {x}"
            assert [p["labels"] for p in over["predictions"]] == [
                expected_labels(probs, names, [x] * NUM_LABELS) for probs in probabilities
            ]
        # The dataset's manifest names the same labels in the same order: accepted; others are refused.
        by_dataset = json.loads(tagflow(*args, "--dataset", evaluated["doc"]["dataset"], "--json", env=env).stdout)
        assert by_dataset["predictions"] == answer["predictions"]
        wrong = tmp_path / "labels.txt"
        wrong.write_text("\n".join(reversed(names)) + "\n")
        refused = tagflow(*args, "--labels", str(wrong), env=env)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert f"label 0 is {names[-1]!r}, but the served model was trained with {names[0]!r}" in refused.stderr
    finally:
        endpoint.stop(Path(info.state_dir))


def test_predict_without_recorded_thresholds_needs_threshold(
    evaluated, stale, images, s3_client, mxnet_python, tmp_path
):
    home = tmp_path / "home"
    env = {"TAGFLOW_HOME": str(home)}
    info = served(stale["model"], home, "t-predict-stale", s3_client, mxnet_python)
    try:
        args = ["predict", str(images[0]), "--name", "t-predict-stale"]
        done = tagflow(*args, env=env)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        (line,) = done.stderr.strip().split("\n")
        assert re.fullmatch(
            rf"tagflow: error: endpoint 't-predict-stale' serves {re.escape(stale['model'])} without recorded "
            rf"thresholds: .*{evaluated['doc']['model']['sha256']}.*{stale['sha256']}.*; give --threshold X to "
            r"predict every label at probability >= X",
            line,
        )
        assert done.stdout == ""
        forced = tagflow(*args, "--threshold", "0.5", "--dataset", evaluated["doc"]["dataset"], "--json", env=env)
        assert forced.returncode == 0, forced.stderr[-3000:]
        (prediction,) = json.loads(forced.stdout)["predictions"]
        probs = endpoint.invoke(info, images[0].read_bytes())
        assert prediction == {"image": str(images[0]), "labels": expected_labels(probs, LABEL_NAMES, [0.5] * 10),
                              "probabilities": probs}  # fmt: skip
        status = json.loads(tagflow("serve", "status", "--name", "t-predict-stale", "--json", env=env).stdout)
        assert status["thresholds_from"] is None and stale["sha256"] in status["thresholds_problem"]
    finally:
        endpoint.stop(Path(info.state_dir))
