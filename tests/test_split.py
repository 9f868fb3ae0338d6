"""The train/validation split: by image ID as always, or by a group key (a regex over the path, or a group file) so
that every image of one design lands on one side. Data goes through the real local S3 server."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tagflow import demo, pipeline, runconfig, s3
from tagflow.errors import InputError, ListFileError
from tagflow.listfile import parse_list
from tagflow.recordio import read_index
from tagflow.shards import parse_group_file, plan_split, side_of_key, sides_by_id

NUM = demo.NUM_LABELS
GROUP_RE = r"^designs/(d\d+)/"


def _line(image_id: int, labels: np.ndarray, path: str) -> str:
    return "\t".join([str(image_id), *("1" if v else "0" for v in labels.tolist()), path]) + "\n"


def _list(rows: list[tuple[int, str]], num: int = 3) -> bytes:
    """A list of `(ID, path)` rows with one label each (the labels do not matter to the split)."""
    return "".join(_line(i, np.eye(num, dtype=np.uint8)[i % num], p) for i, p in rows).encode()


def _variants(first_id: int, designs: int, per_design: int) -> list[tuple[int, str]]:
    """`designs` groups of `per_design` images each, IDs consecutive, paths `designs/dNNN/vK.jpg`."""
    rows, image_id = [], first_id
    for d in range(designs):
        for k in range(per_design):
            rows.append((image_id, f"designs/d{first_id + d:05d}/v{k}.jpg"))
            image_id += 1
    return rows


def _sides(plan) -> list[str]:
    return ["train" if t else "val" for t in plan.train.tolist()]


# --- core -----------------------------------------------------------------------------------------------------


def test_the_side_is_a_stable_function_of_the_key():
    # Pinned: a change here would move images between train and val on the next run.
    assert "".join(side_of_key(str(i), 0.5)[0] for i in range(12)) == "vvtvtvtvvvvv"
    # The side is blake2b-64 of the key (the decimal ID, or the group), as a fraction compared with the ratio.
    for key in ("7", "8", str(2**63), "design one"):
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        fraction = int.from_bytes(digest, "big") / 2**64
        assert side_of_key(key, fraction + 1e-9) == "train" and side_of_key(key, fraction - 1e-9) == "val"
    ids = range(20_000)
    assert abs(sum(side_of_key(str(i), 0.9) == "train" for i in ids) / len(ids) - 0.9) < 0.01
    assert {side_of_key(str(i), 1.0) for i in ids} == {"train"}
    assert {side_of_key(str(i), 0.0) for i in ids} == {"val"}


def test_without_a_group_key_the_plan_splits_by_id():
    ids = [*range(0, 20_000, 7), 2**40 + 5, 2**62]
    lf = parse_list(_list([(i, f"img/{i}.jpg") for i in ids]), 3, name="plain.lst")
    plan = plan_split(lf, 0.9)
    assert _sides(plan) == [side_of_key(str(i), 0.9) for i in ids]
    assert plan.record == {"by": "image_id", "train_ratio": 0.9}
    assert sides_by_id(lf.ids, plan.sides()) == {i: side_of_key(str(i), 0.9) for i in ids}


def test_a_grouped_split_keeps_every_group_on_one_side():
    rows = _variants(100, designs=300, per_design=4)
    lf = parse_list(_list(rows), 3, name="grouped.lst")
    plan = plan_split(lf, 0.8, regex=GROUP_RE)
    side_of_group: dict[str, set[str]] = {}
    for (_, path), side in zip(rows, _sides(plan), strict=True):
        side_of_group.setdefault(path.split("/")[1], set()).add(side)
    assert all(len(sides) == 1 for sides in side_of_group.values())
    train_groups = sum(sides == {"train"} for sides in side_of_group.values())
    assert 200 < train_groups < 280  # about 80 % of 300 groups
    assert plan.record == {
        "by": "group_regex",
        "train_ratio": 0.8,
        "group_regex": GROUP_RE,
        "groups": {"train": train_groups, "val": 300 - train_groups},
    }
    # The same list split by ID puts variants of one design on both sides: the leak the group key prevents.
    by_id = _sides(plan_split(lf, 0.8))
    split_by_id = {path.split("/")[1] for (_, path), side in zip(rows, by_id, strict=True) if side == "val"}
    assert any(side_of_group[g] == {"train"} for g in split_by_id)


def test_the_whole_match_is_the_group_without_a_capture_group():
    rows = [(1, "a/x-1.jpg"), (2, "a/x-2.jpg"), (3, "b/x-1.jpg")]
    lf = parse_list(_list(rows), 3, name="l.lst")
    plan = plan_split(lf, 0.5, regex=r"^[^/]+")
    assert _sides(plan) == [side_of_key("a", 0.5), side_of_key("a", 0.5), side_of_key("b", 0.5)]


def test_growing_the_dataset_keeps_every_groups_side():
    old_rows = _variants(0, designs=200, per_design=3)
    old = plan_split(parse_list(_list(old_rows), 3, name="old.lst"), 0.7, regex=GROUP_RE)
    old_side = {path.split("/")[1]: side for (_, path), side in zip(old_rows, _sides(old), strict=True)}
    # Grown: new variants of old designs (new IDs, interleaved paths), and new designs.
    more = [(10_000 + k, f"designs/d{k * 3 % 200:05d}/new{k}.jpg") for k in range(150)]
    grown_rows = old_rows + more + _variants(5_000, designs=100, per_design=2)
    grown = plan_split(parse_list(_list(grown_rows), 3, name="grown.lst"), 0.7, regex=GROUP_RE)
    sides = _sides(grown)
    for (_, path), side in zip(grown_rows, sides, strict=True):
        group = path.split("/")[1]
        assert old_side.get(group, side) == side, f"{path} left its group's side"
    assert sides[: len(old_rows)] == _sides(old)
    assert {"train", "val"} <= set(sides[len(old_rows) :])


def test_a_path_the_regex_does_not_match_is_refused_naming_the_line_and_the_regex():
    rows = [(1, "designs/d00001/a.jpg"), (2, "designs/d00001/b.jpg"), (3, "loose/c.jpg"), (4, "designs/d00002/a.jpg")]
    lf = parse_list(_list(rows), 3, name="s3://raw/lists/designs.lst")
    with pytest.raises(ListFileError) as err:
        plan_split(lf, 0.9, regex=GROUP_RE)
    assert str(err.value) == (
        f"s3://raw/lists/designs.lst:3: path 'loose/c.jpg' does not match the group regex '{GROUP_RE}'"
    )
    with pytest.raises(ListFileError, match=r":1: path 'designs/d00001/a.jpg' matches with an empty group"):
        plan_split(lf, 0.9, regex=r"^designs/(x*)")


def test_a_group_file_groups_by_id_and_refuses_an_id_it_does_not_name():
    rows = [(1, "p/1.jpg"), (2, "q/2.jpg"), (3, "r/3.jpg"), (7, "s/7.jpg")]
    lf = parse_list(_list(rows), 3, name="l.lst")
    groups = parse_group_file(b"1\tdesign one\n2\tdesign one\r\n3\tthree\n\n7\tthree\n99\tunlisted\n", "groups.tsv")
    plan = plan_split(lf, 0.5, groups=groups)
    one, three = side_of_key("design one", 0.5), side_of_key("three", 0.5)
    assert _sides(plan) == [one, one, three, three]
    assert plan.record["by"] == "group_file"
    assert plan.record["group_file"]["name"] == "groups.tsv" and len(plan.record["group_file"]["sha256"]) == 64
    assert plan.record["groups"] == {"train": [one, three].count("train"), "val": [one, three].count("val")}
    partial = parse_group_file(b"1\ta\n2\ta\n3\tb\n", "groups.tsv")
    with pytest.raises(ListFileError, match=r"^l\.lst:4: ID 7 has no group in the group file groups\.tsv$"):
        plan_split(lf, 0.5, groups=partial)


def test_a_bad_group_file_is_refused_naming_each_line():
    with pytest.raises(ListFileError) as err:
        parse_group_file(b"1\ta\nx\tb\n3 c\n1\td\n4\t \n", "g.tsv")
    assert str(err.value).splitlines() == [
        "g.tsv:2: ID 'x': expected a whole number ≥ 0",
        "g.tsv:3: '3 c': expected ID<TAB>GROUP",
        "g.tsv:4: ID 1 already has a group on line 1",
        "g.tsv:5: '4\\t ': expected ID<TAB>GROUP",
    ]


def test_the_spec_refuses_a_bad_regex_and_two_group_keys():
    base = {"list_uri": "s3://b/l.lst", "dataset_uri": "s3://b/ds", "num_labels": 3}
    with pytest.raises(InputError, match=r"^group regex '\(unclosed': not a valid regular expression"):
        pipeline.DatasetSpec(**base, split_group_regex="(unclosed")
    with pytest.raises(InputError, match="both given; choose one"):
        pipeline.DatasetSpec(**base, split_group_regex="x", split_group_file="s3://b/g.tsv")
    assert not pipeline.DatasetSpec(**base).grouped
    assert pipeline.DatasetSpec.from_dict(pipeline.DatasetSpec(**base, split_group_regex="x").to_dict()).grouped


def test_without_a_group_key_staged_packs_keep_their_names():
    """Datasets staged before the group key existed are reused as they are, not re-packed."""
    spec = pipeline.DatasetSpec(list_uri="s3://b/l.lst", dataset_uri="s3://b/ds", num_labels=3)
    old = f"s3://b/ds/staging/packed/abc-{spec.pack.digest()}-v{pipeline.STAGE_FORMAT}.tar"
    assert str(pipeline.packed_uri(spec, "abc")) == old
    assert str(pipeline.packed_uri(spec, "abc", "tvt")) != str(pipeline.packed_uri(spec, "abc", "ttv")) != old


# --- through S3 -------------------------------------------------------------------------------------------------


def _publish(client, bucket: str, rows: list[tuple[int, str]], list_key: str = "lists/designs.lst") -> dict[str, str]:
    """Real demo images uploaded at `rows`' paths under s3://bucket/raw/, with a list naming them."""
    lines = []
    for (image_id, path), design in zip(rows, demo.generate(len(rows), seed=5, workers=1), strict=True):
        client.put_object(Bucket=bucket, Key=f"raw/{path}", Body=design.data)
        lines.append(_line(image_id, design.labels, path))
    client.put_object(Bucket=bucket, Key=f"raw/{list_key}", Body="".join(lines).encode())
    return {"list_uri": f"s3://{bucket}/raw/{list_key}", "source_uri": f"s3://{bucket}/raw/"}


def _spec(bucket: str, where: dict[str, str], **overrides) -> pipeline.DatasetSpec:
    fields = {
        "dataset_uri": f"s3://{bucket}/dataset",
        "num_labels": NUM,
        "shard_size": 12,
        "pack_workers": 1,
        "download_workers": 4,
        "pack": pipeline.PackParams(resize=32, train_ratio=0.6),
        **where,
    }
    return pipeline.DatasetSpec(**{**fields, **overrides})


def _published_sides(client, bucket: str, tmp_path: Path) -> dict[int, str]:
    sides = {}
    for split, folder in (("train", "training"), ("val", "validation")):
        idx = tmp_path / f"{split}.idx"
        s3.get_file(client, s3.S3Uri(bucket, f"dataset/{folder}/{split}.idx"), idx)
        sides.update(dict.fromkeys(read_index(idx), split))
    return sides


def _manifest(client, bucket: str) -> dict:
    return json.loads(client.get_object(Bucket=bucket, Key="dataset/training/manifest.json")["Body"].read())


def test_the_pipeline_packs_every_group_on_one_side_and_records_the_split(s3_client, bucket, tmp_path):
    rows = _variants(1, designs=15, per_design=4)
    where = _publish(s3_client, bucket, rows)
    summary = pipeline.run(_spec(bucket, where, split_group_regex=GROUP_RE), s3_client)
    assert summary["plan"]["num_shards"] >= 3  # groups cross shard boundaries
    sides = _published_sides(s3_client, bucket, tmp_path)
    assert sorted(sides) == [i for i, _ in rows]
    by_group: dict[str, set[str]] = {}
    for image_id, path in rows:
        by_group.setdefault(path.split("/")[1], set()).add(sides[image_id])
    assert all(len(s) == 1 for s in by_group.values()) and {"train", "val"} == set(sides.values())
    assert all(side_of_key(g, 0.6) == next(iter(s)) for g, s in by_group.items())
    doc = _manifest(s3_client, bucket)
    n_train = sum(s == {"train"} for s in by_group.values())
    assert doc["split"] == {
        "by": "group_regex",
        "train_ratio": 0.6,
        "group_regex": GROUP_RE,
        "groups": {"train": n_train, "val": 15 - n_train},
    }
    assert doc["counts"]["train"] == sum(v == "train" for v in sides.values())

    # The same data without a group key: today's sides by ID, recorded as such, staged apart from the grouped packs.
    pipeline.run(_spec(bucket, where), s3_client)
    assert _published_sides(s3_client, bucket, tmp_path) == {i: side_of_key(str(i), 0.6) for i, _ in rows}
    assert _manifest(s3_client, bucket)["split"] == {"by": "image_id", "train_ratio": 0.6}


def test_the_pipeline_splits_by_a_group_file(s3_client, bucket, tmp_path):
    rows = [(i, f"flat/{i}.jpg") for i in range(1, 31)]
    where = _publish(s3_client, bucket, rows)
    group = {i: f"design-{(i - 1) // 3}" for i, _ in rows}  # three images per design, nothing in the paths
    body = "".join(f"{i}\t{g}\n" for i, g in group.items()).encode()
    s3_client.put_object(Bucket=bucket, Key="raw/groups.tsv", Body=body)
    pipeline.run(_spec(bucket, where, split_group_file=f"s3://{bucket}/raw/groups.tsv"), s3_client)
    sides = _published_sides(s3_client, bucket, tmp_path)
    assert sides == {i: side_of_key(group[i], 0.6) for i, _ in rows}
    assert len(set(sides.values())) == 2
    recorded = _manifest(s3_client, bucket)["split"]
    assert recorded["by"] == "group_file" and recorded["group_file"]["name"] == f"s3://{bucket}/raw/groups.tsv"


def test_an_unmatched_path_fails_prepare_before_anything_is_staged(s3_client, bucket):
    rows = [*_variants(1, designs=3, per_design=2), (50, "stray/x.jpg")]
    where = _publish(s3_client, bucket, rows)
    with pytest.raises(ListFileError) as err:
        pipeline.prepare(_spec(bucket, where, split_group_regex=GROUP_RE), s3_client)
    assert str(err.value) == (f"{where['list_uri']}:7: path 'stray/x.jpg' does not match the group regex '{GROUP_RE}'")
    assert s3.list_objects(s3_client, s3.S3Uri(bucket, "dataset/")) == {}


def test_a_partitioned_list_names_the_partition_and_line(s3_client, bucket):
    _publish(s3_client, bucket, _variants(1, designs=2, per_design=2), "lists/dt=2026-11-01/part.lst")
    where = _publish(s3_client, bucket, [(9, "designs/d00009/a.jpg"), (10, "other/b.jpg")], "lists/dt=2026-11-02/p.lst")
    spec = _spec(bucket, {**where, "list_uri": f"s3://{bucket}/raw/lists/"}, split_group_regex=GROUP_RE)
    with pytest.raises(ListFileError, match=r"^s3://.*/raw/lists/dt=2026-11-02/p\.lst:2: path 'other/b\.jpg' does n"):
        pipeline.prepare(spec, s3_client)


def test_the_forms_group_regex_reaches_the_data_plane(s3_client, bucket):
    """The trigger form's field, resolved as the DAG resolves it, gives `prepare` a grouped plan."""
    rows = _variants(1, designs=10, per_design=3)
    s3_client.put_object(Bucket=bucket, Key="raw/lists/designs.lst", Body=_list(rows, NUM))
    s3_client.put_object(Bucket=bucket, Key="raw/labels.txt", Body="\n".join(demo.LABEL_NAMES).encode())
    form = {
        "list_uri": f"s3://{bucket}/raw/lists/designs.lst",
        "images_uri": f"s3://{bucket}/raw/",
        "labels_uri": f"s3://{bucket}/raw/labels.txt",
        "bucket": bucket,
        "dataset_prefix": "dataset",
        "shard_size": 8,
        "train_ratio": 0.5,
    }
    ref = pipeline.prepare(runconfig.resolve({**form, "split_group_regex": GROUP_RE}).dataset_spec(), s3_client)
    doc = json.loads(s3_client.get_object(Bucket=bucket, Key=s3.S3Uri.parse(ref.plan_uri).key)["Body"].read())
    assert doc["spec"]["split_group_regex"] == GROUP_RE
    assert doc["split"]["by"] == "group_regex" and doc["split"]["group_regex"] == GROUP_RE
    assert sum(doc["split"]["groups"].values()) == 10
    base = ref.plan_uri.rsplit("/", 1)[0].split("/", 3)[3]
    staged = "".join(
        s3_client.get_object(Bucket=bucket, Key=f"{base}/shards/{i:05d}.sides")["Body"].read().decode()
        for i in range(ref.num_shards)
    )
    assert ref.num_shards >= 3 and len(staged) == len(rows)
    side_of_group: dict[str, set[str]] = {}
    for (_, path), side in zip(rows, staged, strict=True):  # the rows are in ID order, as the plan's
        side_of_group.setdefault(path.split("/")[1], set()).add(side)
    assert all(len(sides) == 1 for sides in side_of_group.values()) and set(staged) == {"t", "v"}
    # Without the field the same form splits by image ID, and stages no sides.
    plain = pipeline.prepare(runconfig.resolve(form).dataset_spec(), s3_client)
    doc = json.loads(s3_client.get_object(Bucket=bucket, Key=s3.S3Uri.parse(plain.plan_uri).key)["Body"].read())
    assert doc["split"] == {"by": "image_id", "train_ratio": 0.5} and plain.plan_uri != ref.plan_uri
