"""The `tagflow` command: one verb per pipeline stage, each a thin call into the library.

Every verb prints progress on stderr for long work, a one-line summary (or `--json`) on stdout, and on bad input a
message naming the file, line or value, with exit status 2 (other failures: 1). No tracebacks for user errors.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from tagflow.errors import TagflowError, describe_os_error, os_error_exit_code
from tagflow.layout import DatasetLayout

app = typer.Typer(
    name="tagflow",
    help="Train and ship a multi-label image tagger: list file → images → RecordIO → S3 → training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
s3_app = typer.Typer(help="The local S3 server (SeaweedFS) for runs without AWS.", no_args_is_help=True)
app.add_typer(s3_app, name="s3")

MAX_RESIZE = 1024  # as the trigger form's Resize field (tagflow.runconfig.PARAMS["resize"])
MaxPixels = Annotated[
    int | None,
    typer.Option(
        "--max-pixels",
        min=1,
        help="Refuse source images above this many pixels (width × height, read from the header) as bad images "
        "(default: 4096 × 4096); packing needs about 18 bytes per pixel of this per worker.",
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout instead of a sentence.")]
NumLabels = Annotated[int, typer.Option("--num-labels", "-n", min=1, help="Label columns per line (50 or 334).")]
MaybeNumLabels = Annotated[
    int | None,
    typer.Option("--num-labels", "-n", min=1, help="Label columns per line (default: counted on the first line)."),
]
LabelsOpt = Annotated[
    str | None,
    typer.Option("--labels", help="Label names, one per line in column order (file or s3:// URI)."),
]
# The split's group key (tagflow.shards.plan_split): the same two options, same meaning, on `run` and `pack`.
GroupRegexOpt = Annotated[
    str | None,
    typer.Option(
        "--group-regex",
        metavar="REGEX",
        help="Split by group, not by image: a group is the images that must stay on one side of the train/val "
        "split (variants of one design). The group is this regular expression's first capture group over each list "
        "path, else its whole match, e.g. '^designs/([^/]+)/'; a path it does not match is refused (exit 2, naming "
        "the list line). A group keeps its side as the list grows.",
    ),
]
GroupFileOpt = Annotated[
    str | None,
    typer.Option(
        "--group-file",
        metavar="FILE",
        help="Split by group, the groups given by ID: a file or s3:// object of ID<TAB>GROUP lines; a listed image "
        "it gives no group is refused (exit 2, naming the list line). Not with --group-regex.",
    ),
]


INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C (128 + SIGINT)
# What an interrupted verb leaves behind, said after `tagflow: interrupted`; a verb that writes sets its own.
_left_behind = ["nothing half-written was left (outputs are written under temporary names and renamed when whole)"]


def _on_interrupt(sentence: str) -> None:
    _left_behind[0] = sentence


def _max_pixels(value: int | None) -> dict[str, int]:
    """PackParams' max_pixels when the flag was given (its default lives in tagflow.pack)."""
    return {} if value is None else {"max_pixels": value}


def _group_key(regex: str | None, group_file: str | None) -> None:
    """Refuse two group keys, or an empty one, before anything is read."""
    from tagflow.errors import InputError

    if regex is not None and group_file is not None:
        raise InputError("--group-regex and --group-file were both given; choose one group key")
    if regex == "" or group_file == "":
        raise InputError(f"{'--group-regex' if regex == '' else '--group-file'} is empty; omit it to split by image ID")


def _emit(as_json: bool, summary: dict[str, Any], sentence: str) -> None:
    typer.echo(json.dumps(summary, indent=1, sort_keys=True, default=str) if as_json else sentence)


@contextmanager
def _progress(description: str) -> Iterator[Callable[..., None]]:
    """A progress bar on stderr; yields `update(done, total, *extra)`. Silent when stderr is not a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        last = [0.0]

        def log_line(done: int, total: int, *_: Any) -> None:
            now = time.monotonic()
            if done == total or now - last[0] >= 5:
                last[0] = now
                print(f"{description}: {done}/{total}", file=sys.stderr, flush=True)

        yield log_line
        return
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int, *_: Any) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@app.command()
def parse(
    list_file: Annotated[str, typer.Argument(help="The list file: a local path or s3:// URI.")],
    num_labels: NumLabels,
    labels: LabelsOpt = None,
    out: Annotated[Path | None, typer.Option(help="Write the normalized list (tabs, LF, sorted by ID) here.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Validate a list file (ID, N labels of 0/1, path per line); exit 2 with LIST:LINE errors if it is bad."""
    from tagflow.listfile import list_warnings, load_label_names, parse_list, write_list
    from tagflow.s3 import read_location

    raw, name = read_location(list_file)
    listfile = parse_list(raw, num_labels, name=name).sorted_by_id()
    names = load_label_names(labels, num_labels)
    warnings = list_warnings(listfile, names)  # after sorting: its examples keep their file lines
    if out:
        write_list(listfile, out)
    counts = listfile.label_counts()
    summary = {
        "list": name,
        "images": len(listfile),
        "num_labels": num_labels,
        "sha256": listfile.sha256,
        "label_counts": dict(zip(names, (int(c) for c in counts), strict=True)),
        "normalized": str(out) if out else None,
        "warnings": warnings.to_dict(),
    }
    per_image = float(counts.sum()) / max(len(listfile), 1)
    _emit(
        as_json,
        summary,
        f"{name}: {len(listfile)} images, {num_labels} labels, {per_image:.2f} labels per image, "
        f"sha256 {listfile.sha256[:12]}"
        + (f", normalized list at {out}" if out else "")
        + "".join(f"\nwarning: {message}" for message in warnings.messages()),
    )


@app.command()
def download(
    list_file: Annotated[str, typer.Argument(help="The list file: a local path or s3:// URI.")],
    dest: Annotated[Path, typer.Option(help="Local folder for the mirror (the --root of `tagflow pack`).")],
    num_labels: MaybeNumLabels = None,
    source: Annotated[str | None, typer.Option(help="s3://BUCKET/PREFIX that relative list paths are under.")] = None,
    workers: Annotated[int, typer.Option(min=1, max=256, help="Concurrent requests.")] = 32,
    max_bad_fraction: Annotated[float, typer.Option(min=0, max=1, help="Fail above this share of bad objects.")] = 0.01,
    as_json: JsonFlag = False,
) -> None:
    """Mirror the images a list file names into DEST; already present, unchanged objects are not fetched again."""
    from tagflow import download as dl
    from tagflow.listfile import infer_num_labels, parse_list
    from tagflow.s3 import S3Uri, read_location

    raw, name = read_location(list_file)
    listfile = parse_list(raw, num_labels or infer_num_labels(raw, name=name), name=name)
    _on_interrupt(f"the images already in {dest} are whole and kept; a re-run fetches only the rest")
    with _progress("download") as update:
        report = dl.download(
            listfile.paths,
            dest,
            source=S3Uri.parse(source) if source else None,
            workers=workers,
            max_bad_fraction=max_bad_fraction,
            progress=update,
        )
    _emit(
        as_json,
        report.to_dict(),
        f"{dest}: {report.fetched} fetched, {report.already_present} already present, "
        f"{len(report.errors)} skipped, {report.bytes / 1e6:.1f} MB in {report.seconds:.1f}s",
    )


@app.command()
def pack(
    list_file: Annotated[str, typer.Option("--list", help="The list file: a local path or s3:// URI.")],
    root: Annotated[Path, typer.Option(help="Folder the list paths are relative to (a leading / is tolerated).")],
    out_dir: Annotated[Path, typer.Option(help="Writes train.rec/.idx, val.rec/.idx and manifest.json here.")],
    num_labels: MaybeNumLabels = None,
    labels: LabelsOpt = None,
    resize: Annotated[
        int, typer.Option(min=8, max=MAX_RESIZE, help="Shorter side in pixels, like im2rec --resize.")
    ] = 96,
    center_crop: Annotated[bool, typer.Option(help="Crop the centre square first: exact RESIZE×RESIZE.")] = False,
    quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG quality.")] = 95,
    encoding: Annotated[str, typer.Option(help="Image encoding inside records: .jpg or .png.")] = ".jpg",
    train_ratio: Annotated[
        float, typer.Option(min=0, max=1, help="Share of images (or of groups) in train, stable by ID (or group).")
    ] = 0.9,
    group_regex: GroupRegexOpt = None,
    group_file: GroupFileOpt = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Processes (default: all cores).")] = None,
    engine: Annotated[str, typer.Option(help="native, or mxnet (MXNet's own im2rec, for comparison).")] = "native",
    max_pixels: MaxPixels = None,
    max_bad_fraction: Annotated[float, typer.Option(min=0, max=1, help="Fail above this share of bad images.")] = 0.01,
    as_json: JsonFlag = False,
) -> None:
    """Pack images into im2rec-compatible RecordIO with multi-hot labels, split train/val by a hash of the ID (or
    of its group, with --group-regex or --group-file)."""
    from tagflow import manifest
    from tagflow import pack as packing
    from tagflow.errors import InputError, check_bad_fraction
    from tagflow.listfile import infer_num_labels, list_warnings, load_label_names, parse_list
    from tagflow.paths import local_path
    from tagflow.pipeline import load_groups
    from tagflow.s3 import read_location
    from tagflow.shards import compile_group_regex, plan_split, sides_by_id

    if engine not in ("native", "mxnet"):
        raise InputError(f"--engine {engine!r}: expected 'native' or 'mxnet'")
    _group_key(group_regex, group_file)
    if group_regex is not None:
        compile_group_regex(group_regex)
    params = packing.PackParams(
        resize=resize,
        center_crop=center_crop,
        quality=quality,
        encoding=encoding,
        train_ratio=train_ratio,
        **_max_pixels(max_pixels),
    )
    raw, name = read_location(list_file)
    num_labels = num_labels or infer_num_labels(raw, name=name)
    listfile = parse_list(raw, num_labels, name=name).sorted_by_id()
    names = load_label_names(labels, num_labels)
    for message in list_warnings(listfile, names).messages():
        typer.echo(f"warning: {message}", err=True)
    grouped = group_regex is not None or group_file is not None
    split = plan_split(listfile, train_ratio, regex=group_regex, groups=load_groups(group_file)) if grouped else None
    sides = sides_by_id(listfile.ids.tolist(), split.sides()) if split is not None else None
    items = [
        (int(i), listfile.labels[row], local_path(root, listfile.paths[row])) for row, i in enumerate(listfile.ids)
    ]
    started = time.perf_counter()
    # The manifest is the dataset's seal. The native packer renames its four files into place together, removing an
    # earlier manifest just before: interrupted, it leaves the folder as it was. im2rec writes in place, so an
    # earlier manifest goes first. A threshold or manifest failure after that removes the new files: a folder is a
    # whole dataset or holds none of it.
    dataset_files = [out_dir / f for f in ("manifest.json", "train.rec", "train.idx", "val.rec", "val.idx")]
    if engine == "mxnet":
        dataset_files[0].unlink(missing_ok=True)
        _on_interrupt(f"no dataset was left in {out_dir} (a folder holds a dataset only with its manifest.json)")
    else:
        _on_interrupt(f"{out_dir} is as it was: the new files replace it only together, when all are whole")
    with _progress("pack") as update:
        if engine == "native":
            report = packing.pack(items, out_dir, params, workers=workers, progress=update, sides=sides)
        else:
            report = packing.pack_with_im2rec(items, out_dir, params, workers=workers, sides=sides)
    errors = [dict(e) for e in report.to_dict()["errors"]]
    try:
        check_bad_fraction(errors, len(listfile), max_bad_fraction)
        manifest.build(
            out_dir,
            listfile=listfile,
            label_names=names,
            pack_params=params,
            errors=errors,
            split=split.record if split is not None else None,
            list_name=name,
        )
    except BaseException:
        for path in dataset_files:
            path.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - started
    summary = {**report.to_dict(), "out_dir": str(out_dir), "seconds": round(seconds, 3), "engine": engine}
    _emit(
        as_json,
        summary,
        f"{out_dir}: {report.counts.get('train', 0)} train, {report.counts.get('val', 0)} val, "
        f"{len(errors)} skipped, {len(listfile) / max(seconds, 1e-9):.0f} images/s ({engine})",
    )


@app.command()
def upload(
    out_dir: Annotated[Path, typer.Argument(help="A folder written by `tagflow pack`.")],
    dataset: Annotated[str, typer.Argument(help="s3://BUCKET/PREFIX: writes training/ and validation/ below it.")],
    as_json: JsonFlag = False,
) -> None:
    """Upload a packed dataset to the seed's layout; unchanged files are not rewritten, the manifest goes last."""
    from tagflow import s3
    from tagflow.names import check_dataset_uri
    from tagflow.pipeline import upload_dataset

    uris = upload_dataset(s3.make_client(), out_dir, s3.S3Uri.parse(check_dataset_uri(dataset)))
    _emit(as_json, uris, "\n".join(uris.values()))


@app.command()
def run(
    list_file: Annotated[str, typer.Argument(help="The list file's s3:// URI (or a local path).")],
    dataset: Annotated[str, typer.Argument(help="s3://BUCKET/PREFIX for training/ and validation/.")],
    num_labels: NumLabels,
    source: Annotated[str | None, typer.Option(help="s3://BUCKET/PREFIX that relative list paths are under.")] = None,
    labels: LabelsOpt = None,
    staging: Annotated[str | None, typer.Option(help="Staging prefix (default DATASET/staging).")] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="Images per shard (target).")] = 5000,
    resize: Annotated[int, typer.Option(min=8, max=MAX_RESIZE, help="Shorter side in pixels.")] = 96,
    quality: Annotated[int, typer.Option(min=1, max=100)] = 95,
    train_ratio: Annotated[
        float, typer.Option(min=0, max=1, help="Share of images (or of groups) in train, stable by ID (or group).")
    ] = 0.9,
    group_regex: GroupRegexOpt = None,
    group_file: GroupFileOpt = None,
    max_bad_fraction: Annotated[float, typer.Option(min=0, max=1)] = 0.01,
    max_pixels: MaxPixels = None,
    as_json: JsonFlag = False,
) -> None:
    """The whole data plane, shard by shard through S3 staging, exactly as the DAG runs it."""
    from tagflow import pipeline
    from tagflow.packparams import PackParams

    _group_key(group_regex, group_file)
    spec = pipeline.DatasetSpec(
        list_uri=list_file,
        dataset_uri=dataset,
        num_labels=num_labels,
        source_uri=source,
        labels_uri=labels,
        staging_uri=staging,
        shard_size=shard_size,
        pack=PackParams(resize=resize, quality=quality, train_ratio=train_ratio, **_max_pixels(max_pixels)),
        max_bad_fraction=max_bad_fraction,
        split_group_regex=group_regex,
        split_group_file=group_file,
    )

    def on_stage(name: str, seconds: float, _: dict) -> None:
        print(f"{name}: {seconds:.2f}s", file=sys.stderr, flush=True)

    _on_interrupt("every staged shard in S3 is whole (one PUT each); a re-run reuses them and does the rest")
    summary = pipeline.run(spec, on_stage=on_stage)
    _emit(as_json, summary, _describe_run(summary))


def _describe_run(summary: dict[str, Any]) -> str:
    counts = summary["counts"]
    lines = [
        f"dataset {summary['dataset']}: {counts['train']} train, {counts['val']} val, {counts['skipped']} skipped "
        f"of {counts['listed']} listed",
        *(f"  {uri}" for uri in summary["uris"].values()),
        "  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in summary["seconds"].items()),
    ]
    return "\n".join(lines)


def _hyperparameter_pairs(pairs: list[str]) -> dict[str, str]:
    from tagflow.errors import InputError

    values = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InputError(f"--hp {pair!r}: expected NAME=VALUE, for example --hp epochs=2")
        values[name.strip()] = value.strip()
    return values


def _dataset_request(
    dataset: str,
    hyperparameters: dict[str, str],
    job_name: str | None,
    max_runtime: int,
    *,
    tuned: frozenset[str] = frozenset(),
) -> dict:
    """A CreateTrainingJob request for the packed dataset at `dataset` (counts read from its manifest): the DAG's
    builder, with `--hp` allowed to replace what the data decides, and the batch size checked unless it is tuned."""
    from datetime import UTC, datetime

    from tagflow import jobs
    from tagflow import sagemaker_config as smc
    from tagflow.names import check_dataset_uri, check_job_name
    from tagflow.s3 import read_location

    check_dataset_uri(dataset, "--dataset")
    if job_name is not None:
        check_job_name(job_name, smc.TRAINING_NAME_MAX, "--job-name")
    manifest = json.loads(read_location(str(DatasetLayout.of(dataset).manifest))[0])
    name = job_name or smc.training_job_name("tagflow", datetime.now(UTC).strftime("%Y%m%d-%H%M%S"))
    return jobs.dataset_request(
        dataset, manifest, hyperparameters, job_name=name, image_uri=smc.LOCAL_IMAGE_URI, role_arn=smc.LOCAL_ROLE_ARN,
        instance_type="ml.m5.large", max_runtime_s=max_runtime, override_data=True,
        check_batch_size="mini_batch_size" not in tuned,
    )  # fmt: skip


HpOpt = Annotated[list[str] | None, typer.Option("--hp", help="A hyperparameter NAME=VALUE (repeatable).")]
WorkdirOpt = Annotated[Path, typer.Option(help="Job folders (laid out like SageMaker's /opt/ml) go here.")]


@app.command()
def train(
    dataset: Annotated[str | None, typer.Option(help="s3://BUCKET/PREFIX of a packed dataset.")] = None,
    request: Annotated[
        Path | None, typer.Option(help="A CreateTrainingJob request (JSON) instead of --dataset.")
    ] = None,
    hp: HpOpt = None,
    job_name: Annotated[str | None, typer.Option(help="Training job name (default: tagflow-TIMESTAMP-HASH).")] = None,
    max_runtime: Annotated[int, typer.Option(min=1, help="StoppingCondition.MaxRuntimeInSeconds.")] = 86_400,
    workdir: WorkdirOpt = Path(".tagflow/jobs"),
    as_json: JsonFlag = False,
) -> None:
    """Train the image-classification model locally, through the same request SageMaker takes."""
    from tagflow.errors import InputError, TagflowError
    from tagflow.local.runner import run_training_job

    if (dataset is None) == (request is None):
        raise InputError("give exactly one of --dataset s3://BUCKET/PREFIX or --request JOB.json")
    if request is not None:
        try:
            job = json.loads(request.read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"{request}: not a readable JSON request ({err})") from None
    else:
        job = _dataset_request(dataset, _hyperparameter_pairs(hp or []), job_name, max_runtime)
    from tagflow.jobs import training_candidate
    from tagflow.local.runner import progress_line

    def echo(line: str) -> None:  # the epochs as they end, on stderr (a pipe or a log file sees them too)
        shown = progress_line(line)
        if shown:
            print(f"{job['TrainingJobName']}: {shown}", file=sys.stderr, flush=True)

    _on_interrupt("the training job and its trainer were stopped; a model is uploaded only whole, at the end")
    described = run_training_job(job, workdir=workdir, on_line=echo)
    status = described["TrainingJobStatus"]
    first = ("validation:mAP", "validation:accuracy", "validation:micro_f1", "validation:macro_f1")

    def figures(values: dict[str, float]) -> str:
        order = sorted(values, key=lambda k: (first.index(k) if k in first else len(first), k))
        return ", ".join(f"{k} = {values[k]:.4f}" for k in order)

    if status == "Completed":  # the saved model (what model.tar.gz holds) first, then the last epoch
        found = training_candidate(described, "validation:accuracy")
        saved, last = found["saved_model"], found["last_epoch"]
        lines = [f"saved model (epoch {saved['epoch']}): {figures(saved['metrics'])}"] if saved else []
        lines.append(f"last epoch (epoch {last['epoch']}): {figures(last['metrics'])}")
        lines.append(f"model: {described['ModelArtifacts']['S3ModelArtifacts']}")
    else:
        lines = [f"{k} = {m:.4f}" for k, m in sorted((m["MetricName"], m["Value"]) for m in described.get(
            "FinalMetricDataList", []))]  # fmt: skip
    _emit(
        as_json,
        described,
        f"{described['TrainingJobName']}: {status}"
        + (f" — {described.get('FailureReason')}" if status != "Completed" else "")
        + "".join(f"\n  {line}" for line in lines),
    )
    if status != "Completed":
        raise TagflowError(f"training job {described['TrainingJobName']} {status.lower()}")


@app.command()
def tune(
    dataset: Annotated[str, typer.Option(help="s3://BUCKET/PREFIX of a packed dataset.")],
    ranges: Annotated[Path, typer.Option(help="JSON: {name: [choices] | {type, min, max, scaling}}.")],
    hp: HpOpt = None,
    strategy: Annotated[str, typer.Option(help="Bayesian or Random.")] = "Bayesian",
    max_jobs: Annotated[int, typer.Option(min=1)] = 4,
    max_parallel: Annotated[int, typer.Option(min=1)] = 1,
    early_stopping: Annotated[str, typer.Option(help="Off or Auto.")] = "Off",
    job_name: Annotated[str | None, typer.Option(help="Tuning job name (≤ 32 characters).")] = None,
    max_runtime: Annotated[int, typer.Option(min=1, help="Per trial MaxRuntimeInSeconds.")] = 86_400,
    workdir: WorkdirOpt = Path(".tagflow/jobs"),
    as_json: JsonFlag = False,
) -> None:
    """Tune hyperparameters locally: trials are local training jobs, chosen by Optuna, objective validation:accuracy."""
    from datetime import UTC, datetime

    from tagflow import sagemaker_config as smc
    from tagflow.errors import InputError, TagflowError
    from tagflow.local.tuner import run_tuning_job
    from tagflow.names import check_job_name

    if job_name is not None:
        check_job_name(job_name, smc.TUNING_NAME_MAX, "--job-name")
    try:
        spec = json.loads(ranges.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{ranges}: not a readable JSON object of ranges ({err})") from None
    if not isinstance(spec, dict):
        raise InputError(f"{ranges}: a JSON {type(spec).__name__}; expected an object {{name: range}}")
    try:
        smc.parameter_ranges(spec)  # the ranges' own rules first: no S3 request for a request that cannot run
    except InputError as err:
        raise InputError(f"{ranges}: {err}") from None
    training = _dataset_request(dataset, _hyperparameter_pairs(hp or []), None, max_runtime, tuned=frozenset(spec))
    name = job_name or smc.tuning_job_name("tf", datetime.now(UTC).strftime("%m%d%H%M%S"))
    request = smc.tuning_job_request(
        name,
        training=training,
        ranges=spec,
        strategy=strategy,
        max_jobs=max_jobs,
        max_parallel=max_parallel,
        early_stopping=early_stopping,
    )
    from tagflow.local.runner import progress_line

    def echo(trial: str, line: str) -> None:  # each trial's epochs as they end, on stderr
        shown = progress_line(line)
        if shown:
            print(f"{trial}: {shown}", file=sys.stderr, flush=True)

    described = run_tuning_job(request, workdir=workdir, on_line=echo)
    best = described.get("BestTrainingJob") or {}
    metric = described["HyperParameterTuningJobConfig"]["HyperParameterTuningJobObjective"]["MetricName"]
    lines = [f"{name}: {described['HyperParameterTuningJobStatus']} (trials ranked by their saved model's {metric})"]
    for trial in described.get("TrainingJobSummaries", []):
        value = (trial.get("FinalHyperParameterTuningJobObjectiveMetric") or {}).get("Value")
        # The trial's own DescribeTrainingJob (the runner's describe.json) says which epochs the values are from.
        trial_file = workdir / name / trial["TrainingJobName"] / "describe.json"
        final = json.loads(trial_file.read_text()).get("FinalMetricDataList", []) if trial_file.is_file() else []
        values = {m["MetricName"]: m["Value"] for m in final}
        saved_epoch, last_epoch = values.get("saved-model:epoch"), values.get("epoch")
        at = "" if saved_epoch is None else f" (epoch {saved_epoch:.0f})"
        shown = "-" if value is None else f"saved model{at} {value:.4f}"
        if metric in values and last_epoch is not None:
            shown += f", last epoch (epoch {last_epoch:.0f}) {values[metric]:.4f}"
        lines.append(
            f"  {trial['TrainingJobName']}  {trial['TrainingJobStatus']:<9} {shown}  "
            f"{trial.get('TunedHyperParameters', {})}"
        )
    if best:
        lines.append(
            f"best: {best['TrainingJobName']} (saved model's {metric} "
            f"{best['FinalHyperParameterTuningJobObjectiveMetric']['Value']:.4f})"
        )
    _emit(as_json, described, "\n".join(lines))
    if described["HyperParameterTuningJobStatus"] != "Completed":
        raise TagflowError(f"tuning job {name} {described['HyperParameterTuningJobStatus'].lower()}")


serve_app = typer.Typer(
    help="The local endpoint: serve a trained model like a SageMaker endpoint.", no_args_is_help=True
)
app.add_typer(serve_app, name="serve")
EndpointName = Annotated[
    str, typer.Option("--name", help="Endpoint name (its state lives in .tagflow/endpoints/NAME).")
]


def _thresholds_state(meta: dict | None) -> dict[str, Any]:
    """Where the served model's thresholds came from (its evaluation), or why it has none; {} without a model."""
    if meta is None:
        return {}
    return {"thresholds_from": (meta.get("thresholds") or {}).get("evaluation"),
            "thresholds_problem": meta.get("thresholds_problem")}  # fmt: skip


def _thresholds_note(meta: dict | None) -> str:
    state = _thresholds_state(meta)
    if not state:
        return ""
    if state["thresholds_from"]:
        return f"\n  per-label thresholds from {state['thresholds_from']}"
    return f"\n  no per-label thresholds ({state['thresholds_problem']}): predict needs --threshold"


def _endpoint_token() -> str | None:
    """The endpoint's admin token from the environment: given to servers `serve start` runs, sent by `serve swap`."""
    from tagflow.local.endpoint import TOKEN_ENV

    return os.environ.get(TOKEN_ENV, "").strip() or None


@serve_app.command("start")
def serve_start(
    model: Annotated[
        str | None, typer.Argument(help="model.tar.gz: a local path or s3:// URI (none: start with no model).")
    ] = None,
    name: EndpointName = "tagflow",
    port: Annotated[int | None, typer.Option(help="Port (default: a free one).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    workers: Annotated[int, typer.Option(min=1, help="Model executors (concurrent predictions).")] = 1,
    max_pixels: Annotated[
        int | None, typer.Option(min=1, help="Largest image accepted, width × height (default 4096 × 4096).")
    ] = None,
    max_bytes: Annotated[int | None, typer.Option(min=1, help="Largest request body (default 6 MB).")] = None,
    idle_timeout: Annotated[
        float | None, typer.Option(min=0.1, help="Seconds an idle keep-alive connection stays open (default 10).")
    ] = None,
    read_timeout: Annotated[
        float | None, typer.Option(min=0.1, help="Seconds a request may take to arrive whole (default 30).")
    ] = None,
    max_connections: Annotated[int | None, typer.Option(min=1, help="Open connections at most (default 64).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Start serving MODEL, or an empty endpoint to load models into later (or report the one running under NAME).

    The admin token is TAGFLOW_ENDPOINT_TOKEN if set, else the one kept in .tagflow/endpoints/NAME/admin-token (made
    at the first start, mode 0600); every model load must send it, loopback clients included.
    """
    from dataclasses import asdict

    from tagflow.local import endpoint

    info = endpoint.start(
        model,
        name=name,
        port=port,
        host=host,
        workers=workers,
        state_dir=endpoint.default_state_dir(name),
        token=_endpoint_token(),
        max_pixels=max_pixels,
        max_bytes=max_bytes,
        idle_timeout=idle_timeout,
        read_timeout=read_timeout,
        max_connections=max_connections,
    )
    serving = f"serving {info.model_source}" if info.model_source else "with no model yet"
    meta = endpoint.metadata(info) if info.model_source else None
    _emit(
        as_json,
        {**asdict(info), **_thresholds_state(meta)},
        f"endpoint {info.name} at {info.url} {serving} (pid {info.pid}){_thresholds_note(meta)}",
    )


@serve_app.command("swap")
def serve_swap(
    model: Annotated[str, typer.Argument(help="The new model.tar.gz: a local path or s3:// URI.")],
    name: EndpointName = "tagflow",
) -> None:
    """Load MODEL into the running endpoint, then switch to it; no request is dropped."""
    from tagflow.errors import TagflowError
    from tagflow.local import endpoint

    state = endpoint.default_state_dir(name)
    if endpoint.status(state) is None:
        raise TagflowError(f"no endpoint named {name!r} is running (tagflow serve start MODEL --name {name})")
    info = endpoint.swap(state, model, token=_endpoint_token())
    typer.echo(f"endpoint {info.name} now serves {info.model_source}{_thresholds_note(endpoint.metadata(info))}")


@serve_app.command("stop")
def serve_stop(name: EndpointName = "tagflow") -> None:
    """Stop the endpoint."""
    from tagflow.local import endpoint

    typer.echo("stopped" if endpoint.stop(endpoint.default_state_dir(name)) else "not running")


@serve_app.command("status")
def serve_status(name: EndpointName = "tagflow", as_json: JsonFlag = False) -> None:
    """Say whether the endpoint runs and what it serves; exit 1 if it does not run."""
    from dataclasses import asdict

    from tagflow.local import endpoint

    info = endpoint.status(endpoint.default_state_dir(name))
    if info is None:
        _emit(as_json, {"running": False}, "not running")
        raise typer.Exit(1)
    serving = f"serving {info.model_source}" if info.model_source else "with no model yet"
    meta = endpoint.metadata(info) if info.model_source else None
    _emit(
        as_json,
        {"running": True, **asdict(info), **_thresholds_state(meta)},
        f"{info.name} at {info.url} {serving}{_thresholds_note(meta)}",
    )


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files (JPEG or PNG).")],
    name: EndpointName = "tagflow",
    labels: Annotated[
        str | None, typer.Option(help="Label names: a dataset's manifest.json or a labels.txt (file or s3://).")
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(help="s3://BUCKET/PREFIX of the packed dataset: names from its training/manifest.json."),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Predict a label at probability >= this, for every label (default: the per-label thresholds "
            "recorded with the served model's evaluation).",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """The labels of each image from the running endpoint (through boto3's sagemaker-runtime client): those whose
    probability is at or above their threshold, with the probabilities (`--json`: {"labels", "probabilities"}
    per image, as the endpoint's labels answer).

    Thresholds: the per-label ones the endpoint loaded with its model (the F1-maximising thresholds of the evaluation
    beside it; `serve status` names it), else --threshold X for every label; a model without recorded thresholds
    needs --threshold, never a silent 0.5. Label names: --labels, else the --dataset's manifest, else the names the
    served model recorded (its metrics.json's, else its evaluation's), else numbered names (label_0, …)."""
    from tagflow import thresholds as recorded_thresholds
    from tagflow.errors import InputError, TagflowError
    from tagflow.listfile import load_label_names
    from tagflow.local import endpoint
    from tagflow.names import check_dataset_uri
    from tagflow.s3 import read_location

    if labels and dataset:
        raise InputError("give at most one of --labels and --dataset")
    if dataset:
        labels = str(DatasetLayout.of(check_dataset_uri(dataset, "--dataset")).manifest)
    info = endpoint.status(endpoint.default_state_dir(name))
    if info is None:
        raise TagflowError(f"no endpoint named {name!r} is running (tagflow serve start MODEL --name {name})")
    meta = endpoint.metadata(info)
    if meta is None:
        raise TagflowError(f"endpoint {name!r} has no model yet (tagflow serve swap MODEL --name {name})")
    loaded = meta.get("thresholds")  # what the endpoint loaded with the model, checked against its sha256
    if threshold is None and loaded is None:
        raise InputError(
            f"endpoint {name!r} serves {meta['source']} without recorded thresholds: {meta.get('thresholds_problem')}"
            "; give --threshold X to predict every label at probability >= X"
        )
    thresholds_from = f"--threshold {threshold}" if threshold is not None else loaded["evaluation"]
    recorded, recorded_from = meta.get("label_names"), "the model's recorded names"
    if not recorded and loaded:
        recorded, recorded_from = loaded["label_names"], f"the label names of its evaluation {loaded['evaluation']}"
    results, lines = [], []
    names: list[str] | None = None
    source = labels or (recorded_from if recorded else "numbered names")
    for image in images:
        if not image.is_file():
            raise InputError(f"{image}: no such file")
        probabilities = endpoint.invoke(info, image.read_bytes())
        if names is None:
            if labels and labels.endswith(".json"):
                names = json.loads(read_location(labels)[0])["label_names"]
            elif labels or not recorded:
                names = load_label_names(labels, len(probabilities))
            else:
                names = list(recorded)
            if len(names) != len(probabilities):
                raise InputError(f"{source}: {len(names)} label names for a model with {len(probabilities)} outputs")
            if recorded and labels and list(recorded) != names:
                i = next((i for i, (a, b) in enumerate(zip(recorded, names, strict=True)) if a != b), 0)
                raise InputError(
                    f"{labels}: label {i} is {names[i]!r}, but the served model was trained with {recorded[i]!r} "
                    f"there ({recorded_from} differ)"
                )
            cuts = [threshold] * len(names) if threshold is not None else loaded["thresholds"]
        chosen = recorded_thresholds.above(probabilities, cuts)
        results.append({"image": str(image), "labels": [names[i] for i in chosen], "probabilities": probabilities})
        shown = sorted(chosen, key=lambda i: -probabilities[i])
        said = ", ".join(f"{names[i]} {probabilities[i]:.2f}" for i in shown) or "no label at or above its threshold"
        lines.append(f"{image}: {said}")
    summary = {"endpoint": info.name, "model": meta["source"], "label_names_from": source,
               "thresholds_from": thresholds_from, "predictions": results}  # fmt: skip
    _emit(as_json, summary, "\n".join(lines))


@app.command()
def evaluate(
    model: Annotated[str, typer.Argument(help="The model.tar.gz to judge (s3:// or a local path).")],
    dataset: Annotated[str, typer.Option(help="s3://BUCKET/PREFIX of the packed dataset; its validation split.")],
    champion: Annotated[
        str | None, typer.Option(help="The serving model's model.tar.gz, scored on the same split.")
    ] = None,
    lift: Annotated[float, typer.Option(min=0, help="Deploy only at ≥ this × the label-frequency mAP.")] = 2.0,
    threshold: Annotated[float | None, typer.Option(help="Deploy only at mAP ≥ this (default 0.1).")] = None,
    tolerance: Annotated[float | None, typer.Option(help="Allowed mAP drop from the champion (default 0).")] = None,
    job: Annotated[str | None, typer.Option(help="Also write PREFIX/output/JOB/evaluation/evaluation.json.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Score a model (and the serving one) on the dataset's current validation split: mAP and the gate's decision."""
    from tagflow import deploy
    from tagflow import evaluate as evaluation

    doc = evaluation.evaluate(
        model, dataset, champion_uri=champion, lift=lift,
        threshold=deploy.DEFAULT_THRESHOLD if threshold is None else threshold,
        tolerance=deploy.DEFAULT_TOLERANCE if tolerance is None else tolerance,
    )  # fmt: skip
    if job is not None:
        doc["evaluation_uri"] = evaluation.write_evaluation(doc, dataset, job)
    c, base = doc["candidate"], doc["baselines"]

    def num(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = [
        f"{model} on {doc['split']['images']} validation images of {dataset}:",
        f"  mAP {num(c['mAP'])} (label-frequency baseline {num(base['label_frequency_mAP'])}), "
        f"micro mAP {num(c['micro_mAP'])}",
        f"  F1 at per-label thresholds: micro {num(c['micro_f1'])}, macro {num(c['macro_f1'])}; at 0.5: micro "
        f"{num(c['micro_f1_at_0.5'])}, macro {num(c['macro_f1_at_0.5'])}",
        f"  accuracy {num(c['accuracy'])} (all-negative baseline {num(base['all_negative_accuracy'])})",
    ]
    if doc["champion"] is not None:
        lines.append(f"  champion {champion}: mAP {num(doc['champion'].get('mAP'))}")
    lines.append(f"  gate: {'deploy' if doc['gate']['deploy'] else 'refuse'} — {doc['gate']['reason']}")
    if (leak := evaluation.leakage_line(doc)) is not None:
        lines.append(f"  {leak}")
    if job is not None:
        lines.append(f"  written to {doc['evaluation_uri']}")
    _emit(as_json, doc, "\n".join(lines))


@app.command("demo-data")
def demo_data(
    bucket_uri: Annotated[
        str, typer.Argument(help="s3://BUCKET/PREFIX for images/ and lists/.")
    ] = "s3://tagflow-raw/designs",
    count: Annotated[int, typer.Option("--count", min=1, help="Images to generate.")] = 2000,
    seed: Annotated[int, typer.Option(help="Generator seed; the same seed gives the same bytes.")] = 0,
    as_json: JsonFlag = False,
) -> None:
    """Generate synthetic graphic designs with 50 learnable labels, upload them and a seed-format list file."""
    from tagflow import demo, s3

    dataset = demo.publish(count, s3.S3Uri.parse(bucket_uri), seed=seed)
    info = dataset.to_dict()
    _emit(as_json, info, "\n".join(f"{k}: {v}" for k, v in info.items()))


@app.command("demo")
def demo_command(
    count: Annotated[int, typer.Option("--count", min=1, help="Images to generate.")] = 2000,
    as_json: JsonFlag = False,
) -> None:
    """The main job on one machine: local S3 and endpoint, demo data, one run of the whole DAG. (`make demo`.)"""
    from tagflow.local import demo_run

    result = demo_run.run(count, say=lambda line: print(line, file=sys.stderr, flush=True))
    _emit(as_json, result, demo_run.describe(result))


@s3_app.command("start")
def s3_start(as_json: JsonFlag = False) -> None:
    """Start the local S3 server (or report the one already running); prints its endpoint."""
    from tagflow.local import s3server

    info = s3server.start()
    _emit(
        as_json,
        {"endpoint": info.endpoint, "pid": info.pid, "env_file": f"{info.state_dir}/s3.env"},
        f"local S3 server at {info.endpoint} (pid {info.pid}); `source {info.state_dir}/s3.env` to use it",
    )


@s3_app.command("stop")
def s3_stop() -> None:
    """Stop the local S3 server (its data stays)."""
    from tagflow.local import s3server

    typer.echo("stopped" if s3server.stop() else "not running")


@s3_app.command("status")
def s3_status(as_json: JsonFlag = False) -> None:
    """Say whether the local S3 server runs; exit 1 if it does not."""
    from tagflow.local import s3server

    info = s3server.status()
    if info is None:
        _emit(as_json, {"running": False}, "not running")
        raise typer.Exit(1)
    _emit(
        as_json,
        {"running": True, "endpoint": info.endpoint, "pid": info.pid},
        f"running at {info.endpoint} (pid {info.pid})",
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one message and an exit status, never a traceback."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = app(args=argv, prog_name="tagflow", standalone_mode=False)
        if result == INTERRUPTED:  # typer turns Ctrl-C into Exit(130), which it returns without standalone mode
            print(f"tagflow: interrupted; {_left_behind[0]}", file=sys.stderr)
        return result if isinstance(result, int) else 0
    except typer.Exit as done:
        return done.exit_code
    except typer.Abort:
        print(f"tagflow: interrupted; {_left_behind[0]}", file=sys.stderr)
        return INTERRUPTED
    except typer.TyperException as err:  # typer's own click: usage errors, bad option values ("Usage: ... Error: ...")
        err.show()
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"tagflow: interrupted; {_left_behind[0]}", file=sys.stderr)
        return INTERRUPTED
    except TagflowError as err:
        print(f"tagflow: error: {err}", file=sys.stderr)
        return err.exit_code
    except (BotoCoreError, ClientError, Boto3Error) as err:
        print(f"tagflow: AWS error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a path given that cannot be used, or the machine failing (disk full): one line
        print(f"tagflow: error: {describe_os_error(err)}", file=sys.stderr)
        return os_error_exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
