"""manifest.json: the `warnings` counts of the list it was packed from, written by `tagflow pack` and by publish."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tagflow import demo, manifest, pipeline, s3
from tagflow.listfile import parse_list
from tagflow.pack import PackParams, pack

PARAMS = PackParams(resize=16, train_ratio=0.5)
CLEAN = {"images_without_labels": 0, "labels_without_images": 0, "paths_under_several_ids": 0}


def packed(tmp_path: Path, data: bytes, num_labels: int, broken: frozenset[str] = frozenset()) -> tuple[Path, dict]:
    """Pack the images `data` lists (small JPEGs written here; `broken` ones are not images) and build the
    manifest, as `tagflow pack` does."""
    root, out = tmp_path / "images", tmp_path / "out"
    lf = parse_list(data, num_labels, name="seed.lst").sorted_by_id()
    for k, rel in enumerate(sorted(set(lf.paths))):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel in broken:
            (root / rel).write_bytes(b"not an image")
        else:
            Image.new("RGB", (24, 20), (40 * k % 255, 90, 160)).save(root / rel, "JPEG")
    items = [(int(i), lf.labels[row], root / lf.paths[row]) for row, i in enumerate(lf.ids)]
    report = pack(items, out, PARAMS, workers=1)
    errors = [dict(e) for e in report.to_dict()["errors"]]
    assert len(errors) == len([p for p in lf.paths if p in broken])
    names = [f"tag{k}" for k in range(num_labels)]
    doc = manifest.build(out, listfile=lf, label_names=names, pack_params=PARAMS, errors=errors, revision="test")
    return out, doc


def test_a_clean_list_records_zero_warnings(tmp_path):
    out, doc = packed(tmp_path, b"1\t1\t0\ta.jpg\n2\t0\t1\tb.jpg\n3\t1\t1\tc.jpg\n", 2)
    assert doc["warnings"] == CLEAN
    assert json.loads((out / "manifest.json").read_text())["warnings"] == CLEAN


def test_warnings_count_unlabeled_images_unused_labels_and_paths_under_several_ids(tmp_path):
    data = (
        b"1\t0\t0\t1\ta.jpg\n"
        b"2\t0\t0\t0\tb.jpg\n"  # no label
        b"3\t0\t0\t1\t/a.jpg\n"  # a.jpg under a second ID
        b"4\t0\t0\t0\tc.jpg\n"  # no label
        b"5\t0\t0\t1\tc.jpg\n"  # c.jpg under a second ID
    )
    out, doc = packed(tmp_path, data, 3)
    expected = {"images_without_labels": 2, "labels_without_images": 2, "paths_under_several_ids": 2}
    assert doc["warnings"] == expected
    written = json.loads((out / "manifest.json").read_text())
    assert written["warnings"] == expected
    assert written["counts"]["listed"] == 5  # every listed ID is packed, a shared path once per ID
    assert written["counts"]["train"] + written["counts"]["val"] == 5


def independent_counts(lf) -> dict[str, int]:
    """The three figures computed the plain way, to check the manifest against."""
    rows = lf.labels.tolist()
    seen: dict[str, int] = {}
    for p in lf.paths:
        seen[p] = seen.get(p, 0) + 1
    return {
        "images_without_labels": sum(1 for r in rows if not any(r)),
        "labels_without_images": sum(1 for col in zip(*rows, strict=True) if not any(col)),
        "paths_under_several_ids": sum(1 for n in seen.values() if n > 1),
    }


def test_publish_puts_the_list_warnings_in_the_uploaded_manifest(s3_client, bucket):
    designs = demo.publish(12, s3.S3Uri(bucket, "raw"), seed=5, client=s3_client, workers=1)
    list_uri = s3.S3Uri.parse(designs.list_uri)
    lf = parse_list(s3_client.get_object(Bucket=list_uri.bucket, Key=list_uri.key)["Body"].read(), demo.NUM_LABELS)
    labels = lf.labels.copy()
    labels[0] = 0  # one image with no label
    ids = np.append(lf.ids, lf.ids.max() + 1)  # a new ID for an image already listed
    labels = np.vstack([labels, lf.labels[1:2]])
    paths = [*lf.paths, lf.paths[1]]
    lines = [
        "\t".join([str(i), *map(str, row), p]) for i, row, p in zip(ids.tolist(), labels.tolist(), paths, strict=True)
    ]
    raw = ("\n".join(lines) + "\n").encode()
    s3_client.put_object(Bucket=list_uri.bucket, Key=list_uri.key, Body=raw)
    expected = independent_counts(parse_list(raw, demo.NUM_LABELS))
    assert expected["images_without_labels"] >= 1 and expected["paths_under_several_ids"] == 1

    spec = pipeline.DatasetSpec(
        list_uri=designs.list_uri,
        source_uri=designs.images_uri,
        labels_uri=designs.labels_uri,
        dataset_uri=f"s3://{bucket}/dataset",
        num_labels=demo.NUM_LABELS,
        shard_size=5,
        pack=PARAMS,
        pack_workers=1,
        download_workers=4,
    )
    pipeline.run(spec, s3_client)
    doc = json.loads(s3_client.get_object(Bucket=bucket, Key="dataset/training/manifest.json")["Body"].read())
    assert doc["warnings"] == expected
    assert doc["counts"]["listed"] == 13


def test_warnings_describe_the_list_not_the_images_that_packed(tmp_path):
    """A label only a skipped image carries is still carried in the list: the counts are about the list file."""
    _, doc = packed(tmp_path, b"1\t1\t0\ta.jpg\n2\t0\t1\tbroken.jpg\n", 2, broken=frozenset({"broken.jpg"}))
    assert doc["counts"]["skipped"] == 1
    assert doc["warnings"] == CLEAN
    assert doc["label_counts"]["train"]["tag1"] + doc["label_counts"]["val"]["tag1"] == 0
