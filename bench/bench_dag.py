"""DAG figures: how long the DAG file takes to parse (as Airflow's DAG processor does it: airflow.sdk already
imported), and what one whole local run costs, first on new data and then again on the same data.

    .venv/bin/python bench/bench_dag.py --parse-rounds 10 --images 500

The run figures use the real local S3 server and algorithm environment in a throwaway TAGFLOW_HOME.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_line

PARSE = r"""
import json, sys, time
import airflow.sdk
from airflow.dag_processing.dagbag import DagBag
t = time.perf_counter()
bag = DagBag()
print(json.dumps({"seconds": time.perf_counter() - t, "errors": len(bag.import_errors)}))
"""


def parse_times(env: dict[str, str], rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        out = subprocess.run([sys.executable, "-c", PARSE], env=env, capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["errors"] == 0
        times.append(result["seconds"])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--parse-rounds", type=int, default=10)
    parser.add_argument("--images", type=int, default=500, help="demo designs for the whole-run figure (0: skip)")
    args = parser.parse_args()

    import airflow

    print(machine_line(airflow=airflow.__version__))
    home = Path(tempfile.mkdtemp(prefix="bench-dag-"))
    os.environ["TAGFLOW_HOME"] = str(home)
    from tagflow import demo, s3
    from tagflow.local import airflow as local_airflow
    from tagflow.local import services

    running = services.start()
    try:
        env = local_airflow.environment(running.s3, variables=running.airflow_variables())
        times = parse_times(env, args.parse_rounds)
        print(f"DAG file parse: median {statistics.median(times) * 1000:.0f} ms, "
              f"max {max(times) * 1000:.0f} ms over {len(times)} rounds")  # fmt: skip
        if args.images:
            client = running.s3.client()
            data = demo.publish(args.images, s3.S3Uri("tagflow-raw", "bench"), client=client, workers=2)
            local_airflow.migrate(env)
            conf = {
                "list_uri": data.list_uri, "images_uri": data.images_uri, "labels_uri": data.labels_uri,
                "dataset_prefix": "bench", "shard_size": 100,
                "hyperparameters": {"num_layers": 18, "epochs": 1, "mini_batch_size": 16, "learning_rate": 0.05},
            }  # fmt: skip
            for label in ("first run (new data)", "second run (same data)"):
                started = time.perf_counter()
                result = local_airflow.run_once(env, conf, log_file=home / "run.log")
                seconds = time.perf_counter() - started
                fetched = sum(r.get("fetched", 0) for t, r in result["results"].items() if t.startswith("shard.dow"))
                print(f"{label}: {result['state']} in {seconds:.1f} s, {fetched} images fetched")
    finally:
        services.stop()


if __name__ == "__main__":
    main()
