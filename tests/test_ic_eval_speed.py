"""algo/ic_eval.py's scores do not depend on how the scoring is batched or threaded: every batch size gives the
scores of an independent one-image-at-a-time forward (each JPEG decoded by mx.image.imdecode, its own executor),
in record order, within 1e-6. What the evaluation's speed work may change is how fast, never what (bench_evaluate
times it)."""

from __future__ import annotations

import json
import subprocess
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tagflow.local import REPO, process
from tagflow.recordio import RecordWriter
from test_local_endpoint import render, train_tiny_model

IMAGES = 37  # a prime: every batch size below leaves a padded last batch


def soften(python: Path, params: Path) -> None:
    """Scale a model's last layer by 1e-4 in place: the tiny model's probabilities, all 0 or 1 in float32 after one
    epoch (where a difference in the forward would not show), then lie within 0.45-0.55; the cost is unchanged."""
    code = (
        "import sys, mxnet as mx; d = mx.nd.load(sys.argv[1]); "
        "d.update({k: d[k] * 1e-4 for k in ('arg:fc1_weight', 'arg:fc1_bias')}); mx.nd.save(sys.argv[1], d)"
    )
    subprocess.run([str(python), "-c", code, str(params)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, mxnet_python):
    """A trained ResNet-18 with its last layer scaled so that its probabilities are spread out (after one epoch they
    are all 0 or 1 in float32, where no difference would show), and IMAGES records of generated JPEGs."""
    work = tmp_path_factory.mktemp("ic-eval-speed")
    archive = train_tiny_model(work / "train", mxnet_python)
    model_dir = work / "model"
    model_dir.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(model_dir, filter="data")
    metrics = json.loads((model_dir / "metrics.json").read_text())
    params = model_dir / metrics["params_file"]
    soften(mxnet_python, params)
    classes = metrics["num_classes"]
    (work / "val").mkdir()
    jpegs, truth = [], []
    with RecordWriter(work / "val" / "val.rec", work / "val" / "val.idx") as writer:
        for i in range(IMAGES):
            data, labels = render(5_000 + i)
            writer.write_image(700 + i, labels[:classes], data)
            jpegs.append(data)
            truth.append(labels[:classes])
    (work / "freq.json").write_text(json.dumps([0.25] * classes))
    return {"work": work, "model_dir": model_dir, "params": params, "jpegs": jpegs, "truth": np.array(truth)}


def evaluate(python: Path, scored: dict, batch_size: int) -> Path:
    work, out = scored["work"], scored["work"] / f"out-{batch_size}"
    done = subprocess.run(
        [str(python), str(REPO / "algo" / "ic_eval.py"), "--model-dir", str(scored["model_dir"]),
         "--rec", str(work / "val" / "val.rec"), "--idx", str(work / "val" / "val.idx"),
         "--label-frequency", str(work / "freq.json"), "--batch-size", str(batch_size), "--out", str(out)],
        capture_output=True, text=True, env=process.child_env(), check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def one_at_a_time(python: Path, scored: dict) -> np.ndarray:
    """Each JPEG decoded with mx.image.imdecode and forwarded alone through an executor bound here."""
    folder = scored["work"] / "jpegs"
    folder.mkdir(exist_ok=True)
    for i, jpeg in enumerate(scored["jpegs"]):
        (folder / f"{i:04d}.jpg").write_bytes(jpeg)
    code = textwrap.dedent(f"""
        import sys, mxnet as mx, numpy as np
        from pathlib import Path
        model_dir, params = {str(scored["model_dir"])!r}, {str(scored["params"])!r}
        symbol = mx.sym.load(model_dir + "/image-classification-symbol.json")
        loaded = mx.nd.load(params)
        executor = symbol.simple_bind(mx.cpu(), grad_req="null", data=(1, 3, 96, 96))
        executor.copy_params_from({{k[4:]: v for k, v in loaded.items() if k.startswith("arg:")}},
                                  {{k[4:]: v for k, v in loaded.items() if k.startswith("aux:")}},
                                  allow_extra_params=True)
        rows = []
        for path in sorted(Path({str(folder)!r}).glob("*.jpg")):
            pixels = mx.image.imdecode(path.read_bytes()).astype("float32").transpose((2, 0, 1)).expand_dims(0)
            executor.forward(is_train=False, data=pixels)
            rows.append(executor.outputs[0].asnumpy()[0])
        np.save(sys.argv[1], np.array(rows, np.float32))
    """)
    out = scored["work"] / "one-at-a-time.npy"
    subprocess.run([str(python), "-c", code, str(out)], check=True, capture_output=True)
    return np.load(out)


@pytest.fixture(scope="module")
def reference(scored, mxnet_python) -> np.ndarray:
    scores = one_at_a_time(mxnet_python, scored)
    assert scores.shape == scored["truth"].shape
    assert scores.min() > 0.4 and scores.max() < 0.6 and np.ptp(scores) > 1e-3  # spread out, not saturated
    return scores


@pytest.mark.parametrize("batch_size", [1, 8, 64])
def test_every_batch_size_gives_the_scores_of_one_image_at_a_time(scored, reference, mxnet_python, batch_size):
    out = evaluate(mxnet_python, scored, batch_size)
    scores = np.load(out / "scores.npy")
    assert scores.dtype == np.float32 and scores.shape == reference.shape
    np.testing.assert_allclose(scores, reference, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.load(out / "labels.npy"), scored["truth"].astype(np.uint8))
    np.testing.assert_array_equal(np.load(out / "ids.npy"), np.arange(700, 700 + IMAGES))
    assert json.loads((out / "timing.json").read_text())["images"] == IMAGES
