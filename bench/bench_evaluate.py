"""Benchmark: the evaluation stage's batched scoring (algo/ic_eval.py) beside the local endpoint's single-request rate.

    .venv/bin/python bench/bench_evaluate.py [--images 2000] [--batch-size 64] [--requests 300] [--model model.tar.gz]
    .venv/bin/python bench/bench_evaluate.py --report [--repeat 3]

Scores `--images` generated 96-px JPEGs (tests/test_local_endpoint.py's figures) with a ResNet-18 multi-label model
(default: trained for one epoch on a tiny set, as bench_endpoint.py does) through algo/ic_eval.py in the algorithm
environment, and sends `--requests` of the same images one at a time to the local endpoint serving the same model.
Prints both rates (images/s), the wall time of the whole evaluator process (model load included) and the
extrapolation to a 15,500-image validation split, then a machine line.
Goals: evaluation ≥ 2 × the endpoint's single-request rate, and 15,500 images in ≤ 5 minutes.

`--report`: the cost of the evaluation report (tagflow.evaluate.write_evaluation with its report: the cached scores
read back, val.idx and 24 ranged GETs of val.rec, the charts, report.html, all PUT) against a local S3 server
started for the run, for the demo's shape (50 labels, 212 validation images) and the seed's (334 labels, 15,500
images). The records carry generated 96-px JPEGs (200 distinct, repeated) and labels of Zipf-like frequencies; the
scores are the labels plus noise, put in the evaluation cache as ic_eval's would be. Prints the median of
`--repeat` writes, and the render alone (tagflow.report.render) beside it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
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
REPORT_SHAPES = (("demo, 50-label-rs96", 50, 212), ("seed, ic-multi-label", 334, SEED_VALIDATION))


def bench_report(repeat: int) -> None:
    """Time write_evaluation's report for each of REPORT_SHAPES (module docstring)."""
    import numpy as np

    from tagflow import report, s3
    from tagflow.evaluate import Split, build_report, cache_uri, document, put_scores, write_evaluation
    from tagflow.local import s3server

    started = time.perf_counter()
    import matplotlib.figure  # noqa: F401 - paid once per process, reported on its own

    print(f"importing matplotlib: {time.perf_counter() - started:.2f} s (once per process)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = s3server.start(work / "s3")
        try:
            client = server.client()
            s3.ensure_bucket(client, "bench-report")
            jpegs = [render(20_000 + i)[0] for i in range(200)]
            for name, labels, images in REPORT_SHAPES:
                rng = np.random.default_rng(labels)
                frequency = np.clip(0.3 / np.arange(1, labels + 1) ** 0.7, 0.002, None)
                truth = (rng.random((images, labels)) < frequency).astype(np.uint8)
                prefix = f"s3://bench-report/{labels}-labels"
                folder = work / name.split(",")[0]
                folder.mkdir()
                with RecordWriter(folder / "val.rec", folder / "val.idx") as writer:
                    for i in range(images):
                        writer.write_image(i, truth[i], jpegs[i % len(jpegs)])
                dataset = s3.S3Uri.parse(prefix)
                for ext in ("rec", "idx"):
                    s3.put_file(client, folder / f"val.{ext}", dataset.join("validation", f"val.{ext}"))
                names = [f"label-{c:03d}" for c in range(labels)]
                train = (truth.sum(0) * 8 + 1).astype(int)
                manifest = {"counts": {"train": images * 8, "val": images}, "label_names": names,
                            "label_counts": {"train": dict(zip(names, train.tolist(), strict=True)),
                                             "val": dict(zip(names, truth.sum(0).tolist(), strict=True))}}  # fmt: skip
                key = dataset.join("training", "manifest.json")
                client.put_object(Bucket=key.bucket, Key=key.key, Body=json.dumps(manifest).encode())
                split = Split(client, dataset, folder)
                scores = 1 / (1 + np.exp(-(rng.normal(0, 1.5, truth.shape) + 3 * truth - 2)))
                arrays = {"scores": scores.astype(np.float32), "labels": truth, "ids": np.arange(images)}
                sha = "b" * 64
                info = {"num_outputs": labels, "label_names": names, "params_file": "image-classification-0010.params"}
                put_scores(client, cache_uri(dataset, sha, split.digest), info, arrays)
                history = [{"epoch": e, "train_accuracy": 0.9 + e / 200, "validation_accuracy": 0.9 + e / 250,
                            "validation_mAP": 0.2 + e / 30} for e in range(10)]  # fmt: skip
                training = {"history": history, "best_epoch": 9, "selected_by": "validation:mAP"}
                model = {"uri": f"{prefix}/model.tar.gz", "sha256": sha, **info}
                scored = {**arrays, "model": model, "training": training}
                started = time.perf_counter()
                doc = document(f"{prefix}/model.tar.gz", split, scored, None)
                metrics_s = time.perf_counter() - started
                writes, cpus, renders = [], [], []
                for _ in range(repeat):
                    started, cpu = time.perf_counter(), time.process_time()
                    write_evaluation(doc, prefix, "bench-job", client)
                    writes.append(time.perf_counter() - started)
                    cpus.append(time.process_time() - cpu)
                    files = build_report(doc, prefix, "bench-job", client)
                    started = time.perf_counter()
                    report.render(doc, scores=arrays["scores"], labels=truth, label_counts=split.label_counts,
                                  images=[], job="bench-job")  # fmt: skip
                    renders.append(time.perf_counter() - started)
                size = len(files["report.html"])
                print(f"report, {name} ({labels} labels x {images:,} images): write_evaluation with the report "
                      f"{statistics.median(writes):.2f} s, CPU {statistics.median(cpus):.2f} s (median of {repeat}; "
                      f"render without thumbnails "
                      f"{statistics.median(renders):.2f} s); report.html {size / 1024:.0f} KiB; "
                      f"the metrics (document) {metrics_s:.2f} s")  # fmt: skip
        finally:
            s3server.stop(work / "s3")
    print(machine_line())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--report", action="store_true", help="time the evaluation report instead")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.report:
        bench_report(args.repeat)
        return
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
