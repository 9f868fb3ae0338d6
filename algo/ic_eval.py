"""Score a validation split with one image-classification model, in batches (runs in the MXNet algorithm environment).

    .venv-mxnet/bin/python algo/ic_eval.py --model-dir DIR --rec val.rec --idx val.idx \
        --label-frequency FREQ.json [--batch-size 64] --out OUT

`--model-dir` is an extracted model.tar.gz in the built-in's layout (as ic_serve.py loads it):
`image-classification-symbol.json`, the params file metrics.json names as `params_file` (else the highest-numbered
`image-classification-NNNN.params`), `model-shapes.json` and, from the local trainer, `metrics.json`.
`--label-frequency` is a JSON list: each label's frequency in the training split (the caller's label-frequency
baseline); checked here against the model's outputs, so a mismatch fails before any image is decoded.

The images reach the net exactly as the trainer's validation iterator feeds them (ic_train.make_iters): an
`ImageRecordIter` over the .rec in file order with the model's data shape, its `resize` hyperparameter when the
trainer recorded one, no augmentation; the padding of the last batch is dropped. Image IDs come from the .idx (its
keys in offset order, which is the file order).

Writes to `--out`: `model.json` (outputs, params file, image shape, label names if metrics.json has them) first,
then `scores.npy` (images, labels) float32, `labels.npy` uint8, `ids.npy` int64 and `timing.json` (images, wall
and CPU seconds of the scoring alone). The metrics are the caller's: tagflow.evaluate computes them from these
scores with ic_metrics (computing them here as well cost 4 s CPU on the seed's 15,500 x 334 split, unread).
Exit status 2 with `ClientError: ...` on stderr when the model and the records do not fit together (a different
number of labels: model.json is written, so the caller can say both), 1 for other failures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ic_artifacts import MODEL_MEMBERS, MODEL_PREFIX, params_file
from ic_data import DataError, scan
from ic_parent import end_with_parent

log = logging.getLogger("ic-eval")


class ClientError(Exception):
    """The model, the records or the arguments do not fit together; the message says how."""


def read_ids(idx: Path) -> np.ndarray:
    """The image IDs of the .idx in record order (its lines sorted by offset)."""
    rows = []
    for number, line in enumerate(idx.read_text().splitlines(), 1):
        if line.strip():
            try:
                key, offset = line.split("\t")
                rows.append((int(offset), int(key)))
            except ValueError:
                raise ClientError(f"{idx}:{number}: expected 'ID<TAB>OFFSET', found {line[:80]!r}") from None
    return np.array([key for _, key in sorted(rows)], np.int64)


class Scorer:
    """The model bound once for `batch_size` images."""

    def __init__(self, model_dir: Path, batch_size: int) -> None:
        import mxnet as mx

        for member in MODEL_MEMBERS:
            if not (model_dir / member).is_file():
                raise ClientError(f"{model_dir}: no {member}; expected an image-classification model.tar.gz")
        metrics_path = model_dir / "metrics.json"
        self.metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        shapes = json.loads((model_dir / "model-shapes.json").read_text())
        data = next((s for s in shapes if s.get("name") == "data"), None)
        if data is None or len(data.get("shape", [])) != 4:
            raise ClientError(f"{model_dir / 'model-shapes.json'}: expected a 'data' entry with shape [B, C, H, W]")
        self.image_shape = tuple(int(v) for v in data["shape"][1:])
        resize = (self.metrics.get("hyperparameters") or {}).get("resize")
        self.resize = int(resize) if resize else None
        try:
            self.params_file = params_file(model_dir, self.metrics)
        except FileNotFoundError as err:
            raise ClientError(f"{err} (is this an image-classification model?)") from None
        symbol = mx.sym.load(str(model_dir / f"{MODEL_PREFIX}-symbol.json"))
        loaded = mx.nd.load(str(self.params_file))
        args = {k[4:]: v for k, v in loaded.items() if k.startswith("arg:")}
        auxs = {k[4:]: v for k, v in loaded.items() if k.startswith("aux:")}
        missing = [n for n in symbol.list_arguments() if n not in args and n not in ("data", "softmax_label")]
        if missing:
            raise ClientError(f"{self.params_file}: no values for {', '.join(missing[:5])}")
        self.batch_size = batch_size
        self.executor = symbol.simple_bind(mx.cpu(), grad_req="null", data=(batch_size, *self.image_shape))
        self.executor.copy_params_from(args, auxs, allow_extra_params=True)
        self.num_outputs = int(self.executor.outputs[0].shape[1])

    def describe(self) -> dict:
        names = self.metrics.get("label_names")
        return {
            "num_outputs": self.num_outputs,
            "params_file": self.params_file.name,
            "image_shape": list(self.image_shape),
            "resize": self.resize,
            "label_names": names if isinstance(names, list) else None,
            "multi_label": self.metrics.get("multi_label"),
        }

    def batches(self, rec: Path, threads: int):
        """The trainer's validation iterator over `rec`: batches in file order, the last one padded (`batch.pad`)."""
        import mxnet as mx

        common: dict[str, object] = {
            "data_shape": self.image_shape,
            "batch_size": self.batch_size,
            "label_width": self.num_outputs,
            "preprocess_threads": threads,
            "prefetch_buffer": 4,
        }
        if self.resize:
            common["resize"] = self.resize
        return mx.io.ImageRecordIter(path_imgrec=str(rec), shuffle=False, **common)

    def forward(self, data) -> np.ndarray:
        """The model's outputs for one batch of pixels (an NDArray of the bound shape)."""
        self.executor.arg_dict["data"][:] = data
        self.executor.forward(is_train=False)
        return self.executor.outputs[0].asnumpy()

    def score(self, rec: Path, threads: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, labels) of every record of `rec`, in file order, through the trainer's validation iterator."""
        scores, labels = [], []
        for batch in self.batches(rec, threads):
            keep = batch.data[0].shape[0] - (batch.pad or 0)
            scores.append(self.forward(batch.data[0])[:keep])
            labels.append(batch.label[0].asnumpy()[:keep])
        return np.concatenate(scores).astype(np.float32), np.concatenate(labels).astype(np.uint8)


def run(args: argparse.Namespace) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    scorer = Scorer(args.model_dir, args.batch_size)
    (out / "model.json").write_text(json.dumps(scorer.describe(), indent=1))
    if not args.rec.is_file():
        raise ClientError(f"{args.rec}: no such .rec file")
    try:
        channel = scan(args.rec.parent, "validation")  # the record headers: count and labels, before any decoding
    except DataError as err:
        raise ClientError(f"{err} (--rec must be the only .rec file in its folder)") from None
    if channel.label_width != scorer.num_outputs:
        raise ClientError(
            f"the model has {scorer.num_outputs} outputs but the records in {args.rec.name} carry "
            f"{channel.label_width} labels each"
        )
    ids = read_ids(args.idx)
    if len(ids) != channel.count:
        raise ClientError(f"{args.idx} lists {len(ids)} records, {args.rec.name} holds {channel.count}")
    try:
        frequency = np.asarray(json.loads(args.label_frequency.read_text()), np.float64)
    except (OSError, ValueError) as err:
        raise ClientError(f"{args.label_frequency}: not a readable JSON list of label frequencies ({err})") from None
    if frequency.shape != (scorer.num_outputs,):
        raise ClientError(f"{args.label_frequency}: {frequency.size} frequencies for {scorer.num_outputs} labels")
    started, cpu = time.perf_counter(), time.process_time()
    threads = max(1, min(4, len(os.sched_getaffinity(0))))
    scores, labels = scorer.score(args.rec, threads)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    if len(scores) != channel.count or not np.array_equal(labels, channel.labels > 0.5):
        raise RuntimeError(f"the record iterator read {len(scores)} records of {channel.count}, or other labels")
    log.info("scored %d images in %.1f s (%.1f images/s)", len(scores), seconds, len(scores) / max(seconds, 1e-9))
    np.save(out / "scores.npy", scores)
    np.save(out / "labels.npy", labels)
    np.save(out / "ids.npy", ids)
    timing = {"images": len(scores), "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3)}
    (out / "timing.json").write_text(json.dumps(timing))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--rec", type=Path, required=True)
    parser.add_argument("--idx", type=Path, required=True)
    parser.add_argument("--label-frequency", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[%(asctime)s %(levelname)s] %(message)s")
    if not end_with_parent():
        return 1
    if args.batch_size < 1:
        print("ClientError: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        run(args)
    except ClientError as err:
        print(f"ClientError: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
