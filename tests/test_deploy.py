"""The deploy gate and the records it reads the serving model's objective from."""

from __future__ import annotations

import pytest

from tagflow import deploy
from tagflow.errors import TagflowError

NEW = {"job": "j2", "metric": "validation:accuracy", "value": 0.80, "model_data_url": "s3://b/m.tar.gz"}


@pytest.mark.parametrize(
    ("value", "threshold", "serving", "deploys", "reason"),
    [
        (0.80, 0.5, None, True, "validation:accuracy 0.8000 passes the gate 0.5000 and no serving model"),
        (0.80, 0.5, 0.80, True, "passes the gate 0.5000 and the serving model's 0.8000"),
        (0.80, 0.5, 0.85, False, "validation:accuracy 0.8000 is worse than the serving model's 0.8500"),
        (0.80, 0.9, None, False, "validation:accuracy 0.8000 is below the gate 0.9000"),
        (None, 0.5, None, False, "the new model has no validation:accuracy value"),
        (float("nan"), 0.5, None, False, "the new model has no validation:accuracy value"),
    ],
)
def test_the_gate(value, threshold, serving, deploys, reason):
    decision = deploy.gate({**NEW, "value": value}, threshold, serving)
    assert decision["deploy"] is deploys
    assert reason in decision["reason"]


def test_the_objective_round_trips_through_endpoint_config_tags():
    config = deploy.sagemaker_endpoint_config(
        NEW, run_key="manual__1", endpoint_name="tagflow-designs", image_uri="img", role_arn="role",
        instance_type="ml.m5.large",
    )  # fmt: skip
    tags = config["EndpointConfig"]["Tags"]
    assert deploy.tagged_value(tags, "validation:accuracy") == 0.80
    assert deploy.tagged_value(tags, "validation:mAP") is None  # another metric is not comparable
    assert config["Endpoint"]["EndpointConfigName"] == config["EndpointConfig"]["EndpointConfigName"]
    other = deploy.sagemaker_endpoint_config(
        NEW, run_key="manual__2", endpoint_name="tagflow-designs", image_uri="img", role_arn="role",
        instance_type="ml.m5.large",
    )  # fmt: skip
    assert other["EndpointConfig"]["EndpointConfigName"] != config["EndpointConfig"]["EndpointConfigName"]


def test_the_local_endpoints_metrics():
    metadata = {"metrics": {"validation": {"accuracy": 0.7, "mAP": 0.3}}}
    assert deploy.local_serving_value(metadata, "validation:mAP") == 0.3
    assert deploy.local_serving_value({"metrics": None}, "validation:accuracy") is None
    assert deploy.local_serving_value(None, "validation:accuracy") is None


def test_a_prediction_of_the_wrong_shape_is_refused():
    assert deploy.check_prediction(b"[0.1, 0.9]", 2, "e") == [0.1, 0.9]
    with pytest.raises(TagflowError, match=r"endpoint e answered \[0.1\]; expected 2 probabilities"):
        deploy.check_prediction(b"[0.1]", 2, "e")
    with pytest.raises(TagflowError, match="not JSON"):
        deploy.check_prediction(b"body", 2, "e")


def test_an_endpoint_left_on_its_old_config_is_a_failed_deploy():
    """A failed blue/green update rolls back to InService on the old config, which a waiter takes for success."""
    from tagflow.errors import TagflowError

    deploy.check_switched({"EndpointName": "e", "EndpointConfigName": "new", "EndpointStatus": "InService"}, "new")
    rolled_back = {
        "EndpointName": "e",
        "EndpointConfigName": "old",
        "EndpointStatus": "InService",
        "FailureReason": "The primary container for production variant AllTraffic did not pass the ping health check.",
    }
    with pytest.raises(TagflowError) as failed:
        deploy.check_switched(rolled_back, "new")
    assert str(failed.value) == (
        "endpoint e did not switch to new: it still serves old (InService; The primary container for production "
        "variant AllTraffic did not pass the ping health check.). The old model keeps serving."
    )


def section(value, labels=4, names=None):
    return {"mAP": value, "labels": labels, "label_names": names}


NAMES = ["red", "green", "blue", "round"]
SWAPPED = "blue, round), the serving model 4 labels (red, green, blue, square)"


@pytest.mark.parametrize(
    ("candidate", "champion", "deploys", "reason"),
    [
        (section(0.6, names=NAMES), None, True, "passes: ≥ 2 × the label-frequency baseline's 0.2000"),
        (section(0.39), None, False, "below 2 × the label-frequency baseline's 0.2000 (= 0.4000)"),
        (section(0.6), section(0.6), True, "the serving model's 0.6000 − 0.0000 on the same split"),
        (section(0.59), section(0.6), False, "worse than the serving model's 0.6000 on the same split"),
        (section(None), None, False, "no mAP on this split"),
        (section(0.6, 4), section(0.7, 3), False, "has 4 labels (names not recorded), the serving model 3 labels"),
        (section(0.6, names=NAMES), section(0.5, names=[*NAMES[:3], "square"]), False, SWAPPED),
    ],
)
def test_the_evaluation_gate(candidate, champion, deploys, reason):
    decision = deploy.gate_by_evaluation(candidate, champion, baseline=0.2)
    assert decision["deploy"] is deploys
    assert reason in decision["reason"]


def test_the_evaluation_gates_absolute_threshold_and_tolerance():
    low = deploy.gate_by_evaluation(section(0.08), None, baseline=0.01)
    assert not low["deploy"] and "below the absolute threshold 0.1000" in low["reason"]
    assert deploy.gate_by_evaluation(section(0.08), None, baseline=0.01, threshold=0.05)["deploy"]
    assert deploy.gate_by_evaluation(section(0.59), section(0.6), baseline=0.2, tolerance=0.02)["deploy"]
