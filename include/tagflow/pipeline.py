"""The data plane as the DAG runs it: list file → shard plan → per-shard download and pack → publish.

Tasks may run on different workers, so nothing passes between stages on a local disk: every stage reads its
inputs from S3 and writes its outputs to S3, under a staging prefix keyed by content:

    STAGING/plans/<plan_id>/list.lst        the validated list, normalized, sorted by ID
    STAGING/plans/<plan_id>/plan.json       the shard plan and the spec it was made for
    STAGING/plans/<plan_id>/shards/NNNNN.lst, .json
                                            one shard's rows of the list and its sources' sizes/ETags, so a
                                            shard task reads neither the whole list nor a listing of the source
    STAGING/downloads/<shard digest>.tar    one shard's images (stored at paths.local_relpath) + _tagflow/download.json
    STAGING/packed/<labels digest>-<pack params digest>.tar
                                            one shard packed: train.rec/.idx, val.rec/.idx + pack.json

Each staged object is written whole by one PUT, so it either exists complete or not at all; a stage whose
output already exists does nothing. Because shard digests cover (ID, path, source ETag) and packed digests cover
labels and pack parameters too, a later run over a grown list fetches and packs only the shards that changed.

`publish` merges the packed shards (whose pack.json also carries the download stage's bad objects, so the image
bundles are not fetched again) in shard order into the seed's layout:

    DATASET/training/train.rec, train.idx     DATASET/validation/val.rec, val.idx     DATASET/training/manifest.json

and applies the bad-object threshold over the whole list before anything is uploaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from datetime import time as dt_time
from pathlib import Path
from typing import Any

from tagflow import manifest, s3
from tagflow.errors import InputError, check_bad_fraction
from tagflow.layout import FILES, DatasetLayout
from tagflow.listfile import (
    ListFile,
    concat_lists,
    list_warnings,
    load_label_names,
    parse_list,
    write_list,
)
from tagflow.names import check_dataset_uri
from tagflow.packparams import PackParams
from tagflow.paths import local_path, source_uri
from tagflow.recordio import merge_records
from tagflow.shards import (
    GroupFile,
    Shard,
    ShardPlan,
    SplitPlan,
    compile_group_regex,
    group_keys,
    parse_group_file,
    plan_shards,
    plan_split,
    sides_by_id,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
REPORT_MEMBER = "_tagflow/download.json"
PACK_MEMBER = "pack.json"
STAGE_FORMAT = 2  # bump when a staged bundle's contents change meaning, so old bundles are not reused


@dataclass(frozen=True)
class DatasetSpec:
    """Everything that decides a dataset's bytes; plain values so Airflow can template and serialize it."""

    list_uri: str
    dataset_uri: str
    num_labels: int
    source_uri: str | None = None
    labels_uri: str | None = None
    staging_uri: str | None = None
    shard_size: int = 5000
    pack: PackParams = field(default_factory=PackParams)
    max_bad_fraction: float = 0.01
    download_workers: int = 32
    pack_workers: int | None = None
    list_until: str | None = None  # ISO time; with a partitioned list_uri, partitions dated before it are read
    # A group key for the split (at most one): every image of a group lands on one side (tagflow.shards).
    split_group_regex: str | None = None  # over the list path: its first capture group, else its whole match
    split_group_file: str | None = None  # a file or s3:// object of ID<TAB>GROUP lines

    def __post_init__(self) -> None:
        check_dataset_uri(self.dataset_uri, "dataset")  # where it enters: before any S3 request
        if self.staging_uri:
            check_dataset_uri(self.staging_uri, "staging")
        if self.split_group_regex is not None and self.split_group_file is not None:
            raise InputError("a split group regex and a split group file were both given; choose one")
        if self.split_group_regex is not None:
            compile_group_regex(self.split_group_regex)

    @property
    def grouped(self) -> bool:
        return self.split_group_regex is not None or self.split_group_file is not None

    @property
    def staging(self) -> s3.S3Uri:
        return s3.S3Uri.parse(self.staging_uri) if self.staging_uri else DatasetLayout.of(self.dataset_uri).staging

    @property
    def source(self) -> s3.S3Uri | None:
        return s3.S3Uri.parse(self.source_uri) if self.source_uri else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pack": self.pack.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetSpec:
        return cls(**{**data, "pack": PackParams(**data.get("pack", {}))})


@dataclass(frozen=True)
class PlanRef:
    """What XCom carries between stages: where the plan is, and how many shards it has."""

    plan_uri: str
    list_uri: str
    num_images: int
    num_shards: int
    shard_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:20]


def _put_bytes(client, uri: s3.S3Uri, data: bytes) -> None:
    client.put_object(
        Bucket=uri.bucket,
        Key=uri.key,
        Body=data,
        Metadata={s3.SHA256_METADATA_KEY: hashlib.sha256(data).hexdigest()},
    )


def _exists(client, uri: s3.S3Uri) -> bool:
    return s3.object_sha256(client, uri) is not None


def load_groups(location: str | None, client=None) -> GroupFile | None:
    """A group file (local or `s3://`, ID<TAB>GROUP lines), parsed; None without one."""
    if location is None:
        return None
    data, name = s3.read_location(location, client)
    return parse_group_file(data, name)


def split_plan(spec: DatasetSpec, listfile: ListFile, groups: GroupFile | None = None) -> SplitPlan:
    """Every row's side under the spec's split settings (by image ID, or by the group regex or file)."""
    return plan_split(listfile, spec.pack.train_ratio, regex=spec.split_group_regex, groups=groups)


def prepare(spec: DatasetSpec, client=None) -> PlanRef:
    """Validate the list file, look up source sizes and ETags, plan shards, and stage the plan.

    Fails on a bad list (a row without a group under a group key included) before anything is downloaded. The
    source prefix is listed once here (one request per 1,000 objects); each shard's sizes and ETags are staged
    beside the plan, so download tasks need no listing. With a group key each shard's sides are staged too
    (`NNNNN.sides`, one `t`/`v` per row), decided here once for the whole list.
    """
    client = client or s3.make_client()
    groups = load_groups(spec.split_group_file, client)
    listfile = read_list(spec, client, groups=groups).sorted_by_id()
    split = split_plan(spec, listfile, groups)
    # A bad names file fails here, before any download; valid but suspicious lists are said in the task's log.
    list_warnings(listfile, load_label_names(spec.labels_uri, spec.num_labels, client)).log()
    for bucket in {spec.staging.bucket, s3.S3Uri.parse(spec.dataset_uri).bucket}:
        s3.require_bucket(client, bucket)
    known = _source_objects(client, listfile, spec.source)
    plan = plan_shards(listfile, spec.shard_size, etags={path: etag for path, (_, etag) in known.items()})
    # The split's settings enter the plan's identity only with a group key, so ungrouped plans keep their IDs.
    plan_id = _digest(
        listfile.sha256,
        json.dumps(plan.to_dict(), sort_keys=True),
        *([json.dumps(split.record, sort_keys=True)] if spec.grouped else []),
    )
    base = spec.staging.join("plans", plan_id)
    with tempfile.TemporaryDirectory() as tmp:
        lst = Path(tmp) / "list.lst"
        write_list(listfile, lst)
        s3.put_file(client, lst, base.join("list.lst"))

    def stage_shard(shard: Shard) -> None:
        """The shard's own slice of the list and its sources' sizes/ETags: a shard task reads only these."""
        rows = listfile.subset(shard.start, shard.stop)
        with tempfile.TemporaryDirectory() as tmp:
            write_list(rows, Path(tmp) / "shard.lst")
            s3.put_file(client, Path(tmp) / "shard.lst", _shard_uri(base, shard.index, "lst"))
        objects = {path: known[path] for path in rows.paths if path in known}
        _put_bytes(client, _shard_uri(base, shard.index, "json"), json.dumps(objects, sort_keys=True).encode())
        if spec.grouped:
            _put_bytes(client, _shard_uri(base, shard.index, "sides"), split.sides(shard.start, shard.stop).encode())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(stage_shard, plan.shards))
    doc = {"spec": spec.to_dict(), "list_sha256": listfile.sha256, "plan": plan.to_dict(), "split": split.record}
    _put_bytes(client, base.join("plan.json"), json.dumps(doc, indent=1, sort_keys=True).encode())
    log.info("planned %d images in %d shards (shard size %d)", len(listfile), len(plan.shards), plan.shard_size)
    return PlanRef(
        plan_uri=str(base.join("plan.json")),
        list_uri=str(base.join("list.lst")),
        num_images=len(listfile),
        num_shards=len(plan.shards),
        shard_size=plan.shard_size,
    )


PARTITION_RE = re.compile(r"dt=(\d{4}-\d{2}-\d{2})/[^/]+\.lst")


def list_partitions(client, prefix: s3.S3Uri, until: datetime | None) -> list[tuple[date, s3.S3Uri]]:
    """The `dt=YYYY-MM-DD/*.lst` list files directly below `prefix`, oldest first; with `until`, only the
    partitions dated before it (a partition's date is its day's start, UTC)."""
    found = []
    for key in sorted(s3.list_objects(client, prefix)):
        match = PARTITION_RE.fullmatch(key[len(prefix.key) :].lstrip("/"))
        if not match:
            continue
        try:
            day = date.fromisoformat(match[1])
        except ValueError:
            problem = f"{match[1]!r} is not a date (expected dt=YYYY-MM-DD)"
            raise InputError(f"s3://{prefix.bucket}/{key}: {problem}") from None
        if until is None or datetime.combine(day, dt_time(), UTC) < until:
            found.append((day, s3.S3Uri(prefix.bucket, key)))
    return found


def read_list(spec: DatasetSpec, client=None, *, groups: GroupFile | None = None) -> ListFile:
    """The run's list: one file, or every partition below a prefix ending in `/` up to `spec.list_until`.

    With a group key (the spec's regex, or `groups`) each partition's rows are checked for a group here, where
    their lines are known, so a row without one is named by partition and line.
    """
    client = client or s3.make_client()
    if not spec.list_uri.endswith("/"):
        raw, name = s3.read_location(spec.list_uri, client)
        return parse_list(raw, spec.num_labels, name=name)
    until = datetime.fromisoformat(spec.list_until) if spec.list_until else None
    partitions = list_partitions(client, s3.S3Uri.parse(spec.list_uri), until)
    if not partitions:
        when = f" dated before {until.isoformat()}" if until else ""
        raise InputError(f"{spec.list_uri}: no dt=YYYY-MM-DD/*.lst partition{when}")
    parts = []
    for _, uri in partitions:
        raw, name = s3.read_location(str(uri), client)
        parts.append(parse_list(raw, spec.num_labels, name=name))
        if spec.split_group_regex is not None or groups is not None:
            group_keys(parts[-1], regex=spec.split_group_regex, groups=groups)
    log.info("list %s: %d partition(s), %s to %s", spec.list_uri, len(parts), partitions[0][0], partitions[-1][0])
    return concat_lists(parts, name=spec.list_uri)


def _shard_uri(plan_base: s3.S3Uri, index: int, ext: str) -> s3.S3Uri:
    return plan_base.join("shards", f"{index:05d}.{ext}")


def _source_objects(client, listfile: ListFile, source: s3.S3Uri | None) -> dict[str, tuple[int, str]]:
    """List path → (size, ETag) from one listing of the source prefix; paths not found there are left out."""
    if source is None:
        return {}
    listed = s3.list_objects(client, source)
    known = {}
    for path in listfile.paths:
        uri = source_uri(path, source)
        if uri.bucket == source.bucket and uri.key in listed:
            known[path] = listed[uri.key]
    return known


def _load_plan(client, ref: PlanRef, spec: DatasetSpec) -> tuple[ListFile, ShardPlan, dict[str, Any]]:
    """The staged list (sorted by ID), its shard plan, and the plan document."""
    doc = json.loads(s3.read_location(ref.plan_uri, client)[0])
    raw, _ = s3.read_location(ref.list_uri, client)
    listfile = parse_list(raw, spec.num_labels, name=ref.list_uri)
    return listfile, ShardPlan.from_dict(doc["plan"]), doc


def _load_shard(client, ref: PlanRef, spec: DatasetSpec, index: int) -> tuple[ListFile, Shard, dict[str, tuple]]:
    """One shard's rows of the list, its plan entry, and its sources' (size, ETag) — without the whole list."""
    doc = json.loads(s3.read_location(ref.plan_uri, client)[0])
    shards = ShardPlan.from_dict(doc["plan"]).shards
    if not 0 <= index < len(shards):
        raise InputError(f"{ref.plan_uri}: no shard {index} (the plan has {len(shards)})")
    base = s3.S3Uri.parse(ref.plan_uri.rsplit("/", 1)[0])
    raw, name = s3.read_location(str(_shard_uri(base, index, "lst")), client)
    rows = parse_list(raw, spec.num_labels, name=name)
    objects = json.loads(s3.read_location(str(_shard_uri(base, index, "json")), client)[0])
    return rows, shards[index], {path: (int(size), etag) for path, (size, etag) in objects.items()}


def download_uri(spec: DatasetSpec, digest: str) -> s3.S3Uri:
    return spec.staging.join("downloads", f"{digest}.tar")


def packed_uri(spec: DatasetSpec, labels_digest: str, sides: str | None = None) -> s3.S3Uri:
    """Where a shard's packed parts are staged; a grouped split's sides (`t`/`v` per row) are part of the key."""
    grouped = f"-g{_digest(sides)}" if sides is not None else ""
    return spec.staging.join("packed", f"{labels_digest}-{spec.pack.digest()}{grouped}-v{STAGE_FORMAT}.tar")


def download_shard(spec: DatasetSpec, ref: PlanRef, index: int, client=None) -> dict[str, Any]:
    """Fetch one shard's images from the source and stage them as one tar; reuse it if already staged."""
    from tagflow.download import download

    client = client or s3.make_client(pool_size=max(spec.download_workers, 10))
    rows, shard, known = _load_shard(client, ref, spec, index)
    target = download_uri(spec, shard.digest)
    if _exists(client, target):
        log.info("shard %d (%s) already staged at %s", index, shard.digest, target)
        return {"index": index, "staged": str(target), "reused": True, "images": len(rows), "fetched": 0}
    paths = rows.paths
    with tempfile.TemporaryDirectory(prefix="tagflow-dl-") as tmp:
        root = Path(tmp) / "images"
        # The run-wide threshold is applied in publish; a shard records its bad objects and goes on.
        report = download(
            paths,
            root,
            source=spec.source,
            client=client,
            workers=spec.download_workers,
            max_bad_fraction=1.0,
            known=known,
        )
        bundle = Path(tmp) / "shard.tar"
        files = sorted({f for f in (local_path(root, p) for p in paths) if f.exists()})
        _write_tar(bundle, root, files, {REPORT_MEMBER: report.to_dict()})
        s3.put_file(client, bundle, target)
    log.info("shard %d: %d fetched, %d errors, staged at %s", index, report.fetched, len(report.errors), target)
    return {
        "index": index,
        "staged": str(target),
        "reused": False,
        "images": len(rows),
        "fetched": report.fetched,
        "errors": len(report.errors),
    }


def pack_shard(spec: DatasetSpec, ref: PlanRef, index: int, client=None) -> dict[str, Any]:
    """Pack one staged shard into train/val RecordIO parts and stage them as one tar; reuse if already staged."""
    from tagflow.pack import pack  # the image stack (OpenCV, simplejpeg, Pillow): only where images are packed

    client = client or s3.make_client()
    rows_file, shard, _ = _load_shard(client, ref, spec, index)
    sides = _load_sides(client, ref, index, len(rows_file)) if spec.grouped else None
    target = packed_uri(spec, shard.labels_digest, sides)
    if _exists(client, target):
        log.info("shard %d already packed at %s", index, target)
        return {"index": index, "staged": str(target), "reused": True}
    with tempfile.TemporaryDirectory(prefix="tagflow-pack-") as tmp:
        root = Path(tmp) / "images"
        bundle = Path(tmp) / "shard.tar"
        s3.get_file(client, download_uri(spec, shard.digest), bundle)
        with tarfile.open(bundle) as tar:
            tar.extractall(root, filter="data")
        # Images the download stage already reported as bad are not packed (and not reported twice).
        download_errors = _read_member(bundle, REPORT_MEMBER).get("errors", [])
        failed = {e["path"] for e in download_errors}
        rows = [i for i in range(len(rows_file)) if rows_file.paths[i] not in failed]
        files = {i: local_path(root, rows_file.paths[i]) for i in rows}
        items = [(int(rows_file.ids[i]), rows_file.labels[i], files[i]) for i in rows]
        out = Path(tmp) / "packed"
        by_id = None if sides is None else sides_by_id(rows_file.ids.tolist(), sides)
        report = pack(items, out, spec.pack, workers=spec.pack_workers, sides=by_id).to_dict()
        list_path = {str(files[i]): rows_file.paths[i] for i in rows}
        for err in report["errors"]:  # name the image as the list does, not by its temporary file
            err["path"] = list_path.get(err["path"], err["path"])
        report["download_errors"] = download_errors  # so publish never fetches the image bundles again
        packed = Path(tmp) / "packed.tar"
        members = [out / f"{split}.{ext}" for split in SPLITS for ext in ("rec", "idx")]
        _write_tar(packed, out, members, {PACK_MEMBER: report})
        s3.put_file(client, packed, target)
    log.info("shard %d packed: %s", index, report["counts"])
    return {"index": index, "staged": str(target), "reused": False, "counts": report["counts"]}


def _load_sides(client, ref: PlanRef, index: int, rows: int) -> str:
    """A shard's staged sides under a grouped split, one `t`/`v` per row of the shard."""
    base = s3.S3Uri.parse(ref.plan_uri.rsplit("/", 1)[0])
    raw, name = s3.read_location(str(_shard_uri(base, index, "sides")), client)
    sides = raw.decode("ascii", "replace")
    if len(sides) != rows or set(sides) - {"t", "v"}:
        raise InputError(f"{name}: expected {rows} characters t or v (one per row of shard {index})")
    return sides


def _write_tar(path: Path, root: Path, files: list[Path], extra: dict[str, Any]) -> None:
    """A reproducible tar: fixed order, zeroed times and owners, so identical content gives identical bytes."""

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o644
        return info

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for file in files:
            tar.add(file, arcname=file.relative_to(root).as_posix(), filter=clean)
        for name, doc in extra.items():
            data = json.dumps(doc, indent=1, sort_keys=True).encode()
            info = clean(tarfile.TarInfo(name))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _read_member(tar_path: Path, name: str) -> dict[str, Any]:
    with tarfile.open(tar_path) as tar:
        member = tar.extractfile(name)
        if member is None:
            raise InputError(f"{tar_path}: staged bundle has no {name}")
        return json.loads(member.read())


def publish(spec: DatasetSpec, ref: PlanRef, client=None, *, code_revision: str | None = None) -> dict[str, Any]:
    """Merge every packed shard into the dataset layout, check the bad-object threshold, upload, return a summary.

    The manifest is uploaded last: a reader that finds it finds the .rec/.idx it describes.
    """
    client = client or s3.make_client()
    listfile, plan, plan_doc = _load_plan(client, ref, spec)
    dataset = s3.S3Uri.parse(spec.dataset_uri)
    errors: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="tagflow-publish-") as tmp:
        work = Path(tmp)
        parts: dict[str, list[tuple[Path, Path]]] = {split: [] for split in SPLITS}
        for shard in plan.shards:
            packed = work / f"p{shard.index}.tar"
            sides = _load_sides(client, ref, shard.index, shard.size) if spec.grouped else None
            s3.get_file(client, packed_uri(spec, shard.labels_digest, sides), packed)
            shard_dir = work / f"s{shard.index}"
            with tarfile.open(packed) as tar:
                tar.extractall(shard_dir, filter="data")
            packed.unlink()
            packed_report = json.loads((shard_dir / PACK_MEMBER).read_text())
            errors += packed_report.get("download_errors", []) + packed_report.get("errors", [])
            for split in SPLITS:
                parts[split].append((shard_dir / f"{split}.rec", shard_dir / f"{split}.idx"))
        check_bad_fraction(errors, len(listfile), spec.max_bad_fraction)
        for err in errors:
            log.warning("skipped %s: %s", err.get("path"), err.get("reason"))
        out = work / "out"
        out.mkdir()
        for split in SPLITS:
            merge_records(parts[split], out / f"{split}.rec", out / f"{split}.idx")
        doc = manifest.build(
            out,
            listfile=listfile,
            label_names=load_label_names(spec.labels_uri, spec.num_labels, client),
            pack_params=spec.pack,
            split=plan_doc.get("split"),
            errors=errors,
            list_name=spec.list_uri,
            list_sha256=plan_doc["list_sha256"],
            revision=code_revision,
        )
        uris = upload_dataset(client, out, dataset)
    return {
        "dataset": str(dataset),
        "uris": uris,
        "counts": doc["counts"],
        "errors": len(errors),
        "warnings": doc["warnings"],
    }


def upload_dataset(client, out_dir: Path, dataset: s3.S3Uri) -> dict[str, str]:
    """Upload a packed folder to the seed's layout; unchanged objects are not rewritten; manifest last."""
    layout = {name: DatasetLayout.of(dataset).file(name) for name in FILES}  # manifest.json last
    missing = [name for name in layout if not (out_dir / name).exists()]
    if missing:
        raise InputError(f"{out_dir}: missing {', '.join(missing)} (expected the output of `tagflow pack`)")
    s3.require_bucket(client, dataset.bucket)
    for name, uri in layout.items():
        changed = s3.put_file(client, out_dir / name, uri)
        log.info("%s %s", "uploaded" if changed else "unchanged", uri)
    return {name: str(uri) for name, uri in layout.items()}


def run(
    spec: DatasetSpec, client=None, *, on_stage: Callable[[str, float, dict], None] | None = None
) -> dict[str, Any]:
    """All stages in order in this process (the CLI and `make demo`); the DAG runs the same functions as tasks."""
    client = client or s3.make_client(pool_size=max(spec.download_workers, 10))
    timings: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - started, 3)
        if on_stage:
            on_stage(name, timings[name], result if isinstance(result, dict) else {})
        return result

    ref = stage("prepare", lambda: prepare(spec, client))
    stage("download", lambda: [download_shard(spec, ref, i, client) for i in range(ref.num_shards)])
    stage("pack", lambda: [pack_shard(spec, ref, i, client) for i in range(ref.num_shards)])
    summary = stage("publish", lambda: publish(spec, ref, client))
    return {**summary, "plan": ref.to_dict(), "seconds": timings}
