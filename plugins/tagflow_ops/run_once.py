"""Run the tagflow DAG once with `dag.test()` (no scheduler: every task in this process) and print a summary line
`TAGFLOW_RESULT {json}`: the run's state, each task's state and its XCom result. `make demo` and the tests use it
through `tagflow.local.airflow.run_once`, with the environment that module builds.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime

from tagflow.dag_id import DAG_ID


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conf", default="{}", help="the run's params, as JSON")
    parser.add_argument("--logical-date", help="ISO date or time (default: now)")
    parser.add_argument("--dag-id", default=DAG_ID)
    args = parser.parse_args()

    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import timezone

    bag = DagBag()
    if bag.import_errors:
        raise SystemExit(f"DAG import errors: {bag.import_errors}")
    dag = bag.dags[args.dag_id]
    logical_date = timezone.coerce_datetime(datetime.fromisoformat(args.logical_date)) if args.logical_date else None
    run = dag.test(run_conf=json.loads(args.conf), logical_date=logical_date)
    from airflow.models.renderedtifields import RenderedTaskInstanceFields

    tasks, results, rendered = {}, {}, {}
    for ti in run.get_task_instances():
        key = ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"
        tasks[key] = str(ti.state)
        if ti.state == "success":
            results[key] = ti.xcom_pull(task_ids=ti.task_id, map_indexes=ti.map_index if ti.map_index >= 0 else None)
            rendered[key] = RenderedTaskInstanceFields.get_templated_fields(ti)
    summary = {"run_id": run.run_id, "state": str(run.state), "tasks": tasks, "results": results, "rendered": rendered}
    print("TAGFLOW_RESULT " + json.dumps(summary, default=str), flush=True)


if __name__ == "__main__":
    main()
