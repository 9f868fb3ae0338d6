"""Benchmark: the evaluation stage's batched scoring (algo/ic_eval.py) beside the local endpoint's single-request rate.

    .venv/bin/python bench/bench_evaluate.py [--images 2000] [--batch-size 64] [--requests 300] [--rounds 3]
        [--model model.tar.gz]
    .venv/bin/python bench/bench_evaluate.py --report [--repeat 3]

Scores `--images` generated 96-px JPEGs (tests/test_local_endpoint.py's figures) with a ResNet-18 multi-label model
(default: trained for one epoch on a tiny set, as bench_endpoint.py does, its last layer scaled down so that the
probabilities are not all 0 or 1) three ways, side by side in each of `--rounds` rounds, so a load from other jobs
falls on all three alike:
- the evaluation: algo/ic_eval.py in the algorithm environment, its scoring time and CPU (timing.json);
- the bare forward: the same model and batch size forwarding the same images decoded beforehand (ic_eval's own
  iterator, untimed), so neither JPEG decoding nor the iterator is counted: the physical limit of the evaluation;
- the endpoint: `--requests` of the same JPEGs one at a time to the local endpoint serving the same model (keep-alive,
  after 20 warm-up requests), with the server's CPU time per request from /proc.
Prints each round, the medians, the ratios and the extrapolation to a 15,500-image split, the load average before
and after, then a machine line. Exits non-zero if the bare forward's scores differ from the evaluation's by more
than 1e-6 (both must compute the same numbers, or the comparison means nothing).
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
import os
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
from test_ic_eval_speed import soften  # noqa: E402
from test_local_endpoint import render, train_tiny_model  # noqa: E402 - the tests' model recipe, on purpose

SEED_VALIDATION = 15_500
TOLERANCE = 1e-6
# Run in the algorithm environment: ic_eval's Scorer and iterator, the images decoded first, then the forward timed.
BARE_FORWARD = """
import json, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[1])
from ic_eval import Scorer
model_dir, rec, batch_size, out = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
scorer = Scorer(model_dir, batch_size)
started, cpu = time.perf_counter(), time.process_time()
batches = [(b.data[0].copy(), b.data[0].shape[0] - (b.pad or 0)) for b in scorer.batches(rec, 1)]
decode, decode_cpu = time.perf_counter() - started, time.process_time() - cpu
scorer.forward(batches[0][0])  # warm-up: the first forward creates the oneDNN primitives
started, cpu = time.perf_counter(), time.process_time()
scores = np.concatenate([scorer.forward(data)[:keep] for data, keep in batches]).astype(np.float32)
seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
np.save(out, scores)
print(json.dumps({"images": len(scores), "seconds": seconds, "cpu_seconds": cpu,
                  "decode_seconds": decode, "decode_cpu_seconds": decode_cpu}))
"""
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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--report", action="store_true", help="time the evaluation report instead")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.report:
        bench_report(args.repeat)
        return
    python = mxnet_python()
    load_before = os.getloadavg()
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model or train_tiny_model(work / "train", python)
        model_dir = work / "model"
        model_dir.mkdir()
        subprocess.run(["tar", "xzf", str(model), "-C", str(model_dir)], check=True)
        metrics = json.loads((model_dir / "metrics.json").read_text())
        classes = metrics["num_classes"]
        if not args.model:
            soften(python, model_dir / metrics["params_file"])
            model = work / "softened.tar.gz"  # what the endpoint serves too
            subprocess.run(["tar", "czf", str(model), "-C", str(model_dir), "."], check=True)
        (work / "val").mkdir()
        images = []
        with RecordWriter(work / "val" / "val.rec", work / "val" / "val.idx") as writer:
            for i in range(args.images):
                data, labels = render(10_000 + i)
                writer.write_image(i, labels[:classes], data)
                images.append(data)
        (work / "freq.json").write_text(json.dumps([0.2] * classes))
        info = endpoint.start(model, name="bench-evaluate", state_dir=work / "ep", mxnet_python=python)
        try:
            for number in range(1, args.rounds + 1):
                row = evaluation_round(python, work, model_dir, args.batch_size)
                row |= bare_round(python, work, model_dir, args.batch_size)
                row |= endpoint_round(info, images, args.requests)
                rounds.append(row)
                print(f"round {number}: evaluation {row['eval_rate']:.0f} images/s ({row['eval_cpu_ms']:.2f} ms CPU "
                      f"an image), bare forward {row['bare_rate']:.0f} ({row['bare_cpu_ms']:.2f} ms), endpoint "
                      f"{row['endpoint_rate']:.0f} requests/s ({row['endpoint_cpu_ms']:.2f} ms server CPU a request); "
                      f"evaluation / endpoint {row['eval_rate'] / row['endpoint_rate']:.2f}x, "
                      f"bare / endpoint {row['bare_rate'] / row['endpoint_rate']:.2f}x, "
                      f"evaluation / bare {row['eval_rate'] / row['bare_rate']:.2f}", flush=True)  # fmt: skip
        finally:
            endpoint.stop(work / "ep")
    load_after = os.getloadavg()

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    def ratio(a: str, b: str) -> float:
        return statistics.median(r[a] / r[b] for r in rounds)

    print(f"median of {len(rounds)} rounds, {args.images} images, batch {args.batch_size}:")
    print(f"  evaluation (ic_eval.py): {med('eval_rate'):.0f} images/s, {med('eval_cpu_ms'):.2f} ms CPU an image; "
          f"process wall {med('eval_wall'):.1f} s (start-up + model load {med('eval_fixed'):.1f} s)")  # fmt: skip
    print(f"  bare forward, same batch, images decoded beforehand: {med('bare_rate'):.0f} images/s, "
          f"{med('bare_cpu_ms'):.2f} ms CPU an image (decoding alone: {med('decode_rate'):.0f} images/s, "
          f"{med('decode_cpu_ms'):.2f} ms CPU an image)")  # fmt: skip
    print(f"  endpoint, one request at a time: {med('endpoint_rate'):.0f} images/s, "
          f"{med('endpoint_cpu_ms'):.2f} ms server CPU a request ({args.requests} requests)")  # fmt: skip
    print(f"  evaluation / endpoint {ratio('eval_rate', 'endpoint_rate'):.2f}x (goal >= 2x); "
          f"bare forward / endpoint {ratio('bare_rate', 'endpoint_rate'):.2f}x; "
          f"evaluation / bare forward {ratio('eval_rate', 'bare_rate'):.2f}; "
          f"CPU time of an endpoint request / of an evaluated image "
          f"{ratio('endpoint_cpu_ms', 'eval_cpu_ms'):.2f}x")  # fmt: skip
    print(f"  scores: bare forward vs evaluation, max |difference| {max(r['max_diff'] for r in rounds):.2g} "
          f"(allowed {TOLERANCE:g})")  # fmt: skip
    seed = SEED_VALIDATION / med("eval_rate") + med("eval_fixed")
    print(f"  extrapolated to {SEED_VALIDATION:,} images: {seed:.0f} s (goal <= 300 s)")
    before, after = (" ".join(f"{v:.1f}" for v in load) for load in (load_before, load_after))
    print(f"  load average (1, 5, 15 min) before {before}, after {after}")
    print(machine_line())


def evaluation_round(python: Path, work: Path, model_dir: Path, batch_size: int) -> dict[str, float]:
    """One ic_eval.py run over work/val: its scoring rate and CPU from timing.json, its whole process's wall time."""
    out = work / "out"
    started = time.perf_counter()
    subprocess.run(
        [str(python), str(REPO / "algo" / "ic_eval.py"), "--model-dir", str(model_dir),
         "--rec", str(work / "val" / "val.rec"), "--idx", str(work / "val" / "val.idx"),
         "--label-frequency", str(work / "freq.json"), "--batch-size", str(batch_size), "--out", str(out)],
        check=True, capture_output=True, env=process.child_env(),
    )  # fmt: skip
    wall = time.perf_counter() - started
    timing = json.loads((out / "timing.json").read_text())
    n = timing["images"]
    return {"eval_rate": n / timing["seconds"], "eval_wall": wall, "eval_fixed": wall - timing["seconds"],
            "eval_cpu_ms": 1000 * timing["cpu_seconds"] / n}  # fmt: skip


def bare_round(python: Path, work: Path, model_dir: Path, batch_size: int) -> dict[str, float]:
    """The bare forward over the same images (BARE_FORWARD), and its scores compared with the evaluation's."""
    import numpy as np

    bare = work / "bare_scores.npy"
    done = subprocess.run(
        [str(python), "-c", BARE_FORWARD, str(REPO / "algo"), str(model_dir), str(work / "val" / "val.rec"),
         str(batch_size), str(bare)],
        check=True, capture_output=True, text=True, env=process.child_env(),
    )  # fmt: skip
    timing = json.loads(done.stdout.strip().splitlines()[-1])
    evaluated = np.load(work / "out" / "scores.npy")
    forwarded = np.load(bare)
    if evaluated.shape != forwarded.shape:
        raise SystemExit(f"the bare forward scored {forwarded.shape}, the evaluation {evaluated.shape}")
    diff = float(np.abs(evaluated - forwarded).max())
    if diff > TOLERANCE:
        raise SystemExit(f"the bare forward's scores differ from the evaluation's by up to {diff:g} (> {TOLERANCE:g})")
    n = timing["images"]
    return {"bare_rate": n / timing["seconds"], "bare_cpu_ms": 1000 * timing["cpu_seconds"] / n,
            "decode_rate": n / timing["decode_seconds"], "decode_cpu_ms": 1000 * timing["decode_cpu_seconds"] / n,
            "max_diff": diff}  # fmt: skip


def _cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def endpoint_round(info: endpoint.EndpointInfo, images: list[bytes], requests: int) -> dict[str, float]:
    """`requests` JPEGs one at a time on one keep-alive connection, after 20 warm-up requests."""
    conn = http.client.HTTPConnection(info.host, info.port, timeout=60)
    try:
        for i in range(requests + 20):
            if i == 20:
                begun, cpu = time.perf_counter(), _cpu_seconds(info.pid)
            conn.request("POST", "/invocations", body=images[i % len(images)], headers={"Content-Type": "image/jpeg"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise SystemExit(f"the endpoint answered {resp.status} to request {i}")
        seconds, cpu = time.perf_counter() - begun, _cpu_seconds(info.pid) - cpu
    finally:
        conn.close()
    return {"endpoint_rate": requests / seconds, "endpoint_cpu_ms": 1000 * cpu / requests}


if __name__ == "__main__":
    main()
