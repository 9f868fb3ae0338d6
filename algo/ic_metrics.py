"""Multi-label metrics: the one implementation the trainer logs and the evaluation stage reports.

Plain numpy (no MXNet, no tagflow), so it runs in the algorithm environment (numpy 1.23) and in tagflow's own
(numpy 2); tagflow and the tests load it by path. Inputs are `scores` (images, labels) probabilities and `truth`
(images, labels) 0/1.

- `average_precision`: as scikit-learn's `average_precision_score` — the step-wise area under the
  precision-recall curve, sum over thresholds of (R_k - R_{k-1}) * P_k, where every distinct score is one
  threshold (tied scores enter together: a constant predictor's AP is the label's prevalence). Unlike
  scikit-learn (which answers 0 with a warning) a label without a positive has AP NaN: it is left out of the mean.
- macro mAP: the mean AP over labels with at least one positive (the primary metric); micro mAP: the AP of all
  (image, label) pairs flattened into one ranking (scikit-learn's `average="micro"`).
- F1 (`f1`): micro over all (image, label) decisions; macro over the labels with at least one positive, the same
  labels macro mAP averages (scikit-learn's `f1_score(labels=those, average="macro", zero_division=0)`).
- `best_thresholds`: per label the threshold maximising F1 on the given scores, predicting positive at
  score >= threshold. Candidates are the distinct scores; among equal F1 the highest threshold wins (fewest
  positives predicted). A label without a positive gets a threshold above every score it can have (1.0, or just
  above 1.0 when a score reached 1.0), so it is never predicted.
- Hamming accuracy at 0.5: the fraction of (image, label) decisions that are right, the built-in's multi-label
  "accuracy".
- Baselines on the same split: the label-frequency predictor scores every image with each label's frequency in
  the training split (its AP per label is the label's prevalence in the evaluated split, computed by the same
  `average_precision`); the all-negative predictor's Hamming accuracy is 1 - the fraction of positive pairs.
"""

from __future__ import annotations

import math

import numpy as np

THRESHOLD = 0.5


def _curve(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true positives, false positives, threshold) at each distinct score, highest score first."""
    order = np.argsort(-scores, kind="mergesort")
    ranked, hits = scores[order], truth[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # the last index of each group of equal scores
    tps = np.cumsum(hits)[last]
    return tps, (last + 1) - tps, ranked[last]


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    """AP of one label (scikit-learn's `average_precision_score`); NaN when `truth` has no positive."""
    scores, truth = np.asarray(scores).ravel(), np.asarray(truth).ravel() > 0.5
    if not truth.any():
        return float("nan")
    tps, fps, _ = _curve(scores, truth)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def per_label_ap(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.array([average_precision(scores[:, c], truth[:, c]) for c in range(scores.shape[1])])


def mean_ap(ap: np.ndarray) -> float:
    """Macro mAP: the mean of the APs that are not NaN (labels with a positive); NaN if there is none."""
    valid = ap[~np.isnan(ap)]
    return float(valid.mean()) if valid.size else float("nan")


def f1(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(micro F1, macro F1 over labels with a positive, F1 per label) of the 0/1 decisions `pred`."""
    pred, truth = np.asarray(pred) > 0.5, np.asarray(truth) > 0.5
    tp = (pred & truth).sum(0).astype(np.float64)
    wrong = (pred != truth).sum(0).astype(np.float64)  # false positives + false negatives
    per_label = np.where(2 * tp + wrong > 0, 2 * tp / np.maximum(2 * tp + wrong, 1), 0.0)
    micro = 2 * tp.sum() / max(2 * tp.sum() + wrong.sum(), 1.0)
    positive = truth.any(0)
    macro = float(per_label[positive].mean()) if positive.any() else float("nan")
    return float(micro), macro, per_label


def best_thresholds(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per label the threshold that maximises F1 on these scores (see the module docstring for ties and labels
    without a positive)."""
    out = np.empty(scores.shape[1], np.float64)
    never = 1.0 if float(np.max(scores, initial=0.0)) < 1.0 else float(np.nextafter(1.0, 2.0))
    for c in range(scores.shape[1]):
        positives = truth[:, c] > 0.5
        if not positives.any():
            out[c] = never
            continue
        tps, fps, cut = _curve(scores[:, c], positives)
        f1s = 2 * tps / (tps + fps + positives.sum())
        out[c] = float(cut[int(np.argmax(f1s))])  # argmax: the first best, i.e. the highest threshold
    return out


def hamming_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(((np.asarray(pred) > 0.5) == (np.asarray(truth) > 0.5)).mean())


def _round(value: float, digits: int = 6) -> float | None:
    return None if math.isnan(value) else round(float(value), digits)


def multilabel_metrics(scores: np.ndarray, truth: np.ndarray) -> dict[str, object]:
    """What the trainer logs per epoch: accuracy and F1 at 0.5, macro mAP, AP per label, label frequency."""
    pred = scores >= THRESHOLD
    ap = per_label_ap(scores, truth)
    micro, macro, _ = f1(pred, truth)
    return {
        "accuracy": hamming_accuracy(pred, truth),
        "mAP": mean_ap(ap),
        "micro_f1": micro,
        "macro_f1": macro,
        "per_label_ap": [_round(a) for a in ap],
        "label_frequency": [round(float(f), 6) for f in (truth > 0.5).mean(0)],
    }


def evaluation(scores: np.ndarray, truth: np.ndarray, train_frequency: np.ndarray) -> dict[str, object]:
    """Everything the evaluation stage reports for one model on one split, with the baselines on that split.
    `train_frequency` is each label's frequency in the training split (the label-frequency predictor's score)."""
    scores, truth = np.asarray(scores, np.float64), (np.asarray(truth) > 0.5)
    images, labels = truth.shape
    train_frequency = np.asarray(train_frequency, np.float64).reshape(-1)
    if scores.shape != truth.shape or train_frequency.shape != (labels,):
        raise ValueError(
            f"scores {scores.shape}, truth {truth.shape} and training frequencies {train_frequency.shape} "
            "do not describe the same images and labels"
        )
    ap = per_label_ap(scores, truth)
    thresholds = best_thresholds(scores, truth)
    tuned = scores >= thresholds
    at_half = scores >= THRESHOLD
    micro_t, macro_t, f1_t = f1(tuned, truth)
    micro_h, macro_h, _ = f1(at_half, truth)
    constant = np.broadcast_to(train_frequency, truth.shape)
    baseline_ap = per_label_ap(constant, truth)
    support = truth.sum(0)
    return {
        "images": int(images),
        "labels": int(labels),
        "labels_with_positives": int((support > 0).sum()),
        "mAP": _round(mean_ap(ap)),
        "micro_mAP": _round(average_precision(scores.ravel(), truth.ravel())),
        "micro_f1": round(micro_t, 6),
        "macro_f1": _round(macro_t),
        "micro_f1_at_0.5": round(micro_h, 6),
        "macro_f1_at_0.5": _round(macro_h),
        "accuracy": round(hamming_accuracy(at_half, truth), 6),
        "per_label": [
            {
                "ap": _round(ap[c]),
                "support": int(support[c]),
                "threshold": float(thresholds[c]),
                "f1": round(float(f1_t[c]), 6),
                "baseline_ap": _round(baseline_ap[c]),
            }
            for c in range(labels)
        ],
        "baselines": {
            "label_frequency_mAP": _round(mean_ap(baseline_ap)),
            "label_frequency_micro_mAP": _round(average_precision(constant.ravel(), truth.ravel())),
            "all_negative_accuracy": round(1.0 - float(truth.mean()), 6),
        },
    }
