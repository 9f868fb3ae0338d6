"""Synthetic "graphic designs" with 50 visual-attribute labels, for demos, tests and benchmarks.

Each design is rendered with Pillow from a generator seeded by (seed, image ID), so the same pair always gives the
same bytes. A label is 1 exactly when its attribute is drawn: the background style, tone and tint, the kinds and
colour families of the shapes, the layout, text, and decorations (see `LABEL_NAMES`). Attributes are chosen to stay
visible after a resize to 96 px and JPEG compression: colour labels name the saturated colours of the shapes,
while backgrounds, text and decorations use only tints of the background hue.

Images are 224-320 px on each side (60 % not square, up to 1.2:1), JPEG (quality 90) with about 5 % PNG.
`exotic=True` adds a few unusual encodings (progressive, CMYK and EXIF-rotated JPEG; RGBA and palette PNG) for
readers' edge cases.

`publish` writes the seed's layout to S3:

    PREFIX/images/<id>.<ext>     the images
    PREFIX/lists/designs.lst     ID, 50 labels (0/1), path relative to PREFIX/images (some with a leading '/'),
                                 tab-separated, LF, trailing newline
    PREFIX/lists/labels.txt      the label names, one per line, in column order

`write_local` writes the same list bytes beside a local `images/` folder. The drawing itself, and the labels'
meaning, are in `tagflow.demo.render`.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from tagflow import s3
from tagflow.demo.render import LABEL_NAMES, NUM_LABELS, render_design
from tagflow.errors import InputError
from tagflow.local import usable_cores

if TYPE_CHECKING:
    from tagflow.s3 import S3Client

log = logging.getLogger(__name__)

LIST_NAME = "designs.lst"
LABELS_NAME = "labels.txt"


class Design(NamedTuple):
    """One rendered design: its ID, encoded bytes, file extension ("jpg" or "png") and uint8 labels."""

    image_id: int
    data: bytes
    ext: str
    labels: np.ndarray


@dataclass(frozen=True)
class DemoDataset:
    """Where `publish` put a demo set, and what it holds."""

    images_uri: str
    list_uri: str
    labels_uri: str
    count: int
    num_labels: int
    start_id: int
    uploaded: int
    bytes: int
    formats: dict[str, int]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------- generation


def _render_item(image_id: int, seed: int, exotic: bool) -> Design:
    data, ext, labels = render_design(image_id, seed, exotic=exotic)
    return Design(image_id, data, ext, labels)


def _render_chunk(args: tuple[int, int, int, bool]) -> list[Design]:
    start, stop, seed, exotic = args
    return [_render_item(i, seed, exotic) for i in range(start, stop)]


def generate(
    n: int, *, seed: int = 0, workers: int | None = None, start_id: int = 0, exotic: bool = False
) -> Iterator[Design]:
    """Render designs `start_id` .. `start_id + n - 1` in ID order, over `workers` processes (default: all cores).

    Rendering is keyed by (seed, image ID) only, so the bytes do not depend on `workers` or on `start_id` splits.
    Worker processes start by forkserver (not fork), which is safe when the caller already runs threads.
    """
    if n < 1 or start_id < 0:
        raise InputError(f"demo data needs at least one image and a start ID >= 0, got n={n}, start_id={start_id}")
    workers = usable_cores() if workers is None else max(1, workers)
    chunk = 32
    tasks = [(i, min(i + chunk, start_id + n), seed, exotic) for i in range(start_id, start_id + n, chunk)]
    return _run(tasks, workers)


def _run(tasks: list[tuple[int, int, int, bool]], workers: int) -> Iterator[Design]:
    if workers == 1 or len(tasks) <= 1:
        for task in tasks:
            yield from _render_chunk(task)
        return
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tagflow.demo"])
    with ctx.Pool(min(workers, len(tasks))) as pool:
        for designs in pool.imap(_render_chunk, tasks):
            yield from designs


def list_line(design: Design, *, leading_slash: bool | None = None) -> str:
    """The seed-format line for `design`: ID, labels, path relative to the images folder, tab-separated.

    By default every third line writes its path with a leading '/', as the seed's own lists do.
    """
    slash = design.image_id % 3 == 0 if leading_slash is None else leading_slash
    labels = "\t".join("1" if v else "0" for v in design.labels.tolist())
    return f"{design.image_id}\t{labels}\t{'/' if slash else ''}{image_name(design)}\n"


def image_name(design: Design) -> str:
    return f"{design.image_id}.{design.ext}"


def labels_text() -> str:
    return "".join(f"{name}\n" for name in LABEL_NAMES)


def write_local(n: int, out_dir: Path, seed: int = 0, *, workers: int | None = None, exotic: bool = False) -> Path:
    """Write `n` designs to `out_dir/images/`, with `out_dir/designs.lst` and `out_dir/labels.txt`; the list's path.

    List paths are relative to `out_dir/images` (the packer's `--root`), byte-identical to what `publish` uploads.
    """
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for design in generate(n, seed=seed, workers=workers, exotic=exotic):
        (images / image_name(design)).write_bytes(design.data)
        lines.append(list_line(design))
    (out_dir / LABELS_NAME).write_text(labels_text(), encoding="utf-8")
    list_path = out_dir / LIST_NAME
    list_path.write_text("".join(lines), encoding="utf-8")
    log.info("wrote %d designs under %s", n, out_dir)
    return list_path


# ---------------------------------------------------------------------------------------------------- publish


def _put_if_changed(client: S3Client, uri: s3.S3Uri, data: bytes, existing: dict[str, tuple[int, str]]) -> bool:
    """PUT `data` at `uri` unless an object of the same size and MD5 ETag is there already; True if uploaded."""
    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if existing.get(uri.key) == (len(data), md5):
        return False
    client.put_object(Bucket=uri.bucket, Key=uri.key, Body=data)
    return True


def publish(
    n: int,
    bucket_uri: s3.S3Uri,
    *,
    seed: int = 0,
    client: S3Client | None = None,
    workers: int | None = None,
    start_id: int = 0,
    list_key: str = f"lists/{LIST_NAME}",
    upload_threads: int = 32,
    exotic: bool = False,
) -> DemoDataset:
    """Generate `n` designs (IDs from `start_id`) and upload them with a seed-format list file below `bucket_uri`.

    Writes `PREFIX/images/<id>.<ext>`, `PREFIX/<list_key>` and `PREFIX/lists/labels.txt`, creating the bucket if
    needed. Images go up from a thread pool on one shared client while the next ones render; an object that is
    already there with the same bytes (size and MD5 ETag) is not sent again, so a re-run uploads nothing new.
    The list file is written last, so a reader that sees it finds every image it names.
    """
    client = client or s3.make_client(pool_size=max(upload_threads, 10))
    s3.ensure_bucket(client, bucket_uri.bucket)
    images_uri = bucket_uri.join("images")
    existing = s3.list_objects(client, s3.S3Uri(images_uri.bucket, images_uri.key + "/"))
    lines: list[str] = []
    formats: dict[str, int] = {}
    total_bytes = 0
    uploaded = 0
    pending: set[Future[bool]] = set()

    def settle(block_until: int) -> None:
        nonlocal pending, uploaded
        while len(pending) > block_until:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            uploaded += sum(f.result() for f in done)

    with ThreadPoolExecutor(upload_threads, thread_name_prefix="demo-upload") as pool:
        for design in generate(n, seed=seed, workers=workers, start_id=start_id, exotic=exotic):
            key = images_uri.join(image_name(design))
            pending.add(pool.submit(_put_if_changed, client, key, design.data, existing))
            settle(upload_threads * 4)  # bounded: never more than a few batches of images in memory
            lines.append(list_line(design))
            formats[design.ext] = formats.get(design.ext, 0) + 1
            total_bytes += len(design.data)
        settle(0)
    labels_uri = bucket_uri.join("lists", LABELS_NAME)
    list_uri = bucket_uri.join(list_key)
    client.put_object(Bucket=labels_uri.bucket, Key=labels_uri.key, Body=labels_text().encode())
    client.put_object(Bucket=list_uri.bucket, Key=list_uri.key, Body="".join(lines).encode())
    log.info("published %d designs (%d uploaded) to %s, list %s", n, uploaded, images_uri, list_uri)
    return DemoDataset(
        images_uri=str(images_uri),
        list_uri=str(list_uri),
        labels_uri=str(labels_uri),
        count=n,
        num_labels=NUM_LABELS,
        start_id=start_id,
        uploaded=uploaded,
        bytes=total_bytes,
        formats=formats,
    )


def partition_key(day: date) -> str:
    """The list key of one daily partition: `lists/dt=YYYY-MM-DD/part.lst`."""
    return f"lists/dt={day.isoformat()}/part.lst"


def make_partitioned(
    per_day: int,
    bucket_uri: s3.S3Uri,
    first_day: date,
    days: int = 3,
    *,
    seed: int = 0,
    client: S3Client | None = None,
    workers: int | None = None,
) -> list[DemoDataset]:
    """Publish `days` daily partitions of `per_day` new designs each, for backfill runs.

    Day k lists only its own images (IDs `k * per_day` ..), under `lists/dt=YYYY-MM-DD/part.lst`; all days share
    `PREFIX/images/` and `PREFIX/lists/labels.txt`.
    """
    client = client or s3.make_client()
    return [
        publish(
            per_day,
            bucket_uri,
            seed=seed,
            client=client,
            workers=workers,
            start_id=k * per_day,
            list_key=partition_key(first_day + timedelta(days=k)),
        )
        for k in range(days)
    ]
