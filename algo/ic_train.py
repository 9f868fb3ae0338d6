"""Train like SageMaker's built-in image-classification algorithm, against a SageMaker-style job folder.

    .venv-mxnet/bin/python algo/ic_train.py --job-dir DIR      (DIR plays the part of /opt/ml)

Reads `input/config/hyperparameters.json` (string values, the built-in's names: see ic_hyperparams.py),
`input/config/inputdataconfig.json` and one .rec file per channel under `input/data/{train,validation}/`; writes
the model to `model/` and, on failure, a one-paragraph reason to `output/failure` with exit status 1 (`ClientError:`
for bad hyperparameters or data, `AlgorithmError:` otherwise). On SIGTERM it stops after the current batch, saves
the best model so far and exits with status 143.

Artifact (`model/`, what SageMaker tars into model.tar.gz): `image-classification-symbol.json` (inference symbol:
raw RGB pixels NCHW → probabilities), `image-classification-NNNN.params` (the saved epoch's weights; with
`checkpoint_frequency=k` also the weights at every k-th epoch, as the built-in keeps them, so a later evaluation
may pick another), `model-shapes.json` (`[{"name": "data", "shape": [batch, C, H, W]}]`) and `metrics.json`
(`params_file`: the saved model's file; `checkpoint_epochs`: every params file → its epoch; `label_names`: the
dataset's names when a tagflow manifest.json was staged with the train channel, else null). `output/data/` gets
`metrics.json` and `training-curve.png`.

Which epoch is saved — a difference from the built-in: the built-in keeps the epoch with the best validation
accuracy. For a multi-label job that is the wrong judge (a model predicting no label at all scores ≈ 1 − label
density), so multi-label jobs keep the epoch with the best validation mAP, and `early_stopping` counts improvement
in mAP too; multi-class jobs (and a multi-label validation split without a single positive) keep the best accuracy,
as the built-in. `metrics.json` says which (`selected_by`), and `Saved-model (epoch E) Validation-NAME=F` lines at
the end of the log give the saved model's values (the `saved-model:*` metrics).

Epoch numbers, one mapping: the log, metrics.json (`best_epoch`, `history[].epoch`, `checkpoint_epochs`) and the
training curve count epochs from 0 as the built-in's log does (MXNet `Module.fit`: `Epoch[0]` is the first); a
params file is numbered epoch + 1, the epochs completed, as MXNet's `do_checkpoint` names the built-in's files:
`Epoch[3]`'s weights are `image-classification-0004.params`.

Log lines follow the built-in (MXNet `Module.fit`) format, so one set of metric regexes serves both backends:
`Epoch[E] Train-accuracy=F`, `Epoch[E] Time cost=S`, `Epoch[E] Validation-accuracy=F`.
Multi-label accuracy is the built-in's "average accuracy across all classes": the fraction of (image, label)
decisions that are right when a label is predicted at probability ≥ 0.5. Beyond the built-in, multi-label jobs
log and save `Validation-mAP` (mean over labels with a positive example of the average precision), micro and macro
F1 at 0.5, and per-label AP.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ic_data import Channel, DataError, scan
from ic_hyperparams import HyperparameterError, Hyperparameters, parse
from ic_metrics import multilabel_metrics
from ic_parent import end_with_parent

log = logging.getLogger("image-classification")

MODEL_PREFIX = "image-classification"
RECORDIO = "application/x-recordio"
THRESHOLD = 0.5
PROGRESS_SECONDS = 10.0
MAX_POS_WEIGHT = 100.0


class ClientError(Exception):
    """The job's configuration is wrong (SageMaker's `ClientError:` failures)."""


class Stop(Exception):
    """SIGTERM arrived: stop training, keep what was learnt."""


# --- job folder ------------------------------------------------------------------------------------------------


def read_config(job: Path) -> tuple[Hyperparameters, dict]:
    config = job / "input" / "config"
    try:
        raw = json.loads((config / "hyperparameters.json").read_text())
    except FileNotFoundError:
        raw = {}
    except json.JSONDecodeError as err:
        raise ClientError(f"{config / 'hyperparameters.json'}: not valid JSON ({err})") from None
    try:
        hp = parse(raw)
    except HyperparameterError as err:
        raise ClientError(str(err)) from None
    try:
        channels = json.loads((config / "inputdataconfig.json").read_text())
    except FileNotFoundError:
        channels = {}
    for name in ("train", "validation"):
        if name not in channels:
            raise ClientError(
                f"the job has no {name!r} channel (channels: {', '.join(channels) or 'none'}); "
                "image classification needs 'train' and 'validation'"
            )
        content_type = channels[name].get("ContentType", RECORDIO)
        if content_type != RECORDIO:
            raise ClientError(
                f"channel {name!r}: ContentType {content_type!r} is not supported locally; expected {RECORDIO}"
            )
    extra = sorted(set(channels) - {"train", "validation"})
    if extra:
        raise ClientError(f"unexpected channel(s) {', '.join(extra)}: expected only 'train' and 'validation'")
    return hp, channels


def check_data(hp: Hyperparameters, train: Channel, val: Channel) -> None:
    """num_classes and num_training_samples must describe the .rec data: say both numbers when they don't."""
    width = hp.num_classes if hp.multi_label else 1
    for channel in (train, val):
        if channel.label_width != width:
            if hp.multi_label:
                raise ClientError(
                    f"num_classes={hp.num_classes} does not match the data: the records in {channel.name} channel "
                    f"file {channel.rec.name} carry {channel.label_width} labels each (multi_label=1 needs one label "
                    f"per class)"
                )
            raise ClientError(
                f"multi_label=0 expects one class index per record, but the records in {channel.name} channel file "
                f"{channel.rec.name} carry {channel.label_width} labels each; set multi_label=1 and "
                f"num_classes={channel.label_width}"
            )
        values = channel.labels
        if hp.multi_label:
            bad = ~np.isin(values, (0.0, 1.0))
            if bad.any():
                row = int(np.argwhere(bad)[0][0])
                raise ClientError(f"{channel.name} channel record {row}: multi-label labels must be 0 or 1")
        elif (values < 0).any() or (values >= hp.num_classes).any() or (values != np.round(values)).any():
            top = int(values.max())
            raise ClientError(
                f"num_classes={hp.num_classes} does not match the data: {channel.name} channel file "
                f"{channel.rec.name} has class index {top} (expected integers 0..{hp.num_classes - 1})"
            )
    if train.count != hp.num_training_samples:
        raise ClientError(
            f"num_training_samples={hp.num_training_samples} does not match the data: train channel file "
            f"{train.rec.name} holds {train.count} records"
        )


# --- metrics ---------------------------------------------------------------------------------------------------


def multiclass_metrics(prob: np.ndarray, truth: np.ndarray, top_k: int | None) -> dict[str, object]:
    labels = truth.astype(int).reshape(-1)
    out: dict[str, object] = {"accuracy": float((prob.argmax(1) == labels).mean())}
    if top_k:
        top = np.argsort(-prob, axis=1)[:, :top_k]
        out[f"top_k_accuracy_{top_k}"] = float((top == labels[:, None]).any(1).mean())
    return out


def batch_accuracy(prob: np.ndarray, truth: np.ndarray, multi_label: bool) -> tuple[float, int]:
    """(sum of correct decisions, number of decisions) for a running training accuracy."""
    if multi_label:
        return float(((prob >= THRESHOLD) == (truth > 0.5)).sum()), truth.size
    return float((prob.argmax(1) == truth.astype(int).reshape(-1)).sum()), len(truth)


# --- training --------------------------------------------------------------------------------------------------


def make_iters(hp: Hyperparameters, train: Channel, val: Channel, threads: int):
    import mxnet as mx

    width = hp.num_classes if hp.multi_label else 1
    common = {
        "data_shape": hp.image_shape,
        "batch_size": hp.mini_batch_size,
        "label_width": width,
        "preprocess_threads": threads,
        "prefetch_buffer": 4,
    }
    if hp.resize:
        common["resize"] = hp.resize
    aug: dict[str, object] = {}
    if hp.augmentation_type:
        aug.update(rand_crop=True, rand_mirror=True, pad=hp.image_shape[1] // 12, fill_value=127)
    if hp.augmentation_type in ("crop_color", "crop_color_transform"):
        aug.update(random_h=36, random_s=50, random_l=50)
    if hp.augmentation_type == "crop_color_transform":
        aug.update(max_rotate_angle=10, max_shear_ratio=0.1, max_aspect_ratio=0.25)
    train_iter = mx.io.ImageRecordIter(
        path_imgrec=str(train.rec),
        **({"path_imgidx": str(train.idx)} if train.idx else {}),
        shuffle=True,
        seed=int(time.time()) % 100_000,
        **common,
        **aug,
    )

    def val_iter():
        # A fresh iterator per evaluation: a reused one starts its next pass where the last batch's wrap-around
        # ended, and with round_batch=False it reports no padding on a short last batch.
        return mx.io.ImageRecordIter(path_imgrec=str(val.rec), shuffle=False, **common)

    return train_iter, val_iter


def make_optimizer(hp: Hyperparameters, batches_per_epoch: int):
    import mxnet as mx

    scheduler = None
    if hp.lr_scheduler_step:
        steps = [max(1, s * batches_per_epoch) for s in hp.lr_scheduler_step]
        scheduler = mx.lr_scheduler.MultiFactorScheduler(
            step=steps, factor=hp.lr_scheduler_factor, base_lr=hp.learning_rate
        )
    params: dict[str, object] = {"learning_rate": hp.learning_rate, "rescale_grad": 1.0 / hp.mini_batch_size}
    if scheduler is not None:
        params["lr_scheduler"] = scheduler
    if hp.optimizer in ("sgd", "nag"):
        params.update(momentum=hp.momentum, wd=hp.weight_decay)
    elif hp.optimizer == "adam":
        params.update(beta1=hp.beta_1, beta2=hp.beta_2, epsilon=hp.eps)
    else:
        params.update(gamma1=hp.gamma, epsilon=hp.eps)
    return hp.optimizer, params


def positive_weights(hp: Hyperparameters, train: Channel) -> np.ndarray:
    """Per-label weight of the positive term: negatives / positives (clipped to [1/100, 100]), or ones."""
    width = hp.num_classes
    if not (hp.multi_label and hp.use_weighted_loss):
        return np.ones((1, width), np.float32)
    positives = train.labels.sum(0)
    negatives = train.count - positives
    weights = np.clip(negatives / np.maximum(positives, 1), 1 / MAX_POS_WEIGHT, MAX_POS_WEIGHT)
    return weights.reshape(1, width).astype(np.float32)


def evaluate(module, val_iter, hp: Hyperparameters, count: int) -> tuple[dict[str, object], np.ndarray]:
    """Validation metrics over exactly the `count` records of the validation channel, in file order."""
    probs, truths = [], []
    for batch in val_iter():
        module.forward(batch, is_train=False)
        keep = batch.data[0].shape[0] - (batch.pad or 0)
        probs.append(module.get_outputs()[0].asnumpy()[:keep])
        truths.append(batch.label[0].asnumpy()[:keep])
    prob, truth = np.concatenate(probs), np.concatenate(truths)
    if len(prob) != count:
        raise RuntimeError(f"validation pass read {len(prob)} records, expected {count}")
    metrics = multilabel_metrics(prob, truth) if hp.multi_label else multiclass_metrics(prob, truth, hp.top_k)
    return metrics, prob


def save_params(module, path: Path, inference_args: set[str]) -> None:
    import mxnet as mx

    args, auxs = module.get_params()
    saved = {f"arg:{k}": v for k, v in args.items() if k in inference_args}
    saved.update({f"aux:{k}": v for k, v in auxs.items()})
    tmp = path.with_name(f".{path.name}.part")  # whole or absent, even if the job is killed mid-save
    mx.nd.save(str(tmp), saved)
    os.replace(tmp, path)


def copy_params(module) -> tuple[dict, dict]:
    args, auxs = module.get_params()
    return {k: v.copy() for k, v in args.items()}, {k: v.copy() for k, v in auxs.items()}


def train(job: Path, hp: Hyperparameters, train_ch: Channel, val_ch: Channel, stop: dict[str, bool]) -> dict:
    """Train for hp.epochs (or until early stopping or a stop request), keep the best epoch by the selection metric,
    and write the model folder in the built-in's layout plus metrics.json; returns metrics.json's content."""
    model_dir, out_dir = job / "model", job / "output" / "data"
    model_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = max(1, min(4, os.cpu_count() or 1))
    train_iter, val_iter = make_iters(hp, train_ch, val_ch, threads)
    multi = bool(hp.multi_label)
    module, batches_per_epoch = build_module(hp, train_ch, train_iter)
    infer_args = set(inference_network(hp).list_arguments())

    history: list[dict[str, object]] = []
    selected_by = selection_metric(hp, val_ch)
    log.info("the saved model will be the epoch with the best validation %s", selected_by)
    best: dict[str, object] = {"value": -math.inf, "epoch": None, "params": None, "metrics": None}
    checkpoints: dict[str, int] = {}  # params file name → the epoch (as logged) whose weights it holds
    progress = Progress(total_batches=batches_per_epoch * hp.epochs, per_epoch=batches_per_epoch)
    stall = 0
    stopped_early = interrupted = False
    for epoch in range(hp.epochs):
        tic = time.time()
        try:
            train_acc = train_epoch(module, train_iter, epoch, multi, progress, stop)
        except Stop:
            interrupted = True
            log.info("Stop requested (SIGTERM) in epoch %d: saving the best model so far", epoch)
            break
        log.info("Epoch[%d] Train-accuracy=%f", epoch, train_acc)
        log.info("Epoch[%d] Time cost=%.3f", epoch, time.time() - tic)
        metrics = validate_epoch(module, val_iter, hp, val_ch, epoch)
        history.append(
            {"epoch": epoch, "train_accuracy": train_acc, "time": round(time.time() - tic, 3)}
            | {f"validation_{k}": v for k, v in metrics.items() if not isinstance(v, list)}
        )
        value, previous = float(metrics[selected_by]), float(best["value"])  # type: ignore[arg-type]
        improved = value > previous and (previous <= 0 or (value - previous) / previous > hp.early_stopping_tolerance)
        if value > previous:
            best = {"value": value, "epoch": epoch, "params": copy_params(module), "metrics": metrics}
            log.info("Storing the best model with validation %s: %f", selected_by, value)
        stall = 0 if improved else stall + 1
        if hp.checkpoint_frequency and (epoch + 1) % hp.checkpoint_frequency == 0:
            name = params_file(epoch)
            save_params(module, model_dir / name, infer_args)
            checkpoints[name] = epoch
            log.info('Saved checkpoint to "%s"', model_dir / name)
        if hp.early_stopping and epoch + 1 >= hp.early_stopping_min_epochs and stall >= hp.early_stopping_patience:
            log.info("Early stopping criteria met: no improvement above tolerance for %d epochs", stall)
            stopped_early = True
            break

    if best["params"] is None:
        if interrupted:
            return {"interrupted": True, "epochs_completed": 0}
        raise RuntimeError("no epoch completed")
    module.set_params(*best["params"])  # type: ignore[misc]
    best_epoch = int(best["epoch"])  # type: ignore[arg-type]
    # The saved model is the best epoch's, not necessarily the last: log its validation metrics on lines of their
    # own (the per-epoch lines stay one per epoch), so a deploy gate can judge the model in model.tar.gz.
    for name, value in best["metrics"].items():  # type: ignore[union-attr]
        if not isinstance(value, list):
            log.info("Saved-model (epoch %d) Validation-%s=%f", best_epoch, name, value)
    params_name = save_model(module, hp, model_dir, best_epoch, infer_args)
    summary = {
        "algorithm": f"image-classification (local, MXNet {mxnet_version()})",
        "multi_label": hp.multi_label,
        "accuracy_definition": (
            "fraction of (image, label) decisions that are right at probability >= 0.5"
            if multi
            else "fraction of images whose highest-probability class is the true class"
        ),
        "num_classes": hp.num_classes,
        "num_layers": hp.num_layers,
        "image_shape": list(hp.image_shape),
        "train_records": train_ch.count,
        "validation_records": val_ch.count,
        "selected_by": f"validation:{selected_by}",
        "best_epoch": best_epoch,
        "params_file": params_name,
        "checkpoints": sorted(set(checkpoints) | {params_name}),
        "checkpoint_epochs": dict(sorted({**checkpoints, params_name: best_epoch}.items())),
        "label_names": label_names(job / "input" / "data" / "train", hp.num_classes),
        "stopped_early": stopped_early,
        "interrupted": interrupted,
        "validation": best["metrics"],
        "history": history,
        "hyperparameters": {k: list(v) if isinstance(v, tuple) else v for k, v in hp.to_dict().items()},
        "ignored_hyperparameters": list(hp.ignored),
        "seconds": round(time.time() - progress.started, 3),
    }
    text = json.dumps(summary, indent=2)
    (model_dir / "metrics.json").write_text(text)
    (out_dir / "metrics.json").write_text(text)
    draw_curve(history, out_dir / "training-curve.png", multi, best_epoch)
    return summary


def mxnet_version() -> str:
    import mxnet as mx

    return mx.__version__


def inference_network(hp: Hyperparameters):
    """The inference symbol saved with the model (the training symbol without its loss)."""
    from ic_model import inference_symbol

    return inference_symbol(hp.num_layers, hp.num_classes, bool(hp.multi_label))


def build_module(hp: Hyperparameters, train_ch: Channel, train_iter):
    """The training module bound to the iterator's shapes, initialised, with its optimizer; (module, batches per
    epoch). Multi-label: the loss's per-label positive weights come from the training labels (kept fixed)."""
    import mxnet as mx
    from ic_model import training_symbol

    multi = bool(hp.multi_label)
    symbol = training_symbol(hp.num_layers, hp.num_classes, multi)
    fixed = ["pos_weight"] if multi else None
    module = mx.mod.Module(symbol, data_names=["data"], label_names=["softmax_label"], context=mx.cpu(),
                           fixed_param_names=fixed)  # fmt: skip
    module.bind(data_shapes=train_iter.provide_data, label_shapes=train_iter.provide_label, for_training=True)
    module.init_params(mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2))
    if multi:
        args, auxs = module.get_params()
        args["pos_weight"] = mx.nd.array(positive_weights(hp, train_ch))
        module.set_params(args, auxs)
    batches_per_epoch = math.ceil(train_ch.count / hp.mini_batch_size)
    opt, opt_params = make_optimizer(hp, batches_per_epoch)
    module.init_optimizer(optimizer=opt, optimizer_params=opt_params)
    return module, batches_per_epoch


class Progress:
    """Batches done over the whole job, for the progress lines' ETA."""

    def __init__(self, total_batches: int, per_epoch: int) -> None:
        self.total, self.per_epoch, self.done, self.started = total_batches, per_epoch, 0, time.time()

    def eta(self) -> float:
        return (time.time() - self.started) / max(self.done, 1) * max(self.total - self.done, 0)


def train_epoch(module, train_iter, epoch: int, multi: bool, progress: Progress, stop: dict[str, bool]) -> float:
    """One pass over the training data, a progress line every PROGRESS_SECONDS and at the end; its training
    accuracy. Raises Stop when a stop was requested."""
    tic = last_log = time.time()
    train_iter.reset()
    correct = count = 0.0
    seen = nbatch = logged = 0

    def report() -> None:
        speed = seen / max(time.time() - tic, 1e-9)
        log_progress(epoch, nbatch, progress.per_epoch, speed, correct / max(count, 1), progress.eta())

    for nbatch, batch in enumerate(train_iter, 1):
        if stop["now"]:
            raise Stop
        module.forward_backward(batch)
        module.update()
        keep = batch.data[0].shape[0] - (batch.pad or 0)
        c, n = batch_accuracy(module.get_outputs()[0].asnumpy()[:keep], batch.label[0].asnumpy()[:keep], multi)
        correct, count, seen = correct + c, count + n, seen + keep
        progress.done += 1
        if time.time() - last_log >= PROGRESS_SECONDS:
            report()
            last_log, logged = time.time(), nbatch
    if logged != nbatch:
        report()
    return correct / max(count, 1)


def validate_epoch(module, val_iter, hp: Hyperparameters, val_ch: Channel, epoch: int) -> dict[str, object]:
    """The epoch's validation metrics, logged one per line as the built-in does (accuracy first)."""
    metrics, _ = evaluate(module, val_iter, hp, val_ch.count)
    log.info("Epoch[%d] Validation-accuracy=%f", epoch, float(metrics["accuracy"]))  # type: ignore[arg-type]
    names = ("mAP", "micro_f1", "macro_f1") if hp.multi_label else tuple(k for k in metrics if k != "accuracy")
    for name in names:
        log.info("Epoch[%d] Validation-%s=%f", epoch, name, metrics[name])
    return metrics


def save_model(module, hp: Hyperparameters, model_dir: Path, epoch: int, infer_args: set[str]) -> str:
    """The module's current weights as `epoch`'s params file, the inference symbol and model-shapes.json, in the
    built-in's layout; the params file's name."""
    name = params_file(epoch)
    save_params(module, model_dir / name, infer_args)
    inference_network(hp).save(str(model_dir / f"{MODEL_PREFIX}-symbol.json"))
    shapes = [{"name": "data", "shape": [hp.mini_batch_size, *hp.image_shape]}]
    (model_dir / "model-shapes.json").write_text(json.dumps(shapes))
    return name


def params_file(epoch: int) -> str:
    """The params file of the epoch logged as `Epoch[epoch]`: numbered epoch + 1 (epochs completed), as MXNet's
    `do_checkpoint` numbers the built-in's files."""
    return f"{MODEL_PREFIX}-{epoch + 1:04d}.params"


def selection_metric(hp: Hyperparameters, val: Channel) -> str:
    """What picks the saved epoch: mAP for multi-label jobs whose validation split has a positive label (accuracy
    cannot see a model that predicts nothing), accuracy otherwise (multi-class jobs, as the built-in)."""
    if hp.multi_label and val.count and float(val.labels.sum()) > 0:
        return "mAP"
    return "accuracy"


def label_names(channel_dir: Path, num_classes: int) -> list[str] | None:
    """The label names of a tagflow dataset manifest (`manifest.json`) staged with the train channel, if it holds
    `num_classes` of them: a train channel whose S3 prefix is the dataset's `training/` folder brings it along."""
    path = channel_dir / "manifest.json"
    try:
        names = json.loads(path.read_text()).get("label_names")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names):
        return names
    if names is not None:
        log.warning("%s: label_names is not a list of %d names; not recorded", path, num_classes)
    return None


def log_progress(epoch: int, nbatch: int, per_epoch: int, speed: float, accuracy: float, eta_s: float) -> None:
    log.info(
        "Epoch[%d] Batch [%d/%d]\tSpeed: %.2f samples/sec\taccuracy=%f\tETA: %s",
        epoch, nbatch, per_epoch, speed, accuracy, _clock(eta_s),
    )  # fmt: skip


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def draw_curve(history: list[dict[str, object]], path: Path, multi: bool, saved_epoch: int | None = None) -> None:
    """A small accuracy-per-epoch chart drawn with OpenCV (matplotlib is not in the algorithm environment). Epochs
    are numbered as the log's `Epoch[E]`; a dashed line marks the saved epoch."""
    import cv2

    width, height, margin = 640, 400, 50
    img = np.full((height, width, 3), 255, np.uint8)
    x0, y0, x1, y1 = margin, height - margin, width - 20, 30
    cv2.rectangle(img, (x0, y1), (x1, y0), (0, 0, 0), 1)
    for tick in range(0, 11, 2):
        y = int(y0 - (y0 - y1) * tick / 10)
        cv2.line(img, (x0 - 4, y), (x0, y), (0, 0, 0), 1)
        cv2.putText(img, f"{tick / 10:.1f}", (5, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    epochs = [int(h["epoch"]) for h in history]  # type: ignore[arg-type]
    span = max(max(epochs, default=0), 1)
    series = [("train_accuracy", (200, 120, 0)), ("validation_accuracy", (0, 0, 220))]
    if multi:
        series.append(("validation_mAP", (0, 150, 0)))
    for i, (key, color) in enumerate(series):
        points = [
            (int(x0 + (x1 - x0) * int(h["epoch"]) / span), int(y0 - (y0 - y1) * float(h[key])))  # type: ignore[arg-type]
            for h in history
            if key in h
        ]
        for a, b in itertools.pairwise(points):
            cv2.line(img, a, b, color, 2, cv2.LINE_AA)
        for p in points:
            cv2.circle(img, p, 3, color, -1, cv2.LINE_AA)
        cv2.putText(img, key, (x0 + 10 + 190 * i, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1, cv2.LINE_AA)
    if saved_epoch is not None:
        x = int(x0 + (x1 - x0) * saved_epoch / span)
        for y in range(y1, y0, 8):
            cv2.line(img, (x, y), (x, min(y + 4, y0)), (90, 90, 90), 1)
        cv2.putText(img, f"saved: epoch {saved_epoch}", (min(x + 4, x1 - 110), y1 + 14), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4, (90, 90, 90), 1, cv2.LINE_AA)  # fmt: skip
    cv2.putText(img, f"epoch as logged, Epoch[0..{span}]", (width // 2 - 90, height - 15), cv2.FONT_HERSHEY_SIMPLEX,
                0.45, (0, 0, 0), 1)  # fmt: skip
    cv2.imwrite(str(path), img)


# --- entry point -----------------------------------------------------------------------------------------------


def write_failure(job: Path, reason: str) -> None:
    failure = job / "output" / "failure"
    failure.parent.mkdir(parents=True, exist_ok=True)
    failure.write_text(" ".join(reason.split()) + "\n")


def run(job: Path, stop: dict[str, bool]) -> int:
    hp, _ = read_config(job)
    for item in hp.ignored:
        log.warning("hyperparameter %s is accepted but has no effect in the local algorithm", item)
    data = job / "input" / "data"
    try:
        train_ch, val_ch = scan(data / "train", "train"), scan(data / "validation", "validation")
    except DataError as err:
        raise ClientError(str(err)) from None
    check_data(hp, train_ch, val_ch)
    log.info(
        "training ResNet-%d on %d images (%d validation), %d labels, multi_label=%d, image_shape=%s, %d epochs",
        hp.num_layers, train_ch.count, val_ch.count, hp.num_classes, hp.multi_label,
        ",".join(map(str, hp.image_shape)), hp.epochs,
    )  # fmt: skip
    summary = train(job, hp, train_ch, val_ch, stop)
    return 143 if summary.get("interrupted") else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job-dir", type=Path, default=Path("/opt/ml"), help="the job folder (SageMaker: /opt/ml)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="[%(asctime)s %(levelname)s %(thread)d] %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
    )
    stop = {"now": False}

    def on_term(signum, frame) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_term)
    if not end_with_parent():
        return 1
    job = args.job_dir.resolve()
    try:
        return run(job, stop)
    except ClientError as err:
        log.error("ClientError: %s", err)
        write_failure(job, f"ClientError: {err}")
    except Exception as err:
        log.error("AlgorithmError: %s\n%s", err, traceback.format_exc())
        write_failure(job, f"AlgorithmError: {type(err).__name__}: {err}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
