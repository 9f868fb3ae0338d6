"""The Airflow DAG's id, in one place: dags/tagflow.py declares the DAG under it, and what finds the DAG or its
runs from outside (`make up`'s readiness check, the run-note listener) looks it up by it. No Airflow import."""

from __future__ import annotations

DAG_ID = "tagflow"
