"""Benchmark: the evaluation stage's batched scoring (algo/ic_eval.py) beside the local endpoint's single-request rate.

    .venv/bin/python bench/bench_evaluate.py [--images 2000] [--batch-size 64] [--requests 300] [--model model.tar.gz]

Scores `--images` generated 96-px JPEGs (tests/test_local_endpoint.py's figures) with a ResNet-18 multi-label model
(default: trained for one epoch on a tiny set, as bench_endpoint.py does) through algo/ic_eval.py in the algorithm
environment, and sends `--requests` of the same images one at a time to the local endpoint serving the same model.
Prints both rates (images/s), the wall time of the whole evaluator process (model load included) and the
extrapolation to a 15,500-image validation split, then a machine line.
Goals: evaluation ≥ 2 × the endpoint's single-request rate, and 15,500 images in ≤ 5 minutes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from machine import machine_line  # noqa: E402
from tagflow.local import endpoint, process  # noqa: E402
from tagflow.pack import mxnet_python  # noqa: E402
from tagflow.recordio import RecordWriter  # noqa: E402
from test_local_endpoint import render, train_tiny_model  # noqa: E402 - the tests' model recipe, on purpose

SEED_VALIDATION = 15_500


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--model", type=Path)
    args = parser.parse_args()
    python = mxnet_python()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model or train_tiny_model(work / "train", python)
        model_dir = work / "model"
        model_dir.mkdir()
        subprocess.run(["tar", "xzf", str(model), "-C", str(model_dir)], check=True)
        classes = json.loads((model_dir / "metrics.json").read_text())["num_classes"]
        (work / "val").mkdir()
        images = []
        with RecordWriter(work / "val" / "val.rec", work / "val" / "val.idx") as writer:
            for i in range(args.images):
                data, labels = render(10_000 + i)
                writer.write_image(i, labels[:classes], data)
                images.append(data)
        (work / "freq.json").write_text(json.dumps([0.2] * classes))
        started = time.perf_counter()
        subprocess.run(
            [str(python), str(REPO / "algo" / "ic_eval.py"), "--model-dir", str(model_dir),
             "--rec", str(work / "val" / "val.rec"), "--idx", str(work / "val" / "val.idx"),
             "--label-frequency", str(work / "freq.json"), "--batch-size", str(args.batch_size),
             "--out", str(work / "out")],
            check=True, capture_output=True, env=process.child_env(),
        )  # fmt: skip
        wall = time.perf_counter() - started
        scoring = json.loads((work / "out" / "metrics.json").read_text())["seconds"]
        eval_rate = args.images / scoring

        info = endpoint.start(model, name="bench-evaluate", state_dir=work / "ep", mxnet_python=python)
        try:
            conn = http.client.HTTPConnection(info.host, info.port, timeout=60)
            for i in range(args.requests + 20):
                if i == 20:  # after a warm-up
                    begun = time.perf_counter()
                conn.request("POST", "/invocations", body=images[i % len(images)],
                             headers={"Content-Type": "image/jpeg"})  # fmt: skip
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 200, resp.status
            endpoint_rate = args.requests / (time.perf_counter() - begun)
            conn.close()
        finally:
            endpoint.stop(work / "ep")
    fixed = wall - scoring  # start-up and model load, paid once per evaluation
    print(f"evaluation (ic_eval.py, batch {args.batch_size}): {args.images} images scored in {scoring:.1f} s = "
          f"{eval_rate:.0f} images/s; process wall time {wall:.1f} s (start-up + load {fixed:.1f} s)")  # fmt: skip
    print(f"endpoint, one request at a time: {endpoint_rate:.0f} images/s ({args.requests} requests)")
    print(f"ratio: {eval_rate / endpoint_rate:.1f}x (goal >= 2x)")
    print(f"extrapolated to {SEED_VALIDATION:,} images: {SEED_VALIDATION / eval_rate + fixed:.0f} s (goal <= 300 s)")
    print(machine_line())


if __name__ == "__main__":
    main()
