"""The trigger form: its JSON schemas refuse bad values, presets fill empty fields, cross-field rules hold."""

from __future__ import annotations

from datetime import UTC, datetime

import jsonschema
import pytest

from tagflow import runconfig
from tagflow.errors import InputError


def _valid(name: str, value) -> bool:
    schema = {k: v for k, v in runconfig.PARAMS[name].items() if k not in ("section", "default")}
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    return True


def test_every_default_satisfies_its_own_schema_and_every_field_is_documented():
    for name, spec in runconfig.PARAMS.items():
        assert _valid(name, spec["default"]), name
        assert spec.get("section") in ("Dataset", "Packing", "Training", "Tuning", "Deployment"), name
        assert spec.get("title") and spec.get("description"), f"{name}: the form shows a title and help text"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("preset", "75-label"),
        ("list_uri", "https://example.com/list.lst"),
        ("list_uri", "s3://A_BAD_BUCKET/list.lst"),
        ("bucket", "x"),
        ("num_labels", 0),
        ("num_labels", "50"),
        ("resize", 4),
        ("quality", 101),
        ("train_ratio", 1.0),
        ("shard_size", 1),
        ("mode", "eval"),
        ("backend", "gcp"),
        ("instance_type", "p3.2xlarge"),
        ("hyperparameters", "epochs=3"),
        ("max_jobs", 0),
        ("deploy", "yes"),
        ("endpoint_name", "-leading-hyphen"),
        ("endpoint_name", "x" * 64),
        ("endpoint_name", "../../evil"),
        ("dataset_prefix", "x/../y"),
        ("dataset_prefix", ".."),
        ("dataset_prefix", "./x"),
        ("dataset_prefix", "a//b"),
        ("gate_metric", "validation:accuracy"),
        ("gate_lift", -1),
        ("gate_threshold", 1.5),
        ("gate_tolerance", -0.1),
        ("force_training", "yes"),
        ("objective_metric", "mAP"),
    ],
)
def test_the_form_refuses_bad_values(name, value):
    assert not _valid(name, value)


def test_a_preset_fills_only_the_fields_left_empty():
    cfg = runconfig.resolve({"preset": "ic-multi-label", "dataset_prefix": "mine/v2"})
    assert cfg.num_labels == 334
    assert cfg.dataset_prefix == "mine/v2"
    assert cfg.list_uri == runconfig.PRESETS["ic-multi-label"]["list_uri"]
    assert cfg.dataset_uri == "s3://tagflow-data/mine/v2"
    assert runconfig.resolve({}).num_labels == 50


def test_the_cutoff_travels_with_the_config():
    cutoff = datetime(2026, 11, 3, tzinfo=UTC)
    assert runconfig.resolve({}, list_until=cutoff).list_until == "2026-11-03T00:00:00+00:00"
    assert runconfig.RunConfig.from_dict(runconfig.resolve({}).to_dict()) == runconfig.resolve({})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"preset": "custom"}, "preset custom: set list_uri, dataset_prefix, num_labels, resize, endpoint_name"),
        ({"metric_gate": 0.5}, "metric_gate: renamed gate_threshold"),
        ({"hyperparameters": {"num_classes": 50}}, "hyperparameters: num_classes come from the packed data"),
        ({"mode": "tune", "tuning_ranges": {}}, "tuning_ranges: mode is tune but no range is given"),
        ({"mode": "tune", "max_jobs": 2, "max_parallel_jobs": 3}, "max_parallel_jobs: 3 is more than max_jobs (2)"),
        ({"backend": "sagemaker", "objective_metric": "validation:mAP"}, "reported only by the local trainer"),
        ({"list_uri": "s3://bucket"}, "names a bucket, not a list file"),
        ({"num_lables": 50}, "params: unknown field(s) num_lables"),
        # the form's patterns refuse these too; resolve is also what a run triggered through the API meets
        ({"dataset_prefix": "x/../y"}, "dataset_prefix: 'x/../y' has a '..' segment"),
        ({"endpoint_name": "../../evil"}, "endpoint_name: '../../evil': expected 1-63 letters"),
    ],
)
def test_cross_field_rules_name_the_field(params, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        runconfig.resolve(params)


def test_manual_runs_read_up_to_now_and_scheduled_runs_up_to_their_interval_end():
    end = datetime(2026, 11, 2, tzinfo=UTC)
    after = datetime(2026, 11, 5, 14, tzinfo=UTC)
    assert runconfig.partition_cutoff("scheduled", end, after) == end
    assert runconfig.partition_cutoff("backfill", end, after) == end
    assert runconfig.partition_cutoff("manual", end, after) == after


@pytest.mark.parametrize("prefix", ["mine/v2", "a.b/c..d", ".hidden-ok", "x/...", "50-label-rs96"])
def test_the_form_accepts_dotted_names_that_are_not_dot_segments(prefix):
    assert _valid("dataset_prefix", prefix)
    assert runconfig.resolve({"dataset_prefix": prefix}).dataset_prefix == prefix


def test_the_presets_deploy_to_endpoints_of_their_own_and_a_custom_run_names_its_own():
    assert runconfig.resolve({}).endpoint_name == "tagflow-designs-50"
    assert runconfig.resolve({"preset": "ic-multi-label"}).endpoint_name == "tagflow-designs-334"
    assert runconfig.resolve({"endpoint_name": "mine"}).endpoint_name == "mine"
    custom = {"preset": "custom", "list_uri": "s3://b/l.lst", "dataset_prefix": "p", "num_labels": 3, "resize": 32}
    assert runconfig.resolve({**custom, "endpoint_name": "tagflow-p"}).endpoint_name == "tagflow-p"


def test_the_gate_defaults_to_mAP_with_the_deploy_modules_constants_and_the_objective_follows_the_backend():
    from tagflow import deploy

    cfg = runconfig.resolve({})
    assert (cfg.gate_metric, cfg.gate_lift, cfg.gate_threshold, cfg.gate_tolerance) == (
        "mAP",
        deploy.DEFAULT_LIFT,
        deploy.DEFAULT_THRESHOLD,
        deploy.DEFAULT_TOLERANCE,
    )
    assert runconfig.PARAMS["gate_metric"]["enum"] == ["mAP", "accuracy"]
    assert cfg.force_training is False
    assert cfg.objective_metric == "validation:mAP"
    assert runconfig.resolve({"backend": "sagemaker"}).objective_metric == "validation:accuracy"
    assert runconfig.resolve({"objective_metric": "validation:accuracy"}).objective_metric == "validation:accuracy"
    assert "metric_gate" not in runconfig.PARAMS


def test_the_split_group_key_is_checked_when_the_form_is_resolved():
    cfg = runconfig.resolve({"split_group_regex": r"^designs/(d\d+)/"})
    assert cfg.split_group_regex == r"^designs/(d\d+)/" and cfg.split_group_file is None
    with pytest.raises(InputError, match=r"split_group_regex: group regex '\(x': not a valid regular expression"):
        runconfig.resolve({"split_group_regex": "(x"})
    with pytest.raises(InputError, match="split_group_regex and split_group_file: both were given"):
        runconfig.resolve({"split_group_regex": "x", "split_group_file": "s3://b/groups.tsv"})


def test_approval_defaults_to_auto():
    cfg = runconfig.resolve({})
    assert (cfg.approval, cfg.approval_timeout_h) == ("auto", 24)
    assert runconfig.RunConfig.from_dict(runconfig.resolve({"approval": "manual"}).to_dict()).approval == "manual"
