"""The demo data set: deterministic renders, sane labels, a seed-format list on the real local S3 server, and
labels a trivial classifier can pick up from the pixels."""

from __future__ import annotations

import io
from datetime import date

import numpy as np
import pytest
from PIL import Image

from tagflow import demo, s3
from tagflow.demo import render
from tagflow.errors import InputError
from tagflow.listfile import parse_list, read_label_names
from tagflow.paths import source_uri

# Labels a linear model on colour histograms and coarse pixel statistics must learn (Brier skill > 0.15). Not here:
# shape kinds (they need a convolutional model) and white / black shapes (light backgrounds are near-white too,
# which a histogram cannot tell from white shapes).
MUST_LEARN = [
    "bg_dark",
    "bg_light",
    "bg_warm",
    "bg_cool",
    *(f"color_{c}" for c in render.COLORS if c not in ("white", "black")),
    "has_border",
    "text_banner",
]


@pytest.fixture(scope="module")
def designs() -> list[demo.Design]:
    """640 designs of seed 1, rendered once for the module."""
    return list(demo.generate(640, seed=1, workers=2))


def test_label_names_are_fifty_distinct_identifiers():
    assert len(demo.LABEL_NAMES) == 50
    assert len(set(demo.LABEL_NAMES)) == 50
    assert all(name.isidentifier() and name == name.lower() for name in demo.LABEL_NAMES)


def test_same_seed_and_index_give_the_same_bytes_and_other_seeds_differ():
    first = [demo.render_design(i, seed=7) for i in range(12)]
    again = [demo.render_design(i, seed=7) for i in range(12)]
    other = [demo.render_design(i, seed=8) for i in range(12)]
    for (a, ext_a, la), (b, ext_b, lb) in zip(first, again, strict=True):
        assert a == b and ext_a == ext_b
        assert np.array_equal(la, lb)
    assert all(a != c for (a, _, _), (c, _, _) in zip(first, other, strict=True))


def test_generate_is_independent_of_workers_and_id_ranges():
    serial = list(demo.generate(70, seed=3, workers=1))
    parallel = list(demo.generate(70, seed=3, workers=2))
    tail = list(demo.generate(6, seed=3, workers=1, start_id=64))
    assert [d.image_id for d in parallel] == list(range(70))
    assert [d.data for d in serial] == [d.data for d in parallel]
    assert [d.data for d in tail] == [d.data for d in serial[64:]]


def test_an_empty_or_negative_range_is_refused():
    with pytest.raises(InputError, match="n=0"):
        demo.generate(0)
    with pytest.raises(InputError, match="start_id=-1"):
        demo.generate(5, start_id=-1)


def test_labels_are_multi_hot_with_frequencies_between_4_and_60_percent(designs):
    labels = np.stack([d.labels for d in designs[:300]])
    assert labels.dtype == np.uint8 and labels.shape == (300, 50)
    assert set(np.unique(labels).tolist()) <= {0, 1}
    freq = labels.mean(axis=0)
    outside = {name: round(float(f), 3) for name, f in zip(demo.LABEL_NAMES, freq, strict=True) if not 0.04 <= f <= 0.6}
    assert not outside, f"label frequencies outside [4 %, 60 %]: {outside}"
    per_image = labels.sum(axis=1)
    assert per_image.min() >= 4, "every design has a background, a layout, a shape kind and a colour"
    # Groups that are exclusive by construction.
    for group in (render.BACKGROUNDS, render.LAYOUTS):
        prefix = "bg_" if group is render.BACKGROUNDS else "layout_"
        cols = [demo.LABEL_NAMES.index(prefix + name) for name in group]
        assert np.all(labels[:, cols].sum(axis=1) == 1)
    both = labels[:, demo.LABEL_NAMES.index("bg_dark")] & labels[:, demo.LABEL_NAMES.index("bg_light")]
    assert not both.any()


def test_images_decode_at_their_sizes_mostly_jpeg_some_png(designs):
    sizes = set()
    for d in designs:
        img = Image.open(io.BytesIO(d.data))
        img.load()
        assert img.format == {"jpg": "JPEG", "png": "PNG"}[d.ext]
        assert img.mode == "RGB"
        assert 224 <= img.width <= 320 and 224 <= img.height <= 320
        sizes.add(img.size)
    exts = [d.ext for d in designs]
    assert 0.01 <= exts.count("png") / len(exts) <= 0.12
    assert any(w != h for w, h in sizes) and any(w == h for w, h in sizes)


def test_exotic_encodings_only_when_asked(designs):
    exotic = [demo.render_design(i, 1, exotic=True) for i in range(200)]
    changed = [(data, ext) for (data, ext, _), plain in zip(exotic, designs, strict=False) if data != plain.data]
    assert 2 <= len(changed) <= 30
    modes = set()
    for data, _ in changed:
        img = Image.open(io.BytesIO(data))
        modes.add((img.format, img.mode, bool(img.getexif().get(0x0112))))
        img.load()
    assert len(modes) >= 2, modes


def test_write_local_writes_images_list_and_labels(tmp_path):
    list_path = demo.write_local(25, tmp_path, seed=2, workers=1)
    lf = parse_list(list_path, 50)
    assert lf.ids.tolist() == list(range(25))
    for image_id, path in zip(lf.ids.tolist(), lf.paths, strict=True):
        assert (tmp_path / "images" / path).read_bytes() == demo.render_design(image_id, 2)[0]
    assert read_label_names(tmp_path / "labels.txt", 50) == demo.LABEL_NAMES


def _check_seed_format(text: str, num_labels: int) -> list[tuple[int, list[int], str]]:
    """A minimal reading of the seed format, stricter than the parser: tabs, LF, trailing newline."""
    assert text.endswith("\n") and "\r" not in text
    rows = []
    for line in text[:-1].split("\n"):
        fields = line.split("\t")
        assert len(fields) == num_labels + 2, line[:80]
        assert all(v in ("0", "1") for v in fields[1:-1])
        rows.append((int(fields[0]), [int(v) for v in fields[1:-1]], fields[-1]))
    return rows


def test_publish_puts_exactly_the_listed_objects(s3_client, bucket):
    prefix = s3.S3Uri(bucket, "raw/designs")
    result = demo.publish(60, prefix, seed=4, client=s3_client, workers=2)
    info = result.to_dict()
    assert info["count"] == 60 and info["num_labels"] == 50 and info["uploaded"] == 60
    assert info["list_uri"] == f"s3://{bucket}/raw/designs/lists/designs.lst"
    assert info["images_uri"] == f"s3://{bucket}/raw/designs/images"
    assert sum(info["formats"].values()) == 60

    body = s3_client.get_object(Bucket=bucket, Key="raw/designs/lists/designs.lst")["Body"].read()
    rows = _check_seed_format(body.decode(), 50)
    assert any(p.startswith("/") for _, _, p in rows) and any(not p.startswith("/") for _, _, p in rows)
    lf = parse_list(body, 50, name=info["list_uri"])
    assert lf.ids.tolist() == list(range(60))

    images = s3.S3Uri.parse(info["images_uri"])
    listed = {source_uri(p, images).key for p in lf.paths}
    stored = s3.list_objects(s3_client, s3.S3Uri(bucket, "raw/designs/"))
    assert set(stored) == listed | {"raw/designs/lists/designs.lst", "raw/designs/lists/labels.txt"}
    for image_id, labels, path in rows[:5]:
        data, _, expected = demo.render_design(image_id, 4)
        key = source_uri(path, images).key
        assert s3_client.get_object(Bucket=bucket, Key=key)["Body"].read() == data
        assert labels == expected.tolist()
    names = s3_client.get_object(Bucket=bucket, Key="raw/designs/lists/labels.txt")["Body"].read().decode()
    assert names.splitlines() == demo.LABEL_NAMES

    again = demo.publish(60, prefix, seed=4, client=s3_client, workers=1)
    assert again.uploaded == 0, "a re-run with the same seed finds every image already there"


def test_publish_creates_the_bucket_and_daily_partitions_add_new_images(s3_client, s3_server):
    import uuid

    name = f"t-demo-{uuid.uuid4().hex[:12]}"
    parts = demo.make_partitioned(8, s3.S3Uri(name, "p"), date(2025, 3, 30), days=3, client=s3_client, workers=1)
    keys = set(s3.list_objects(s3_client, s3.S3Uri(name, "p/lists/")))
    assert keys == {
        "p/lists/labels.txt",
        "p/lists/dt=2025-03-30/part.lst",
        "p/lists/dt=2025-03-31/part.lst",
        "p/lists/dt=2025-04-01/part.lst",
    }
    seen: list[int] = []
    for part in parts:
        body = s3_client.get_object(Bucket=name, Key=s3.S3Uri.parse(part.list_uri).key)["Body"].read()
        seen += parse_list(body, 50).ids.tolist()
    assert seen == list(range(24))
    assert len(s3.list_objects(s3_client, s3.S3Uri(name, "p/images/"))) == 24


def _features(designs: list[demo.Design], side: int = 32) -> np.ndarray:
    """Per image at side x side: colour and tint histograms, channel statistics, a 4x4 brightness grid, edge
    energy and frame contrast."""
    px = []
    for d in designs:
        img = Image.open(io.BytesIO(d.data))
        img.draft("RGB", (side * 2, side * 2))
        px.append(np.asarray(img.convert("RGB").resize((side, side), Image.Resampling.BOX), np.float32) / 255)
    x = np.stack(px)
    n = len(x)
    hi, lo = x.max(-1), x.min(-1)
    sat = (hi - lo) / np.maximum(hi, 1e-3)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    hue = (np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) + 360) % 360
    bins = np.where(sat > 0.45, (hue // 30).astype(int), 12 + np.minimum((hi * 4).astype(int), 3))
    bins = np.where((sat > 0.45) & (hi < 0.35), 16, bins)
    hist = np.stack([(bins == k).mean(axis=(1, 2)) for k in range(17)], axis=1)
    tinted = (sat > 0.1) & (sat <= 0.45)
    tints = np.stack([(tinted & (hue // 60 == k)).mean(axis=(1, 2)) for k in range(6)], axis=1)
    channels = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)
    lum = x.mean(-1)
    grid = lum.reshape(n, 4, side // 4, 4, side // 4).mean(axis=(2, 4)).reshape(n, 16)
    edges = np.stack([np.abs(np.diff(lum, axis=a)).mean(axis=(1, 2)) for a in (1, 2)], axis=1)
    frame = np.abs(np.stack([lum[:, 0].mean(1) - lum[:, 2].mean(1), lum[:, :, 0].mean(1) - lum[:, :, 2].mean(1)], 1))
    return np.concatenate([hist, np.sqrt(hist), tints, channels, grid, edges, frame], axis=1).astype(np.float64)


def test_labels_are_learnable_from_pixels(designs):
    """Ridge regression on simple pixel features beats the label-frequency baseline on held-out images."""
    x = _features(designs)
    y = np.stack([d.labels for d in designs]).astype(np.float64)
    n_train = 480
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = (x - mean) / std
    prior = y[:n_train].mean(0)
    w = np.linalg.solve(x[:n_train].T @ x[:n_train] + 100 * np.eye(x.shape[1]), x[:n_train].T @ (y[:n_train] - prior))
    pred = np.clip(x[n_train:] @ w + prior, 0, 1)
    brier = ((pred - y[n_train:]) ** 2).mean(0)
    baseline = ((prior - y[n_train:]) ** 2).mean(0)
    skill = dict(zip(demo.LABEL_NAMES, (1 - brier / baseline).round(2).tolist(), strict=True))
    weak = {name: s for name, s in skill.items() if name in MUST_LEARN and s <= 0.15}
    assert not weak, f"labels a linear model should learn from colour and brightness: {weak}"
    beaten = [name for name, s in skill.items() if s > 0]
    assert len(beaten) >= 30, f"only {len(beaten)} labels beat the baseline: {skill}"

    # The same features with labels shuffled across images must not beat the baseline: the test can fail.
    shuffled = y[np.random.default_rng(0).permutation(len(y))]
    prior_s = shuffled[:n_train].mean(0)
    w_s = np.linalg.solve(
        x[:n_train].T @ x[:n_train] + 100 * np.eye(x.shape[1]), x[:n_train].T @ (shuffled[:n_train] - prior_s)
    )
    brier_s = ((np.clip(x[n_train:] @ w_s + prior_s, 0, 1) - shuffled[n_train:]) ** 2).mean(0)
    assert (brier_s < ((prior_s - shuffled[n_train:]) ** 2).mean(0)).sum() < 15


def test_the_demo_summary_shows_map_the_baselines_the_champion_the_gates_reason_and_where_the_report_is():
    from tagflow.local import demo_run

    gate = {
        "deploy": False,
        "reason": "mAP 0.3000 is worse than the serving model's 0.3500 on the same split (tolerance 0.0000)",
        "mAP": 0.3,
        "accuracy": 0.86,
        "baselines": {"label_frequency_mAP": 0.12, "all_negative_accuracy": 0.81},
        "champion": "s3://tagflow-data/50-label-rs96/output/old/output/model.tar.gz",
        "champion_mAP": 0.35,
        "candidate": {"model_data_url": "s3://tagflow-data/50-label-rs96/output/new/output/model.tar.gz"},
        "evaluation": "s3://tagflow-data/50-label-rs96/output/new/evaluation/evaluation.json",
        "report": "s3://tagflow-data/50-label-rs96/output/new/evaluation/report.html",
    }
    publish = {"dataset": "s3://tagflow-data/50-label-rs96",
               "counts": {"train": 9, "val": 1, "skipped": 0, "listed": 10}}  # fmt: skip
    result = {"run_id": "r", "state": "success", "tasks": {"publish": "success"},
              "results": {"publish": publish, "evaluate_gate": gate}, "prediction": None}  # fmt: skip
    text = demo_run.describe(result)
    assert "  mAP 0.3000 (label-frequency baseline 0.1200); accuracy 0.8600 (all-negative baseline 0.8100)" in text
    assert f"  the serving model's mAP on the same split: 0.3500 ({gate['champion']})" in text
    assert f"gate: kept the serving model — {gate['reason']}" in text
    assert f"evaluation {gate['evaluation']}\n  report {gate['report']}" in text
    first = demo_run.describe({**result, "results": {**result["results"],
                                                     "evaluate_gate": {**gate, "champion": None}}})  # fmt: skip
    assert "  no serving model to compare with" in first
