"""What an image-classification model.tar.gz holds, as SageMaker's built-in algorithm and ic_train.py write it:
`image-classification-symbol.json`, one or more `image-classification-NNNN.params`, `model-shapes.json`, and from
the local trainer `metrics.json` (which names the params file it saved as `params_file`). Shared by the endpoint
(ic_serve) and the evaluation (ic_eval); runs in the algorithm environment, where tagflow is not importable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

MODEL_PREFIX = "image-classification"
MODEL_MEMBERS = (f"{MODEL_PREFIX}-symbol.json", "model-shapes.json")


def params_file(model_dir: Path, metrics: dict) -> Path:
    """The params file to load: the one metrics.json names, else the highest-numbered (the built-in keeps the best
    epoch's, and with checkpoint_frequency every checkpoint). FileNotFoundError saying which is missing."""
    named = metrics.get("params_file")
    if named:
        path = model_dir / named
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir / 'metrics.json'} names params_file {named!r}, which is missing")
        return path
    found = sorted(model_dir.glob(f"{MODEL_PREFIX}-[0-9][0-9][0-9][0-9].params"))
    if not found:
        raise FileNotFoundError(f"{model_dir}: no {MODEL_PREFIX}-NNNN.params file")
    return found[-1]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
