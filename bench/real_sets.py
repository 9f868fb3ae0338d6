"""Real multi-label image sets for benchmarks: OpenMoji's emoji designs with their own annotations as labels.

    .venv/bin/python bench/real_sets.py OUT_DIR [--labels 50 | --labels all --min-support 4] [--images 1000]
        [--size 96] [--max-per-group 4] [--cache ~/.cache/tagflow-real]

The data are not synthetic: OpenMoji 17.0.0 (npm package `openmoji`, CC BY-SA 4.0) ships 4,495 colour SVG
designs and `data/openmoji.csv` with each design's Unicode group and subgroup, CLDR keyword tags and OpenMoji's own
tags. This script installs and downloads nothing. One-time setup, done by hand (npm and Debian's rsvg-convert):

    mkdir -p ~/.cache/tagflow-real && cd ~/.cache/tagflow-real && npm pack openmoji@17.0.0 \\
        && mkdir -p openmoji && tar xzf openmoji-17.0.0.tgz -C openmoji
    apt-get install -y librsvg2-bin

What it builds in OUT_DIR: `images/GROUP/HEXCODE.png` (the colour SVG rendered by rsvg-convert at `--size` px on
white; renders are cached under CACHE/render-SIZE/), `real.lst` (tagflow's list format: ID, one 0/1 column per
label, the path relative to `images/`), `labels.txt` (one label name a line) and `set.json` (what was chosen).

- Labels of a design: its `tags` and `openmoji_tags` (lower-cased), `group:NAME` and `sub:NAME`. A skin-tone
  variant has no tags of its own in the CSV: it takes its base emoji's.
- Groups: a design and its skin-tone variants are one group (`skintone_base_hexcode`), the folder in the path, so
  `--group-regex '^([^/]+)/'` keeps them on one side of the split. At most `--max-per-group` images of a group are
  taken (a two-person emoji has 26 skin-tone combinations; uncapped, people-body would be most of a sample).
- Which designs: groups in the order of a salted hash of their key (deterministic, unrelated to the labels and
  to the split's hash) until
  `--images` images are taken.
- Which labels: the `--labels K` most frequent among the taken images (ties by name), or `all` labels found in
  at least `--min-support` groups (variants repeat their base's labels). Images left without any chosen label are
  dropped (counted in set.json).
- Image IDs are the design's row number in openmoji.csv (1-based): stable for one package version.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

VERSION = "17.0.0"
DEFAULT_CACHE = Path.home() / ".cache" / "tagflow-real"
GROUP_REGEX = "^([^/]+)/"
SETUP = (
    f"mkdir -p {DEFAULT_CACHE} && cd {DEFAULT_CACHE} && npm pack openmoji@{VERSION} && mkdir -p openmoji "
    f"&& tar xzf openmoji-{VERSION}.tgz -C openmoji; apt-get install -y librsvg2-bin"
)


@dataclass(frozen=True)
class Design:
    image_id: int
    hexcode: str
    group: str  # the base emoji's hexcode: a design and its skin-tone variants
    labels: frozenset[str]


def package_dir(cache: Path) -> Path:
    return cache / "openmoji" / "package"


def read_designs(cache: Path) -> list[Design]:
    """Every design of the cached package with its labels; SystemExit saying how to set up when it is missing."""
    table = package_dir(cache) / "data" / "openmoji.csv"
    if not table.is_file():
        sys.exit(f"{table} not found: set the OpenMoji package up once with:\n  {SETUP}")
    with table.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"hexcode", "group", "subgroups", "tags", "openmoji_tags", "skintone_base_hexcode"} - set(rows[0])
    if missing:
        sys.exit(f"{table}: expected columns {', '.join(sorted(missing))} (OpenMoji {VERSION}'s layout)")

    def own(row: dict[str, str]) -> set[str]:
        words = f"{row['tags']},{row['openmoji_tags']}".split(",")
        return {w.strip().lower() for w in words if w.strip()}

    tags = {row["hexcode"]: own(row) for row in rows}
    designs = []
    for number, row in enumerate(rows, 1):
        base = row["skintone_base_hexcode"] or row["hexcode"]
        words = tags[row["hexcode"]] or tags.get(base, set())
        labels = words | {f"group:{row['group']}", f"sub:{row['subgroups']}"}
        designs.append(Design(number, row["hexcode"], base, frozenset(labels)))
    return designs


def _order(key: str) -> bytes:
    """A salted hash: unsalted it would be the split's own hash, and the first groups taken all training ones."""
    return hashlib.blake2b(key.encode(), digest_size=8, person=b"tagflow-sample").digest()


def sample(designs: list[Design], images: int, max_per_group: int) -> list[Design]:
    """Whole groups (capped) in hash order until `images` are taken."""
    by_group: dict[str, list[Design]] = {}
    for d in designs:
        by_group.setdefault(d.group, []).append(d)
    taken: list[Design] = []
    for key in sorted(by_group, key=_order):
        taken.extend(sorted(by_group[key], key=lambda d: d.image_id)[:max_per_group])
        if len(taken) >= images:
            break
    return sorted(taken, key=lambda d: d.image_id)


def choose_labels(designs: list[Design], k: int | None, min_support: int) -> list[str]:
    """The K most frequent labels by images, or every label found in at least `min_support` groups (skin-tone
    variants repeat their base's labels, so images would overstate how often a label can be learnt and held out)."""
    counts = Counter(label for d in designs for label in d.labels)
    ranked = sorted(counts, key=lambda name: (-counts[name], name))
    if k is not None:
        return ranked[:k]
    groups = Counter(label for _, labels in {(d.group, d.labels) for d in designs} for label in labels)
    return [name for name in ranked if groups[name] >= min_support]


def render(designs: list[Design], cache: Path, size: int, out_images: Path, workers: int = 2) -> None:
    """Each design's colour SVG as a `size`-px PNG on white (cached), linked into out_images/GROUP/HEXCODE.png."""
    tool = shutil.which("rsvg-convert")
    if tool is None:
        sys.exit(f"rsvg-convert not found (Debian package librsvg2-bin): set up once with:\n  {SETUP}")
    svgs, renders = package_dir(cache) / "color" / "svg", cache / f"render-{size}"
    renders.mkdir(parents=True, exist_ok=True)

    def one(d: Design) -> None:
        png = renders / f"{d.hexcode}.png"
        if not png.exists():
            svg = svgs / f"{d.hexcode}.svg"
            partial = png.with_suffix(".partial.png")
            done = subprocess.run([tool, "-w", str(size), "-h", str(size), "-b", "white", "-o", str(partial), str(svg)],
                                  capture_output=True, text=True)  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"rsvg-convert {svg}: {done.stderr.strip() or done.returncode}")
            partial.replace(png)
        target = out_images / d.group / f"{d.hexcode}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.hardlink_to(png)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, designs))


def build(
    out: Path,
    *,
    labels: int | None,
    min_support: int = 4,
    images: int = 1000,
    size: int = 96,
    max_per_group: int = 4,
    cache: Path = DEFAULT_CACHE,
) -> dict[str, object]:
    """Write the set into `out` (see the module docstring); what was chosen, as written to set.json."""
    taken = sample(read_designs(cache), images, max_per_group)
    names = choose_labels(taken, labels, min_support)
    index = {name: i for i, name in enumerate(names)}
    kept = [d for d in taken if d.labels & index.keys()]
    if out.exists():
        shutil.rmtree(out)
    render(kept, cache, size, out / "images")
    lines = []
    for d in kept:
        row = ["0"] * len(names)
        for label in d.labels & index.keys():
            row[index[label]] = "1"
        lines.append(f"{d.image_id}\t" + "\t".join(row) + f"\t{d.group}/{d.hexcode}.png\n")
    (out / "real.lst").write_text("".join(lines), encoding="utf-8")
    (out / "labels.txt").write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    positives = sum(len(d.labels & index.keys()) for d in kept)
    record: dict[str, object] = {
        "source": f"OpenMoji {VERSION} (npm openmoji), colour SVGs rendered at {size} px",
        "images": len(kept),
        "dropped_without_label": len(taken) - len(kept),
        "groups": len({d.group for d in kept}),
        "labels": len(names),
        "labels_per_image": round(positives / max(len(kept), 1), 2),
        "group_regex": GROUP_REGEX,
        "label_rule": f"{labels} most frequent" if labels is not None else f"all in >= {min_support} groups",
        "max_per_group": max_per_group,
    }
    (out / "set.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--labels", default="50", help="K most frequent labels, or 'all' (with --min-support)")
    parser.add_argument("--min-support", type=int, default=4)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--max-per-group", type=int, default=4)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    if args.labels != "all" and not args.labels.isdigit():
        parser.error(f"--labels {args.labels!r}: expected a whole number or 'all'")
    k = None if args.labels == "all" else int(args.labels)
    record = build(args.out, labels=k, min_support=args.min_support, images=args.images, size=args.size,
                   max_per_group=args.max_per_group, cache=args.cache)  # fmt: skip
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
