"""Benchmark: the local trainer's training images/s against a bare MXNet `Module.fit` loop, side by side in one run.

    .venv/bin/python bench/bench_train.py [--images 1000] [--epochs 2] [--batch 32] [--layers 18] [--rounds 1]

Generates `--images` demo designs (tagflow.demo.write_local), packs them at 96 px with the native packer (centre
crop, so every record is exactly 96×96) and then, in the algorithm environment, alternates `--rounds` times:

- local: algo/ic_train.py on a SageMaker-style job folder holding those train/val .rec files (multi_label=1,
  ResNet-`--layers`, no augmentation, sgd), exactly as the local runner starts it;
- bare: `mx.mod.Module.fit` of the same training symbol (algo/ic_model.py) on the same train .rec, same batch size,
  image shape, label width, shuffle and number of decode threads, with no validation, no per-batch accuracy and no
  checkpoints (this script itself, re-run under the algorithm environment's interpreter with `--bare JOB_DIR`).

Both figures are training images/s from the `Epoch[E] Time cost=S` lines both write (the training passes only:
validation and saving are outside them): train records × epochs / Σ time cost; each engine keeps its best round.
The local trainer's end-to-end wall time (start-up, validation, saving the model) is printed beside it.
Goal: local ≥ 90 % of bare.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIME_COST = re.compile(r"Epoch\[(\d+)\] Time cost=([\d.]+)")


def decode_threads() -> int:
    """What the trainer uses (algo/ic_train.py `train`): one per core, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


# --- the bare loop (runs in the algorithm environment) ----------------------------------------------------------


def bare_loop(job: Path) -> None:
    """Module.fit of the trainer's symbol on the job's train channel, with the job's hyperparameters."""
    import logging

    import mxnet as mx

    sys.path.insert(0, str(REPO / "algo"))
    from ic_model import training_symbol

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    hp = json.loads((job / "input" / "config" / "hyperparameters.json").read_text())
    shape = tuple(int(v) for v in hp["image_shape"].split(","))
    batch, classes = int(hp["mini_batch_size"]), int(hp["num_classes"])
    rec = next((job / "input" / "data" / "train").glob("*.rec"))
    train = mx.io.ImageRecordIter(
        path_imgrec=str(rec),
        path_imgidx=str(rec.with_suffix(".idx")),
        data_shape=shape,
        batch_size=batch,
        label_width=classes,
        preprocess_threads=decode_threads(),
        prefetch_buffer=4,
        shuffle=True,
    )
    symbol = training_symbol(int(hp["num_layers"]), classes, True)
    module = mx.mod.Module(
        symbol, data_names=["data"], label_names=["softmax_label"], context=mx.cpu(), fixed_param_names=["pos_weight"]
    )
    module.fit(
        train,
        eval_metric=mx.metric.Loss(output_names=["bce_output"], label_names=[]),
        optimizer="sgd",
        optimizer_params={
            "learning_rate": float(hp["learning_rate"]),
            "momentum": 0.9,
            "wd": 0.0001,
            "rescale_grad": 1.0 / batch,
        },
        initializer=mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2),
        arg_params={"pos_weight": mx.nd.ones((1, classes))},
        allow_missing=True,
        num_epoch=int(hp["epochs"]),
    )


# --- the driver (runs in the Airflow environment) ----------------------------------------------------------------


def make_job(root: Path, images: int, epochs: int, batch: int, layers: int) -> tuple[Path, int]:
    """Demo images packed at 96 px into a SageMaker-style job folder; (job folder, train records)."""
    from tagflow import demo
    from tagflow.listfile import infer_num_labels, parse_list
    from tagflow.pack import PackParams, pack
    from tagflow.paths import local_path

    list_path = demo.write_local(images, root / "demo")
    raw = list_path.read_bytes()
    num_labels = infer_num_labels(raw, name=str(list_path))
    listfile = parse_list(raw, num_labels, name=str(list_path)).sorted_by_id()
    items = [(int(i), listfile.labels[row], local_path(root / "demo" / "images", listfile.paths[row]))
             for row, i in enumerate(listfile.ids)]  # fmt: skip
    report = pack(items, root / "packed", PackParams(resize=96, center_crop=True))
    job = root / "job"
    for channel, split in (("train", "train"), ("validation", "val")):
        folder = job / "input" / "data" / channel
        folder.mkdir(parents=True)
        for ext in ("rec", "idx"):
            os.link(root / "packed" / f"{split}.{ext}", folder / f"{split}.{ext}")
    config = job / "input" / "config"
    config.mkdir(parents=True)
    hyperparameters = {
        "num_classes": num_labels, "num_training_samples": report.counts["train"], "multi_label": 1,
        "image_shape": "3,96,96", "num_layers": layers, "epochs": epochs, "mini_batch_size": batch,
        "learning_rate": 0.05, "optimizer": "sgd",
    }  # fmt: skip
    (config / "hyperparameters.json").write_text(json.dumps({k: str(v) for k, v in hyperparameters.items()}))
    channel = {"ContentType": "application/x-recordio", "TrainingInputMode": "File"}
    (config / "inputdataconfig.json").write_text(json.dumps({"train": channel, "validation": channel}))
    return job, report.counts["train"]


def run(cmd: list[str], log_path: Path) -> tuple[list[float], float]:
    """Run one engine; (per-epoch training seconds from its log, wall seconds)."""
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - started
    log_path.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(f"{cmd[1]} failed ({done.returncode}); see {log_path}:\n{(done.stdout + done.stderr)[-2000:]}")
    costs = [float(s) for _, s in TIME_COST.findall(done.stdout + done.stderr)]
    return costs, wall


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--bare":
        bare_loop(Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    from machine import machine_line
    from tagflow.pack import mxnet_python

    python = str(mxnet_python())
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        job, n_train = make_job(root, args.images, args.epochs, args.batch, args.layers)
        print(f"data: {args.images} demo images packed at 96 px → {n_train} train records; ResNet-{args.layers}, "
              f"batch {args.batch}, {args.epochs} epochs, {decode_threads()} decode threads")  # fmt: skip
        best: dict[str, float] = {}
        wall_local = 0.0
        for r in range(args.rounds):
            for engine in ("local", "bare"):
                if engine == "local":
                    for sub in ("model", "output"):
                        if (job / sub).exists():
                            subprocess.run(["rm", "-rf", str(job / sub)], check=True)
                    cmd = [python, str(REPO / "algo" / "ic_train.py"), "--job-dir", str(job)]
                else:
                    cmd = [python, str(Path(__file__).resolve()), "--bare", str(job)]
                costs, wall = run(cmd, root / f"{engine}-{r}.log")
                if len(costs) != args.epochs:
                    sys.exit(f"{engine}: expected {args.epochs} 'Time cost' lines, got {costs}")
                rate = n_train * args.epochs / sum(costs)
                print(f"round {r + 1} {engine:5s}: {rate:7.1f} images/s (epochs {', '.join(f'{c:.1f}' for c in costs)}"
                      f" s; process wall {wall:.1f} s)")  # fmt: skip
                if rate > best.get(engine, 0.0):
                    best[engine] = rate
                    if engine == "local":
                        wall_local = wall
        version = subprocess.run([python, "-c", "import mxnet; print(mxnet.__version__)"], capture_output=True,
                                 text=True).stdout.strip()  # fmt: skip
    ratio = best["local"] / best["bare"]
    print(f"local trainer: {best['local']:.1f} images/s (job wall {wall_local:.1f} s incl. start-up, validation, save)")
    print(f"bare Module.fit: {best['bare']:.1f} images/s")
    print(f"ratio local/bare: {ratio:.1%} (goal ≥ 90 %)")
    print(machine_line(mxnet=version))


if __name__ == "__main__":
    main()
