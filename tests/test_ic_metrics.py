"""algo/ic_metrics.py against scikit-learn, on random, tied and degenerate scores."""

from __future__ import annotations

import importlib.util
import sys
import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score

from tagflow.local import REPO


@pytest.fixture(scope="module")
def m():
    """algo/ic_metrics.py loaded by path, as tagflow.sagemaker_config.hyperparameter_spec loads ic_hyperparams."""
    name = "tagflow_algo_ic_metrics_test"
    spec = importlib.util.spec_from_file_location(name, REPO / "algo" / "ic_metrics.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def near(value: float):
    """Equal to the 6 decimals the evaluation document keeps."""
    return pytest.approx(value, abs=1e-6)


def sk_ap(truth, scores) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No positive class found": we compare only where there is one
        return float(average_precision_score(truth, scores))


def cases():
    rng = np.random.default_rng(7)
    yield "random", rng.random(200), rng.random(200) < 0.2
    yield "rounded (many ties)", np.round(rng.random(300), 1), rng.random(300) < 0.3
    yield "float32 sigmoid-like", rng.random(100).astype(np.float32), rng.random(100) < 0.5
    yield "two values", rng.integers(0, 2, 50) * 0.5 + 0.25, rng.random(50) < 0.4
    yield "all equal", np.full(40, 0.3), rng.random(40) < 0.25
    yield "all positive", rng.random(30), np.ones(30, bool)
    yield "single positive last", np.linspace(1, 0, 20), np.eye(1, 20, 19, dtype=bool)[0]
    yield "single image, positive", np.array([0.7]), np.array([True])
    yield "perfect", np.r_[np.ones(5), np.zeros(15)], np.r_[np.ones(5, bool), np.zeros(15, bool)]


@pytest.mark.parametrize("case", list(cases()), ids=lambda c: c[0])
def test_average_precision_equals_scikit_learn(m, case):
    _, scores, truth = case
    assert m.average_precision(scores, truth) == pytest.approx(sk_ap(truth, scores), abs=1e-12)


def test_tied_scores_are_one_threshold_not_a_stable_sort(m):
    # Positives first in file order: a stable sort would rank them first and give AP 1.0.
    scores, truth = np.full(4, 0.5), np.array([1, 1, 0, 0])
    assert m.average_precision(scores, truth) == pytest.approx(0.5)
    assert sk_ap(truth, scores) == pytest.approx(0.5)


def test_no_positive_is_nan_and_left_out_of_the_mean(m):
    assert np.isnan(m.average_precision(np.random.default_rng(0).random(10), np.zeros(10)))
    assert np.isnan(m.average_precision(np.array([0.2]), np.array([0])))
    assert m.mean_ap(np.array([0.5, np.nan, 1.0])) == pytest.approx(0.75)
    assert np.isnan(m.mean_ap(np.array([np.nan, np.nan])))


def matrix(seed: int = 3, images: int = 120, labels: int = 7):
    rng = np.random.default_rng(seed)
    truth = rng.random((images, labels)) < rng.uniform(0.05, 0.5, labels)
    truth[:, -1] = False  # a label with no positive in this split
    scores = np.clip(truth * 0.3 + rng.random((images, labels)) * 0.7, 0, 1)
    scores[:, 2] = np.round(scores[:, 2], 1)  # ties
    return scores, truth


def test_macro_and_micro_map_equal_scikit_learn(m):
    scores, truth = matrix()
    positive = truth.any(0)
    doc = m.evaluation(scores, truth, np.full(truth.shape[1], 0.2))
    expected_macro = average_precision_score(truth[:, positive], scores[:, positive], average="macro")
    assert doc["mAP"] == pytest.approx(expected_macro, abs=1e-6)
    assert doc["micro_mAP"] == pytest.approx(average_precision_score(truth, scores, average="micro"), abs=1e-6)
    assert doc["labels_with_positives"] == int(positive.sum()) == truth.shape[1] - 1
    assert doc["per_label"][-1]["ap"] is None and doc["per_label"][-1]["support"] == 0
    assert [p["support"] for p in doc["per_label"]] == truth.sum(0).tolist()


def test_f1_at_half_and_at_the_chosen_thresholds_equal_scikit_learn(m):
    scores, truth = matrix(5)
    positive = np.flatnonzero(truth.any(0))
    doc = m.evaluation(scores, truth, truth.mean(0))
    thresholds = np.array([p["threshold"] for p in doc["per_label"]])
    for key, pred in (("_at_0.5", scores >= 0.5), ("", scores >= thresholds)):
        assert doc["micro_f1" + key] == near(f1_score(truth, pred, average="micro", zero_division=0))
        assert doc["macro_f1" + key] == near(f1_score(truth, pred, labels=positive, average="macro", zero_division=0))
    assert doc["accuracy"] == near(((scores >= 0.5) == truth).mean())


def test_each_threshold_maximises_f1_and_the_highest_wins_a_tie(m):
    scores, truth = matrix(11)
    thresholds = m.best_thresholds(scores, truth)
    for c in np.flatnonzero(truth.any(0)):
        candidates = np.unique(scores[:, c])
        f1s = np.array([f1_score(truth[:, c], scores[:, c] >= t, zero_division=0) for t in candidates])
        best = f1s.max()
        assert f1_score(truth[:, c], scores[:, c] >= thresholds[c], zero_division=0) == near(best)
        assert thresholds[c] == candidates[np.flatnonzero(np.isclose(f1s, best))].max()
    # A label with no positive is never predicted.
    assert not (scores[:, -1] >= thresholds[-1]).any()
    assert m.best_thresholds(np.full((3, 1), 0.9), np.zeros((3, 1)))[0] == 1.0
    saturated = np.ones((3, 1))
    assert not (saturated >= m.best_thresholds(saturated, np.zeros((3, 1)))).any()


def test_baselines_are_computed_not_special_cased(m):
    scores, truth = matrix(13)
    train_frequency = np.linspace(0.05, 0.6, truth.shape[1])
    doc = m.evaluation(scores, truth, train_frequency)
    positive = truth.any(0)
    # Constant scores tie: each label's AP is its prevalence in the evaluated split, whatever the training frequency.
    assert doc["baselines"]["label_frequency_mAP"] == near(truth[:, positive].mean(0).mean())
    for c, entry in enumerate(doc["per_label"]):
        assert entry["baseline_ap"] == (near(truth[:, c].mean()) if positive[c] else None)
    constant = np.broadcast_to(train_frequency, truth.shape)
    assert doc["baselines"]["label_frequency_micro_mAP"] == near(
        average_precision_score(truth.ravel(), constant.ravel())
    )
    assert doc["baselines"]["all_negative_accuracy"] == near(1 - truth.mean())
    # The all-negative predictor's accuracy is what the evaluation gives a model that says no to everything.
    assert m.evaluation(np.zeros_like(scores), truth, train_frequency)["accuracy"] == near(1 - truth.mean())


def test_degenerate_splits(m):
    one = m.evaluation(np.array([[0.9, 0.1]]), np.array([[1, 0]]), np.array([0.5, 0.5]))
    assert one["mAP"] == 1.0 and one["micro_mAP"] == 1.0 and one["labels_with_positives"] == 1
    none = m.evaluation(np.random.default_rng(1).random((5, 3)), np.zeros((5, 3)), np.full(3, 0.1))
    assert none["mAP"] is None and none["macro_f1"] is None and none["micro_mAP"] is None
    assert none["baselines"]["all_negative_accuracy"] == 1.0
    with pytest.raises(ValueError, match="same images and labels"):
        m.evaluation(np.zeros((4, 3)), np.zeros((4, 2)), np.zeros(3))


def test_trainer_metrics_use_the_same_ap(m):
    scores, truth = matrix(17)
    logged = m.multilabel_metrics(scores, truth)
    assert logged["mAP"] == pytest.approx(m.evaluation(scores, truth, truth.mean(0))["mAP"], abs=1e-6)
    assert logged["per_label_ap"][-1] is None
