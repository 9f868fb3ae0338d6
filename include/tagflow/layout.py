"""Where a dataset's parts live below `s3://BUCKET/PREFIX`: the seed's layout, spelled once.

    PREFIX/training/train.rec, train.idx, manifest.json   what the algorithm's train channel reads, and the manifest
    PREFIX/validation/val.rec, val.idx                     the validation channel
    PREFIX/output/JOB/output/model.tar.gz                  a training job's model (SageMaker's output layout)
    PREFIX/output/JOB/evaluation/evaluation.json           its evaluation, with the report beside it
    PREFIX/staging/                                        the data plane's intermediate objects (tagflow.pipeline)
    PREFIX/evaluation-cache/                               scores and leakage checks, by digest (tagflow.evaluate)

A packed folder (`tagflow pack`) holds the same five files flat: `FILES` maps each name to its place.
"""

from __future__ import annotations

from dataclasses import dataclass

from tagflow.s3 import S3Uri

FILES = {  # a packed folder's file → (folder below PREFIX, name)
    "train.rec": ("training", "train.rec"),
    "train.idx": ("training", "train.idx"),
    "val.rec": ("validation", "val.rec"),
    "val.idx": ("validation", "val.idx"),
    "manifest.json": ("training", "manifest.json"),
}
MODEL_TAIL = ("output", "model.tar.gz")  # below PREFIX/output/JOB
EVALUATION_TAIL = ("evaluation", "evaluation.json")  # below PREFIX/output/JOB


@dataclass(frozen=True)
class DatasetLayout:
    """The named parts of one dataset's layout (see the module docstring)."""

    root: S3Uri

    @classmethod
    def of(cls, dataset_uri: str | S3Uri) -> DatasetLayout:
        root = dataset_uri if isinstance(dataset_uri, S3Uri) else S3Uri.parse(dataset_uri)
        return cls(S3Uri(root.bucket, root.key.strip("/")))

    def file(self, name: str) -> S3Uri:
        """One of `FILES` (train.rec, train.idx, val.rec, val.idx, manifest.json)."""
        return self.root.join(*FILES[name])

    @property
    def train_rec(self) -> S3Uri:
        return self.file("train.rec")

    @property
    def train_idx(self) -> S3Uri:
        return self.file("train.idx")

    @property
    def val_rec(self) -> S3Uri:
        return self.file("val.rec")

    @property
    def val_idx(self) -> S3Uri:
        return self.file("val.idx")

    @property
    def manifest(self) -> S3Uri:
        return self.file("manifest.json")

    @property
    def output(self) -> S3Uri:
        """Training jobs' S3OutputPath: each job writes PREFIX/output/JOB/output/model.tar.gz."""
        return self.root.join("output")

    def model(self, job: str) -> S3Uri:
        return self.output.join(job, *MODEL_TAIL)

    def evaluation(self, job: str) -> S3Uri:
        return self.output.join(job, *EVALUATION_TAIL)

    @property
    def staging(self) -> S3Uri:
        return self.root.join("staging")

    @property
    def evaluation_cache(self) -> S3Uri:
        return self.root.join("evaluation-cache")
