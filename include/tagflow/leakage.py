"""Leakage check: validation images that are near-duplicates of a training image.

A grouped split (tagflow.shards) keeps the variants of one design on one side when the group key knows them; this
check finds the ones it does not know. Every image in the packed train and validation `.rec` files gets a 64-bit
perceptual hash of its edges (`edge_phash`): the sum over R, G and B of the absolute horizontal and vertical
differences, area-averaged to 32×32, its 8×8 lowest DCT frequencies, one bit per coefficient above their median.
Edges rather than greyscale, because a recolouring (another colourway of a design) changes the brightness of each
region, and with it a greyscale hash, but keeps the edges. Re-encoding, darkening, a recolouring or a shift by a
pixel or two changes few bits; a different design about half (the measured figures are by DEFAULT_MAX_DISTANCE). A
validation image whose hash is within `max_distance` bits (Hamming distance) of a training image's is reported with
its nearest training image. A mirrored or cropped variant is not caught.

The hash is a few lines on libjpeg-turbo, Pillow and numpy rather than the `imagehash` package, which needs scipy and
PyWavelets and hashes greyscale only: on the demo designs greyscale pHash/dHash left 4-12 % of recoloured variants
beyond 10 bits and put distinct designs within 4 bits of each other. JPEG records are decoded at libjpeg-turbo's
smallest DCT scale covering 32×32 (3/8 for the 96-px records): bench/bench_leakage.py measured 1,900 packed demo
records a second on this machine's 2 cores (0.84 ms each on one thread, at load 12), so the seed's 155,000 images
take about 1.5 minutes.

The comparison is brute force over packed uint64 (XOR, `np.bitwise_count`, min per row) in blocks of validation
hashes: the seed's 15,500 × 139,500 pairs take 4-7 s here (load 1.5-12), under a tenth of the hashing, and give the
exact nearest training image of every validation image, so one result serves any max distance. An index (multi-index
hashing over 16-bit blocks) would answer only within a radius and save seconds on a check paid once per dataset.
"""

from __future__ import annotations

import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image

from tagflow.errors import TagflowError
from tagflow.recordio import RecordReader, unpack_payload

log = logging.getLogger(__name__)

HASH = "edge-phash-64"
# Measured on 2,000 demo designs packed at 96 px (hashes have 32 of 64 bits set, so distances are even): no two
# distinct designs are within 4 bits (15 are within 6), while within 4 bits of its original are 94 % of re-encoded
# (JPEG q60), 92 % of darkened, 91-93 % of recoloured (hue +120°, RGB→BGR), 70 % of hue +40° and 55 % of 2-px shifted
# variants (at 6 bits: 98 %, 96 %, 97-98 %, 84 %, 79 %). 4 flags no distinct design; raise it to catch more shifts.
DEFAULT_MAX_DISTANCE = 4
MAX_EXAMPLES = 12  # closest leaks listed (the report shows each beside its training image)
_READ_BATCH = 4096  # records held in memory at once while hashing
_BLOCK = 64  # validation hashes compared at once: 64 × 140,000 × 9 bytes of temporaries ≈ 80 MB


def _dct_rows(n: int, rows: int) -> np.ndarray:
    """The first `rows` basis vectors of the n-point DCT-II (unnormalised: only signs against the median count)."""
    k = np.arange(rows)
    return np.ascontiguousarray(np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k[:, None] / (2 * n)))


_DCT8 = _dct_rows(32, 8)  # the 8 × 8 lowest frequencies of a 32 × 32 image
_DCT8_T = np.ascontiguousarray(_DCT8.T)


def edge_phash(image: bytes) -> int:
    """The 64-bit perceptual hash of an encoded image's edges (JPEG via libjpeg-turbo, others via Pillow)."""
    pixels = None
    if image[:3] == b"\xff\xd8\xff":
        try:
            pixels = simplejpeg.decode_jpeg(image, colorspace="RGB", min_width=32, min_height=32, fastdct=True)
        except ValueError:
            pixels = None  # a JPEG libjpeg-turbo cannot decode this way: Pillow decides
    if pixels is None:
        with Image.open(io.BytesIO(image)) as opened:
            rgb_image = opened.convert("RGB")
            # the size libjpeg-turbo's DCT scaling gives a JPEG of this size, so both paths see the same edges
            scale = next((m for m in range(1, 9) if min(rgb_image.size) * m >= 8 * 32), 8)
            size = tuple(-(-side * scale // 8) for side in rgb_image.size)
            pixels = np.asarray(rgb_image.resize(size, Image.Resampling.BOX) if scale < 8 else rgb_image)
    rgb = pixels.astype(np.float32)
    edges = np.abs(np.diff(rgb, axis=1, append=rgb[:, -1:])).sum(2) + np.abs(np.diff(rgb, axis=0, append=rgb[-1:])).sum(
        2
    )
    small = np.asarray(Image.fromarray(edges).resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    low = (_DCT8 @ small @ _DCT8_T).reshape(-1)
    middle = np.sort(low)[31:33].mean()  # the median of 64 values
    return int.from_bytes(np.packbits(low > middle).tobytes(), "big")


def record_hashes(rec_path: Path | str, workers: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(image IDs, hashes) of every record in a `.rec` file, in file order (uint64 arrays). Records are read and
    hashed _READ_BATCH at a time, so memory stays flat for a training split of any size."""
    ids: list[int] = []
    hashes: list[int] = []

    def one(item: tuple[int, bytes]) -> int:
        try:
            return edge_phash(item[1])
        except (OSError, ValueError) as err:
            raise TagflowError(f"{rec_path}: image {item[0]} cannot be decoded ({err})") from None

    batch: list[tuple[int, bytes]] = []
    with RecordReader(rec_path) as reader, ThreadPoolExecutor(max(1, workers)) as pool:
        # libjpeg-turbo and Pillow release the GIL: threads hash in parallel
        for offset, payload in reader:
            try:
                header, _, image = unpack_payload(payload)
            except ValueError as err:
                raise TagflowError(f"{rec_path}: the record at byte {offset} is not an image record ({err})") from None
            ids.append(header.id)
            batch.append((header.id, image))
            if len(batch) == _READ_BATCH:
                hashes.extend(pool.map(one, batch, chunksize=64))
                batch = []
        hashes.extend(pool.map(one, batch, chunksize=64))
    return np.array(ids, dtype=np.uint64), np.array(hashes, dtype=np.uint64)


def nearest(queries: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query hash, the Hamming distance to its nearest reference hash and that hash's index (the first
    on a tie); distance 65 and index -1 when there is no reference at all."""
    distance = np.full(len(queries), 65, dtype=np.uint8)
    index = np.full(len(queries), -1, dtype=np.int64)
    if not len(reference):
        return distance, index
    xor = np.empty((min(_BLOCK, len(queries)), len(reference)), dtype=np.uint64)
    bits = np.empty(xor.shape, dtype=np.uint8)
    for start in range(0, len(queries), _BLOCK):
        block = queries[start : start + _BLOCK]
        n = len(block)
        np.bitwise_xor(block[:, None], reference[None, :], out=xor[:n])
        np.bitwise_count(xor[:n], out=bits[:n])
        index[start : start + n] = bits[:n].argmin(axis=1)
        distance[start : start + n] = bits[np.arange(n), index[start : start + n]]
    return distance, index


def find_leaks(
    val: tuple[np.ndarray, np.ndarray],
    train: tuple[np.ndarray, np.ndarray],
    max_distance: int = DEFAULT_MAX_DISTANCE,
    examples: int = MAX_EXAMPLES,
) -> dict[str, Any]:
    """The leakage result (`summarize`) for (IDs, hashes) of the validation and training images."""
    _check_distance(max_distance)
    return summarize(val[0], *match(val, train), len(train[0]), max_distance, examples)


def match(val: tuple[np.ndarray, np.ndarray], train: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(distance to the nearest training hash, that training image's ID) for each validation (ID, hash); what
    `summarize` needs for any max distance (distance 65 and ID 0 when there are no training images)."""
    train_ids, train_hashes = train
    distance, index = nearest(val[1], train_hashes)
    return distance, (train_ids[index] if len(train_ids) else np.zeros(len(val[1]), np.uint64))


def _check_distance(max_distance: int) -> None:
    if not 0 <= max_distance <= 64:
        raise ValueError(f"max distance {max_distance}: expected 0..64 bits")


def summarize(
    val_ids: np.ndarray,
    distance: np.ndarray,
    nearest_ids: np.ndarray,
    training_images: int,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    examples: int = MAX_EXAMPLES,
) -> dict[str, Any]:
    """The validation images within `max_distance` bits of a training image, from each one's nearest distance and
    nearest training ID (`nearest`): method, max_distance, validation_images, training_images, leaked (how many),
    fraction (leaked / validation_images), by_distance (how many at each distance 0..max_distance) and the
    `examples` closest (val_id, train_id, distance; closest first, then by val ID). Plain JSON."""
    _check_distance(max_distance)
    leaked = np.flatnonzero(distance <= max_distance)
    order = leaked[np.lexsort((val_ids[leaked], distance[leaked]))]
    listed = [
        {"val_id": int(val_ids[k]), "train_id": int(nearest_ids[k]), "distance": int(distance[k])}
        for k in order[:examples].tolist()
    ]
    counts = np.bincount(distance[leaked], minlength=max_distance + 1)
    return {
        "method": HASH,
        "max_distance": max_distance,
        "validation_images": len(val_ids),
        "training_images": int(training_images),
        "leaked": len(leaked),
        "fraction": round(len(leaked) / len(val_ids), 6) if len(val_ids) else 0.0,
        "by_distance": {str(d): int(c) for d, c in enumerate(counts.tolist())},
        "examples": listed,
    }


def check_leakage(
    train_rec: Path | str,
    val_rec: Path | str,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    workers: int = 4,
    examples: int = MAX_EXAMPLES,
) -> dict[str, Any]:
    """Hash every image of the packed `train.rec` and `val.rec` and report the likely leaks (`find_leaks`), with
    the seconds spent hashing and comparing; the result is plain JSON."""
    started = time.perf_counter()
    train = record_hashes(train_rec, workers)
    val = record_hashes(val_rec, workers)
    hashed = time.perf_counter()
    result = find_leaks(val, train, max_distance, examples)
    result["seconds"] = {"hash": round(hashed - started, 3), "compare": round(time.perf_counter() - hashed, 3)}
    log.info(
        "leakage: %d of %d validation images within %d bits of a training image (%d training images)",
        result["leaked"],
        result["validation_images"],
        max_distance,
        result["training_images"],
    )
    return result
