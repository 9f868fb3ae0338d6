"""The `tagflow` command as a person runs it: the README's session, exit statuses and messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tagflow import demo, s3

TAGFLOW = [sys.executable, "-m", "tagflow.cli"]


def tagflow(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TAGFLOW, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600, check=False
    )


def ok(*args: str) -> dict:
    done = tagflow(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_readme_session_parse_download_pack_upload(s3_server, s3_client, bucket, tmp_path, mxnet_records):
    raw = f"s3://{bucket}/designs"
    data = ok("demo-data", raw, "--count", "40", "--seed", "4")
    assert data["count"] == 40
    listed = ok("parse", data["list_uri"], "--num-labels", "50", "--labels", data["labels_uri"])
    assert listed["images"] == 40 and "shape_circle" in listed["label_counts"]
    fetched = ok(
        "download",
        data["list_uri"],
        "--num-labels",
        "50",
        "--source",
        data["images_uri"],
        "--dest",
        str(tmp_path / "mirror"),
    )
    assert fetched["fetched"] == 40 and fetched["failed"] == 0
    again = ok(
        "download",
        data["list_uri"],
        "--num-labels",
        "50",
        "--source",
        data["images_uri"],
        "--dest",
        str(tmp_path / "mirror"),
    )
    assert again["fetched"] == 0 and again["already_present"] == 40
    packed = ok(
        "pack",
        "--list",
        data["list_uri"],
        "--num-labels",
        "50",
        "--labels",
        data["labels_uri"],
        "--root",
        str(tmp_path / "mirror"),
        "--out-dir",
        str(tmp_path / "packed"),
        "--workers",
        "2",
    )
    assert packed["counts"]["train"] + packed["counts"]["val"] == 40
    manifest = json.loads((tmp_path / "packed" / "manifest.json").read_text())
    assert manifest["label_names"] == demo.LABEL_NAMES
    uris = ok("upload", str(tmp_path / "packed"), f"s3://{bucket}/dataset")
    assert uris["train.rec"] == f"s3://{bucket}/dataset/training/train.rec"
    local = tmp_path / "check.rec"
    s3.get_file(s3_client, s3.S3Uri(bucket, "dataset/training/train.rec"), local)
    s3.get_file(s3_client, s3.S3Uri(bucket, "dataset/training/train.idx"), tmp_path / "check.idx")
    records = mxnet_records("indexed", str(local), str(tmp_path / "check.idx"))["records"]
    assert len(records) == packed["counts"]["train"] and all(r["flag"] == 50 for r in records)


def test_bad_list_exits_2_with_line_numbers_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.lst"
    bad.write_bytes(b"1\t0\t1\ta.jpg\n2\t0\t7\tb.jpg\r\n2\t1\t1\tc.jpg\n3\t1\n")
    done = tagflow("parse", str(bad), "--num-labels", "2")
    assert done.returncode == 2
    assert f"{bad}:2: column 3: label value '7' is not 0 or 1" in done.stderr
    assert f"{bad}:3: duplicate ID 2 (first on line 2)" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("parse", "/no/such.lst", "--num-labels", "3"), "/no/such.lst: no such file"),
        (("upload", "/no/such/dir", "s3://bkt/x"), "missing train.rec"),
        (("pack", "--list", "x.lst", "--root", ".", "--out-dir", "o", "-n", "2", "--engine", "gpu"), "--engine 'gpu'"),
    ],
)
def test_user_errors_are_one_message(args, message):
    done = tagflow(*args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def test_unreachable_s3_is_a_message(tmp_path):
    done = tagflow(
        "parse",
        "s3://bkt/list.lst",
        "--num-labels",
        "2",
        env={
            "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
            "AWS_ACCESS_KEY_ID": "x",
            "AWS_SECRET_ACCESS_KEY": "y",
            "AWS_DEFAULT_REGION": "us-east-1",
        },
    )
    assert done.returncode == 1
    assert "AWS error" in done.stderr and "Traceback" not in done.stderr


def test_every_verb_has_help():
    for verb in ("parse", "download", "pack", "upload", "run", "demo-data", "demo", "s3"):
        done = tagflow(verb, "--help")
        assert done.returncode == 0 and "Usage" in done.stdout, verb


def test_module_entry_point_matches_console_script():
    script = Path(sys.executable).parent / "tagflow"
    assert script.exists()
    assert subprocess.run([str(script), "--help"], capture_output=True, check=False).returncode == 0


@pytest.mark.mxnet
@pytest.mark.slow
def test_demo_runs_the_whole_dag_on_its_own_services(tmp_path):
    from tagflow.local import endpoint, s3server

    home = tmp_path / "home"
    env = {"TAGFLOW_HOME": str(home)}
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env[key] = ""  # the demo must find its own server, not the test session's
    try:
        done = tagflow("demo", "--count", "400", "--json", env=env)  # 40 for validation: more than a batch
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["state"] == "success"
        assert result["results"]["publish"]["counts"]["listed"] == 400
        assert result["results"]["publish"]["dataset"] == "s3://tagflow-data/50-label-rs96"
        assert result["tasks"]["local_train"] == "success" and result["tasks"]["sagemaker_train"] == "skipped"
        top = result["prediction"]["top"]
        assert len(top) == 5 and all(0 <= t["probability"] <= 1 for t in top)
        assert s3server.status(home / "s3") is not None  # left running for the user to look at
        served = endpoint.status(home / "endpoints" / "tagflow-designs")
        assert served is not None and served.model_source == result["results"]["deploy_local"]["model"]
    finally:
        endpoint.stop(home / "endpoints" / "tagflow-designs")
        s3server.stop(home / "s3")
