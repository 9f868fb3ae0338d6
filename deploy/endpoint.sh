#!/bin/sh
# The compose `endpoint` service: a local SageMaker-like endpoint (`tagflow serve start`: algo/ic_serve.py under the
# algorithm environment), started with no model and run in the foreground. Models are loaded into it over HTTP by
# whoever holds its admin token: the DAG's deploy task, from any worker, sends `POST /admin/load` with an S3
# presigned URL and the server downloads the model itself (tagflow.local.endpoint.load).
#
#   TAGFLOW_ENDPOINT_TOKEN    the admin token every model load must send as `Authorization: Bearer …` (required)
#   TAGFLOW_ENDPOINT_NAME     endpoint name, answered at /endpoints/NAME/invocations (default tagflow)
#   TAGFLOW_ENDPOINT_HOST     address the server listens on (default 0.0.0.0: the container's network)
#   TAGFLOW_ENDPOINT_PORT     its port (default 8080)
#
# Once the server answers /health, its log follows on stdout. SIGTERM (docker compose stop) stops the server's
# process group; the server dying ends the script with status 1. The model is not kept across restarts: the next
# deploy loads one again.
set -u
: "${TAGFLOW_ENDPOINT_TOKEN:?set TAGFLOW_ENDPOINT_TOKEN to the endpoint's admin token (python3 deploy/make_env.py)}"
name="${TAGFLOW_ENDPOINT_NAME:-tagflow}"
state="${TAGFLOW_HOME:?TAGFLOW_HOME must be set}/endpoints/$name"

# No process of a previous run survives a container restart, so a pid file found here is stale (its number may
# even belong to a new process, which would pass for a running endpoint).
rm -f "$state/endpoint.pid"

tagflow serve start --name "$name" \
    --host "${TAGFLOW_ENDPOINT_HOST:-0.0.0.0}" --port "${TAGFLOW_ENDPOINT_PORT:-8080}" || exit

trap 'tagflow serve stop --name "$name"; exit 0' TERM INT
tail -n +1 -f --pid="$(cat "$state/endpoint.pid")" "$state/endpoint.log" &
wait $!
echo "endpoint: the server process exited; its log is above" >&2
exit 1
