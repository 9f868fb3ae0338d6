"""The services a local tagflow runs against, started once and found again by their state folders under
$TAGFLOW_HOME: the S3 server (with the buckets the default preset uses) and the local endpoint, empty until the
DAG deploys a model into it. `make demo` and `make up` start them the same way.

The endpoint accepts models presigned on this S3 server (its `--s3-endpoint`) and loads only with its admin token
(kept in its state folder), which reaches the DAG's deploy task as the Airflow Variable `tagflow_endpoint_token`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tagflow import local, runconfig, s3
from tagflow.local import endpoint, s3server
from tagflow.local.s3server import ServerInfo

# The local endpoint service's name (and state folder) while it serves nothing; a deploy renames it to the run's
# endpoint name (the preset's, e.g. tagflow-designs-50, or the form's). The form's default is empty (the preset
# decides), so it cannot come from there.
ENDPOINT_NAME = "tagflow-designs"


@dataclass(frozen=True)
class Services:
    s3: ServerInfo
    endpoint: endpoint.EndpointInfo

    def airflow_variables(self) -> dict[str, str]:
        """The Airflow Variables through which the DAG's local backend finds the endpoint and may load into it."""
        return {
            "tagflow_endpoint_url": self.endpoint.url,
            "tagflow_endpoint_token": endpoint.admin_token(self.endpoint.state_dir),
        }


def endpoint_state_dir() -> Path:
    return endpoint.default_state_dir(ENDPOINT_NAME)


def default_buckets() -> list[str]:
    """The buckets a run triggered with the form's defaults uses: its dataset bucket and its preset's sources."""
    preset = runconfig.PRESETS[runconfig.PARAMS["preset"]["default"]]
    buckets = {runconfig.PARAMS["bucket"]["default"]}
    buckets.update(s3.S3Uri.parse(preset[key]).bucket for key in ("list_uri", "images_uri", "labels_uri"))
    return sorted(buckets)


def start() -> Services:
    """Start (or find) the S3 server and the endpoint; create the default preset's buckets. Idempotent."""
    local.make_private_dir(local.home())
    info = s3server.start()
    client = info.client()
    for bucket in default_buckets():
        s3.ensure_bucket(client, bucket)
    state = endpoint_state_dir()
    if endpoint.status(state) and info.endpoint not in endpoint.s3_endpoints_of(state):
        endpoint.stop(state)  # it accepts models from where the S3 server was before it moved: start it anew
    served = endpoint.start(None, name=ENDPOINT_NAME, state_dir=state, s3_endpoints=[info.endpoint])
    return Services(s3=info, endpoint=served)


def stop() -> dict[str, bool]:
    """Stop the endpoint and the S3 server (their data stays); which of them was running."""
    return {"endpoint": endpoint.stop(endpoint_state_dir()), "s3": s3server.stop()}
