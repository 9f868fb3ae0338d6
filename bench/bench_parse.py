"""Benchmark: parse the seed-sized list file (155,000 lines x 334 labels, about 109 MB). Goal: <= 0.5 s.

Generates a deterministic list in a temporary folder, then times in this one process:
- `tagflow.listfile.parse_list` from the file (as the CLI calls it; includes reading it), best of 5;
- the same on the bytes already in memory (parsing alone), best of 5;
- `list_warnings` on the parsed list (what the `parse` verb adds to its summary), best of 5;
- a naive pure-Python per-line parser (split, int, list of labels) for comparison, best of 2.
With `--baseline FILE` (an older listfile.py, e.g. `git show REV:include/tagflow/listfile.py > /tmp/old.py`),
that module's `parse_list` is timed too, interleaved round by round with the current one, for a side-by-side figure
on a shared machine. Prints a machine line, wall and CPU seconds, and the figure against the goal.

    .venv/bin/python bench/bench_parse.py [--lines 155000] [--labels 334] [--baseline FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from machine import machine_line
from tagflow.listfile import list_warnings, parse_list

GOAL_SECONDS = 0.5


def generate(path: Path, lines: int, labels: int) -> None:
    """A seed-like list: shuffled unique IDs, ~5 % positive labels, tab-separated, paths with a leading '/'."""
    rng = np.random.default_rng(20240601)
    ids = rng.permutation(np.arange(1_000_000, 1_000_000 + 3 * lines))[:lines]
    cells = np.full((lines, 2 * labels), ord("\t"), np.uint8)
    cells[:, ::2] = (rng.random((lines, labels)) < 0.05).astype(np.uint8) + ord("0")
    block, width = cells.tobytes(), 2 * labels
    path.write_bytes(
        b"".join(
            b"%d\t%b/designs/%03d/%d.jpg\n" % (i, block[k * width : (k + 1) * width], i % 1000, i)
            for k, i in enumerate(ids.tolist())
        )
    )


def naive_parse(path: Path, labels: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """What a first notebook version does: one line at a time, validating as it goes."""
    ids, rows, paths = [], [], []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) != labels + 2:
                raise ValueError(f"bad line {line[:40]!r}")
            values = [int(v) for v in fields[1:-1]]
            if any(v not in (0, 1) for v in values):
                raise ValueError(f"bad label in {line[:40]!r}")
            ids.append(int(fields[0]))
            rows.append(values)
            paths.append(fields[-1].lstrip("/"))
    return np.array(ids, np.int64), np.array(rows, np.uint8), paths


def best_of(runs: int, fn):
    walls, cpus, result = [], [], None
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), result


def load_baseline(path: Path):
    """The `parse_list` of another version of listfile.py, imported under its own module name."""
    spec = importlib.util.spec_from_file_location("listfile_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.parse_list


def side_by_side(rounds: int, fns: dict[str, object]) -> dict[str, tuple[float, float]]:
    """Best (wall, CPU) of each function, run in turn within every round so load changes hit both alike."""
    best: dict[str, tuple[float, float]] = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            wall, cpu, _ = best_of(1, fn)
            old = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(old[0], wall), min(old[1], cpu))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=155_000)
    parser.add_argument("--labels", type=int, default=334)
    parser.add_argument("--baseline", type=Path, help="an older listfile.py to time side by side")
    args = parser.parse_args()

    print(machine_line(numpy=np.__version__))
    with tempfile.TemporaryDirectory(prefix="bench-parse-") as tmp:
        path = Path(tmp) / "seed.lst"
        generate(path, args.lines, args.labels)
        size_mb = path.stat().st_size / 1e6
        print(f"list: {args.lines:,} lines x {args.labels} labels, {size_mb:.1f} MB")

        fast_wall, fast_cpu, lf = best_of(5, lambda: parse_list(path, args.labels))
        raw = path.read_bytes()
        mem_wall, mem_cpu, _ = best_of(5, partial(parse_list, raw, args.labels))
        del raw
        warn_wall, warn_cpu, warnings = best_of(5, partial(list_warnings, lf))
        if args.baseline:
            old_parse = load_baseline(args.baseline)
            pair = side_by_side(
                5, {"baseline": lambda: old_parse(path, args.labels), "current": lambda: parse_list(path, args.labels)}
            )
        naive_wall, naive_cpu, (ids, labels, paths) = best_of(2, lambda: naive_parse(path, args.labels))
        same = np.array_equal(lf.ids, ids) and np.array_equal(lf.labels, labels) and lf.paths == paths
        if not same:
            print("ERROR: parse_list and the naive parser disagree", file=sys.stderr)
            return 1

    print(f"naive per-line Python: {naive_wall:.2f} s wall, {naive_cpu:.2f} s CPU (best of 2)")
    print(f"parse_list(file):      {fast_wall:.3f} s wall, {fast_cpu:.3f} s CPU (best of 5)")
    print(f"parse_list(bytes):     {mem_wall:.3f} s wall, {mem_cpu:.3f} s CPU (best of 5, file already read)")
    print(f"list_warnings:         {warn_wall:.3f} s wall, {warn_cpu:.3f} s CPU (best of 5; {warnings.counts()})")
    if args.baseline:
        for name, (wall, cpu) in pair.items():
            print(f"side by side, {name + ':':9} {wall:.3f} s wall, {cpu:.3f} s CPU (parse_list(file), best of 5)")
    verdict = "meets" if fast_wall <= GOAL_SECONDS else "MISSES"
    print(
        f"figure: parse {args.lines:,} x {args.labels} ({size_mb:.0f} MB) in {fast_wall:.3f} s, "
        f"{naive_wall / fast_wall:.1f}x the naive parser; goal <= {GOAL_SECONDS} s: {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
