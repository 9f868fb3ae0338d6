"""The packer: im2rec geometry, image decoding edge cases, splits, determinism, and MXNet reading what we wrote."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import PIL
import pytest
import simplejpeg
from PIL import Image, ImageDraw, ImageOps

from tagflow.errors import InputError, TooManyFailures, check_bad_fraction
from tagflow.pack import (
    ImageError,
    PackParams,
    encode_image,
    pack,
    pack_with_im2rec,
    target_geometry,
)
from tagflow.recordio import RecordReader, read_index, unpack_payload
from tagflow.shards import side_of_key
from test_download import CATCH, in_small_fs

N_LABELS = 5
PARAMS = PackParams(train_ratio=0.6)  # both splits get images even from a handful


def design(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, asymmetric 'graphic design': left-to-right gradient, a block top-left, a disc lower right."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = rng.integers(30, 120, size=3)
    pixels = base + x * np.array([150, 60, 20]) + y * np.array([0, 70, 110])
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.rectangle((width * 0.05, height * 0.05, width * 0.4, height * 0.3), fill=(240, 240, 40))
    draw.ellipse((width * 0.55, height * 0.55, width * 0.9, height * 0.9), fill=(20, 30, 200))
    return image


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


# name -> (how to make it in folder d, upright size (w, h), expected im2rec --resize 96 size)
GOOD = {
    "rgb_256.jpg": (lambda d: _save(design(256, 256, 1), d / "rgb_256.jpg", quality=92), (96, 96)),
    "land.jpg": (lambda d: _save(design(300, 200, 2), d / "land.jpg", quality=92), (144, 96)),
    "port.jpg": (lambda d: _save(design(200, 300, 3), d / "port.jpg", quality=92), (96, 144)),
    "odd.jpg": (lambda d: _save(design(257, 301, 4), d / "odd.jpg", quality=92), (96, 112)),
    "small.jpg": (lambda d: _save(design(50, 40, 5), d / "small.jpg", quality=92), (120, 96)),
    "progressive.jpg": (lambda d: _save(design(256, 200, 6), d / "progressive.jpg", progressive=True), (122, 96)),
    "wide.png": (lambda d: _save(design(700, 90, 7), d / "wide.png"), (746, 96)),
    "gray.jpg": (lambda d: _save(design(240, 200, 8).convert("L"), d / "gray.jpg", quality=92), (115, 96)),
    "gray.png": (lambda d: _save(design(200, 240, 9).convert("L"), d / "gray.png"), (96, 115)),
    "rgba.png": (
        lambda d: _save(
            Image.merge("RGBA", (*design(200, 180, 10).split(), Image.linear_gradient("L").resize((200, 180)))),
            d / "rgba.png",
        ),
        (106, 96),
    ),
    "palette.png": (lambda d: _save(design(180, 200, 11).convert("P"), d / "palette.png"), (96, 106)),
    "cmyk.jpg": (lambda d: _save(design(220, 200, 12).convert("CMYK"), d / "cmyk.jpg", quality=95), (105, 96)),
    "exif6.jpg": (lambda d: _save(design(300, 200, 13), d / "exif6.jpg", quality=92, exif=_exif(6)), (96, 144)),
    "png16.png": (
        lambda d: _save(
            Image.fromarray(np.asarray(design(200, 200, 14).convert("L"), dtype=np.uint16) * 257), d / "png16.png"
        ),
        (96, 96),
    ),
}


def _truncated(d: Path) -> Path:
    data = io.BytesIO()
    design(256, 256, 20).save(data, "JPEG", quality=92)
    return _save_bytes(d / "truncated.jpg", data.getvalue()[: len(data.getvalue()) // 2])


def _save_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD = {
    "empty.jpg": (lambda d: _save_bytes(d / "empty.jpg", b""), "empty file (0 bytes)"),
    "corrupt.jpg": (lambda d: _save_bytes(d / "corrupt.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4), "not a"),
    "notimage.txt": (lambda d: _save_bytes(d / "notimage.txt", b"hello, world\n"), "not a decodable image"),
    "truncated.jpg": (_truncated, "not a decodable image"),
    "missing.jpg": (lambda d: d / "missing.jpg", "cannot read file"),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    return {name: make(folder) for name, (make, *_) in {**GOOD, **BAD}.items()}


@pytest.fixture(scope="module")
def items(images) -> list[tuple[int, np.ndarray, Path]]:
    """(ID, labels, path) for every image, IDs deliberately not in name order."""
    rng = np.random.default_rng(7)
    names = sorted(images)
    return [
        (int(1000 + (i * 37) % 101), rng.integers(0, 2, size=N_LABELS).astype(np.uint8), images[name])
        for i, name in enumerate(names)
    ]


def _reference(data: bytes, size: tuple[int, int], params: PackParams = PARAMS) -> np.ndarray:
    """Pillow's reading of the file (orientation, RGB, 16-bit high byte) resized with Lanczos: an independent path."""
    with Image.open(io.BytesIO(data)) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I"):
            image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
        image = image.convert("RGB")
        box, _ = target_geometry(*image.size, params)
        return np.asarray(image.resize(size, Image.Resampling.LANCZOS, box=box), dtype=np.float64)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-9))


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


@pytest.mark.parametrize(
    ("size", "params", "box", "out"),
    [
        ((300, 200), PackParams(), (0, 0, 300, 200), (144, 96)),
        ((200, 300), PackParams(), (0, 0, 200, 300), (96, 144)),
        ((257, 301), PackParams(), (0, 0, 257, 301), (96, 112)),  # 301 * 96 // 257 = 112 (floor, as im2rec)
        ((50, 40), PackParams(), (0, 0, 50, 40), (120, 96)),  # small images are enlarged, as im2rec does
        ((96, 96), PackParams(), (0, 0, 96, 96), (96, 96)),
        ((300, 200), PackParams(resize=0), (0, 0, 300, 200), (300, 200)),
        ((300, 200), PackParams(center_crop=True), (50, 0, 250, 200), (96, 96)),
        ((200, 301), PackParams(center_crop=True), (0, 50, 200, 250), (96, 96)),
        ((201, 300), PackParams(center_crop=True, resize=0), (0, 49, 201, 250), (201, 201)),
    ],
)
def test_target_geometry_is_im2rec_s(size, params, box, out):
    assert target_geometry(*size, params) == (box, out)


@pytest.mark.parametrize("name", sorted(GOOD))
def test_encode_image_size_and_content(images, name):
    data = images[name].read_bytes()
    encoded = encode_image(data, PARAMS)
    assert encoded[:3] == b"\xff\xd8\xff"
    pixels = _decode(encoded)
    expected = GOOD[name][1]
    assert (pixels.shape[1], pixels.shape[0], pixels.shape[2]) == (*expected, 3)
    assert _psnr(pixels, _reference(data, expected)) > 30


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    buffer = io.BytesIO()
    design(240, 160, orientation).save(buffer, "JPEG", quality=92, exif=_exif(orientation))
    data = buffer.getvalue()
    upright = (160, 240) if orientation >= 5 else (240, 160)
    _, size = target_geometry(*upright, PARAMS)
    pixels = _decode(encode_image(data, PARAMS))
    assert (pixels.shape[1], pixels.shape[0]) == size
    assert _psnr(pixels, _reference(data, size)) > 30


@pytest.mark.parametrize("name", ["land.jpg", "port.jpg", "odd.jpg", "png16.png", "exif6.jpg"])
def test_center_crop(images, name):
    params = PackParams(center_crop=True)
    data = images[name].read_bytes()
    pixels = _decode(encode_image(data, params))
    assert pixels.shape == (96, 96, 3)
    assert _psnr(pixels, _reference(data, (96, 96), params)) > 30


def test_png_encoding(images):
    data = images["land.jpg"].read_bytes()
    encoded = encode_image(data, PackParams(encoding=".png", quality=6))
    assert encoded[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(encoded)) as image:
        assert (image.size, image.mode) == ((144, 96), "RGB")
        assert _psnr(np.asarray(image), _reference(data, (144, 96))) > 30


@pytest.mark.parametrize("name", sorted(set(BAD) - {"missing.jpg"}))
def test_undecodable_input_raises_image_error(images, name):
    with pytest.raises(ImageError) as caught:
        encode_image(images[name].read_bytes(), PARAMS)
    assert caught.value.reason.startswith(BAD[name][1])


def test_pack_params_validation_and_digest():
    assert PackParams().digest() == PackParams().digest()
    assert PackParams().digest() != PackParams(quality=90).digest()
    assert PackParams().to_dict() == {
        "resize": 96,
        "center_crop": False,
        "quality": 95,
        "encoding": ".jpg",
        "train_ratio": 0.9,
        "max_pixels": 4096 * 4096,
    }
    # The default pixel limit leaves the digest as it was before the field existed, so staged packs are reused;
    # another limit may admit or refuse other images, so it is a different pack.
    before = {k: v for k, v in PackParams().to_dict().items() if k != "max_pixels"}
    before |= {"encoder": 3, "simplejpeg": simplejpeg.__version__, "pillow": PIL.__version__, "opencv": cv2.__version__}
    assert PackParams().digest() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert PackParams(max_pixels=1000).digest() != PackParams().digest()
    for bad, message in [
        (dict(encoding=".gif"), "encoding '.gif'"),
        (dict(quality=0), "JPEG quality must be 1..100"),
        (dict(encoding=".png"), "PNG compression level must be 0..9"),
        (dict(resize=-1), "resize -1"),
        (dict(train_ratio=1.5), "train ratio 1.5"),
        (dict(max_pixels=0), "max pixels '0': expected a whole number of pixels ≥ 1"),
        (dict(max_pixels=2.5), "max pixels '2.5'"),
    ]:
        with pytest.raises(InputError, match=message):
            PackParams(**bad)


def _read(out_dir: Path, split: str) -> list[tuple[int, int, list[float], tuple[int, ...]]]:
    """(idx key, header id, labels, decoded shape) for every record, in file order."""
    rows = []
    with RecordReader(out_dir / f"{split}.rec", out_dir / f"{split}.idx") as reader:
        offsets = {offset: key for key, offset in reader.index.items()}
        for offset, payload in reader:
            header, labels, image = unpack_payload(payload)
            rows.append((offsets[offset], header.id, labels.tolist(), _decode(image).shape))
    return rows


@pytest.fixture(scope="module")
def packed(items, tmp_path_factory):
    out = tmp_path_factory.mktemp("native")
    progress = []
    report = pack(items, out, PARAMS, workers=2, progress=lambda done, total: progress.append((done, total)))
    return out, report, progress


def test_pack_writes_sorted_records_and_reports_bad_images(items, packed):
    out, report, progress = packed
    by_id = {image_id: (labels, path) for image_id, labels, path in items}
    bad_ids = {image_id for image_id, _, path in items if path.name in BAD}
    assert sorted((e.image_id, Path(e.path).name) for e in report.errors) == sorted(
        (image_id, by_id[image_id][1].name) for image_id in bad_ids
    )
    for error in report.errors:
        assert error.reason.startswith(BAD[Path(error.path).name][1])
    seen = set()
    for split in ("train", "val"):
        rows = _read(out, split)
        keys = [row[0] for row in rows]
        assert keys == sorted(keys) and len(keys) == report.counts[split] > 0
        for key, header_id, labels, shape in rows:
            assert side_of_key(str(key), PARAMS.train_ratio) == split and header_id == key
            assert labels == by_id[key][0].tolist()
            assert (shape[1], shape[0]) == GOOD[by_id[key][1].name][1]
        expected_counts = np.sum([by_id[k][0] for k in keys], axis=0).tolist()
        assert report.label_counts[split] == expected_counts
        seen |= set(keys)
    assert seen == set(by_id) - bad_ids
    assert progress[-1] == (len(items), len(items))


def test_pack_output_is_identical_across_runs_and_worker_counts(items, packed, tmp_path):
    out, _, _ = packed
    for workers in (1, 3):
        again = pack(items, tmp_path / str(workers), PARAMS, workers=workers)
        assert again.counts == packed[1].counts
        for name in ("train.rec", "train.idx", "val.rec", "val.idx"):
            assert (tmp_path / str(workers) / name).read_bytes() == (out / name).read_bytes(), name


def test_pack_puts_each_image_on_the_side_its_caller_gives(items, packed, tmp_path):
    """A split plan's sides (by group) in one pass; the plan's sides by ID are exactly the packer's own."""
    out, report, _ = packed
    own = {image_id: side_of_key(str(image_id), PARAMS.train_ratio) for image_id, _, _ in items}
    same = pack(items, tmp_path / "same", PARAMS, workers=2, sides=own)
    assert same.counts == report.counts
    for name in ("train.rec", "train.idx", "val.rec", "val.idx"):
        assert (tmp_path / "same" / name).read_bytes() == (out / name).read_bytes(), name
    flipped = {image_id: "val" if side == "train" else "train" for image_id, side in own.items()}
    again = pack(items, tmp_path / "flipped", PARAMS, workers=2, sides=flipped)
    assert again.counts == {"train": report.counts["val"], "val": report.counts["train"]}
    assert again.label_counts == {"train": report.label_counts["val"], "val": report.label_counts["train"]}
    for split, other in (("train", "val"), ("val", "train")):
        # the same records, byte for byte, under the other side's name
        assert (tmp_path / "flipped" / f"{split}.rec").read_bytes() == (out / f"{other}.rec").read_bytes()
        assert set(read_index(tmp_path / "flipped" / f"{split}.idx")) == set(read_index(out / f"{other}.idx"))


def test_pack_refuses_sides_that_leave_an_image_out(items, tmp_path):
    first, second = items[0][0], items[1][0]
    sides = {image_id: "train" for image_id, _, _ in items if image_id != first}
    with pytest.raises(ValueError, match=rf"^image {first} \(.*\): no side in the split, expected 'train' or 'val'$"):
        pack(items, tmp_path, PARAMS, sides=sides)
    with pytest.raises(ValueError, match=rf"^image {second} \(.*\): side 'test' in the split"):
        pack(items, tmp_path, PARAMS, sides={**sides, first: "val", second: "test"})
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_pack_rejects_duplicate_ids_and_uneven_labels(images, tmp_path):
    path = images["land.jpg"]
    with pytest.raises(ValueError, match="image ID 5 appears twice"):
        pack([(5, [1, 0], path), (5, [0, 1], path)], tmp_path)
    with pytest.raises(ValueError, match=r"image 6 .*: 3 labels, expected 2"):
        pack([(5, [1, 0], path), (6, [0, 1, 1], path)], tmp_path)
    assert not (tmp_path / "train.rec").exists()


def test_pack_of_nothing_writes_empty_files(tmp_path):
    report = pack([], tmp_path)
    assert report.counts == {"train": 0, "val": 0} and report.errors == []
    assert all((tmp_path / name).read_bytes() == b"" for name in ("train.rec", "train.idx", "val.rec", "val.idx"))


# --- MXNet's own readers and im2rec, in the algorithm environment ---------------------------------------------


@pytest.mark.mxnet
def test_mxnet_indexed_reader_reads_our_records(items, packed, mxnet_records):
    out, report, _ = packed
    by_id = {image_id: (labels, path) for image_id, labels, path in items}
    for split in ("train", "val"):
        records = mxnet_records("indexed", str(out / f"{split}.rec"), str(out / f"{split}.idx"))["records"]
        assert [r["key"] for r in records] == sorted(r["key"] for r in records)
        assert len(records) == report.counts[split]
        for r in records:
            labels, path = by_id[r["key"]]
            assert (r["id"], r["id2"], r["flag"]) == (r["key"], 0, N_LABELS)
            assert r["labels"] == labels.tolist()
            width, height = GOOD[path.name][1]
            assert r["shape"] == [height, width, 3]


@pytest.mark.mxnet
def test_mxnet_image_record_iter_reads_our_labels(items, packed, mxnet_records):
    out, _, _ = packed
    by_id = {image_id: labels for image_id, labels, _ in items}
    batch_size = 4
    result = mxnet_records(
        "iter", str(out / "train.rec"), "--label-width", str(N_LABELS), "--batch-size", str(batch_size)
    )
    got = []
    for batch in result["batches"]:
        assert batch["shape"] == [batch_size, 3, 96, 96]
        got += batch["labels"][: batch_size - batch["pad"]]
    keys = [row[0] for row in _read(out, "train")]
    assert got == [by_id[k].tolist() for k in keys]


@pytest.fixture(scope="module")
def packed_im2rec(items, tmp_path_factory, mxnet_python):
    out = tmp_path_factory.mktemp("im2rec")
    return out, pack_with_im2rec(items, out, PARAMS, workers=2)


@pytest.mark.mxnet
def test_im2rec_engine_matches_native(items, packed, packed_im2rec):
    native_out, native, _ = packed
    mx_out, mx = packed_im2rec
    by_id = {image_id: path.name for image_id, _, path in items}
    # im2rec (cv2) packs a truncated JPEG, filling the missing part with grey; the native engine rejects it.
    native_failed = {e.image_id for e in native.errors}
    mx_failed = {e.image_id for e in mx.errors}
    assert native_failed - mx_failed == {i for i, name in by_id.items() if name == "truncated.jpg"}
    assert mx_failed <= native_failed
    for error in mx.errors:
        assert error.reason  # im2rec's own message, or that it skipped silently
    for split in ("train", "val"):
        ours = {row[0]: row for row in _read(native_out, split)}
        theirs = {row[0]: row for row in _read(mx_out, split)}
        assert set(ours) == set(theirs) - {i for i in theirs if by_id[i] == "truncated.jpg"}
        for key, row in ours.items():
            assert theirs[key][1:] == row[1:], by_id[key]  # same header ID, labels and decoded shape
        # Same pixels, up to resize filters and JPEG: checks orientation, CMYK, alpha, grey and 16-bit like cv2.
        with (
            RecordReader(native_out / f"{split}.rec", native_out / f"{split}.idx") as a,
            RecordReader(mx_out / f"{split}.rec", mx_out / f"{split}.idx") as b,
        ):
            for key in ours:
                pa, pb = (_decode(unpack_payload(r.read(key))[2]) for r in (a, b))
                assert _psnr(pa, pb) > 25, by_id[key]


@pytest.mark.mxnet
def test_im2rec_engine_takes_the_callers_sides_too(items, tmp_path):
    good = sorted(item for item in items if item[2].name in ("land.jpg", "port.jpg", "odd.jpg", "gray.png"))
    sides = {image_id: ("train", "val")[k % 2] for k, (image_id, _, _) in enumerate(good)}
    assert sides != {i: side_of_key(str(i), PARAMS.train_ratio) for i in sides}  # not what the hash would give
    report = pack_with_im2rec(good, tmp_path, PARAMS, workers=2, sides=sides)
    for split in ("train", "val"):
        assert sorted(read_index(tmp_path / f"{split}.idx")) == sorted(i for i, s in sides.items() if s == split)
    assert report.counts == {s: list(sides.values()).count(s) for s in ("train", "val")}


@pytest.mark.mxnet
def test_our_reader_reads_im2rec_output_as_mxnet_does(packed_im2rec, mxnet_records):
    mx_out, mx = packed_im2rec
    for split in ("train", "val"):
        theirs = mxnet_records("indexed", str(mx_out / f"{split}.rec"), str(mx_out / f"{split}.idx"))["records"]
        with RecordReader(mx_out / f"{split}.rec", mx_out / f"{split}.idx") as reader:
            assert reader.keys() == [r["key"] for r in theirs]
            for r in theirs:
                payload = reader.read(r["key"])
                header, labels, _ = unpack_payload(payload)
                assert hashlib.sha256(payload).hexdigest() == r["sha256"]
                assert (header.flag, header.id, labels.tolist()) == (r["flag"], r["id"], r["labels"])
            assert len([1 for _ in reader]) == mx.counts[split]


@pytest.mark.mxnet
@pytest.mark.slow
def test_im2rec_output_does_not_depend_on_thread_count(items, packed_im2rec, tmp_path):
    mx_out, _ = packed_im2rec
    pack_with_im2rec(items, tmp_path, PARAMS, workers=3)
    for name in ("train.rec", "train.idx", "val.rec", "val.idx"):
        assert (tmp_path / name).read_bytes() == (mx_out / name).read_bytes(), name


# --- the pixel limit, and the output folder's faults ----------------------------------------------------------


def grey_png(width: int, height: int) -> bytes:
    """An 8-bit grey PNG of zeros, written row by row: a 12000×12000 one is 140 KB on disk and 144 MB decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then the samples
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(grey_png(12000, 12000))
    return path


def test_images_above_the_pixel_limit_are_bad_images(bomb, images, tmp_path):
    small = PackParams(train_ratio=0.6, max_pixels=200 * 240)
    items = [
        (1, [1, 0], bomb),
        (2, [0, 1], images["land.jpg"]),  # 300×200 = 60,000: above, read by libjpeg-turbo's header
        (3, [1, 1], images["cmyk.jpg"]),  # 220×200 = 44,000: at most the limit (Pillow's path)
        (4, [1, 0], images["wide.png"]),  # 700×90 = 63,000: above, read by Pillow's header
        (5, [0, 1], images["gray.png"]),  # 200×240 = 48,000: exactly the limit, accepted
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = pack(items, tmp_path, small, workers=2)
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []
    limit = "above the limit of 48000 (PackParams.max_pixels / --max-pixels)"
    assert [(e.image_id, e.path, e.reason) for e in report.errors] == [
        (1, str(bomb), f"12000x12000 = 144000000 pixels, {limit}"),
        (2, str(images["land.jpg"]), f"300x200 = 60000 pixels, {limit}"),
        (4, str(images["wide.png"]), f"700x90 = 63000 pixels, {limit}"),
    ]
    assert sum(report.counts.values()) == 2
    # Counted toward the bad-image threshold like any other bad image, and named with the reason.
    errors = [{"path": e.path, "reason": e.reason} for e in report.errors]
    with pytest.raises(TooManyFailures, match=r"3 of 5 images \(60\.00%\).*\n  '.*bomb\.png': 12000x12000 = "):
        check_bad_fraction(errors, len(items), 0.5)
    # The default limit refuses the bomb too, and admits every ordinary test image.
    default = pack([(1, [1], bomb), (2, [1], images["land.jpg"])], tmp_path / "default")
    assert [(e.image_id, e.reason) for e in default.errors] == [
        (1, "12000x12000 = 144000000 pixels, above the limit of 16777216 (PackParams.max_pixels / --max-pixels)")
    ]


def test_a_bomb_is_refused_before_it_costs_memory(bomb, images):
    """In a fresh process: peak RSS stays near an ordinary pack's (2.1 GB before the limit), stderr stays empty."""
    code = textwrap.dedent(
        f"""
        import json, tempfile
        from pathlib import Path
        from tagflow.pack import pack
        with tempfile.TemporaryDirectory() as out:
            report = pack([(1, [1], Path({str(bomb)!r})), (2, [1], Path({str(images["land.jpg"])!r}))], Path(out))
        status = Path("/proc/self/status").read_text()  # VmHWM: this process's peak (ru_maxrss has the parent's)
        peak_mb = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024
        print(json.dumps({{"reasons": [e.reason for e in report.errors], "peak_mb": peak_mb}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no DecompressionBombWarning
    result = json.loads(done.stdout)
    assert [r.split(",")[0] for r in result["reasons"]] == ["12000x12000 = 144000000 pixels"]
    assert result["peak_mb"] < 300, result


def test_output_folder_that_is_a_file_is_one_message(images, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InputError) as caught:
        pack([(1, [1], images["land.jpg"])], afile)
    assert str(caught.value) == (
        f"pack output folder {str(afile)!r} exists but is not a folder: expected a folder, or a name to create one"
    )
    assert afile.read_text() == "x"


def small_designs(folder: Path, count: int, side: int = 128) -> list[tuple[int, list[int], Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for n in range(count):
        path = folder / f"{n:04}.jpg"
        if not path.exists():
            design(side, side, n % 50).save(path, quality=90)
        items.append((n, [n % 2, 1 - n % 2], path))
    return items


PACK_FILES = ("train.rec", "train.idx", "val.rec", "val.idx")


def test_read_only_and_full_output_folders_are_one_message(tmp_path):
    items = small_designs(tmp_path / "images", 300)
    code = CATCH + textwrap.dedent(
        f"""
        from tagflow.pack import pack
        items = [(i, labels, Path(p)) for i, labels, p in {json.dumps([(i, lab, str(p)) for i, lab, p in items])}]
        out = {{"ro_root": attempt(lambda: pack(items, fs)), "ro_sub": attempt(lambda: pack(items, fs / "out"))}}
        print(json.dumps(out))
        """
    )
    ro = str(tmp_path / "ro" / "fs")
    assert in_small_fs(tmp_path / "ro", code, read_only=True) == {
        "ro_root": f"InputError: pack output folder {ro!r} is not writable: the file system is read-only",
        "ro_sub": f"InputError: cannot create pack output folder {ro + '/out'!r}: the file system is read-only",
    }

    code = CATCH + textwrap.dedent(
        f"""
        from tagflow.pack import pack
        items = [(i, labels, Path(p)) for i, labels, p in {json.dumps([(i, lab, str(p)) for i, lab, p in items])}]
        out_dir = fs / "out"
        pack(items[:4], out_dir)  # an earlier dataset in the folder
        (out_dir / "manifest.json").write_text("earlier")
        before = {{name: (out_dir / name).read_bytes().hex() for name in {PACK_FILES!r}}}
        error = attempt(lambda: pack(items, out_dir))
        after = {{name: (out_dir / name).read_bytes().hex() for name in {PACK_FILES!r}}}
        print(json.dumps({{"error": error, "unchanged": before == after, "left": listing(out_dir)}}))
        """
    )
    full = in_small_fs(tmp_path / "full", code, size="128k")
    out_dir = str(tmp_path / "full" / "fs" / "out")
    assert full["error"] in {
        f"TagflowError: cannot write {out_dir + '/' + name!r}: no space left on the device (disk full)"
        for name in PACK_FILES
    }
    assert full["unchanged"] and full["left"] == sorted([*PACK_FILES, "manifest.json"])


def test_a_killed_pack_leaves_the_earlier_dataset_and_a_rerun_replaces_it(tmp_path):
    items = small_designs(tmp_path / "images", 1100, side=64)
    out = tmp_path / "out"
    pack(items[:10], out)  # the earlier dataset
    (out / "manifest.json").write_text("earlier")
    before = {name: (out / name).read_bytes() for name in PACK_FILES}
    code = textwrap.dedent(
        f"""
        import json, os, signal
        from pathlib import Path
        from tagflow.pack import pack

        def die(done, total):
            if done >= 1024:
                os.kill(os.getpid(), signal.SIGKILL)

        rows = json.loads({json.dumps(json.dumps([(i, lab, str(p)) for i, lab, p in items]))})
        pack([(i, labels, Path(p)) for i, labels, p in rows], Path({str(out)!r}), workers=2, progress=die)
        """
    )
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    # What the killed run wrote sits under .partial names only: the dataset in the folder is the earlier one, whole.
    assert {name: (out / name).read_bytes() for name in PACK_FILES} == before
    assert (out / "manifest.json").read_text() == "earlier"
    assert {p.name for p in out.iterdir()} - {*PACK_FILES, "manifest.json"} <= {f"{n}.partial" for n in PACK_FILES}

    report = pack(items, out, workers=2)
    clean = tmp_path / "clean"
    pack(items, clean, workers=1)
    assert sum(report.counts.values()) == 1100
    assert sorted(p.name for p in out.iterdir()) == sorted(PACK_FILES)  # no .partial; the old manifest is gone
    for name in PACK_FILES:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name


def test_messages_cut_a_huge_path(images, tmp_path):
    huge = Path("/" + "d/" * 5_000_000 + "x.jpg")
    with pytest.raises(ValueError, match="appears twice") as caught:
        pack([(5, [1, 0], huge), (5, [0, 1], images["land.jpg"])], tmp_path)
    assert len(str(caught.value)) < 1000 and "(10000006 characters)" in str(caught.value)
