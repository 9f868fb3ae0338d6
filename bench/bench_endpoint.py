"""Benchmark: local endpoint latency and throughput for 96-px JPEGs from a concurrent client.

    .venv/bin/python bench/bench_endpoint.py [--model model.tar.gz] [--requests 1000] [--threads 8] [--workers 1]

Serves `--model` (default: a ResNet-18 multi-label model trained for one epoch by algo/ic_train.py on a tiny generated
set, as tests/test_local_endpoint.py does) with tagflow.local.endpoint, then `--threads` client threads send
`--requests` POST /invocations in total over keep-alive connections (http.client, one connection per thread),
after a warm-up of 20 requests. Prints p50/p90/p99 latency, requests/s and errors, then a machine line.
Goal: p50 ≤ 20 ms, 0 errors.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from tagflow.local import endpoint  # noqa: E402
from tagflow.pack import mxnet_python  # noqa: E402
from test_local_endpoint import render, train_tiny_model  # noqa: E402 - the tests' model recipe, on purpose


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def client_thread(host: str, port: int, images: list[bytes], count: int, out: list[float], errors: list[str]) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=60)
    for i in range(count):
        body = images[i % len(images)]
        started = time.perf_counter()
        try:
            conn.request("POST", "/invocations", body=body, headers={"Content-Type": "image/jpeg"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors.append(f"HTTP {resp.status}")
                continue
        except (OSError, http.client.HTTPException) as err:
            errors.append(repr(err))
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=60)
            continue
        out.append(time.perf_counter() - started)
    conn.close()


def run(info: endpoint.EndpointInfo, requests: int, threads: int) -> None:
    images = [render(i)[0] for i in range(64)]
    warm: list[float] = []
    client_thread(info.host, info.port, images, 20, warm, [])
    latencies: list[float] = []
    errors: list[str] = []
    per_thread = [requests // threads + (1 if t < requests % threads else 0) for t in range(threads)]
    workers = [
        threading.Thread(target=client_thread, args=(info.host, info.port, images, n, latencies, errors))
        for n in per_thread
    ]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    q = statistics.quantiles(sorted(latencies), n=100)
    print(f"requests: {requests} from {threads} threads, 96-px JPEGs ({sum(map(len, images)) // len(images)} B avg)")
    print(f"latency p50 {q[49] * 1000:.1f} ms  p90 {q[89] * 1000:.1f} ms  p99 {q[98] * 1000:.1f} ms")
    print(f"throughput {len(latencies) / elapsed:.1f} requests/s  errors {len(errors)}  wall {elapsed:.1f} s")
    if errors:
        print("first errors:", errors[:5])
    # A single client: the latency of one request with no queueing.
    single: list[float] = []
    client_thread(info.host, info.port, images, 200, single, errors)
    print(f"single client: p50 {statistics.median(single) * 1000:.1f} ms over {len(single)} requests")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model.tar.gz (default: train a tiny one)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="server executors (endpoint.start workers)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-endpoint-") as tmp:
        work = Path(tmp)
        model = args.model or train_tiny_model(work, mxnet_python())
        state = work / "endpoint"
        info = endpoint.start(model, name="bench", state_dir=state, workers=args.workers)
        print(f"server: {args.workers} worker(s)")
        try:
            run(info, args.requests, args.threads)
        finally:
            endpoint.stop(state)
    print(f"machine: {cpu_model()}, {len(os.sched_getaffinity(0))} cores, python {platform.python_version()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
