"""Benchmark: the per-epoch validation mAP of the local trainer on real multi-label sets, for a few learning rates,
to choose the form's default epochs and learning_rate (issue 9, part 10).

    nice -n 10 .venv/bin/python bench/bench_defaults.py [--work /tmp/tagflow-defaults] [--images 800]
        [--epochs 20] [--lrs 0.01,0.05,0.1] [--sets 50,all] [--min-support 3] [--parallel 2]
    .venv/bin/python bench/bench_defaults.py --table WORK [WORK ...]     (the table of finished or partial runs)

The sets are OpenMoji's designs with their own annotations (bench/real_sets.py: its docstring gives the one-time
setup, `npm pack openmoji` into ~/.cache/tagflow-real and Debian's rsvg-convert). `50`: the 50 most frequent labels;
`all`: every label found in at least `--min-support` groups (≈ the 334-label preset's size). Both are drawn from the
same `--images` designs, rendered at 96 px.

Each set is split by group (`--group-regex '^([^/]+)/'`: an emoji and its skin-tone variants on one side; train
ratio 0.8, since the form's 0.9 leaves a validation split of ~100 images at this size) with tagflow's own
`plan_split`, and packed with tagflow's packer on the plan's sides. Then per (set, learning rate) algo/ic_train.py
runs on a SageMaker-style job folder with the form's other defaults (ResNet-18, batch 32, sgd,
crop_color_transform) for `--epochs` epochs, keeping the best-mAP epoch. From
its log (`Epoch[E] Validation-mAP=F`, epochs from 0) come the curve, the best epoch and its mAP and what the form's
epochs=10 would have kept (the best of epochs 0-9). Beside them: the label-frequency predictor's mAP on the same
validation split (algo/ic_metrics.py, the evaluation's own baseline). Results are written to WORK/results.json
after each epoch of any run, so a stopped benchmark leaves its partial curves.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import real_sets  # noqa: E402

VAL_MAP = re.compile(r"Epoch\[(\d+)\] Validation-mAP=([\d.naN]+)")
TIME_COST = re.compile(r"Epoch\[(\d+)\] Time cost=([\d.]+)")
TRAIN_RATIO = 0.8
FORM_EPOCHS = 10
NICENESS = 10  # the trainers run at this niceness in all, whether or not the driver was started with nice


def prepare(work: Path, name: str, labels: int | None, images: int, min_support: int) -> dict:
    """Build one set, split it by group, pack it; what the runs need (data folder, counts, baseline)."""
    import numpy as np

    from tagflow.evaluate import metrics_module
    from tagflow.listfile import parse_list
    from tagflow.pack import PackParams, pack
    from tagflow.paths import local_path
    from tagflow.shards import plan_split

    root = work / f"set-{name}"
    record = real_sets.build(root / "source", labels=labels, min_support=min_support, images=images)
    raw = (root / "source" / "real.lst").read_bytes()
    lf = parse_list(raw, int(record["labels"]), name=str(root / "source" / "real.lst"))
    plan = plan_split(lf, TRAIN_RATIO, regex=real_sets.GROUP_REGEX)
    items = [(int(i), lf.labels[row], local_path(root / "source" / "images", lf.paths[row]))
             for row, i in enumerate(lf.ids)]  # fmt: skip
    packed = root / "packed"
    sides = {int(i): "train" if plan.train[row] else "val" for row, i in enumerate(lf.ids)}
    report = pack(items, packed, PackParams(resize=96, center_crop=True, train_ratio=TRAIN_RATIO), sides=sides)
    counts = {split: report.counts[split] for split in ("train", "val")}
    truth = np.asarray(lf.labels)[~plan.train] > 0.5
    train_truth = np.asarray(lf.labels)[plan.train] > 0.5
    metrics = metrics_module()
    constant = np.broadcast_to(train_truth.mean(0), truth.shape)
    baseline = metrics.mean_ap(metrics.per_label_ap(constant, truth))
    return {
        "name": name,
        "set": record,
        "packed": str(packed),
        "train": counts["train"],
        "val": counts["val"],
        "groups": plan.record.get("groups"),
        "labels_with_val_positive": int(truth.any(0).sum()),
        "baseline_mAP": round(float(baseline), 4),
    }


def job_folder(work: Path, data: dict, lr: float, epochs: int) -> Path:
    job = work / f"job-{data['name']}-lr{lr:g}"
    if job.exists():
        subprocess.run(["rm", "-rf", str(job)], check=True)
    for channel, split in (("train", "train"), ("validation", "val")):
        folder = job / "input" / "data" / channel
        folder.mkdir(parents=True)
        for ext in ("rec", "idx"):
            os.link(Path(data["packed"]) / f"{split}.{ext}", folder / f"{split}.{ext}")
    config = job / "input" / "config"
    config.mkdir(parents=True)
    hp = {
        "num_classes": data["set"]["labels"], "num_training_samples": data["train"], "multi_label": 1,
        "image_shape": "3,96,96", "num_layers": 18, "epochs": epochs, "mini_batch_size": 32,
        "learning_rate": lr, "optimizer": "sgd", "augmentation_type": "crop_color_transform",
    }  # fmt: skip
    (config / "hyperparameters.json").write_text(json.dumps({k: str(v) for k, v in hp.items()}))
    channel = {"ContentType": "application/x-recordio", "TrainingInputMode": "File"}
    (config / "inputdataconfig.json").write_text(json.dumps({"train": channel, "validation": channel}))
    return job


def summarise(curve: list[float]) -> dict:
    if not curve:
        return {"epochs_done": 0}
    best = max(range(len(curve)), key=curve.__getitem__)
    first = curve[:FORM_EPOCHS]
    kept10 = max(range(len(first)), key=first.__getitem__)
    return {
        "epochs_done": len(curve),
        "best_epoch": best,
        "best_mAP": curve[best],
        "kept_by_epochs_10": {"epoch": kept10, "mAP": first[kept10]} if len(curve) >= FORM_EPOCHS else None,
    }


class Results:
    """results.json, rewritten whole after every change (several runs report at once)."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.data, self.lock = path, {**meta, "sets": {}, "runs": {}}, threading.Lock()

    def update(self, section: str, key: str, value: dict) -> None:
        with self.lock:
            self.data[section][key] = value
            tmp = self.path.with_suffix(".part")
            tmp.write_text(json.dumps(self.data, indent=2) + "\n")
            tmp.replace(self.path)


def run(job: Path, key: str, threads: int, results: Results, base: dict) -> dict:
    """algo/ic_train.py on `job`, recording the curve as epochs finish; the run's summary."""
    from tagflow.pack import mxnet_python

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    log_path = job / "train.log"  # written line by line, so a running job's log can be read
    curve: list[float] = []
    costs: list[float] = []
    started = time.perf_counter()
    with log_path.open("w", buffering=1) as log, subprocess.Popen(
        ["nice", "-n", str(max(0, NICENESS - os.nice(0))), str(mxnet_python()), str(REPO / "algo" / "ic_train.py"),
         "--job-dir", str(job)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    ) as proc:  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if m := TIME_COST.search(line):
                costs.append(float(m.group(2)))
            if m := VAL_MAP.search(line):
                curve.append(round(float(m.group(2)), 4))
                print(f"  {key} epoch {m.group(1)}: validation mAP {curve[-1]:.4f}", flush=True)
                results.update("runs", key, {**base, "curve": curve, **summarise(curve)})
    summary = {
        **base,
        "curve": curve,
        **summarise(curve),
        "returncode": proc.returncode,
        "train_images_per_s": round(base["train"] * len(costs) / sum(costs), 1) if costs else None,
        "wall_s": round(time.perf_counter() - started, 1),
        "log": str(log_path),
    }
    results.update("runs", key, summary)
    if proc.returncode != 0:
        print(f"  {key} failed ({proc.returncode}); see {log_path}", flush=True)
    return summary


def merged(works: list[Path]) -> dict:
    """The results of several WORK folders (e.g. one driver per learning rate) as one; runs without an epoch
    are left out, and a later folder's run replaces an earlier one of the same set and rate."""
    out: dict = {"sets": {}, "runs": {}}
    for work in works:
        data = json.loads((work / "results.json").read_text())
        out["sets"].update(data["sets"])
        out["runs"].update({k: r for k, r in data["runs"].items() if r.get("epochs_done")})
    return out


def table(results: dict) -> str:
    """The Markdown table BENCHMARKS.md shows."""
    lines = [
        "| set | labels (with a val positive) | train / val images | label-frequency mAP | lr | best epoch | best mAP "
        "| kept by epochs=10 | mAP at epochs 0, 4, 9, 14, 19 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(results["runs"].values(), key=lambda r: (r["set"] == "all", r["lr"])):
        s = results["sets"][r["set"]]
        kept = r.get("kept_by_epochs_10")
        at = ", ".join(f"{r['curve'][e]:.3f}" if e < len(r["curve"]) else "–" for e in (0, 4, 9, 14, 19))
        best = f"{r['best_epoch']} | {r['best_mAP']:.3f}" if r.get("epochs_done") else "– | –"
        kept_text = f"epoch {kept['epoch']}: {kept['mAP']:.3f}" if kept else "–"
        lines.append(
            f"| {r['set']} | {s['set']['labels']} ({s['labels_with_val_positive']}) | {s['train']} / {s['val']} "
            f"| {s['baseline_mAP']:.3f} | {r['lr']:g} | {best} "
            f"| {kept_text} | {at} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/tagflow-defaults"))
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lrs", default="0.01,0.05,0.1")
    parser.add_argument("--sets", default="50,all", help="comma-separated: a label count K, or 'all'")
    parser.add_argument("--min-support", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=2, help="training jobs at once")
    parser.add_argument(
        "--table",
        nargs="*",
        type=Path,
        metavar="WORK",
        help="print the table of these WORK folders' results.json (or --work's), runs merged, and exit",
    )
    args = parser.parse_args()
    if args.table is not None:
        print(table(merged(args.table or [args.work])))
        return

    from machine import machine_line

    args.work.mkdir(parents=True, exist_ok=True)
    lrs = [float(v) for v in args.lrs.split(",")]
    names = args.sets.split(",")
    line = machine_line()
    print(line, flush=True)
    results = Results(args.work / "results.json", {"machine": line, "command": " ".join(sys.argv),
                                                   "epochs": args.epochs, "images": args.images})  # fmt: skip
    sets = {}
    for name in names:
        sets[name] = prepare(args.work, name, None if name == "all" else int(name), args.images, args.min_support)
        results.update("sets", name, sets[name])
        s = sets[name]
        print(f"set {name}: {s['set']['labels']} labels ({s['labels_with_val_positive']} with a validation positive),"
              f" {s['train']} train / {s['val']} val images, groups {s['groups']}, "
              f"label-frequency mAP {s['baseline_mAP']:.4f}", flush=True)  # fmt: skip
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    order = [(name, lr) for lr in lrs for name in names]  # every set gets each rate before the next rate

    def one(task: tuple[str, float]) -> dict:
        name, lr = task
        key = f"{name}-lr{lr:g}"
        base = {"set": name, "lr": lr, "train": sets[name]["train"]}
        return run(job_folder(args.work, sets[name], lr, args.epochs), key, threads, results, base)

    with ThreadPoolExecutor(args.parallel) as pool:
        for summary in pool.map(one, order):
            print(f"done {summary['set']} lr {summary['lr']:g}: best epoch {summary.get('best_epoch')} "
                  f"mAP {summary.get('best_mAP')} ({summary['wall_s']} s)", flush=True)  # fmt: skip
    print(table(results.data))
    print(machine_line())


if __name__ == "__main__":
    main()
