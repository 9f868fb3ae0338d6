"""Deciding whether a new model replaces the serving one, the SageMaker endpoint requests that do it, and the
smoke test that proves the endpoint answers afterwards.

The gate judges two models scored on the same images: the candidate and the model the run's endpoint serves now
(the champion), both evaluated by `tagflow.evaluate` on the dataset's current validation split. The champion is
found where each backend keeps it: the local endpoint reports its model's source and name at `/metadata`; on
SageMaker the endpoint's config names a model whose PrimaryContainer.ModelDataUrl is the archive. Every endpoint
config tagflow creates also carries the training job's objective as tags (`tagflow:objective-metric`,
`tagflow:objective-value`, `tagflow:training-job`), for people reading the console; the gate does not use them.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tagflow import s3
from tagflow.errors import TagflowError
from tagflow.layout import DatasetLayout
from tagflow.sagemaker_config import job_name

METRIC_TAG = "tagflow:objective-metric"
VALUE_TAG = "tagflow:objective-value"
JOB_TAG = "tagflow:training-job"
GATE_METRICS = ("mAP", "accuracy")  # what the form's gate_metric may name; mAP is the default, never accuracy
BASELINES = {"mAP": "label_frequency_mAP", "accuracy": "all_negative_accuracy"}  # each metric's baseline


DEFAULT_LIFT = 2.0
DEFAULT_THRESHOLD = 0.1
DEFAULT_TOLERANCE = 0.0


def _labels(section: Mapping[str, Any]) -> str:
    names = section.get("label_names")
    count = section.get("labels")
    if not names:
        return f"{count} labels (names not recorded)"
    shown = ", ".join(names[:5]) + (f", … ({len(names) - 5} more)" if len(names) > 5 else "")
    return f"{count} labels ({shown})"


def gate_by_evaluation(
    candidate: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    *,
    baseline: float | None,
    lift: float = DEFAULT_LIFT,
    threshold: float = DEFAULT_THRESHOLD,
    tolerance: float = DEFAULT_TOLERANCE,
    metric: str = "mAP",
) -> dict[str, Any]:
    """{"deploy": bool, "reason": str} for two models scored on the same validation split (tagflow.evaluate).

    `candidate` and `champion` (the serving model, None when there is none) are evaluation sections: `labels`
    (count), `label_names` (None when unknown) and `metric` (macro mAP by default); `baseline` is the
    label-frequency predictor's value of `metric` on that split (for metric "accuracy", the all-negative
    predictor's accuracy, which the candidate must beat: lift is not used). Deploy only if the label sets are
    equal (count, and names when both are known), and the candidate's value is ≥ lift × baseline, ≥ threshold and
    ≥ the champion's minus tolerance. Defaults: lift 2 (the issue's), threshold 0.1 (lift alone passes a
    near-random model on a many-label set with rare labels, whose baseline is ~0.01), tolerance 0 (both are scored
    on the same images, so no split noise needs absorbing, and any allowance would let a run of scheduled retrains
    ratchet quality down)."""
    kept = "; the endpoint is left as it is"
    if champion is not None:
        names_differ = (
            candidate.get("label_names") is not None
            and champion.get("label_names") is not None
            and list(candidate["label_names"]) != list(champion["label_names"])
        )
        if candidate.get("labels") != champion.get("labels") or names_differ:
            return {
                "deploy": False,
                "reason": f"the label sets differ: the candidate has {_labels(candidate)}, the serving model "
                f"{_labels(champion)}{kept}",
            }
    value = candidate.get(metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        reason = f"the candidate has no {metric} on this split (no label has a positive){kept}"
        return {"deploy": False, "reason": reason}
    if baseline is not None and metric == "accuracy":
        if value <= baseline:
            return {
                "deploy": False,
                "reason": f"accuracy {value:.4f} does not beat the all-negative predictor's {baseline:.4f} (a model "
                f"that predicts no label){kept}",
            }
    elif baseline is not None:
        bar = lift * baseline
        if value < bar:
            return {
                "deploy": False,
                "reason": f"{metric} {value:.4f} is below {lift:g} × the label-frequency baseline's {baseline:.4f} "
                f"(= {bar:.4f}){kept}",
            }
    if value < threshold:
        reason = f"{metric} {value:.4f} is below the absolute threshold {threshold:.4f}{kept}"
        return {"deploy": False, "reason": reason}
    serving = None if champion is None else champion.get(metric)
    if isinstance(serving, (int, float)) and math.isfinite(serving) and value < serving - tolerance:
        return {
            "deploy": False,
            "reason": f"{metric} {value:.4f} is worse than the serving model's {serving:.4f} on the same split "
            f"(tolerance {tolerance:.4f}){kept}",
        }
    against = (
        "no serving model"
        if champion is None
        else f"the serving model's {serving:.4f} − {tolerance:.4f} on the same split"
        if isinstance(serving, (int, float))
        else "a serving model with no value"
    )
    base = (
        ""
        if baseline is None
        else f"> the all-negative predictor's {baseline:.4f}, "
        if metric == "accuracy"
        else f"{lift:g} × the label-frequency baseline's {baseline:.4f}, "
    )
    reason = f"{metric} {value:.4f} passes: ≥ {base}≥ the threshold {threshold:.4f}, ≥ {against}"
    return {"deploy": True, "reason": reason}


def judge(
    doc: Mapping[str, Any], *, metric: str = "mAP", lift: float, threshold: float, tolerance: float
) -> dict[str, Any]:
    """The gate's decision on an evaluation document (tagflow.evaluate) under the run's rule, with the rule.

    For mAP it is the document's own `gate` (evaluate decided it with the same lift, threshold and tolerance);
    for accuracy it is decided again from the same scores, against the all-negative predictor's accuracy."""
    if metric not in GATE_METRICS:
        raise ValueError(f"gate metric {metric!r}: expected one of {', '.join(GATE_METRICS)}")
    if metric == "mAP":
        return dict(doc["gate"])
    baseline = doc["baselines"][BASELINES[metric]]
    decision = gate_by_evaluation(
        doc["candidate"], doc.get("champion"), baseline=baseline, lift=lift, threshold=threshold,
        tolerance=tolerance, metric=metric,
    )  # fmt: skip
    rule = {"metric": metric, "baseline": BASELINES[metric], "threshold": threshold, "tolerance": tolerance}
    return {**decision, "rule": rule}


def summary(doc: Mapping[str, Any], decision: Mapping[str, Any], metric: str = "mAP") -> dict[str, Any]:
    """The figures a person looks for first, from an evaluation document: the gate metric's value for the
    candidate, its baseline and the champion's (None without a scored champion)."""
    champion = doc.get("champion") or {}
    return {
        "metric": metric,
        "mAP": doc["candidate"].get("mAP"),
        "accuracy": doc["candidate"].get("accuracy"),
        "baseline": doc["baselines"].get(BASELINES[metric]),
        "baselines": dict(doc["baselines"]),
        "champion_mAP": champion.get("mAP"),
        "champion_accuracy": champion.get("accuracy"),
        "champion": (champion.get("model") or {}).get("uri"),
        "deploy": bool(decision["deploy"]),
        "reason": decision["reason"],
    }


def run_note(gate: Mapping[str, Any] | None, training: Mapping[str, Any] | None) -> str | None:
    """The DAG run's note (shown on the run's page): the gate's decision and its figures, or why nothing was
    trained; None when neither task decided anything (the run failed before)."""
    if gate:
        verdict = "Deployed" if gate.get("deploy") else "Kept the serving model"
        lines = [f"**{verdict}** — {gate.get('reason', '')}"]
        if gate.get("mAP") is not None:
            figures = f"mAP {gate['mAP']:.4f}, label-frequency baseline {gate['baselines']['label_frequency_mAP']:.4f}"
            if gate.get("champion_mAP") is not None:
                figures += f", serving model {gate['champion_mAP']:.4f} on the same split"
            lines.append(figures)
        if gate.get("evaluation"):
            lines.append(f"Evaluation: {gate['evaluation']}")
        return "\n\n".join(lines)
    if training and not training.get("train", True):
        return f"**Not trained** — {training['reason']}"
    return None


APPROVE, REJECT = "Approve", "Reject"  # the standard provider's ApprovalOperator's two options


def _figure(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "—"


def approval_body(gate: Mapping[str, Any], report_url: str | None) -> str:
    """What a person reads before approving a deploy (markdown, shown on the run's Required actions): the
    candidate beside the serving model and both baselines, all scored on the same validation split, the gate's
    reason and the report's link. `gate` is evaluate_gate's result; `report_url` the report as a browser opens it."""
    baselines = gate.get("baselines") or {}
    candidate = gate.get("candidate") or {}
    champion = gate.get("champion")
    rows = [
        ("**Candidate** (this run's model)", gate.get("mAP"), gate.get("accuracy")),
        (
            "Serving model" if champion else "Serving model: none",
            gate.get("champion_mAP") if champion else None,
            gate.get("champion_accuracy") if champion else None,
        ),
        ("Label-frequency baseline", baselines.get("label_frequency_mAP"), None),
        ("All-negative predictor (no label)", None, baselines.get("all_negative_accuracy")),
    ]
    lines = [
        "| | macro mAP | accuracy |",
        "|---|---:|---:|",
        *(f"| {name} | {_figure(m)} | {_figure(a)} |" for name, m, a in rows),
        "",
        f"**Gate ({gate.get('metric', 'mAP')}):** {gate.get('reason', '')}",
        "",
        f"- candidate: `{candidate.get('model_data_url', '?')}` (job `{candidate.get('job', '?')}`)",
        f"- serving model: `{champion}`" if champion else "- serving model: none (the endpoint serves no model)",
    ]
    if report_url:
        lines.append(f"- report: [{report_url.rsplit('/', 1)[-1]}]({report_url})")
    if gate.get("evaluation"):
        lines.append(f"- evaluation: `{gate['evaluation']}`")
    lines += ["", "**Approve** deploys the candidate; **Reject**, or no answer in time, leaves the endpoint as it is."]
    return "\n".join(lines)


def approval_outcome(
    chosen: Sequence[str], responded_by: Mapping[str, Any] | None, *, timeout_h: float | None = None
) -> dict[str, Any]:
    """The approval's answer as the run records it: {"approved", "by", "outcome"}. An answer nobody gave (the
    timeout's default, Reject, written by the scheduler) is "approval timed out"."""
    approved = list(chosen) == [APPROVE]
    by = (responded_by or {}).get("name") or (responded_by or {}).get("id")
    if by is None:
        within = f" (no answer within {timeout_h:g} h)" if timeout_h else ""
        return {"approved": False, "by": None, "outcome": f"approval timed out{within}"}
    return {"approved": approved, "by": by, "outcome": f"{'approved' if approved else 'rejected'} by {by}"}


def with_approval(gate: Mapping[str, Any], approval: Mapping[str, Any] | None) -> dict[str, Any]:
    """The gate's decision after a person's answer (or its timeout): deployed only if both said yes; the reason
    leads with the answer. Without an answer (approval auto, or nobody was asked) the gate's decision as it is."""
    if not approval:
        return dict(gate)
    return {
        **gate,
        "deploy": bool(gate.get("deploy")) and bool(approval.get("approved")),
        "reason": f"{approval['outcome']}; the gate: {gate.get('reason', '')}",
        "approval": dict(approval),
    }


def local_champion(metadata: Mapping[str, Any] | None, endpoint_name: str) -> str | None:
    """The model the local endpoint serves under `endpoint_name` (its /metadata `source`); None if it serves no
    model or serves it under another name (another endpoint's model is no champion for this one)."""
    if not metadata or metadata.get("name") != endpoint_name:
        return None
    return metadata.get("source")


def serving_model(
    backend: str, endpoint_name: str, *, local_url: Callable[[], str], sagemaker: Callable[[], Any]
) -> str | None:
    """The model the run's endpoint serves now, on the run's backend: the local endpoint service's (at
    `local_url()`) or the SageMaker endpoint's (through the client `sagemaker()` makes); None if none. The two are
    callables so a run asks only the backend it uses."""
    if backend == "local":
        from tagflow.local import endpoint

        return local_champion(endpoint.metadata(local_url()), endpoint_name)
    return sagemaker_champion(sagemaker(), endpoint_name)


def sagemaker_champion(sagemaker, endpoint_name: str) -> str | None:
    """The model.tar.gz the SageMaker endpoint `endpoint_name` serves now: DescribeEndpoint → its EndpointConfig →
    the first variant's Model → PrimaryContainer.ModelDataUrl; None if there is no such endpoint. `sagemaker` is a
    boto3 SageMaker client."""
    current = described(lambda name: sagemaker.describe_endpoint(EndpointName=name), endpoint_name)
    if current is None:
        return None
    config = sagemaker.describe_endpoint_config(EndpointConfigName=current["EndpointConfigName"])
    variants = config.get("ProductionVariants") or []
    if not variants:
        return None
    model = described(lambda name: sagemaker.describe_model(ModelName=name), variants[0]["ModelName"])
    if model is None:
        return None
    container = model.get("PrimaryContainer") or (model.get("Containers") or [{}])[0]
    return container.get("ModelDataUrl")


def local_serving_value(metadata: Mapping[str, Any] | None, metric: str) -> float | None:
    """The serving model's `metric` as its own training recorded it (the local endpoint's /metadata, from its
    metrics.json), if it has one. Informative only: the gate re-scores the serving model instead."""
    if not metadata:
        return None
    validation = ((metadata.get("metrics") or {}).get("validation")) or {}
    value = validation.get(metric.split(":", 1)[-1])
    return float(value) if isinstance(value, (int, float)) else None


def tagged_value(tags: Sequence[Mapping[str, str]], metric: str) -> float | None:
    """The objective recorded in an endpoint config's tags, if it is `metric`."""
    found = {t["Key"]: t["Value"] for t in tags}
    if found.get(METRIC_TAG) != metric:
        return None
    try:
        return float(found[VALUE_TAG])
    except (KeyError, ValueError):
        return None


def described(describe: Callable[[str], dict[str, Any]], name: str) -> dict[str, Any] | None:
    """`describe(name)` (a SageMaker Describe* call), or None when there is no such resource: SageMaker answers
    ValidationException ("Could not find endpoint …", "Requested resource not found") for a missing name."""
    from botocore.exceptions import ClientError

    try:
        return describe(name)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("ValidationException", "ResourceNotFound"):
            return None
        raise


def objective_tags(candidate: Mapping[str, Any]) -> list[dict[str, str]]:
    """The training job and its own objective value (for the console; a job may report none)."""
    tags = [{"Key": METRIC_TAG, "Value": candidate["metric"]}, {"Key": JOB_TAG, "Value": candidate["job"]}]
    if isinstance(candidate.get("value"), (int, float)):
        tags.insert(1, {"Key": VALUE_TAG, "Value": repr(float(candidate["value"]))})
    return tags


def sagemaker_endpoint_config(
    candidate: Mapping[str, Any],
    *,
    run_key: str,
    endpoint_name: str,
    image_uri: str,
    role_arn: str,
    instance_type: str,
    instance_count: int = 1,
) -> dict[str, Any]:
    """The SageMakerEndpointOperator config (Model, EndpointConfig, Endpoint) serving `candidate`.

    Model and endpoint-config names are new per run, so an update is blue/green: SageMaker keeps the old config
    serving until the new one is InService, and a failed update leaves it serving. Old configs are not deleted.
    """
    model_name = job_name(f"{endpoint_name}-model", run_key)
    config_name = job_name(f"{endpoint_name}-config", run_key)
    tags = objective_tags(candidate)
    return {
        "Model": {
            "ModelName": model_name,
            "PrimaryContainer": {"Image": image_uri, "ModelDataUrl": candidate["model_data_url"]},
            "ExecutionRoleArn": role_arn,
            "Tags": tags,
        },
        "EndpointConfig": {
            "EndpointConfigName": config_name,
            "ProductionVariants": [
                {
                    "VariantName": "AllTraffic",
                    "ModelName": model_name,
                    "InitialInstanceCount": instance_count,
                    "InstanceType": instance_type,
                    "InitialVariantWeight": 1.0,
                }
            ],
            "Tags": tags,
        },
        "Endpoint": {"EndpointName": endpoint_name, "EndpointConfigName": config_name},
    }


def check_switched(endpoint: Mapping[str, Any], config_name: str) -> None:
    """After a create or update has settled (DescribeEndpoint's shape): TagflowError unless the endpoint serves
    `config_name`. A failed blue/green update leaves the endpoint InService on its old config, which a waiter for
    InService takes for success; this says what happened instead."""
    current = endpoint.get("EndpointConfigName")
    if current != config_name:
        reason = endpoint.get("FailureReason", "no reason given")
        raise TagflowError(
            f"endpoint {endpoint.get('EndpointName')} did not switch to {config_name}: it still serves {current} "
            f"({endpoint.get('EndpointStatus')}; {reason}). The old model keeps serving."
        )


def smoke_image(dataset_uri: str, client=None) -> tuple[int, bytes]:
    """(image ID, encoded bytes) of the first validation record, fetched with two small reads (no full download)."""
    from tagflow.recordio import RecordReader, unpack_payload  # numpy: not at import (the DAG file imports this)

    client = client or s3.make_client()
    layout = DatasetLayout.of(dataset_uri)
    idx, rec = layout.val_idx, layout.val_rec
    lines = client.get_object(Bucket=idx.bucket, Key=idx.key)["Body"].read().decode().split("\n")
    offsets = [int(line.split("\t")[1]) for line in lines[:2] if line.strip()]
    if not offsets:
        raise TagflowError(f"{idx}: no validation record to smoke-test the endpoint with")
    byte_range = f"bytes={offsets[0]}-{offsets[1] - 1}" if len(offsets) > 1 else f"bytes={offsets[0]}-"
    data = client.get_object(Bucket=rec.bucket, Key=rec.key, Range=byte_range)["Body"].read()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "first.rec"
        path.write_bytes(data)
        with RecordReader(path) as reader:
            header, _, image = unpack_payload(reader.read_at(0))
    return int(header.id), image


def smoke_test(
    backend: str,
    endpoint_name: str,
    dataset_uri: str,
    num_classes: int,
    client,
    *,
    local_url: Callable[[], str],
    runtime: Callable[[], Any],
) -> dict[str, Any]:
    """Send the dataset's first validation image through InvokeEndpoint — the local endpoint service's route (at
    `local_url()`) or SageMaker Runtime (the client `runtime()` makes) — and check the answer is `num_classes`
    probabilities. Returns the endpoint, the image ID and the top three labels."""
    from tagflow.local import endpoint

    image_id, image = smoke_image(dataset_uri, client)
    invoker = endpoint.runtime_client(local_url()) if backend == "local" else runtime()
    response = invoker.invoke_endpoint(
        EndpointName=endpoint_name, ContentType=endpoint.content_type_of(image), Body=image
    )
    probabilities = check_prediction(response["Body"].read(), num_classes, endpoint_name)
    top = sorted(range(len(probabilities)), key=lambda i: -probabilities[i])[:3]
    return {"endpoint": endpoint_name, "image_id": image_id, "top": top,
            "top_probabilities": [round(probabilities[i], 3) for i in top]}  # fmt: skip


def check_prediction(body: bytes, num_classes: int, endpoint: str) -> list[float]:
    """The endpoint's answer as probabilities; TagflowError unless it is `num_classes` numbers in [0, 1]."""
    try:
        probabilities = json.loads(body)
    except ValueError:
        raise TagflowError(f"endpoint {endpoint} answered {body[:80]!r}, not JSON") from None
    if not (
        isinstance(probabilities, list)
        and len(probabilities) == num_classes
        and all(isinstance(p, (int, float)) and 0.0 <= p <= 1.0 for p in probabilities)
    ):
        raise TagflowError(f"endpoint {endpoint} answered {str(probabilities)[:120]}; expected {num_classes} "
                           "probabilities in [0, 1]")  # fmt: skip
    return [float(p) for p in probabilities]
