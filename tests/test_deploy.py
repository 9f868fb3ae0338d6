"""The deploy gate, the serving model it compares with, and the run's note."""

from __future__ import annotations

import pytest

from tagflow import deploy
from tagflow.errors import TagflowError

NEW = {"job": "j2", "metric": "validation:accuracy", "value": 0.80, "model_data_url": "s3://b/m.tar.gz"}


def test_the_objective_round_trips_through_endpoint_config_tags():
    config = deploy.sagemaker_endpoint_config(
        NEW, run_key="manual__1", endpoint_name="tagflow-designs", image_uri="img", role_arn="role",
        instance_type="ml.m5.large",
    )  # fmt: skip
    tags = config["EndpointConfig"]["Tags"]
    assert deploy.tagged_value(tags, "validation:accuracy") == 0.80
    no_value = deploy.objective_tags({**NEW, "value": None})
    assert [t["Key"] for t in no_value] == [deploy.METRIC_TAG, deploy.JOB_TAG]
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


def _doc(candidate: dict, champion: dict | None, **baselines) -> dict:
    """An evaluation document's parts the gate reads (tagflow.evaluate's shape)."""
    base = {"label_frequency_mAP": 0.1, "all_negative_accuracy": 0.81, **baselines}
    sections = [{"labels": 2, "label_names": ["a", "b"], **s} if s else None for s in (candidate, champion)]
    doc = {"candidate": sections[0], "champion": sections[1], "baselines": base}
    doc["gate"] = deploy.gate_by_evaluation(sections[0], sections[1], baseline=base["label_frequency_mAP"])
    return doc


def test_the_gate_by_accuracy_must_beat_the_all_negative_predictor_and_ignores_the_lift():
    rule = {"lift": 2.0, "threshold": 0.1, "tolerance": 0.0}
    all_negative = _doc({"mAP": 0.1, "accuracy": 0.81}, None)
    decision = deploy.judge(all_negative, metric="accuracy", **rule)
    assert decision["deploy"] is False
    assert "accuracy 0.8100 does not beat the all-negative predictor's 0.8100" in decision["reason"]
    better = deploy.judge(_doc({"mAP": 0.1, "accuracy": 0.83}, None), metric="accuracy", **rule)
    assert better["deploy"] is True and "> the all-negative predictor's 0.8100" in better["reason"]
    assert better["rule"]["metric"] == "accuracy" and better["rule"]["baseline"] == "all_negative_accuracy"
    # mAP (the default) is the document's own decision: 0.1 is not 2 × the baseline
    assert deploy.judge(all_negative, **rule) == all_negative["gate"]
    assert "below 2 × the label-frequency baseline's 0.1000" in all_negative["gate"]["reason"]
    worse = _doc({"mAP": 0.5, "accuracy": 0.84}, {"mAP": 0.6, "accuracy": 0.85})
    assert "worse than the serving model's 0.8500" in deploy.judge(worse, metric="accuracy", **rule)["reason"]
    with pytest.raises(ValueError, match="gate metric 'validation:accuracy'"):
        deploy.judge(worse, metric="validation:accuracy", **rule)


def test_the_champion_is_the_model_served_under_the_forms_endpoint_name():
    metadata = {"name": "tagflow-designs-50", "source": "s3://b/p/output/j/output/model.tar.gz"}
    assert deploy.local_champion(metadata, "tagflow-designs-50") == metadata["source"]
    assert deploy.local_champion(metadata, "tagflow-designs-334") is None  # another endpoint's model
    assert deploy.local_champion(None, "tagflow-designs-50") is None  # the endpoint serves nothing yet


def test_the_run_note_says_the_decision_and_its_figures_or_why_nothing_was_trained():
    doc = _doc({"mAP": 0.5, "accuracy": 0.9}, {"mAP": 0.4, "accuracy": 0.88, "model": {"uri": "s3://b/old"}})
    gate = {**deploy.summary(doc, doc["gate"]), "evaluation": "s3://b/p/output/j/evaluation/evaluation.json"}
    assert (gate["mAP"], gate["baseline"], gate["champion_mAP"], gate["champion"]) == (0.5, 0.1, 0.4, "s3://b/old")
    note = deploy.run_note(gate, {"train": True, "reason": "a manual run trains whatever changed"})
    assert note.startswith("**Deployed** — mAP 0.5000 passes")
    assert "mAP 0.5000, label-frequency baseline 0.1000, serving model 0.4000 on the same split" in note
    assert gate["evaluation"] in note
    kept = deploy.run_note({**gate, "deploy": False, "reason": "r"}, None)
    assert kept.startswith("**Kept the serving model** — r")
    stopped = deploy.run_note(None, {"train": False, "reason": "nothing new since s3://b/m"})
    assert stopped == "**Not trained** — nothing new since s3://b/m"
    assert deploy.run_note(None, None) is None
