"""Benchmark: the leakage check's cost at the seed's split size (≈ 139,500 training and 15,500 validation images).

    nice -n 10 .venv/bin/python bench/bench_leakage.py [--images 3000] [--repeat 3]

Two parts, one run:
- hashing (tagflow.leakage.record_hashes): `--images` demo designs packed at 96 px by tagflow's own pack (real JPEG
  records, as a published dataset has them), hashed from the .rec with 1, 2 and 4 threads; images/s and the
  extrapolation to the seed's 155,000 images (both splits are hashed once per dataset: the evaluation caches the
  result by the two records' digests).
- the nearest search (tagflow.leakage.nearest, brute force: XOR and np.bitwise_count over packed uint64 in blocks
  of validation hashes) on synthetic 64-bit hashes of the seed's sizes, each with 32 bits set as the edge hash's
  are, a few hundred of the validation hashes planted within 4 bits of a training hash; median of `--repeat`.
- `--end-to-end`: tagflow.evaluate.split_leakage against a local S3 server started for the run, on the same
  designs packed 85/15 into a dataset: the first call (download train.rec, hash both splits, search, one PUT) and
  the second (the cached result read back: what the champion's and every later run's evaluation pay).
Then a machine line. Goal: the check adds well under the evaluation's own 5-minute budget for the seed split.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402

from machine import machine_line  # noqa: E402
from tagflow import demo, leakage  # noqa: E402
from tagflow.pack import PackParams, pack  # noqa: E402

SEED_TRAIN, SEED_VAL = 139_500, 15_500


def packed(n: int, folder: Path, train_ratio: float = 1.0) -> tuple[Path, dict[str, int]]:
    """`n` demo designs packed at 96 px (the pack's own JPEG records) into `folder`/packed: (that folder, counts)."""
    items = []
    for design in demo.generate(n, seed=7, workers=2):
        path = folder / f"{design.image_id}.{design.ext}"
        path.write_bytes(design.data)
        items.append((design.image_id, design.labels.tolist(), path))
    report = pack(items, folder / "packed", PackParams(resize=96, train_ratio=train_ratio), workers=2)
    assert sum(report.counts.values()) == n and not report.errors, report
    return folder / "packed", dict(report.counts)


def end_to_end(n: int, work: Path) -> None:
    """split_leakage computed, then read from its cache, on `n` designs published to a local S3 server."""
    import json

    from tagflow import s3
    from tagflow.evaluate import Split, split_leakage
    from tagflow.local import s3server

    (work / "designs").mkdir()
    out, counts = packed(n, work / "designs", train_ratio=0.85)
    server = s3server.start(work / "s3")
    try:
        client = server.client()
        s3.ensure_bucket(client, "bench-leakage")
        dataset = s3.S3Uri.parse("s3://bench-leakage/designs")
        for split, folder in (("train", "training"), ("val", "validation")):
            for ext in ("rec", "idx"):
                s3.put_file(client, out / f"{split}.{ext}", dataset.join(folder, f"{split}.{ext}"))
        names = [f"label-{c}" for c in range(demo.NUM_LABELS)]
        zero = dict.fromkeys(names, 0)
        manifest = {"counts": counts, "label_names": names, "label_counts": {"train": zero, "val": zero}}
        key = dataset.join("training", "manifest.json")
        client.put_object(Bucket=key.bucket, Key=key.key, Body=json.dumps(manifest).encode())
        print(f"split_leakage on {counts['train']:,} training and {counts['val']:,} validation designs, local S3:")
        for attempt in ("first (computed)", "second (cached)"):
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                started = time.perf_counter()
                block = split_leakage(client, Split(client, dataset, Path(tmp)))
                wall = time.perf_counter() - started
            said = "read from the cache" if block["cached"] else f"spent {block['seconds']}"
            print(f"  {attempt}: {wall:.2f} s wall, {said}; {block['leaked']} leaked")
    finally:
        s3server.stop(work / "s3")


def synthetic_hashes(n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` random 64-bit hashes with 32 bits set each (the edge hash sets one bit per coefficient above the median)."""
    bits = np.argsort(rng.random((n, 64)), axis=1)[:, :32]
    words = np.zeros(n, np.uint64)
    for column in range(32):
        words |= np.uint64(1) << bits[:, column].astype(np.uint64)
    return words


def median_seconds(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000, help="demo designs to pack and hash")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is printed)")
    parser.add_argument("--end-to-end", action="store_true", help="also time split_leakage against local S3")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-leakage-") as tmp:
        rec = packed(args.images, Path(tmp))[0] / "train.rec"
        size = rec.stat().st_size
        print(f"hashing {args.images} packed 96-px demo JPEG records ({size / args.images / 1024:.1f} KiB each):")
        for workers in (1, 2, 4):
            seconds, _ = median_seconds(lambda w=workers: leakage.record_hashes(rec, w), args.repeat)
            rate = args.images / seconds
            total = SEED_TRAIN + SEED_VAL
            print(f"  {workers} thread(s): {rate:,.0f} images/s ({1000 / rate:.2f} ms per image); the seed's "
                  f"{total:,} images: {total / rate:,.0f} s")  # fmt: skip

    rng = np.random.default_rng(5)
    train = synthetic_hashes(SEED_TRAIN, rng)
    val = synthetic_hashes(SEED_VAL, rng)
    planted = rng.choice(SEED_VAL, 300, replace=False)
    # two bits swapped (one set bit cleared, one clear bit set): 2 bits from its training hash, still 32 bits set
    for k, source in zip(planted.tolist(), rng.choice(SEED_TRAIN, 300).tolist(), strict=True):
        word = int(train[source])
        ones = [b for b in range(64) if word >> b & 1]
        zeros = [b for b in range(64) if not word >> b & 1]
        val[k] = np.uint64(word ^ (1 << ones[0]) ^ (1 << zeros[0]))
    seconds, (distance, _) = median_seconds(lambda: leakage.nearest(val, train), args.repeat)
    pairs = SEED_TRAIN * SEED_VAL
    found = int((distance <= leakage.DEFAULT_MAX_DISTANCE).sum())
    print(f"nearest search, brute force: {SEED_VAL:,} validation × {SEED_TRAIN:,} training hashes = {pairs / 1e9:.2f} "
          f"G pairs in {seconds:.2f} s ({pairs / seconds / 1e9:.2f} G pairs/s); {found} within "
          f"{leakage.DEFAULT_MAX_DISTANCE} bits (300 planted)")  # fmt: skip
    if args.end_to_end:
        with tempfile.TemporaryDirectory(prefix="bench-leakage-") as tmp:
            end_to_end(args.images, Path(tmp))
    print(machine_line(numpy=np.__version__))


if __name__ == "__main__":
    main()
