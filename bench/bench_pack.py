"""Benchmark: native packer vs MXNet's im2rec on the same synthetic ~256-px JPEGs, side by side in one run.

    .venv/bin/python bench/bench_pack.py [--images 20000] [--workers 2] [--cache DIR]

Prints images/s for both engines, their ratio, and the mean PSNR of each engine's 96-px output against a
high-quality reference (Pillow Lanczos resize of the original to the same size, computed in float), then a machine
line. im2rec runs as `pack_with_im2rec` does (one subprocess per split); its figure is given end to end and without
the interpreter + MXNet start-up (measured separately, once per split), which is what its own log reports. The two
engines alternate `--rounds` times and each keeps its best time.
Goal: native ≥ 2.5× im2rec at no worse PSNR.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageDraw

from machine import machine_line
from tagflow.pack import PackParams, mxnet_python, pack, pack_with_im2rec
from tagflow.recordio import RecordReader, unpack_payload

LABELS = 50
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def synth_image(index: int) -> Image.Image:
    """A deterministic 'graphic design': gradient, shapes and text-like strokes at about 256 px."""
    rng = np.random.default_rng(index)
    width, height = (int(v) for v in rng.integers(200, 321, size=2))
    c0, c1 = rng.integers(0, 256, size=(2, 3))
    t = np.linspace(0.0, 1.0, width)[None, :, None] * 0.6 + np.linspace(0.0, 1.0, height)[:, None, None] * 0.4
    image = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 7))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, size=2))
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour, outline=(0, 0, 0), width=2)
        else:
            points = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(3)]
            draw.polygon(points, fill=colour)
    for _ in range(int(rng.integers(1, 4))):
        text = "".join(LETTERS[int(i)] for i in rng.integers(0, len(LETTERS), size=int(rng.integers(3, 10))))
        xy = (int(rng.integers(0, width // 2)), int(rng.integers(0, height - 12)))
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        draw.text(xy, text, fill=colour, font_size=int(rng.integers(12, 40)))
    return image


def _write_one(args: tuple[int, str]) -> None:
    index, folder = args
    synth_image(index).save(Path(folder) / f"{index:06d}.jpg", quality=90)


def make_images(folder: Path, count: int) -> list[tuple[int, np.ndarray, Path]]:
    """`count` JPEGs in `folder` (kept if already there) and their items with random multi-hot labels."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [(i, str(folder)) for i in range(count) if not (folder / f"{i:06d}.jpg").exists()]
    if missing:
        print(f"generating {len(missing)} images in {folder} ...", file=sys.stderr)
        with multiprocessing.get_context("fork").Pool() as pool:
            pool.map(_write_one, missing, chunksize=64)
    rng = np.random.default_rng(12345)
    labels = (rng.random((count, LABELS)) < 0.2).astype(np.uint8)
    return [(1000 + i, labels[i], folder / f"{i:06d}.jpg") for i in range(count)]


def reference(original: Path, size: tuple[int, int]) -> np.ndarray:
    """Lanczos resize of the original to `size`, per channel in float (no rounding)."""
    with Image.open(original) as image:
        channels = [band.convert("F").resize(size, Image.Resampling.LANCZOS) for band in image.convert("RGB").split()]
    return np.stack([np.asarray(c, dtype=np.float64) for c in channels], axis=-1)


def mean_psnr(out_dir: Path, paths: dict[int, Path], every: int) -> tuple[float, int]:
    """Mean PSNR (dB) of every `every`-th packed image against its reference, and how many were compared."""
    values = []
    for split in ("train", "val"):
        with RecordReader(out_dir / f"{split}.rec", out_dir / f"{split}.idx") as reader:
            for key in list(reader.index):
                if key % every:
                    continue
                _, _, data = unpack_payload(reader.read(key))
                with Image.open(__import__("io").BytesIO(data)) as decoded:
                    got = np.asarray(decoded.convert("RGB"), dtype=np.float64)
                ref = reference(paths[key], (got.shape[1], got.shape[0]))
                mse = float(np.mean((got - np.clip(ref, 0, 255)) ** 2))
                values.append(10 * np.log10(255.0**2 / max(mse, 1e-12)))
    return float(np.mean(values)), len(values)


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (pool workers, im2rec) so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def startup_seconds() -> tuple[float, float]:
    """Wall and CPU time of starting the algorithm environment's interpreter and importing mxnet, cv2 (median of 3)."""
    walls, cpus = [], []
    for _ in range(3):
        started, cpu = time.perf_counter(), cpu_seconds()
        subprocess.run([str(mxnet_python()), "-c", "import mxnet, cv2"], check=True, capture_output=True)
        walls.append(time.perf_counter() - started)
        cpus.append(cpu_seconds() - cpu)
    return sorted(walls)[1], sorted(cpus)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", type=Path, help="keep the generated images here (reused on the next run)")
    parser.add_argument("--psnr-every", type=int, default=10, help="compare every N-th image ID (default 10)")
    parser.add_argument("--rounds", type=int, default=2, help="alternate the engines this many times; best kept")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_pack_") as tmp:
        folder = args.cache or Path(tmp) / "images"
        items = make_images(folder, args.images)
        paths = {image_id: path for image_id, _, path in items}
        params = PackParams()
        n = len(items)

        native = mxnet = None
        cpu = {"native": [], "mxnet": []}
        for _ in range(args.rounds):  # alternate, so a busy moment on the machine hits both engines alike
            before = cpu_seconds()
            run = pack(items, Path(tmp) / "native", params, workers=args.workers)
            cpu["native"].append(cpu_seconds() - before)
            native = run if native is None or run.seconds < native.seconds else native
            before = cpu_seconds()
            run = pack_with_im2rec(items, Path(tmp) / "mxnet", params, workers=args.workers)
            cpu["mxnet"].append(cpu_seconds() - before)
            mxnet = run if mxnet is None or run.seconds < mxnet.seconds else mxnet
        assert native is not None and mxnet is not None
        startup, startup_cpu = startup_seconds()
        runs = 2  # one im2rec process per split
        mxnet_steady = mxnet.seconds - runs * startup

        psnr_native, compared = mean_psnr(Path(tmp) / "native", paths, args.psnr_every)
        psnr_mxnet, _ = mean_psnr(Path(tmp) / "mxnet", paths, args.psnr_every)

    rate_native = n / native.seconds
    rate_mxnet = n / mxnet.seconds
    rate_steady = n / mxnet_steady
    print(f"images: {n} synthetic JPEGs ~256 px, resize {params.resize}, quality {params.quality}")
    print(f"workers: {args.workers} (native threads, im2rec --num-thread)")
    print(f"native : {native.seconds:7.2f} s  {rate_native:8.0f} img/s  errors {len(native.errors)}")
    print(f"im2rec : {mxnet.seconds:7.2f} s  {rate_mxnet:8.0f} img/s  end to end  errors {len(mxnet.errors)}")
    print(
        f"im2rec : {mxnet_steady:7.2f} s  {rate_steady:8.0f} img/s  without start-up "
        f"({runs} × {startup:.2f} s interpreter + mxnet import)"
    )
    print(f"ratio  : {rate_native / rate_mxnet:.2f}× end to end")
    print(f"ratio  : {rate_native / rate_steady:.2f}× vs im2rec without start-up")
    print(f"PSNR   : native {psnr_native:.2f} dB, im2rec {psnr_mxnet:.2f} dB (mean over {compared} images)")
    cpu_native = min(cpu["native"]) / n * 1000
    cpu_mxnet = (min(cpu["mxnet"]) - runs * startup_cpu) / n * 1000
    print(
        f"CPU    : native {cpu_native:.3f} ms/image, im2rec {cpu_mxnet:.3f} ms/image without start-up "
        f"(all processes; {cpu_mxnet / cpu_native:.2f}× — the ratio on an otherwise idle machine)"
    )
    goal = rate_native / rate_steady >= 2.5 and psnr_native >= psnr_mxnet
    print(f"goal ≥ 2.5× at no worse PSNR: {'met' if goal else 'NOT met'}")
    print(machine_line(simplejpeg=simplejpeg.__version__, opencv=cv2.__version__))


if __name__ == "__main__":
    main()
