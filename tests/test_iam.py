"""The least-privilege policies in deploy/iam/ are valid JSON and name only real SageMaker API actions."""

from __future__ import annotations

import json
from pathlib import Path

import botocore.session
import pytest

IAM = Path(__file__).resolve().parents[1] / "deploy" / "iam"


def _actions(doc: dict) -> list[str]:
    actions = []
    for statement in doc["Statement"]:
        found = statement["Action"]
        actions += [found] if isinstance(found, str) else found
    return actions


@pytest.mark.parametrize("name", sorted(p.name for p in IAM.glob("*.json")))
def test_policy_documents_are_well_formed(name):
    doc = json.loads((IAM / name).read_text())
    assert doc["Version"] == "2012-10-17"
    for statement in doc["Statement"]:
        assert statement["Effect"] == "Allow"
        assert "*" not in statement.get("Action", []), f"{name}: no wildcard actions"


def test_every_sagemaker_action_is_a_real_api_operation():
    session = botocore.session.get_session()
    operations = set(session.get_service_model("sagemaker").operation_names) | set(
        session.get_service_model("sagemaker-runtime").operation_names
    )
    doc = json.loads((IAM / "airflow-policy.json").read_text())
    sagemaker = [a.split(":", 1)[1] for a in _actions(doc) if a.startswith("sagemaker:")]
    assert sagemaker and sorted(set(sagemaker) - operations) == []
