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


def packed_rec(n: int, folder: Path) -> Path:
    """`n` demo designs packed at 96 px into one train.rec (the pack's own JPEG records)."""
    items = []
    for design in demo.generate(n, seed=7, workers=2):
        path = folder / f"{design.image_id}.{design.ext}"
        path.write_bytes(design.data)
        items.append((design.image_id, design.labels.tolist(), path))
    report = pack(items, folder / "packed", PackParams(resize=96, train_ratio=1.0), workers=2)
    assert report.counts["train"] == n and not report.errors, report
    return folder / "packed" / "train.rec"


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
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-leakage-") as tmp:
        rec = packed_rec(args.images, Path(tmp))
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
    print(machine_line(numpy=np.__version__))


if __name__ == "__main__":
    main()
