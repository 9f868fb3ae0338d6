"""Imports point down the pipeline: what each DAG task's core modules load, measured in a fresh interpreter.

A task that only builds a request or reads a manifest must not need the image stack (OpenCV, simplejpeg, Pillow),
the algorithm environment (MXNet) or the report's plotting on its worker; only the stages that touch pixels do.
The modules listed per task are what its operator imports in `execute` (plugins/tagflow_ops).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

IMAGE_STACK = ("cv2", "simplejpeg", "PIL")
ALWAYS_HEAVY = ("mxnet", "matplotlib", "optuna", "sagemaker")
TASKS = {
    "resolve_config": ("tagflow.jobs", "tagflow.runconfig"),
    "prepare / download / publish": ("tagflow.jobs", "tagflow.pipeline", "tagflow.manifest"),
    "requests and the SageMaker operators": ("tagflow.jobs", "tagflow.sagemaker_config", "tagflow.deploy"),
    "local_train": ("tagflow.jobs", "tagflow.local.runner", "tagflow.sagemaker_config"),
    "deploy_local / smoke_test": ("tagflow.deploy", "tagflow.thresholds", "tagflow.local.endpoint"),
    "the CLI's entry point": ("tagflow.cli",),
}


def loaded(modules: tuple[str, ...]) -> set[str]:
    code = f"import importlib, json, sys\nfor m in {list(modules)!r}: importlib.import_module(m)\n"
    code += "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(done.stdout))


@pytest.mark.parametrize("task", TASKS)
def test_a_task_that_touches_no_pixels_loads_no_image_stack(task):
    heavy = sorted(loaded(TASKS[task]) & {*IMAGE_STACK, *ALWAYS_HEAVY})
    assert heavy == [], f"{task} imports {heavy}"


def test_the_stages_that_touch_pixels_load_what_they_use_and_no_more():
    pack = loaded(("tagflow.pack",))
    assert set(IMAGE_STACK) <= pack and not pack & set(ALWAYS_HEAVY)
    local_tune = loaded(("tagflow.local.tuner",))
    assert not local_tune & {*IMAGE_STACK, "mxnet", "matplotlib"}  # optuna is the tuner's own
    evaluate = loaded(("tagflow.evaluate",))  # hashes JPEGs for the leakage check; MXNet runs in its own env
    assert not evaluate & {"mxnet", "matplotlib"}
