"""Run a SageMaker CreateHyperParameterTuningJob request on this machine: trials are local training jobs.

`run_tuning_job(request, workdir=...)` takes the dict `tagflow.sagemaker_config.tuning_job_request` builds (the one
boto3's `create_hyperparameter_tuning_job` takes) and:

1. validates it against botocore's SageMaker service model, then what the local backend supports (strategy
   Bayesian or Random, one TrainingJobDefinition, ranges over hyperparameters the algorithm knows, with range ends
   the algorithm accepts — checked with the trainer's own plain-Python spec, algo/ic_hyperparams.py): a bad request
   raises `InputError` naming the field;
2. searches with Optuna: Bayesian → TPESampler, Random → RandomSampler, both seeded with `RandomSeed` (default: a
   number derived from the tuning job's name, so a re-run proposes the same trials);
3. runs up to MaxNumberOfTrainingJobs trials, MaxParallelTrainingJobs at a time (threads; each trial is its own
   trainer process), named like SageMaker's `TUNINGNAME-NNN-HASH8`, in `WORKDIR/TUNINGNAME/`;
4. reads each trial's objective from its FinalMetricDataList and returns (and saves as
   `WORKDIR/TUNINGNAME/describe.json`) a DescribeHyperParameterTuningJob-shaped dict plus `TrainingJobSummaries`,
   shaped like ListTrainingJobsForHyperParameterTuningJob's. Each trial's own DescribeTrainingJob-shaped dict is
   `WORKDIR/TUNINGNAME/TRIAL/describe.json`.

A trial's objective value — what ranks it, what Optuna is told, `FinalHyperParameterTuningJobObjectiveMetric` and so
`BestTrainingJob` — is that of the model the trial saved (`saved-model:<objective>`, which the trainer logs at the
end: its best epoch), not its last epoch's: the best trial is the one whose model.tar.gz is best. (SageMaker ranks the
built-in's trials by their final value; locally the saved model is what gets deployed.) An objective without a
`saved-model:` counterpart (one already naming the saved model) is read as is. Early stopping still judges the
per-epoch values as they stream.

Ranges and ScalingType: Continuous → `suggest_float`, Integer → `suggest_int`, Categorical → `suggest_categorical`.
Linear and Auto sample uniformly (SageMaker's Auto may pick log scale on its own; locally it stays linear, which is
predictable); Logarithmic samples uniformly in log space (`log=True`, needs MinValue > 0). ReverseLogarithmic (for
values close to 1, e.g. momentum; SageMaker needs 0 ≤ MinValue < MaxValue < 1) samples y = 1 − x log-uniformly over
[1 − MaxValue, 1 − MinValue] and returns x = 1 − y, so values crowd near MaxValue.

Early stopping (`TrainingJobEarlyStoppingType: Auto`): SageMaker stops a trial whose objective at an epoch is worse
than the median of the previous trials' running averages up to that epoch; locally that is Optuna's MedianPruner,
the same idea with Optuna's definition (the trial's best value so far against the median of the completed trials'
values at that epoch, so a little more lenient with a trial that dips once). Each
trial's `Epoch[E] <objective>=V` log lines are reported to Optuna as they stream (`trial.report(V, E)`, through the
runner's `on_line`), and when `trial.should_prune()` says so the trial's stop event is set: the runner SIGTERMs the
trainer, which saves the best model so far; the trial ends `Stopped` with that saved model's objective value
(ObjectiveStatus Succeeded, counted under TrainingJobStatusCounters.Stopped, as SageMaker reports early-stopped
trials) and is told to Optuna as pruned. Pruner settings: `n_startup_trials=1` (a local tuning job has a handful of
trials; waiting for Optuna's default 5 completed trials would stop nothing), `n_warmup_steps=1` (never judge on the
first epoch alone: epoch 0 is noisy and every trial gets one comparison point more), `interval_steps=1`. Only
completed trials form the median, so with MaxParallelTrainingJobs > 1 the first trials run to the end. Optuna's
in-memory storage guards every call with a lock, so reporting from the trials' log threads is safe. With early
stopping Off, the values are still reported (the study holds the learning curves) but nothing is stopped.

A failed trial is reported (TrainingJobStatusCounters.NonRetryableError, ObjectiveStatus Failed) and told to
Optuna as failed; the tuning job fails only when no trial yields the objective.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tagflow.errors import InputError
from tagflow.local.runner import FAILURE_REASON_MAX, run_training_job
from tagflow.local.runner import validate_request as validate_training_request
from tagflow.sagemaker_config import (
    LOCAL_METRIC_DEFINITIONS,
    METRIC_DEFINITIONS,
    TRAINING_NAME_MAX,
    TUNING_STRATEGIES,
    hyperparameter_spec,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    import optuna

    from tagflow.s3 import S3Client

log = logging.getLogger(__name__)

ARN_PREFIX = "arn:aws:sagemaker:local:000000000000:hyper-parameter-tuning-job/"
TRAINING_ARN_PREFIX = "arn:aws:sagemaker:local:000000000000:training-job/"
EPOCH = re.compile(r"Epoch\[(\d+)\]")
PRUNER_STARTUP_TRIALS = 1  # completed trials before any trial can be stopped (see the module docstring)
PRUNER_WARMUP_EPOCHS = 1  # the first epoch (0) is never judged


# --- request validation ----------------------------------------------------------------------------------------


def _number(text: str, field: str, kind: str) -> float:
    try:
        value = int(text) if kind == "Integer" else float(text)
    except (TypeError, ValueError):
        raise InputError(f"{field}: {text!r} is not a{'n integer' if kind == 'Integer' else ' number'}") from None
    if not math.isfinite(value):
        raise InputError(f"{field}: {text!r} is not a finite number")
    return value


def _check_range(rng: dict[str, Any], kind: str, field: str) -> None:
    low = _number(rng["MinValue"], f"{field}.MinValue", kind)
    high = _number(rng["MaxValue"], f"{field}.MaxValue", kind)
    if low > high:
        raise InputError(f"{field}: MinValue {rng['MinValue']} is greater than MaxValue {rng['MaxValue']}")
    scaling = rng.get("ScalingType", "Auto")
    if scaling == "Logarithmic" and low <= 0:
        raise InputError(f"{field}: ScalingType Logarithmic needs MinValue > 0, got {rng['MinValue']}")
    if scaling == "ReverseLogarithmic":
        if kind == "Integer":
            raise InputError(f"{field}: ScalingType ReverseLogarithmic is for Continuous ranges only")
        if not (low >= 0 and high < 1):
            raise InputError(
                f"{field}: ScalingType ReverseLogarithmic needs 0 ≤ MinValue ≤ MaxValue < 1, "
                f"got [{rng['MinValue']}, {rng['MaxValue']}]"
            )


def validate_request(request: dict[str, Any]) -> None:
    """Raise InputError naming the field when `request` is not a valid CreateHyperParameterTuningJob request or
    asks for something the local backend does not do."""
    import botocore.session
    from botocore.validate import ParamValidator

    model = botocore.session.get_session().get_service_model("sagemaker")
    shape = model.operation_model("CreateHyperParameterTuningJob").input_shape
    report = ParamValidator().validate(request, shape)
    if report.has_errors():
        raise InputError(f"CreateHyperParameterTuningJob request is invalid:\n{report.generate_report()}")
    name = request["HyperParameterTuningJobName"]
    pattern = shape.members["HyperParameterTuningJobName"].metadata["pattern"]
    if not re.fullmatch(pattern, name):
        raise InputError(f"HyperParameterTuningJobName: {name!r} does not match SageMaker's pattern {pattern}")
    config = request["HyperParameterTuningJobConfig"]
    if config["Strategy"] not in TUNING_STRATEGIES:
        raise InputError(f"HyperParameterTuningJobConfig.Strategy: {config['Strategy']!r}; locally {TUNING_STRATEGIES}")
    objective = config.get("HyperParameterTuningJobObjective")
    metrics = {d["Name"] for d in (*METRIC_DEFINITIONS, *LOCAL_METRIC_DEFINITIONS)}
    if objective is None or objective["MetricName"] not in metrics:
        got = objective and objective["MetricName"]
        raise InputError(
            f"HyperParameterTuningJobConfig.HyperParameterTuningJobObjective.MetricName: {got!r}; expected one of "
            f"{', '.join(sorted(metrics))}"
        )
    for unsupported in ("StrategyConfig", "TuningJobCompletionCriteria"):
        if unsupported in config:
            raise InputError(f"HyperParameterTuningJobConfig.{unsupported}: not supported by the local backend")
    if "TrainingJobDefinition" not in request or "TrainingJobDefinitions" in request or "WarmStartConfig" in request:
        raise InputError("TrainingJobDefinition: the local backend runs exactly one, without WarmStartConfig")
    ranges = config.get("ParameterRanges") or {}
    if ranges.get("AutoParameters"):
        raise InputError("HyperParameterTuningJobConfig.ParameterRanges.AutoParameters: not supported locally")

    spec = hyperparameter_spec()
    static = dict(request["TrainingJobDefinition"].get("StaticHyperParameters", {}))
    seen: set[str] = set()
    ends: list[tuple[str, str, str]] = []  # (field, hyperparameter, value) to try with the trainer's parser
    for kind in ("Integer", "Continuous", "Categorical"):
        for i, rng in enumerate(ranges.get(f"{kind}ParameterRanges", [])):
            field = f"ParameterRanges.{kind}ParameterRanges[{i}] ({rng['Name']})"
            hp = rng["Name"]
            if hp not in spec.KNOWN:
                raise InputError(
                    f"{field}: unknown hyperparameter {hp!r}; the algorithm accepts {', '.join(sorted(spec.KNOWN))}"
                )
            if hp in seen:
                raise InputError(f"{field}: {hp!r} has more than one range")
            if hp in static:
                raise InputError(f"{field}: {hp!r} is also a StaticHyperParameter; tune it or fix it, not both")
            seen.add(hp)
            if kind == "Categorical":
                if len(set(rng["Values"])) != len(rng["Values"]):
                    raise InputError(f"{field}.Values: {rng['Values']} repeats a value")
                ends += [(f"{field}.Values", hp, v) for v in rng["Values"]]
            else:
                _check_range(rng, kind, field)
                ends += [(f"{field}.MinValue", hp, rng["MinValue"]), (f"{field}.MaxValue", hp, rng["MaxValue"])]
    if not seen:
        raise InputError("HyperParameterTuningJobConfig.ParameterRanges: no range to tune")
    # Every value a range can reach, with the static hyperparameters, must be one the algorithm accepts.
    first = {hp: value for _, hp, value in reversed(ends)}
    for field, hp, value in ends:
        try:
            spec.parse({**static, **first, hp: value})
        except spec.HyperparameterError as err:
            raise InputError(f"{field}: {err}") from None
    validate_training_request(_trial_request(request, "validation-probe", {k: str(v) for k, v in first.items()}))


# --- search space ----------------------------------------------------------------------------------------------


def _suggest(trial: optuna.Trial, config: dict[str, Any]) -> dict[str, str]:
    """One set of tuned hyperparameters (SageMaker strings) from Optuna, each range with its ScalingType."""
    ranges = config["ParameterRanges"]
    out: dict[str, str] = {}
    for rng in ranges.get("IntegerParameterRanges", []):
        log_scale = rng.get("ScalingType") == "Logarithmic"
        out[rng["Name"]] = str(
            trial.suggest_int(rng["Name"], int(rng["MinValue"]), int(rng["MaxValue"]), log=log_scale)
        )
    for rng in ranges.get("ContinuousParameterRanges", []):
        low, high, scaling = float(rng["MinValue"]), float(rng["MaxValue"]), rng.get("ScalingType", "Auto")
        if scaling == "ReverseLogarithmic":
            # y = 1 - x, log-uniform; 1 - MaxValue can be tiny but is > 0 because MaxValue < 1.
            value = 1.0 - trial.suggest_float(f"1-{rng['Name']}", 1.0 - high, 1.0 - low, log=True)
        else:
            value = trial.suggest_float(rng["Name"], low, high, log=scaling == "Logarithmic")
        out[rng["Name"]] = repr(value)
    for rng in ranges.get("CategoricalParameterRanges", []):
        out[rng["Name"]] = trial.suggest_categorical(rng["Name"], list(rng["Values"]))
    return out


def _seed(request: dict[str, Any]) -> int:
    config = request["HyperParameterTuningJobConfig"]
    if "RandomSeed" in config:
        return int(config["RandomSeed"])
    return int(hashlib.sha256(request["HyperParameterTuningJobName"].encode()).hexdigest()[:8], 16)


def trial_name(tuning_name: str, number: int, tuned: dict[str, str]) -> str:
    """SageMaker's trial naming: `TUNINGNAME-NNN-HASH8` (number from 1; hash of the tuned hyperparameters)."""
    digest = hashlib.sha256(json.dumps([tuning_name, number, tuned], sort_keys=True).encode()).hexdigest()[:8]
    name = f"{tuning_name}-{number:03d}-{digest}"
    assert len(name) <= TRAINING_NAME_MAX, name
    return name


def _trial_request(request: dict[str, Any], name: str, tuned: dict[str, str]) -> dict[str, Any]:
    """The CreateTrainingJob request SageMaker makes for one trial of the TrainingJobDefinition."""
    definition = request["TrainingJobDefinition"]
    algorithm = {k: v for k, v in definition["AlgorithmSpecification"].items() if k != "MetricDefinitions"}
    trial: dict[str, Any] = {
        "TrainingJobName": name,
        "AlgorithmSpecification": algorithm,
        "RoleArn": definition["RoleArn"],
        "HyperParameters": {**definition.get("StaticHyperParameters", {}), **tuned},
        "InputDataConfig": definition["InputDataConfig"],
        "OutputDataConfig": definition["OutputDataConfig"],
        "ResourceConfig": definition["ResourceConfig"],
        "StoppingCondition": definition["StoppingCondition"],
    }
    return trial


# --- running ---------------------------------------------------------------------------------------------------


def _summary(
    tuning_name: str, describe: dict[str, Any], tuned: dict[str, str], objective: dict[str, str]
) -> dict[str, Any]:
    """A HyperParameterTrainingJobSummary for one finished trial."""
    status = describe["TrainingJobStatus"]
    final = {m["MetricName"]: m["Value"] for m in describe.get("FinalMetricDataList", [])}
    summary: dict[str, Any] = {
        "TrainingJobName": describe["TrainingJobName"],
        "TrainingJobArn": describe["TrainingJobArn"],
        "TuningJobName": tuning_name,
        "CreationTime": describe["CreationTime"],
        "TrainingJobStatus": status,
        "TunedHyperParameters": tuned,
        "ObjectiveStatus": "Failed",
    }
    for key in ("TrainingStartTime", "TrainingEndTime", "FailureReason"):
        if key in describe:
            summary[key] = describe[key]
    metric = objective["MetricName"]
    value = final.get(f"saved-model:{metric}", final.get(metric))  # the saved model's (see the module docstring)
    if status in ("Completed", "Stopped") and value is not None:  # a stopped trial saved its best epoch so far
        summary["FinalHyperParameterTuningJobObjectiveMetric"] = {
            "Type": objective["Type"],
            "MetricName": metric,
            "Value": float(value),
        }
        summary["ObjectiveStatus"] = "Succeeded"
    elif status in ("Completed", "Stopped"):
        summary["FailureReason"] = f"the objective metric {metric} was not found in the trial's log"
    return summary


def _objective_reader(metric: str) -> Callable[[str], tuple[int, float] | None]:
    """A function reading (epoch, objective value) from one log line, or None when the line has no value."""
    regex = re.compile(
        next(d["Regex"] for d in (*METRIC_DEFINITIONS, *LOCAL_METRIC_DEFINITIONS) if d["Name"] == metric)
    )

    def read(line: str) -> tuple[int, float] | None:
        match, epoch = regex.search(line), EPOCH.search(line)
        if match is None or epoch is None:
            return None
        try:
            value = float(match.group(1))
        except ValueError:
            return None
        return (int(epoch.group(1)), value) if math.isfinite(value) else None

    return read


def run_tuning_job(
    request: dict[str, Any],
    *,
    workdir: Path,
    client: S3Client | None = None,
    mxnet_python: Path | None = None,
    on_line: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Run the CreateHyperParameterTuningJob `request` locally to the end; return a
    DescribeHyperParameterTuningJob-shaped dict with every trial's summary under `TrainingJobSummaries`.

    `on_line(trial_name, line)` is called (from the trials' reader threads) with each line of each trial's log.

    Raises InputError for an invalid request; failed trials (and a tuning job whose trials all failed) are
    reported in the returned dict. Stages: validate, build the study, run the trials, describe.
    """
    validate_request(request)
    name = request["HyperParameterTuningJobName"]
    config = request["HyperParameterTuningJobConfig"]
    limits = config["ResourceLimits"]
    max_jobs, max_parallel = limits["MaxNumberOfTrainingJobs"], limits["MaxParallelTrainingJobs"]
    seed = _seed(request)
    early_stopping = config.get("TrainingJobEarlyStoppingType", "Off") == "Auto"
    study = _study(name, config, seed)
    trial_dir = Path(workdir) / name
    trial_dir.mkdir(parents=True, exist_ok=True)
    created = datetime.now(UTC)
    log.info(
        "tuning job %s: %s search, %d trial(s), %d at a time, seed %d, early stopping %s",
        name, config["Strategy"], max_jobs, max_parallel, seed, "Auto" if early_stopping else "Off",
    )  # fmt: skip

    def run_trial(number: int, trial: optuna.Trial, tuned: dict[str, str]) -> tuple[dict[str, Any], bool]:
        job = trial_name(name, number, tuned)
        return _run_trial(
            request, job, trial, tuned, early_stopping=early_stopping, workdir=trial_dir, client=client,
            mxnet_python=mxnet_python, on_line=on_line,
        )  # fmt: skip

    summaries = _search(study, config, run_trial, max_jobs, max_parallel, name)
    describe = _describe(request, summaries, created, maximize=study.direction.name == "MAXIMIZE")
    (trial_dir / "describe.json").write_text(json.dumps(describe, indent=2, default=str))
    return describe


def _study(name: str, config: dict[str, Any], seed: int) -> optuna.Study:
    """An Optuna study for the request's strategy (seeded), direction and early stopping's median pruner."""
    import optuna

    sampler: optuna.samplers.BaseSampler = (
        optuna.samplers.TPESampler(seed=seed)
        if config["Strategy"] == "Bayesian"
        else optuna.samplers.RandomSampler(seed)
    )
    direction = "maximize" if config["HyperParameterTuningJobObjective"]["Type"] == "Maximize" else "minimize"
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_EPOCHS, interval_steps=1
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=name, direction=direction, sampler=sampler, pruner=pruner)


def _run_trial(
    request: dict[str, Any],
    job: str,
    trial: optuna.Trial,
    tuned: dict[str, str],
    *,
    early_stopping: bool,
    workdir: Path,
    client: S3Client | None,
    mxnet_python: Path | None,
    on_line: Callable[[str, str], None] | None,
) -> tuple[dict[str, Any], bool]:
    """Run one trial as a local training job, reporting each epoch's objective to Optuna (which may stop it
    early); (its summary, whether early stopping stopped it)."""
    objective = dict(request["HyperParameterTuningJobConfig"]["HyperParameterTuningJobObjective"])
    read_objective = _objective_reader(objective["MetricName"])
    log.info("trial %s: %s", job, tuned)
    stop = threading.Event()
    reported: set[int] = set()

    def read_line(line: str) -> None:
        if on_line is not None:
            try:
                on_line(job, line)
            except Exception:  # the caller's bug must not cost the trial its pruning
                log.exception("trial %s: on_line callback failed on %r", job, line)
        found = read_objective(line)
        if found is None or found[0] in reported or stop.is_set():
            return
        epoch, value = found
        reported.add(epoch)
        trial.report(value, epoch)
        if early_stopping and trial.should_prune():
            log.info("trial %s: %s=%s at epoch %d is below the median: stopping it", job,
                     objective["MetricName"], value, epoch)  # fmt: skip
            stop.set()

    describe = run_training_job(
        _trial_request(request, job, tuned),
        workdir=workdir,
        client=client,
        mxnet_python=mxnet_python,
        on_line=read_line,
        stop=stop,
    )
    return _summary(request["HyperParameterTuningJobName"], describe, tuned, objective), stop.is_set()


def _search(
    study: optuna.Study,
    config: dict[str, Any],
    run_trial: Callable[[int, optuna.Trial, dict[str, str]], tuple[dict[str, Any], bool]],
    max_jobs: int,
    max_parallel: int,
    name: str,
) -> list[dict[str, Any]]:
    """Ask, run and tell `max_jobs` trials, `max_parallel` at a time; every trial's summary, by name."""
    import optuna

    summaries: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix=f"tune-{name}") as pool:
        running: dict[Future[tuple[dict[str, Any], bool]], optuna.Trial] = {}
        started = 0
        while started < max_jobs or running:
            while started < max_jobs and len(running) < max_parallel:
                started += 1
                trial = study.ask()  # asked in this thread, in order: a seeded Random search is reproducible
                running[pool.submit(run_trial, started, trial, _suggest(trial, config))] = trial
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                trial = running.pop(future)
                summary, stopped = future.result()
                summaries.append(summary)
                metric = summary.get("FinalHyperParameterTuningJobObjectiveMetric")
                if stopped and summary["TrainingJobStatus"] == "Stopped":
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)  # Optuna keeps its last reported value
                    log.info("trial %s stopped early: %s", summary["TrainingJobName"], metric)
                elif metric is None:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    log.warning("trial %s failed: %s", summary["TrainingJobName"], summary.get("FailureReason"))
                else:
                    study.tell(trial, metric["Value"])
                    log.info("trial %s: %s = %s", summary["TrainingJobName"], metric["MetricName"], metric["Value"])
    return sorted(summaries, key=lambda s: s["TrainingJobName"])


def _describe(
    request: dict[str, Any], summaries: list[dict[str, Any]], created: datetime, *, maximize: bool
) -> dict[str, Any]:
    """The DescribeHyperParameterTuningJob answer once every trial has ended: counters, the best trial (or why
    there is none)."""
    name = request["HyperParameterTuningJobName"]
    scored = [s for s in summaries if "FinalHyperParameterTuningJobObjectiveMetric" in s]
    statuses = [s["TrainingJobStatus"] for s in summaries]
    ended = datetime.now(UTC)
    describe: dict[str, Any] = {
        "HyperParameterTuningJobName": name,
        "HyperParameterTuningJobArn": ARN_PREFIX + name.lower(),
        "HyperParameterTuningJobConfig": request["HyperParameterTuningJobConfig"],
        "TrainingJobDefinition": request["TrainingJobDefinition"],
        "HyperParameterTuningJobStatus": "Completed" if scored else "Failed",
        "CreationTime": created,
        "HyperParameterTuningEndTime": ended,
        "LastModifiedTime": ended,
        "TrainingJobStatusCounters": {
            "Completed": statuses.count("Completed"),
            "InProgress": 0,
            "RetryableError": 0,
            "NonRetryableError": statuses.count("Failed"),
            "Stopped": statuses.count("Stopped"),
        },
        "ObjectiveStatusCounters": {
            "Succeeded": len(scored),
            "Pending": 0,
            "Failed": len(summaries) - len(scored),
        },
        "TrainingJobSummaries": summaries,
    }
    if scored:
        sign = 1 if maximize else -1
        best = max(scored, key=lambda s: sign * s["FinalHyperParameterTuningJobObjectiveMetric"]["Value"])
        describe["BestTrainingJob"] = best
        log.info("tuning job %s: best trial %s", name, best["TrainingJobName"])
    else:
        reasons = "; ".join(f"{s['TrainingJobName']}: {s.get('FailureReason', '?')}" for s in summaries)
        describe["FailureReason"] = f"All training jobs failed. {reasons}"[:FAILURE_REASON_MAX]
        log.error("tuning job %s failed: every trial failed", name)
    return describe
