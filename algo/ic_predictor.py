"""One loaded image-classification model answering single images as the built-in's endpoint does: the header
checked against the pixel limit before decoding, preprocessing as the trainer's record iterator feeds the net, a
forward on one of the model's executors, the labels answer from thresholds chosen for this archive, /metadata.
See ic_serve's docstring for the contract (limits, preprocessing, thresholds).
"""

from __future__ import annotations

import io
import json
import os
import queue
import threading
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path

import numpy as np
from ic_artifacts import MODEL_PREFIX, params_file
from ic_errors import RequestError

# cv2 is imported where it is used, after ic_serve.main() has set OPENCV_IO_MAX_IMAGE_PIXELS (read once, at import).

DEFAULT_MAX_PIXELS = 4096 * 4096
DECODE_SLOTS = len(os.sched_getaffinity(0))  # decoding is CPU-bound: more at once than cores only costs memory
_DECODING = threading.BoundedSemaphore(DECODE_SLOTS)


class Model:
    """One loaded network: an executor bound for a single image, plus what /metadata reports about it."""

    def __init__(
        self, model_dir: Path, source: str | None = None, workers: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        import mxnet as mx

        self.model_dir = model_dir.resolve()
        self.source = source or str(self.model_dir)
        metrics_path = model_dir / "metrics.json"
        self.metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        shapes = json.loads((model_dir / "model-shapes.json").read_text())
        data = next((s for s in shapes if s.get("name") == "data"), None)
        if data is None or len(data.get("shape", [])) != 4:
            raise ValueError(f"{model_dir / 'model-shapes.json'}: expected a 'data' entry with shape [B, C, H, W]")
        self.channels, self.height, self.width = (int(v) for v in data["shape"][1:])
        resize = (self.metrics.get("hyperparameters") or {}).get("resize")
        self.resize = int(resize) if resize else max(self.height, self.width)
        self.max_pixels = max_pixels
        self.params_file = params_file(model_dir, self.metrics)
        symbol = mx.sym.load(str(model_dir / f"{MODEL_PREFIX}-symbol.json"))
        loaded = mx.nd.load(str(self.params_file))
        args = {k[4:]: v for k, v in loaded.items() if k.startswith("arg:")}
        auxs = {k[4:]: v for k, v in loaded.items() if k.startswith("aux:")}
        shape = (1, self.channels, self.height, self.width)
        self._idle: queue.SimpleQueue = queue.SimpleQueue()  # executors not running a forward right now
        for _ in range(max(1, workers)):
            executor = symbol.simple_bind(mx.cpu(), grad_req="null", data=shape)
            executor.copy_params_from(args, auxs, allow_extra_params=True)
            self._idle.put(executor)
        missing = [n for n in symbol.list_arguments() if n not in args and n not in ("data", "softmax_label")]
        if missing:
            raise ValueError(f"{self.params_file}: no values for {', '.join(missing[:5])}")
        self.num_classes = int(executor.outputs[0].shape[1])
        self.workers = max(1, workers)
        self.loaded_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.sha256: str | None = None  # the archive's, set by Server.load
        self.thresholds: dict | None = None  # see attach_thresholds
        self.thresholds_problem: str | None = "no thresholds were given with this model"
        self.predict(np.zeros((self.channels, self.height, self.width), np.float32))  # warm up before serving

    def attach_thresholds(self, offered: dict | None, problem: str | None) -> None:
        """Keep the loader's per-label thresholds when they were chosen for this archive (its sha256) and number
        one per output; otherwise keep none and say why (`problem`: the loader's reason it sent none)."""
        if offered is None:
            problem = problem or self.thresholds_problem
        elif offered["model_sha256"] != self.sha256:
            problem = (
                f"{offered['evaluation']} describes the archive with sha256 {offered['model_sha256']}, but the one "
                f"fetched from {self.source} has sha256 {self.sha256} (it changed after the loader checked it)"
            )
        elif len(offered["thresholds"]) != self.num_classes:
            problem = (
                f"{offered['evaluation']} has {len(offered['thresholds'])} thresholds, but the model has "
                f"{self.num_classes} outputs"
            )
        else:
            problem = None
        self.thresholds, self.thresholds_problem = (offered if problem is None else None), problem

    def labels(self, probs: list[float]) -> dict:
        """The labels answer: the names of the labels whose probability is >= their threshold, and every
        probability (the built-in's array)."""
        assert self.thresholds is not None
        names, cuts = self.thresholds["label_names"], self.thresholds["thresholds"]
        return {"labels": [n for n, p, t in zip(names, probs, cuts, strict=True) if p >= t], "probabilities": probs}

    def _resized(self, w: int, h: int) -> tuple[int, int]:
        """The size an image of w x h is resized to before the centre crop (its shorter side to `resize`)."""
        scale = self.resize / min(h, w)
        return max(self.width, round(w * scale)), max(self.height, round(h * scale))

    def check_size(self, body: bytes) -> None:
        """Refuse (413) an image larger than `max_pixels`, or one whose resize would be (a 1-pixel-high strip),
        from its header alone; 400 when the header is no image's."""
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None  # Pillow's own bomb check (a warning, then an error at 2x) is this one's job
        try:
            with Image.open(io.BytesIO(body)) as img:  # reads the header only; decodes nothing
                w, h = img.size
        except Exception:  # any header Pillow cannot parse (its plugins raise many kinds): not an image for us
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body is not a decodable JPEG or PNG image") from None
        if w < 1 or h < 1:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the image is {w}x{h} pixels; expected at least 1x1")
        limit = f"the limit is {self.max_pixels} pixels (--max-pixels)"
        if w * h > self.max_pixels:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the image is {w}x{h} = {w * h} pixels; {limit}")
        rw, rh = self._resized(w, h)
        if rw * rh > self.max_pixels:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the image is {w}x{h} pixels, which the model resizes to {rw}x{rh} = {rw * rh} pixels; {limit}",
            )

    def preprocess(self, body: bytes) -> np.ndarray:
        """Image bytes → (C, H, W) float32 RGB pixels, as the trainer's record iterator produces them. The size is
        checked from the header first; at most DECODE_SLOTS images are decoded at once."""
        import cv2

        self.check_size(body)
        flag = cv2.IMREAD_GRAYSCALE if self.channels == 1 else cv2.IMREAD_COLOR
        with _DECODING:
            try:
                img = cv2.imdecode(np.frombuffer(body, np.uint8), flag)
            except cv2.error as err:  # OPENCV_IO_MAX_IMAGE_PIXELS is the second line behind check_size
                if "CV_IO_MAX_IMAGE_PIXELS" in str(err):
                    raise RequestError(
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"the image decodes to more than {self.max_pixels} pixels (--max-pixels)",
                    ) from None
                raise RequestError(HTTPStatus.BAD_REQUEST, "the body is not a decodable JPEG or PNG image") from None
            if img is None or img.size == 0:
                raise RequestError(HTTPStatus.BAD_REQUEST, "the body is not a decodable JPEG or PNG image")
            h, w = img.shape[:2]
            scale = self.resize / min(h, w)
            if scale != 1.0:
                img = cv2.resize(
                    img, self._resized(w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
                )
        h, w = img.shape[:2]
        top, left = (h - self.height) // 2, (w - self.width) // 2
        img = img[top : top + self.height, left : left + self.width]
        if self.channels == 1:
            return img[None].astype(np.float32)
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB).transpose(2, 0, 1).astype(np.float32)

    def predict(self, chw: np.ndarray) -> list[float]:
        executor = self._idle.get()  # blocks while every executor is busy: one forward per executor at a time
        try:
            executor.arg_dict["data"][:] = chw[None]
            executor.forward(is_train=False)
            return executor.outputs[0].asnumpy()[0].astype(float).tolist()
        finally:
            self._idle.put(executor)

    def describe(self) -> dict:
        """/metadata. A model without metrics.json (SageMaker's built-in writes none) gets explicit nulls for what
        only that file says (multi_label, the saved epoch, label names, metrics), never a guess."""
        known = bool(self.metrics)
        multi = self.metrics.get("multi_label")
        return {
            "model_dir": str(self.model_dir),
            "source": self.source,
            "params_file": self.params_file.name,
            "params_file_chosen_by": "metrics.json" if self.metrics.get("params_file") else "highest-numbered",
            "loaded_at": self.loaded_at,
            "num_classes": self.num_classes,
            "image_shape": [self.channels, self.height, self.width],
            "multi_label": None if multi is None else bool(multi),
            "saved_epoch": self.metrics.get("best_epoch"),
            "selected_by": self.metrics.get("selected_by"),
            "label_names": self.metrics.get("label_names"),
            "metrics": self.metrics if known else None,
            "sha256": self.sha256,
            "thresholds": self.thresholds,
            "thresholds_problem": self.thresholds_problem,
        }
