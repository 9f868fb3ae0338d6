"""`make demo`: the whole tagflow DAG once on this machine, no AWS account.

Starts the local services (S3 server, empty endpoint), publishes the synthetic demo designs as the
`50-label-rs96` preset expects them (images under s3://tagflow-raw/designs/images, the list as the date partition
`lists/dt=2026-01-01/part.lst`), runs the DAG with `dag.test` (SQLite, every task in one process), then reads
back what a user would look at: the dataset, the model's evaluation (macro mAP beside the label-frequency baseline,
the serving model's mAP on the same split), the gate's decision and where the evaluation and its report are, and
one prediction fetched from the endpoint with boto3's sagemaker-runtime client.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import date
from typing import Any

from tagflow import demo, deploy, jobs, local, runconfig, s3
from tagflow.errors import TagflowError
from tagflow.local import airflow as local_airflow
from tagflow.local import endpoint, services

DEMO_DAY = date(2026, 1, 1)  # one fixed partition: re-running the demo republishes the same list, not a new day
HYPERPARAMETERS = {"num_layers": 18, "epochs": 3, "mini_batch_size": 32, "learning_rate": 0.05}


def run(count: int = 2000, *, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; returns the DAG run's summary plus a prediction. `say` reports progress. What it writes under
    $TAGFLOW_HOME (Airflow's database, the run's log, the servers' files) is the user's only (0600/0700)."""
    with local.private_files():
        return _run(count, say)


def _run(count: int, say: Callable[[str], None]) -> dict[str, Any]:
    from tagflow.local import stack

    if stack.airflow_status() is not None:
        raise TagflowError(
            "`make up` runs Airflow on the same database: trigger the tagflow DAG from its UI instead, "
            "or stop it with `make down` first"
        )
    timings: dict[str, float] = {}
    started = time.perf_counter()
    running = services.start()
    say(f"local S3 server at {running.s3.endpoint}; endpoint at {running.endpoint.url}")
    client = running.s3.client(pool_size=32)
    preset = runconfig.PRESETS["50-label-rs96"]
    raw = s3.S3Uri.parse(preset["images_uri"].rsplit("/", 1)[0])  # images/ and lists/ below it
    data = demo.publish(count, raw, seed=0, client=client, list_key=demo.partition_key(DEMO_DAY))
    timings["services and demo data"] = time.perf_counter() - started

    env = local_airflow.environment(running.s3, variables=running.airflow_variables())
    log_file = local.home() / "airflow" / "demo-run.log"
    say(f"running the tagflow DAG on {data.count} designs (log: {log_file}) ...")
    step = time.perf_counter()
    local_airflow.migrate(env)
    result = local_airflow.run_once(env, {"hyperparameters": HYPERPARAMETERS}, log_file=log_file)
    timings["dag run"] = time.perf_counter() - step
    if result["state"] != "success":
        failed = sorted(t for t, state in result["tasks"].items() if state in ("failed", "upstream_failed"))
        raise TagflowError(f"the DAG run {result['run_id']} {result['state']}: failed tasks {failed}; see {log_file}")

    dataset_uri = result["results"]["publish"]["dataset"]
    served = endpoint.health(running.endpoint.url)  # a deploy names the endpoint as the form did
    if not served["loaded"]:  # the gate refused the only model there is
        result["prediction"] = None
        result["seconds"] = {k: round(v, 1) for k, v in timings.items()}
        return result
    image_id, image = deploy.smoke_image(dataset_uri, client)
    probabilities = endpoint.invoke(replace(running.endpoint, name=served["name"]), image)
    manifest = jobs.read_manifest(dataset_uri, client)
    names = manifest.get("label_names") or [f"label_{i}" for i in range(len(probabilities))]
    top = sorted(range(len(probabilities)), key=lambda i: -probabilities[i])[:5]
    result["prediction"] = {
        "image_id": image_id,
        "top": [{"label": names[i], "probability": round(probabilities[i], 3)} for i in top],
        "true_labels": _true_labels(manifest, image_id),
    }
    result["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    return result


def _true_labels(manifest: dict[str, Any], image_id: int) -> list[str] | None:
    """The demo generator knows each design's labels; None when the manifest has no names to show them by."""
    names = manifest.get("label_names")
    if not names:
        return None
    labels = demo.render_design(image_id, seed=0)[2]
    return [names[i] for i, on in enumerate(labels.tolist()) if on]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _evaluation_lines(gate: dict[str, Any]) -> list[str]:
    """The evaluation's figures: the candidate's macro mAP and accuracy beside their baselines, and the serving
    model's mAP on the same validation split."""
    baselines = gate.get("baselines") or {}
    champion = (
        f"the serving model's mAP on the same split: {_fmt(gate['champion_mAP'])} ({gate['champion']})"
        if gate.get("champion")
        else "no serving model to compare with"
    )
    return [
        f"  mAP {_fmt(gate.get('mAP'))} (label-frequency baseline {_fmt(baselines.get('label_frequency_mAP'))}); "
        f"accuracy {_fmt(gate.get('accuracy'))} (all-negative baseline {_fmt(baselines.get('all_negative_accuracy'))})",
        f"  {champion}",
    ]


def describe(result: dict[str, Any]) -> str:
    """The demo's outcome as a person reads it."""
    states: dict[str, int] = {}
    for state in result["tasks"].values():
        states[state] = states.get(state, 0) + 1
    out = result["results"]
    publish, gate = out["publish"], out["evaluate_gate"]
    downloads = [r for task, r in out.items() if task.startswith("shard.download")]
    counts = publish["counts"]
    candidate = gate["candidate"]
    lines = [
        f"DAG run {result['run_id']}: {result['state']} ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))})",
        f"dataset {publish['dataset']}: {counts['train']} train, {counts['val']} val, {counts['skipped']} skipped "
        f"of {counts['listed']} listed",
        f"  {len(downloads)} shard(s), {sum(r['reused'] for r in downloads)} reused from S3 staging; "
        f"{sum(r.get('fetched', 0) for r in downloads)} images fetched",
        f"model {candidate['model_data_url']}",
        *_evaluation_lines(gate),
        f"gate: {'deployed' if gate['deploy'] else 'kept the serving model'} — {gate['reason']}",
        f"evaluation {gate['evaluation']}",
        f"  report {gate['report']}",
    ]
    pred = result.get("prediction")
    if pred is None:
        lines.append("no prediction: the endpoint has no model (the gate deployed none)")
    else:
        top = ", ".join(f"{t['label']} {t['probability']:.2f}" for t in pred["top"])
        lines.append(f"prediction for validation image {pred['image_id']} (through sagemaker-runtime): {top}")
        if pred.get("true_labels") is not None:
            lines.append(f"  its true labels: {', '.join(pred['true_labels'])}")
    lines.append("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in result.get("seconds", {}).items()))
    return "\n".join(lines)
