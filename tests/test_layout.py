"""tagflow.layout: the seed's dataset layout, spelled once."""

from __future__ import annotations

from tagflow import pipeline, sagemaker_config, thresholds
from tagflow.layout import FILES, DatasetLayout


def test_every_part_has_its_place_below_the_prefix():
    layout = DatasetLayout.of("s3://bucket/designs/50/")
    assert str(layout.train_rec) == "s3://bucket/designs/50/training/train.rec"
    assert str(layout.train_idx) == "s3://bucket/designs/50/training/train.idx"
    assert str(layout.manifest) == "s3://bucket/designs/50/training/manifest.json"
    assert str(layout.val_rec) == "s3://bucket/designs/50/validation/val.rec"
    assert str(layout.val_idx) == "s3://bucket/designs/50/validation/val.idx"
    assert str(layout.model("job-1")) == "s3://bucket/designs/50/output/job-1/output/model.tar.gz"
    assert str(layout.evaluation("job-1")) == "s3://bucket/designs/50/output/job-1/evaluation/evaluation.json"
    assert str(layout.staging) == "s3://bucket/designs/50/staging"
    assert list(FILES)[-1] == "manifest.json"  # publish uploads in this order: the manifest last


def test_the_channels_the_evaluation_and_the_staging_agree_with_the_layout():
    layout = DatasetLayout.of("s3://bucket/ds")
    channels = sagemaker_config.dataset_channels("s3://bucket/ds")
    assert channels == {"train_uri": str(layout.train_rec), "validation_uri": str(layout.val_rec),
                        "output_uri": str(layout.output)}  # fmt: skip
    assert thresholds.evaluation_beside(str(layout.model("j"))) == layout.evaluation("j")
    spec = pipeline.DatasetSpec(list_uri="s3://bucket/l.lst", dataset_uri="s3://bucket/ds", num_labels=2)
    assert spec.staging == layout.staging
