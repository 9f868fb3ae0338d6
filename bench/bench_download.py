"""Download benchmark: tagflow's sharded downloader vs the seed's sequential loop vs a bare concurrent-GET client.

One run, one local SeaweedFS server (started here in a temporary folder), the same N small JPEG objects, side by
side:

    sequential    the seed: one boto3 client, for each key get_object + write the file
    tagflow       tagflow.download.download (listing, checks, atomic writes, index) with --workers threads
    bare          a ThreadPoolExecutor of raw get_object + read, nothing else, same workers: the ceiling
    bare+write    the same plus writing each body to its file (open/write, no checks): a downloader's minimum
    download_file a ThreadPoolExecutor of client.download_file (s3transfer), same workers: the road not taken

Each runs twice: on plain loopback, and through bench/latency_proxy.py adding --latency-ms to every request (real S3
answers small GETs in tens of milliseconds; loopback hides what concurrency buys). With latency the sequential loop
runs on the first --latency-seq-objects objects only; its rate is per object, so the ratio stays comparable.
Goals (issue 2): tagflow ≥ 10× sequential and ≥ 90 % of bare.

    .venv/bin/python bench/bench_download.py [--objects 5000] [--workers 32] [--latency-ms 25]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import numpy as np
from PIL import Image

from machine import machine_line
from tagflow import s3
from tagflow.download import download
from tagflow.local import s3server

BUCKET = "bench-download"
PREFIX = "images/"
HERE = Path(__file__).resolve().parent


def make_objects(count: int, seed: int = 0) -> dict[str, bytes]:
    """`count` distinct noisy JPEGs of about 4–20 KB, keyed like a real image prefix (two levels)."""
    rng = np.random.default_rng(seed)
    objects = {}
    for n in range(count):
        side = int(rng.integers(72, 150))
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", quality=int(rng.integers(65, 85)))
        objects[f"{PREFIX}{n % 50:02}/{n:06}.jpg"] = out.getvalue()
    return objects


def client_for(info: s3server.ServerInfo, endpoint: str, pool: int) -> object:
    session = boto3.session.Session(
        aws_access_key_id=info.access_key, aws_secret_access_key=info.secret_key, region_name=info.region
    )
    return s3.make_client(endpoint, session=session, pool_size=pool)


def run_sequential(client, keys: list[str], dest: Path) -> None:
    """The seed's loop, as the notebook had it."""
    for key in keys:
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        path = dest / key
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(body)


def run_tagflow(client, keys: list[str], dest: Path, workers: int) -> None:
    paths = [key.removeprefix(PREFIX) for key in keys]
    report = download(paths, dest, source=s3.S3Uri(BUCKET, PREFIX), client=client, workers=workers)
    assert report.fetched == len(keys) and not report.errors, report.to_dict()


def run_bare(client, keys: list[str], dest: Path, workers: int) -> None:
    def get(key: str) -> int:
        return len(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    with ThreadPoolExecutor(workers) as pool:
        total = sum(pool.map(get, keys))
    assert total > 0


def run_bare_write(client, keys: list[str], dest: Path, workers: int) -> None:
    def get(key: str) -> None:
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        path = dest / key
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(body)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(get, keys))


def run_download_file(client, keys: list[str], dest: Path, workers: int) -> None:
    def fetch(key: str) -> None:
        path = dest / key
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, key, str(path))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fetch, keys))


def timed(fn: Callable[[Path], None], scratch: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one run into a fresh folder."""
    dest = Path(tempfile.mkdtemp(dir=scratch))
    cpu, started = time.process_time(), time.perf_counter()
    fn(dest)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    shutil.rmtree(dest)
    return seconds, cpu


def measure(label: str, info, endpoint: str, keys: list[str], seq_keys: list[str], args, scratch: Path) -> dict:
    """Objects/s of each variant against `endpoint`: best of --rounds, the variants interleaved in each round.

    The machine is shared; interleaving and taking each variant's best round keeps a burst of someone else's
    load from landing on one variant only. Each run gets a fresh client, warmed by one request.
    """
    w = args.workers
    variants: dict[str, tuple[list[str], Callable[[object, list[str], Path], None]]] = {
        "sequential": (seq_keys, lambda c, k, d: run_sequential(c, k, d)),
        "tagflow": (keys, lambda c, k, d: run_tagflow(c, k, d, w)),
        "bare": (keys, lambda c, k, d: run_bare(c, k, d, w)),
        "bare+write": (keys, lambda c, k, d: run_bare_write(c, k, d, w)),
        "download_file": (keys, lambda c, k, d: run_download_file(c, k, d, w)),
    }
    variants = {name: v for name, v in variants.items() if name in args.variants}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (subset, fn) in variants.items():
            client = client_for(info, endpoint, pool=max(64, w))
            client.head_bucket(Bucket=BUCKET)
            runs[name].append(timed(lambda d, fn=fn, client=client, subset=subset: fn(client, subset, d), scratch))
    rates = {}
    for name, (subset, _) in variants.items():
        seconds, cpu = min(runs[name])
        rates[name] = {
            "objects": len(subset),
            "seconds": round(seconds, 3),
            "per_s": round(len(subset) / seconds, 1),
            "cpu_ms_per_object": round(cpu / len(subset) * 1000, 3),
            "all_seconds": [round(r[0], 3) for r in runs[name]],
        }
    seq, bare, ours = rates["sequential"]["per_s"], rates["bare"]["per_s"], rates["tagflow"]["per_s"]
    print(f"\n{label}; best of {args.rounds} interleaved rounds")
    print(
        f"  {'variant':<14}{'objects':>8}{'seconds':>9}{'objects/s':>11}{'vs seq':>8}{'vs bare':>9}{'CPU ms/obj':>12}"
    )
    for name, r in rates.items():
        note = " (subset; rate per object)" if r["objects"] < len(keys) else ""
        print(
            f"  {name:<14}{r['objects']:>8}{r['seconds']:>9.2f}{r['per_s']:>11.1f}"
            f"{r['per_s'] / seq:>7.1f}×{r['per_s'] / bare:>8.0%}{r['cpu_ms_per_object']:>12.2f}{note}"
        )
    versus_write = f", {ours / rates['bare+write']['per_s']:.0%} of bare GET+write" if "bare+write" in rates else ""
    print(
        f"  tagflow: {ours / seq:.1f}× sequential (goal ≥ 10×), "
        f"{ours / bare:.0%} of bare GET (goal ≥ 90 %){versus_write}"
    )
    return rates


def start_proxy(target: str, delay_ms: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "latency_proxy.py"), "--target", target, "--delay-ms", str(delay_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().split() if proc.stdout else []
    if len(line) != 2 or line[0] != "listening":
        proc.kill()
        raise SystemExit(f"latency proxy did not start (said {line!r})")
    return proc, f"http://127.0.0.1:{line[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--latency-ms", type=float, default=25.0, help="0 skips the run with latency")
    parser.add_argument("--latency-seq-objects", type=int, default=500)
    parser.add_argument(
        "--dest-dir", type=Path, help="where downloads are written (default: the temporary folder, on disk)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs per variant, interleaved; best is reported")
    parser.add_argument(
        "--skip",
        default="",
        help="variants to leave out, comma-separated: bare+write, download_file",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args()
    skipped = {name for name in args.skip.split(",") if name}
    if skipped - {"bare+write", "download_file"}:
        parser.error(f"--skip: only bare+write and download_file can be left out, not {sorted(skipped)}")
    args.variants = [n for n in ("sequential", "tagflow", "bare", "bare+write", "download_file") if n not in skipped]

    print(machine_line(boto3=boto3.__version__))
    with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp:
        scratch = Path(tmp)
        info = s3server.start(scratch / "s3")
        dest_root = Path(tempfile.mkdtemp(prefix="bench-download-", dir=args.dest_dir)) if args.dest_dir else scratch
        proxy = None
        try:
            objects = make_objects(args.objects)
            sizes = [len(b) for b in objects.values()]
            admin = client_for(info, info.endpoint, pool=64)
            admin.create_bucket(Bucket=BUCKET)
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda kv: admin.put_object(Bucket=BUCKET, Key=kv[0], Body=kv[1]), objects.items()))
            keys = list(objects)
            print(
                f"{len(keys)} objects, {min(sizes) / 1024:.1f}–{max(sizes) / 1024:.1f} KB "
                f"(mean {sum(sizes) / len(sizes) / 1024:.1f} KB), {args.workers} workers, SeaweedFS on loopback"
            )
            print(f"downloads written below {dest_root}")
            label = "loopback (no added latency)"
            results = {"loopback": measure(label, info, info.endpoint, keys, keys, args, dest_root)}
            if args.latency_ms > 0:
                proxy, endpoint = start_proxy(info.endpoint.removeprefix("http://"), args.latency_ms)
                label = f"with {args.latency_ms:g} ms added to every request (bench/latency_proxy.py)"
                seq_keys = keys[: args.latency_seq_objects]
                results["latency"] = measure(label, info, endpoint, keys, seq_keys, args, dest_root)
            if args.json:
                print(
                    json.dumps({"machine": machine_line(boto3=boto3.__version__), "workers": args.workers, **results})
                )
        finally:
            if proxy is not None:
                proxy.terminate()
                proxy.wait(10)
            s3server.stop(scratch / "s3")
            if dest_root != scratch:
                shutil.rmtree(dest_root, ignore_errors=True)


if __name__ == "__main__":
    main()
