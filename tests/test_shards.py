"""The shard plan: deterministic, contiguous, bounded, and stable when images are added or changed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tagflow.errors import InputError
from tagflow.listfile import ListFile
from tagflow.shards import (
    BOUNDARY_SALT,
    ShardPlan,
    plan_shards,
    size_bounds,
    stable_id_hash,
)


def make_list(ids, seed: int = 0, num_labels: int = 5) -> ListFile:
    ids = np.asarray(sorted(ids), np.int64)
    rng = np.random.default_rng(seed)
    labels = (rng.random((len(ids), num_labels)) < 0.3).astype(np.uint8)
    return ListFile("gen", ids, labels, [f"img/{i}.jpg" for i in ids.tolist()], "")


def is_cut_row(image_id: int, shard_size: int) -> bool:
    lo, _ = size_bounds(shard_size)
    h = stable_id_hash(np.array([image_id], np.int64), BOUNDARY_SALT)[0]
    return int(h) % (shard_size - lo + 1) == 0


def digests(plan: ShardPlan) -> list[str]:
    return [s.digest for s in plan.shards]


def test_plan_is_deterministic_contiguous_and_bounded():
    lf = make_list(range(0, 200_000, 10))
    plan = plan_shards(lf, 500)
    assert plan == plan_shards(lf, 500)
    assert [s.index for s in plan.shards] == list(range(len(plan)))
    assert plan.shards[0].start == 0 and plan.shards[-1].stop == len(lf)
    assert all(a.stop == b.start for a, b in zip(plan.shards, plan.shards[1:], strict=False))
    lo, hi = size_bounds(500)
    assert (plan.min_size, plan.max_size) == (lo, hi) == (125, 2000)
    assert all(lo <= s.size <= hi for s in plan.shards[:-1]) and 1 <= plan.shards[-1].size <= hi
    assert 0.8 * 500 < len(lf) / len(plan) < 1.25 * 500  # the mean size is near the target
    assert len(set(digests(plan))) == len(plan)
    assert all(len(s.digest) == len(s.labels_digest) == 20 for s in plan.shards)


def test_plan_travels_as_json():
    plan = plan_shards(make_list(range(3000)), 100)
    again = ShardPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan


def test_shard_limit_raises_the_effective_size():
    lf = make_list(range(50_000))
    plan = plan_shards(lf, 10, max_shards=16)
    assert len(plan) <= 16
    assert plan.adjusted and plan.requested_size == 10 and plan.shard_size > 50_000 // 16
    assert plan.shards[-1].stop == len(lf)
    default = plan_shards(lf, 1)
    assert len(default) <= 1024 and default.adjusted
    assert not plan_shards(lf, 2000).adjusted


def test_unsorted_list_and_bad_sizes_are_refused():
    lf = make_list(range(10))
    backwards = ListFile("gen", lf.ids[::-1].copy(), lf.labels[::-1].copy(), lf.paths[::-1], "")
    with pytest.raises(ValueError, match="sorted by ID"):
        plan_shards(backwards, 5)
    with pytest.raises(InputError, match="shard size must be at least 1, got 0"):
        plan_shards(lf, 0)


def test_images_appended_with_higher_ids_change_only_the_tail():
    old = plan_shards(make_list(range(0, 40_000, 2)), 300)
    new = plan_shards(make_list([*range(0, 40_000, 2), *range(40_000, 43_000, 3)]), 300)
    assert digests(new)[: len(old) - 1] == digests(old)[:-1]
    assert len(new) > len(old)


def test_one_image_inserted_mid_shard_changes_exactly_that_shard():
    """The docstring's guarantee: not a cut row, at least MIN rows in, shard stays within MAX -> one shard changes."""
    size = 200
    base = list(range(0, 100_000, 10))
    old = plan_shards(make_list(base), size)
    lo, hi = size_bounds(size)
    checked = 0
    for shard in old.shards[1:-1]:
        if shard.size + 1 > hi:
            continue
        row = shard.start + lo + (shard.size - lo) // 2  # past MIN, before the shard's last row
        candidates = [i for i in range(base[row] + 1, base[row + 1]) if not is_cut_row(i, size)]
        new = plan_shards(make_list([*base, candidates[0]]), size)
        changed = set(digests(old)) - set(digests(new))
        assert changed == {shard.digest}
        assert len(new) == len(old)
        checked += 1
    assert checked >= 30


def test_random_insertions_stay_local():
    size = 100
    base = np.arange(0, 60_000, 10)
    old = plan_shards(make_list(base), size)
    rng = np.random.default_rng(7)
    changed_counts = []
    for image_id in rng.choice(np.setdiff1d(np.arange(60_000), base), 150, replace=False).tolist():
        new = plan_shards(make_list([*base.tolist(), image_id]), size)
        changed = [i for i, d in enumerate(digests(old)) if d not in set(digests(new))]
        assert changed == list(range(changed[0], changed[0] + len(changed)))  # one contiguous run
        changed_counts.append(len(changed))
    assert max(changed_counts) <= 3
    assert changed_counts.count(1) >= 0.9 * len(changed_counts)


def test_etag_change_changes_only_that_shards_digests():
    lf = make_list(range(5000))
    etags = {p: f'"{i}"' for i, p in enumerate(lf.paths)}
    old = plan_shards(lf, 400, etags)
    assert digests(old) != digests(plan_shards(lf, 400))  # ETags are part of the identity
    target = old.shards[3]
    etags[lf.paths[target.start + 1]] = '"replaced"'
    new = plan_shards(lf, 400, etags)
    diff = [i for i, (a, b) in enumerate(zip(old.shards, new.shards, strict=True)) if a != b]
    assert diff == [3]
    assert new.shards[3].digest != target.digest and new.shards[3].labels_digest != target.labels_digest


def test_label_change_changes_only_labels_digest():
    lf = make_list(range(5000))
    old = plan_shards(lf, 400)
    labels = lf.labels.copy()
    row = old.shards[2].start + 5
    labels[row, 0] ^= 1
    new = plan_shards(ListFile(lf.name, lf.ids, labels, lf.paths, ""), 400)
    assert digests(new) == digests(old)
    diff = [
        i for i, (a, b) in enumerate(zip(old.shards, new.shards, strict=True)) if a.labels_digest != b.labels_digest
    ]
    assert diff == [2]


def test_stable_id_hash_is_fixed():
    """splitmix64 known values (0 -> 0xE220A8397B1DCDAF): must never change, or every staged shard is orphaned."""
    assert stable_id_hash(np.array([0, 1, 2**63 - 1], np.int64)).tolist() == [
        0xE220A8397B1DCDAF,
        0x910A2DEC89025CC1,
        0x2A67D7552E039EA7,
    ]
