"""Benchmark: native packer vs MXNet's im2rec on the same synthetic ~256-px JPEGs, side by side in one run.

    .venv/bin/python bench/bench_pack.py [--images 20000] [--workers 2] [--cache DIR]

Prints images/s for both engines, their ratio, and the mean PSNR of each engine's 96-px output against a
high-quality reference (Pillow Lanczos resize of the original to the same size, computed in float), then a machine
line. im2rec runs as `pack_with_im2rec` does (one subprocess per split); its figure is given end to end and without
the interpreter + MXNet start-up (measured separately, once per split), which is what its own log reports. The two
engines alternate `--rounds` times and each keeps its best time.
Goal: native ≥ 2.5× im2rec at no worse PSNR.

    .venv/bin/python bench/bench_pack.py --memory [--images 20000] [--workers 2] [--cache DIR]

Peak memory instead: each case packs in a fresh process and reports that process's peak RSS (VmHWM):
imports only, the `--images` JPEGs, the same plus a 12000×12000 grey PNG bomb (refused from its
header), and images just at the pixel limit (`PackParams.max_pixels`, 4096×4096: RGB, RGBA and 16-bit PNGs,
baseline and progressive JPEGs), packed at --resize 96 and 0, from which the bound per worker thread follows.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageDraw

from machine import machine_line
from tagflow.pack import DEFAULT_MAX_PIXELS, PackParams, mxnet_python, pack, pack_with_im2rec
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


def grey_png(width: int, height: int) -> bytes:
    """An 8-bit grey PNG of zeros: 12000×12000 is 140 KB on disk, 144 MB decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    row = bytes(width + 1)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def at_limit_images(folder: Path) -> list[Path]:
    """Five 4096×4096 images (exactly `DEFAULT_MAX_PIXELS`), one per decoding path, with noise so none is trivial."""
    side = int(DEFAULT_MAX_PIXELS**0.5)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = synth_image(0).resize((side, side))
    noisy = np.asarray(rgb, dtype=np.int16) + rng.integers(-8, 9, size=(side, side, 3), dtype=np.int16)
    rgb = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
    made = {
        "rgb.png": lambda p: rgb.save(p, compress_level=1),
        "rgba.png": lambda p: Image.merge("RGBA", (*rgb.split(), rgb.convert("L"))).save(p, compress_level=1),
        "grey16.png": lambda p: Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).save(p),
        "baseline.jpg": lambda p: rgb.save(p, quality=95),
        "progressive.jpg": lambda p: rgb.save(p, quality=95, progressive=True),
    }
    for name, save in made.items():
        if not (folder / name).exists():
            save(folder / name)
    return [folder / name for name in made]


def peak_rss() -> int:
    """This process's peak resident set in bytes: VmHWM, which starts afresh at exec. (getrusage's ru_maxrss
    does not: Linux carries the parent's peak over a fork + exec, so a child would report the benchmark's own.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_pack(case: dict) -> None:
    """Run in a fresh process: pack the case's files, print the errors and this process's peak RSS."""
    items = [(n, [1, 0], Path(p)) for n, p in enumerate(case["paths"])]
    with tempfile.TemporaryDirectory(prefix="bench_pack_mem_") as out:
        report = pack(items, Path(out), PackParams(resize=case["resize"]), workers=case["workers"]) if items else None
    peak = peak_rss()
    print(json.dumps({"peak": peak, "errors": [e.reason for e in report.errors] if report else []}))


def memory(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_pack_") as tmp:
        folder = args.cache or Path(tmp) / "images"
        normal = [str(p) for _, _, p in make_images(folder, args.images)]
        bomb = Path(tmp) / "bomb.png"
        bomb.write_bytes(grey_png(12000, 12000))
        at_limit = [str(p) for p in at_limit_images((args.cache or Path(tmp)) / "at-limit")]
        cases = [
            ("imports only (no images)", [], 96),
            (f"{len(normal)} JPEGs ~256 px → 96 px", normal, 96),
            (
                f"{len(normal)} JPEGs + 12000×12000 PNG bomb ({bomb.stat().st_size // 1024} KB)",
                [*normal, str(bomb)],
                96,
            ),
            ("5 images at the limit (4096×4096) ×4 → 96 px", at_limit * 4, 96),
            ("5 images at the limit (4096×4096) ×4, --resize 0", at_limit * 4, 0),
        ]
        peaks = {}
        for name, paths, resize in cases:
            case = json.dumps({"paths": paths, "resize": resize, "workers": args.workers})
            command = [sys.executable, __file__, "--child"]
            done = subprocess.run(command, input=case, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout)
            peaks[name] = result["peak"]
            refused = f", refused {len(result['errors'])}: {result['errors'][0]}" if result["errors"] else ""
            warned = " (stderr: " + done.stderr.strip()[:120] + ")" if done.stderr.strip() else ""
            print(f"{name:58s} peak RSS {result['peak'] / 2**20:7.0f} MiB{refused}{warned}")
        base = peaks[cases[0][0]]
        worst = max(peaks[cases[3][0]], peaks[cases[4][0]])
        per_worker = (worst - base) / args.workers
        print(
            f"bound: imports {base / 2**20:.0f} MiB + per worker thread ≤ {per_worker / 2**20:.0f} MiB at max_pixels "
            f"{DEFAULT_MAX_PIXELS} ({per_worker / DEFAULT_MAX_PIXELS:.1f} bytes per pixel of the limit), "
            f"{args.workers} workers"
        )
    print(machine_line(simplejpeg=simplejpeg.__version__, opencv=cv2.__version__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", action="store_true", help="measure peak RSS per case instead of speed")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # a --memory case on stdin
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", type=Path, help="keep the generated images here (reused on the next run)")
    parser.add_argument("--psnr-every", type=int, default=10, help="compare every N-th image ID (default 10)")
    parser.add_argument("--rounds", type=int, default=2, help="alternate the engines this many times; best kept")
    args = parser.parse_args()
    if args.child:
        return child_pack(json.loads(sys.stdin.read()))
    if args.memory:
        return memory(args)

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
