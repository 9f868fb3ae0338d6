"""manifest.json: what a packed dataset contains and how it was made.

Written beside train.rec/val.rec and uploaded last. Training reads `counts.train` for `num_training_samples` and
`num_labels` for `num_classes`, so those never come from a form or a notebook constant. `warnings` counts what the
list holds that is valid but probably a mistake (`tagflow.listfile.list_warnings`): images without a label, labels
no image carries, paths listed under several IDs; all zero for a clean list. `split` says how images were given
their side: `by` `image_id` (a hash of the ID), `group_regex` (with `group_regex`) or `group_file` (with
`group_file`'s name and sha256), the `train_ratio`, and with a group key how many groups went to each side.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tagflow import __version__
from tagflow.listfile import list_warnings
from tagflow.local import REPO
from tagflow.recordio import read_index
from tagflow.shards import SPLIT_BY_ID

if TYPE_CHECKING:
    from tagflow.listfile import ListFile
    from tagflow.packparams import PackParams

FORMAT_VERSION = 1


def code_revision() -> str:
    """The git commit of this checkout (`-dirty` if modified), else TAGFLOW_REVISION, else the package version."""
    if rev := os.environ.get("TAGFLOW_REVISION"):
        return rev
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"tagflow-{__version__}"
    return f"{head}-dirty" if dirty else head


def build(
    out_dir: Path,
    *,
    listfile: ListFile,
    label_names: list[str],
    pack_params: PackParams,
    errors: list[dict[str, str]],
    split: dict[str, Any] | None = None,
    list_name: str | None = None,
    list_sha256: str | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """Describe the packed files in `out_dir` and write `out_dir/manifest.json`; returns the document.

    `list_name`/`list_sha256` name the list file as the user gave it (default: `listfile`'s own). `split` is how
    the sides were decided (`tagflow.shards.SplitPlan.record`; default: by image ID at the pack's train ratio).
    """
    row_of = {int(image_id): row for row, image_id in enumerate(listfile.ids)}
    counts: dict[str, int] = {}
    label_counts: dict[str, dict[str, int]] = {}
    for side in ("train", "val"):
        keys = list(read_index(out_dir / f"{side}.idx"))
        counts[side] = len(keys)
        rows = [row_of[int(k)] for k in keys]
        per_label = listfile.labels[rows].sum(axis=0) if rows else np.zeros(len(label_names), dtype=np.int64)
        label_counts[side] = {name: int(c) for name, c in zip(label_names, per_label, strict=True)}
    doc = {
        "format_version": FORMAT_VERSION,
        "counts": {**counts, "skipped": len(errors), "listed": len(listfile)},
        "num_labels": len(label_names),
        "label_names": label_names,
        "label_counts": label_counts,
        "list_file": {"name": list_name or listfile.name, "sha256": list_sha256 or listfile.sha256},
        "warnings": list_warnings(listfile, label_names).counts(),
        "pack_params": pack_params.to_dict(),
        "split": split or {"by": SPLIT_BY_ID, "train_ratio": pack_params.train_ratio},
        "files": {
            side: {
                "rec": f"{side}.rec",
                "idx": f"{side}.idx",
                "bytes": (out_dir / f"{side}.rec").stat().st_size,
            }
            for side in ("train", "val")
        },
        "skipped": errors,
        "code_revision": revision or code_revision(),
    }
    tmp = out_dir / ".manifest.json.part"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out_dir / "manifest.json")
    return doc
