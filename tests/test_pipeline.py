"""The staged data plane end to end against the real local S3 server, read back by MXNet itself."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tagflow import demo, pipeline, s3
from tagflow.errors import InputError, ListFileError, TooManyFailures
from tagflow.listfile import parse_list
from tagflow.recordio import RecordReader, unpack_payload

NUM = demo.NUM_LABELS


def _spec(data: demo.DemoDataset, bucket: str, **overrides) -> pipeline.DatasetSpec:
    fields = {
        "list_uri": data.list_uri,
        "source_uri": data.images_uri,
        "labels_uri": data.labels_uri,
        "dataset_uri": f"s3://{bucket}/dataset",
        "num_labels": NUM,
        "shard_size": 40,
        "pack_workers": 1,
        "download_workers": 8,
    }
    return pipeline.DatasetSpec(**{**fields, **overrides})


def _keys(client, bucket: str, prefix: str) -> dict[str, str]:
    return {k: etag for k, (_, etag) in s3.list_objects(client, s3.S3Uri(bucket, prefix)).items()}


@pytest.fixture
def designs(s3_client, bucket):
    return demo.publish(120, s3.S3Uri(bucket, "raw"), seed=3, client=s3_client, workers=1)


@pytest.mark.mxnet
def test_run_writes_seed_layout_that_mxnet_reads(s3_client, bucket, designs, tmp_path, mxnet_records):
    summary = pipeline.run(_spec(designs, bucket), s3_client)
    assert summary["counts"]["train"] + summary["counts"]["val"] == 120
    assert summary["counts"]["skipped"] == 0
    assert summary["plan"]["num_shards"] >= 2
    names = set(_keys(s3_client, bucket, "dataset/").keys())
    for key in ("training/train.rec", "training/train.idx", "validation/val.rec", "validation/val.idx"):
        assert f"dataset/{key}" in names
    manifest = json.loads(s3_client.get_object(Bucket=bucket, Key="dataset/training/manifest.json")["Body"].read())
    assert manifest["num_labels"] == NUM and manifest["label_names"] == demo.LABEL_NAMES
    assert manifest["counts"]["train"] == summary["counts"]["train"]

    listed = parse_list(s3_client.get_object(Bucket=bucket, Key="raw/lists/designs.lst")["Body"].read(), NUM)
    expected = {int(i): listed.labels[row].astype(np.float32).tolist() for row, i in enumerate(listed.ids)}
    seen = {}
    for split, folder in (("train", "training"), ("val", "validation")):
        rec, idx = tmp_path / f"{split}.rec", tmp_path / f"{split}.idx"
        s3.get_file(s3_client, s3.S3Uri(bucket, f"dataset/{folder}/{split}.rec"), rec)
        s3.get_file(s3_client, s3.S3Uri(bucket, f"dataset/{folder}/{split}.idx"), idx)
        records = mxnet_records("indexed", str(rec), str(idx))["records"]
        assert [r["key"] for r in records] == sorted(r["key"] for r in records)
        for r in records:
            assert r["flag"] == NUM and r["labels"] == expected[r["key"]]
            assert min(r["shape"][:2]) == 96
            seen[r["key"]] = split
        with RecordReader(rec, idx) as reader:
            for key in reader.keys():  # noqa: SIM118 (iterating a reader yields records, not keys)
                header, labels, _ = unpack_payload(reader.read(key))
                assert header.id == key and labels.tolist() == expected[key]
    assert set(seen) == set(expected)


def test_rerun_reuses_every_shard_and_rewrites_nothing(s3_client, bucket, designs):
    spec = _spec(designs, bucket)
    pipeline.run(spec, s3_client)
    before = _keys(s3_client, bucket, "dataset/")
    ref = pipeline.prepare(spec, s3_client)
    assert all(pipeline.download_shard(spec, ref, i, s3_client)["reused"] for i in range(ref.num_shards))
    assert all(pipeline.pack_shard(spec, ref, i, s3_client)["reused"] for i in range(ref.num_shards))
    heads = {k: s3_client.head_object(Bucket=bucket, Key=k)["LastModified"] for k in before}
    pipeline.publish(spec, ref, s3_client)
    assert _keys(s3_client, bucket, "dataset/") == before
    assert {k: s3_client.head_object(Bucket=bucket, Key=k)["LastModified"] for k in before} == heads


def test_grown_list_downloads_and_packs_only_new_shards(s3_client, bucket):
    raw = s3.S3Uri(bucket, "raw")
    first = demo.publish(100, raw, seed=1, client=s3_client, workers=1, list_key="lists/day1.lst")
    more = demo.publish(30, raw, seed=1, client=s3_client, workers=1, start_id=100, list_key="lists/day2.lst")
    spec1 = _spec(first, bucket)
    pipeline.run(spec1, s3_client)
    day1 = s3_client.get_object(Bucket=bucket, Key="raw/lists/day1.lst")["Body"].read()
    day2 = s3_client.get_object(Bucket=bucket, Key="raw/lists/day2.lst")["Body"].read()
    s3_client.put_object(Bucket=bucket, Key="raw/lists/all.lst", Body=day1 + day2)
    spec2 = _spec(more, bucket, list_uri=f"s3://{bucket}/raw/lists/all.lst")
    ref1 = pipeline.prepare(spec1, s3_client)
    ref2 = pipeline.prepare(spec2, s3_client)
    old = {s["digest"] for s in json.loads(s3.read_location(ref1.plan_uri, s3_client)[0])["plan"]["shards"]}
    downloads = [pipeline.download_shard(spec2, ref2, i, s3_client) for i in range(ref2.num_shards)]
    fresh = [d for d in downloads if not d["reused"]]
    assert 1 <= len(fresh) < ref2.num_shards
    plan2 = json.loads(s3.read_location(ref2.plan_uri, s3_client)[0])["plan"]["shards"]
    assert {plan2[d["index"]]["digest"] for d in fresh}.isdisjoint(old)
    packs = [pipeline.pack_shard(spec2, ref2, i, s3_client) for i in range(ref2.num_shards)]
    assert [p["index"] for p in packs if not p["reused"]] == [d["index"] for d in fresh]
    summary = pipeline.publish(spec2, ref2, s3_client)
    assert summary["counts"]["train"] + summary["counts"]["val"] == 130


def test_bad_objects_below_threshold_are_skipped_and_listed(s3_client, bucket, designs):
    s3_client.delete_object(Bucket=bucket, Key="raw/images/5.jpg")
    summary = pipeline.run(_spec(designs, bucket, max_bad_fraction=0.05), s3_client)
    assert summary["counts"]["skipped"] == 1
    manifest = json.loads(s3_client.get_object(Bucket=bucket, Key="dataset/training/manifest.json")["Body"].read())
    assert manifest["skipped"][0]["path"].endswith("5.jpg")
    assert summary["counts"]["train"] + summary["counts"]["val"] == 119


def test_too_many_bad_objects_fail_and_publish_nothing(s3_client, bucket, designs):
    s3_client.put_object(Bucket=bucket, Key="raw/images/7.jpg", Body=b"")
    s3_client.put_object(Bucket=bucket, Key="raw/images/8.jpg", Body=b"not an image at all")
    with pytest.raises(TooManyFailures) as err:
        pipeline.run(_spec(designs, bucket, max_bad_fraction=0.01), s3_client)
    message = str(err.value)
    assert "2 of 120 images" in message and "7.jpg" in message and "8.jpg" in message
    assert not _keys(s3_client, bucket, "dataset/training/")


def test_bad_list_fails_before_anything_is_staged(s3_client, bucket, designs):
    s3_client.put_object(Bucket=bucket, Key="raw/lists/bad.lst", Body=b"1\t0\t1\timages/1.jpg\n")
    with pytest.raises(ListFileError, match=r"bad\.lst:1: "):
        pipeline.prepare(_spec(designs, bucket, list_uri=f"s3://{bucket}/raw/lists/bad.lst"), s3_client)
    assert not _keys(s3_client, bucket, "dataset/")


def test_shard_tasks_read_their_slice_and_list_nothing(s3_client, bucket, designs):
    spec = _spec(designs, bucket)
    ref = pipeline.prepare(spec, s3_client)
    client = s3.make_client()
    calls: list[str] = []
    client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    result = pipeline.download_shard(spec, ref, 1, client)
    assert not result["reused"]
    assert "ListObjectsV2" not in calls and "HeadObject" in calls  # HEAD: is the bundle already staged?
    fetched = [c for c in calls if c == "GetObject"]
    plan = json.loads(s3.read_location(ref.plan_uri, s3_client)[0])["plan"]["shards"][1]
    assert len(fetched) == 3 + (plan["stop"] - plan["start"])  # plan.json, shard .lst and .json, then its images


def test_partitioned_list_reads_the_days_before_the_cutoff(s3_client, bucket):
    """A list URI ending in / reads every dt=YYYY-MM-DD partition dated before `list_until`, in date order."""
    from datetime import date

    days = demo.make_partitioned(15, s3.S3Uri(bucket, "raw"), date(2026, 11, 1), days=3, client=s3_client, workers=1)
    s3_client.put_object(Bucket=bucket, Key="raw/lists/notes.txt", Body=b"not a partition")
    spec = _spec(days[0], bucket, list_uri=f"s3://{bucket}/raw/lists/", list_until="2026-11-03T00:00:00+00:00")
    listfile = pipeline.read_list(spec, s3_client)
    assert listfile.ids.tolist() == list(range(30))  # days 1 and 2; day 3 is at the cutoff, not before it
    assert listfile.name == spec.list_uri

    everything = pipeline.read_list(pipeline.DatasetSpec(**{**spec.__dict__, "list_until": None}), s3_client)
    assert len(everything) == 45

    early = pipeline.DatasetSpec(**{**spec.__dict__, "list_until": "2026-11-01T00:00:00+00:00"})
    with pytest.raises(InputError, match=r"raw/lists/: no dt=YYYY-MM-DD/\*\.lst partition dated before 2026-11-01"):
        pipeline.read_list(early, s3_client)


def test_partitions_listing_one_image_twice_fail_naming_both(s3_client, bucket):
    from datetime import date

    days = demo.make_partitioned(5, s3.S3Uri(bucket, "raw"), date(2026, 11, 1), days=1, client=s3_client, workers=1)
    first = s3_client.get_object(Bucket=bucket, Key="raw/lists/dt=2026-11-01/part.lst")["Body"].read()
    s3_client.put_object(Bucket=bucket, Key="raw/lists/dt=2026-11-02/part.lst", Body=first.splitlines(True)[0])
    spec = _spec(days[0], bucket, list_uri=f"s3://{bucket}/raw/lists/")
    with pytest.raises(ListFileError) as err:
        pipeline.read_list(spec, s3_client)
    assert str(err.value) == (
        f"s3://{bucket}/raw/lists/dt=2026-11-02/part.lst: ID 0 is already listed in "
        f"s3://{bucket}/raw/lists/dt=2026-11-01/part.lst; each image is listed once"
    )
