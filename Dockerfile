# tagflow's image: the Airflow environment and the MXNet algorithm environment side by side, as `make venvs`
# builds them on a workstation. docker-compose.yaml runs every Airflow component and the local endpoint from it.
#
# Not FROM apache/airflow: that image installs Airflow under its own constraints file, and tagflow has its own
# lock (requirements.txt, with hashes) that the tests run against; a second venv must hold MXNet 1.9.1, which
# needs numpy 1.23.5 and so never shares one with Airflow. A plain Python image plus the two locks gives exactly
# the packages the test suite checked. The locks are resolved for linux x86_64 (MXNet 1.9.1 has no arm64 wheel).
FROM python:3.11-slim-bookworm

# MXNet's libmxnet.so loads libgomp and libquadmath from the system (ldd); every other wheel brings its own.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends libgomp1 libquadmath0 \
    && rm -rf /var/lib/apt/lists/*

# The same uv as the Makefile's UV_VERSION.
ARG UV_VERSION=0.13.8
RUN pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"
ENV UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The two environments first: they change only with the locks, so code edits rebuild in seconds.
WORKDIR /opt/tagflow/src
COPY requirements.txt requirements-mxnet.txt ./
RUN uv venv --quiet --python /usr/local/bin/python3.11 /opt/tagflow/venv \
    && uv pip install --quiet --require-hashes --python /opt/tagflow/venv/bin/python -r requirements.txt
RUN uv venv --quiet --python /usr/local/bin/python3.11 /opt/tagflow/venv-mxnet \
    && uv pip install --quiet --require-hashes --python /opt/tagflow/venv-mxnet/bin/python -r requirements-mxnet.txt

# tagflow itself. Editable, as in `make venvs`: the code finds algo/ (trainer, server) next to include/ in the
# source tree, which a site-packages copy would lose. The DAG and its operators are read from here too.
COPY pyproject.toml ./
COPY include/ include/
COPY algo/ algo/
COPY dags/ dags/
COPY plugins/ plugins/
COPY deploy/endpoint.sh deploy/endpoint.sh
RUN uv pip install --quiet --python /opt/tagflow/venv/bin/python --no-deps -e .

# The running user owns only its state folders; the code stays root's. Empty named volumes mounted on these
# paths start as copies of them, ownership included.
RUN useradd --uid 50000 --user-group --home-dir /opt/airflow --create-home tagflow \
    && mkdir -p /opt/airflow/logs /opt/tagflow/scratch/home /opt/tagflow/scratch/tmp \
    && chown -R tagflow:tagflow /opt/airflow /opt/tagflow/scratch

# No .git in the image: manifest.json records this instead (docker compose build passes it through).
ARG TAGFLOW_REVISION=
ENV PATH=/opt/tagflow/venv/bin:$PATH \
    AIRFLOW_HOME=/opt/airflow \
    TAGFLOW_HOME=/opt/tagflow/scratch/home \
    TAGFLOW_MXNET_PYTHON=/opt/tagflow/venv-mxnet/bin/python \
    TAGFLOW_REVISION=${TAGFLOW_REVISION}

USER tagflow
WORKDIR /opt/airflow
CMD ["tagflow", "--help"]
