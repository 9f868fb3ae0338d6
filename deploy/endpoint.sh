#!/bin/sh
# The compose `endpoint` service: one model.tar.gz from S3 served in the foreground as a local SageMaker-like
# endpoint (`tagflow serve start`: algo/ic_serve.py under the algorithm environment).
#
#   TAGFLOW_ENDPOINT_MODEL    s3://BUCKET/…/model.tar.gz to serve (required)
#   TAGFLOW_ENDPOINT_NAME     endpoint name, answered at /endpoints/NAME/invocations (default tagflow)
#   TAGFLOW_ENDPOINT_HOST     address the server listens on (default 0.0.0.0: the container's network)
#   TAGFLOW_ENDPOINT_PORT     its port (default 8080)
#   TAGFLOW_ENDPOINT_RETRY_S  seconds between tries while the model cannot be fetched yet (default 30)
#
# `tagflow serve start` exits 1 while the model is not in S3 yet (or S3 does not answer yet): the script waits and
# tries again. It exits 2 when the object is no model or the URI is wrong: the script stops with that message, since
# trying again cannot help. Once serving, the server's log follows on stdout. The server accepts model swaps from
# loopback only, so swaps run inside this container: `docker compose exec endpoint tagflow serve swap URI`.
# SIGTERM (docker compose stop) stops the server's process group; the server dying ends the script with status 1.
set -u
model="${TAGFLOW_ENDPOINT_MODEL:?set TAGFLOW_ENDPOINT_MODEL to the s3:// URI of a model.tar.gz}"
name="${TAGFLOW_ENDPOINT_NAME:-tagflow}"
retry_s="${TAGFLOW_ENDPOINT_RETRY_S:-30}"
state="${TAGFLOW_HOME:?TAGFLOW_HOME must be set}/endpoints/$name"

# No process of a previous run survives a container restart, so a pid file found here is stale (its number may
# even belong to a new process, which would pass for a running endpoint).
rm -f "$state/endpoint.pid"

while :; do
    tagflow serve start "$model" --name "$name" \
        --host "${TAGFLOW_ENDPOINT_HOST:-0.0.0.0}" --port "${TAGFLOW_ENDPOINT_PORT:-8080}"
    status=$?
    case $status in
        0) break ;;
        2) exit 2 ;;
    esac
    echo "endpoint: cannot serve $model yet (tagflow exited $status); next try in ${retry_s}s" >&2
    sleep "$retry_s"
done

trap 'tagflow serve stop --name "$name"; exit 0' TERM INT
tail -n +1 -f --pid="$(cat "$state/endpoint.pid")" "$state/endpoint.log" &
wait $!
echo "endpoint: the server process exited; its log is above" >&2
exit 1
