"""The leakage check on real packed RecordIO: planted near-duplicates of training images (re-encoded, shifted,
recoloured) are found with their training image, a split of distinct designs shows none."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tagflow import demo, leakage, pipeline, s3
from tagflow.pack import PackParams, encode_image, pack
from tagflow.recordio import RecordReader, unpack_payload

PARAMS = PackParams(resize=96)


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


VARIANTS = {
    "re-encoded": lambda im: _jpeg(im, 60),
    "shifted": lambda im: _jpeg(Image.fromarray(np.roll(np.asarray(im), (1, 2), axis=(0, 1)))),
    "recoloured": lambda im: _jpeg(Image.fromarray(np.ascontiguousarray(np.asarray(im)[..., ::-1]))),
}


def _pack_side(tmp_path: Path, side: str, images: dict[int, bytes]) -> Path:
    """Pack `images` (ID → file bytes) all on one side, as the grouped split does; returns the .rec."""
    folder = tmp_path / f"src-{side}"
    folder.mkdir()
    items = []
    for image_id, data in images.items():
        (folder / f"{image_id}.img").write_bytes(data)
        items.append((image_id, [1, 0], folder / f"{image_id}.img"))
    ratio = 1.0 if side == "train" else 0.0
    report = pack(items, tmp_path / f"packed-{side}", PackParams(resize=96, train_ratio=ratio), workers=1)
    assert report.counts[side] == len(images) and not report.errors
    return tmp_path / f"packed-{side}" / f"{side}.rec"


@pytest.fixture(scope="module")
def designs() -> list[demo.Design]:
    return list(demo.generate(80, seed=11, workers=1))


def test_planted_near_duplicates_are_found_with_their_training_image(tmp_path, designs):
    train = {d.image_id: d.data for d in designs[:50]}
    val = {d.image_id: d.data for d in designs[50:]}  # distinct designs: no leak among them
    planted = {}
    for k, (name, variant) in enumerate(VARIANTS.items()):
        for original in designs[k * 5 : k * 5 + 5]:
            new_id = 1000 + len(planted)
            val[new_id] = variant(_rgb(original.data))
            planted[new_id] = (original.image_id, name)
    recs = _pack_side(tmp_path, "train", train), _pack_side(tmp_path, "val", val)
    expected = {new_id: original for new_id, (original, _) in planted.items()}
    wide = leakage.check_leakage(*recs, max_distance=8, examples=20)  # every planted variant, and nothing else
    assert wide["validation_images"] == 45 and wide["training_images"] == 50
    assert {e["val_id"]: e["train_id"] for e in wide["examples"]} == expected
    assert wide["leaked"] == 15 and wide["fraction"] == round(15 / 45, 6)
    assert sum(wide["by_distance"].values()) == 15 and len(wide["by_distance"]) == 9
    assert all(e["distance"] <= 8 for e in wide["examples"])
    distances = [(e["distance"], e["val_id"]) for e in wide["examples"]]
    assert distances == sorted(distances)
    # The default (4 bits) misses a few planted variants (see DEFAULT_MAX_DISTANCE) but flags nothing else.
    default = leakage.check_leakage(*recs, examples=20)
    found = {e["val_id"]: e["train_id"] for e in default["examples"]}
    assert found.items() <= expected.items() and len(found) >= 12
    assert default["leaked"] == len(found) and default["max_distance"] == 4 and default["method"] == leakage.HASH
    # The evaluation lists the closest MAX_EXAMPLES (12) of the 15: the closest first, all of them planted.
    listed = leakage.check_leakage(*recs, max_distance=8)["examples"]
    assert listed == wide["examples"][: leakage.MAX_EXAMPLES] and len(listed) == 12
    assert json.loads(json.dumps(default)) == default  # plain JSON for evaluation.json


def test_a_split_of_distinct_designs_shows_no_leak(tmp_path, designs):
    train = {d.image_id: d.data for d in designs[:60]}
    val = {d.image_id: d.data for d in designs[60:]}
    result = leakage.check_leakage(_pack_side(tmp_path, "train", train), _pack_side(tmp_path, "val", val))
    assert (result["leaked"], result["fraction"], result["examples"]) == (0, 0.0, [])
    assert result["validation_images"] == 20 and result["training_images"] == 60


def test_hashes_are_those_of_the_packed_images(tmp_path, designs):
    rec = _pack_side(tmp_path, "train", {d.image_id: d.data for d in designs[:5]})
    ids, hashes = leakage.record_hashes(rec)
    with RecordReader(rec) as reader:
        expected = [leakage.edge_phash(unpack_payload(p)[2]) for _, p in reader]
    assert ids.tolist() == [d.image_id for d in designs[:5]] and hashes.tolist() == expected
    # A PNG record (decoded by Pillow, not at a DCT scale) hashes close to its JPEG twin: datasets use one encoding,
    # so the check never compares across them, but a PNG dataset is checked as well.
    for design in designs[:10]:
        as_jpeg = leakage.edge_phash(encode_image(design.data, PARAMS))
        as_png = leakage.edge_phash(encode_image(design.data, PackParams(resize=96, encoding=".png", quality=6)))
        assert bin(as_jpeg ^ as_png).count("1") <= 8


def test_nearest_is_exact_against_a_plain_loop():
    rng = np.random.default_rng(3)
    reference = rng.integers(0, 2**63, 700, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 700, dtype=np.uint64)
    queries = np.concatenate([reference[:50] ^ np.uint64(0b1011), rng.integers(0, 2**63, 100, dtype=np.uint64)])
    distance, index = leakage.nearest(queries, reference)
    for q, d, i in zip(queries.tolist(), distance.tolist(), index.tolist(), strict=True):
        loop = [bin(q ^ r).count("1") for r in reference.tolist()]
        assert d == min(loop) and i == loop.index(min(loop))
    assert distance[:50].max() <= 3
    empty = leakage.nearest(queries[:3], reference[:0])
    assert empty[0].tolist() == [65] * 3 and empty[1].tolist() == [-1] * 3


def test_a_published_dataset_split_by_id_leaks_its_variants_and_grouped_it_does_not(s3_client, bucket, tmp_path):
    """Through the real pipeline and S3: four variants of each design, split by ID, leak; split by design, do not."""
    rows, lines = [], []
    for design in demo.generate(12, seed=4, workers=1):
        for k, variant in enumerate([lambda im: _jpeg(im, 95), *VARIANTS.values()]):
            image_id, path = 100 + len(rows), f"designs/d{design.image_id:03d}/v{k}.jpg"
            s3_client.put_object(Bucket=bucket, Key=f"raw/{path}", Body=variant(_rgb(design.data)))
            rows.append(image_id)
            lines.append("\t".join([str(image_id), *("1" if v else "0" for v in design.labels.tolist()), path]))
    s3_client.put_object(Bucket=bucket, Key="raw/list.lst", Body=("\n".join(lines) + "\n").encode())
    common = {
        "list_uri": f"s3://{bucket}/raw/list.lst",
        "source_uri": f"s3://{bucket}/raw/",
        "num_labels": demo.NUM_LABELS,
        "shard_size": 16,
        "pack_workers": 1,
        "pack": PackParams(resize=96, train_ratio=0.7),
    }
    leaked = {}
    for name, extra in (("by_id", {}), ("grouped", {"split_group_regex": r"^designs/(d\d+)/"})):
        dataset = f"s3://{bucket}/{name}"
        pipeline.run(pipeline.DatasetSpec(dataset_uri=dataset, **common, **extra), s3_client)
        recs = {}
        for split, folder in (("train", "training"), ("val", "validation")):
            recs[split] = tmp_path / f"{name}-{split}.rec"
            s3.get_file(s3_client, s3.S3Uri.parse(f"{dataset}/{folder}/{split}.rec"), recs[split])
        leaked[name] = leakage.check_leakage(recs["train"], recs["val"])
    assert leaked["by_id"]["leaked"] >= 5  # 48 images of 12 designs: most validation images have a sibling in train
    assert all((e["val_id"] - 100) // 4 == (e["train_id"] - 100) // 4 for e in leaked["by_id"]["examples"])
    assert leaked["grouped"]["leaked"] == 0 and leaked["grouped"]["validation_images"] > 0
