"""The shard plan: the list, in ID order, cut into contiguous shards that later runs recognise.

Each shard is one unit of work downstream (one mapped Airflow task downloads and packs it; its staged outputs in S3
are keyed by its digest), so a shard's identity must depend only on what it contains:

- `digest`: sha256 over the shard's (ID, path, source ETag) entries. Same images from the same objects -> same
  digest -> the staged download is reused.
- `labels_digest`: sha256 over `digest` and the shard's label rows. A relabel changes only this, which forces a
  re-pack but not a re-download.

Boundaries are content-defined, so that adding images disturbs as few shards as possible. A fixed count per shard
would move every boundary after an insertion. Instead, with target size S, the cut points are chosen by the IDs
themselves:

- every ID gets a stable 64-bit hash (splitmix64 of the ID, salted; see `stable_id_hash`);
- scanning in ID order from a shard's first row, the shard ends at the first row that is at least MIN = S//4
  rows in and whose hash is 0 modulo S - MIN + 1 (so the mean size is about S), or at MAX = 4*S rows if no such
  row comes first.

Whether a row ends a shard depends only on its own ID and on where its shard started. So an image inserted into a
shard changes only that shard -- the shards after it keep their boundaries and digests -- provided it is not a cut
row itself (chance 1/(S-MIN+1)), lands at least MIN rows into the shard, and the shard stays within MAX; otherwise
the change spreads to a neighbour or two until the boundaries fall back into step. Images appended with higher IDs
change only the last shard and add new ones; removing an image is the mirror case. The last shard may be smaller
than MIN.

At most `max_shards` shards (1,024 = Airflow's default `max_map_length`): if the requested size would make more,
the effective size is raised until the plan fits, logged and recorded in the plan (`shard_size` vs
`requested_size`). That moves every boundary, so keep the requested size comfortably above `len(list)/1024`.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import math
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tagflow.errors import QUOTE_LIMIT, InputError, ListFileError, quote

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    from tagflow.listfile import ListFile

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 2000
MAX_SHARDS = 1024  # Airflow's default [core] max_map_length
DIGEST_CHARS = 20  # hex characters kept of each sha256 (80 bits)
BOUNDARY_SALT = 0x5348_4152_4453  # "SHARDS": keeps cut rows independent of other uses of the ID hash
_FORMAT = "tagflow-shard-v1"


def stable_id_hash(ids: np.ndarray, salt: int = 0) -> np.ndarray:
    """A 64-bit hash of each ID (splitmix64 of `id ^ salt`), identical on every machine and run."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) ^ np.uint64(salt)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of the ID-sorted list."""

    index: int
    start: int
    stop: int
    digest: str
    labels_digest: str

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ShardPlan:
    """The shards of one list, in order; plain values only so it can travel as JSON (Airflow XCom)."""

    shards: tuple[Shard, ...]
    shard_size: int  # the effective target size
    requested_size: int
    min_size: int
    max_size: int
    num_items: int

    def __len__(self) -> int:
        return len(self.shards)

    def __iter__(self) -> Iterator[Shard]:
        return iter(self.shards)

    @property
    def adjusted(self) -> bool:
        """True if the requested size was raised to stay within the shard limit."""
        return self.shard_size != self.requested_size

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shards": [asdict(s) for s in self.shards]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardPlan:
        return cls(**{**data, "shards": tuple(Shard(**s) for s in data["shards"])})


def size_bounds(shard_size: int) -> tuple[int, int]:
    """(MIN, MAX) rows of a shard for target size `shard_size` (the last shard may be below MIN)."""
    return max(1, shard_size // 4), 4 * shard_size


def shard_stops(ids_sorted: np.ndarray, shard_size: int) -> list[int]:
    """Where each shard ends (exclusive row index) for target size `shard_size`; see the module docstring."""
    n = len(ids_sorted)
    lo, hi = size_bounds(shard_size)
    modulus = np.uint64(shard_size - lo + 1)
    cuts = np.flatnonzero(stable_id_hash(ids_sorted, BOUNDARY_SALT) % modulus == 0).tolist()
    stops, start = [], 0
    while start < n:
        k = bisect.bisect_left(cuts, start + lo - 1)
        last = cuts[k] if k < len(cuts) and cuts[k] <= start + hi - 1 else min(start + hi - 1, n - 1)
        start = last + 1
        stops.append(start)
    return stops


def _digests(lf: ListFile, start: int, stop: int, etags: Mapping[str, str]) -> tuple[str, str]:
    ids = lf.ids[start:stop].tolist()
    paths = lf.paths[start:stop]
    entries = "".join(f"{i}\t{p}\t{etags.get(p, '')}\n" for i, p in zip(ids, paths, strict=True))
    digest = hashlib.sha256(f"{_FORMAT}\n{entries}".encode()).hexdigest()[:DIGEST_CHARS]
    labels = hashlib.sha256(f"{_FORMAT}-labels\n{digest}\n{lf.num_labels}\n".encode())
    labels.update(np.ascontiguousarray(lf.labels[start:stop], np.uint8).tobytes())
    return digest, labels.hexdigest()[:DIGEST_CHARS]


def plan_shards(
    lf_sorted: ListFile,
    shard_size: int = DEFAULT_SHARD_SIZE,
    etags: Mapping[str, str] | None = None,
    max_shards: int = MAX_SHARDS,
) -> ShardPlan:
    """Cut an ID-sorted list (`ListFile.sorted_by_id()`) into at most `max_shards` content-defined shards.

    `etags` maps a list path to its source object's ETag (a missing path counts as ""), so a replaced object
    changes its shard's digest.
    """
    if shard_size < 1:
        raise InputError(f"shard size must be at least 1, got {shard_size}")
    if max_shards < 1:
        raise InputError(f"the shard limit must be at least 1, got {max_shards}")
    if not lf_sorted.is_sorted:
        raise ValueError(f"{lf_sorted.name}: plan_shards needs the list sorted by ID (ListFile.sorted_by_id())")
    etags = etags or {}
    n = len(lf_sorted)
    size = max(shard_size, math.ceil(n / max_shards))
    stops = shard_stops(lf_sorted.ids, size)
    while len(stops) > max_shards:
        size = math.ceil(size * len(stops) / max_shards) + 1
        stops = shard_stops(lf_sorted.ids, size)
    if size != shard_size:
        log.info(
            "%s: shard size raised from %d to %d to stay within %d shards (%d images)",
            lf_sorted.name,
            shard_size,
            size,
            max_shards,
            n,
        )
    shards, start = [], 0
    for index, stop in enumerate(stops):
        digest, labels_digest = _digests(lf_sorted, start, stop, etags)
        shards.append(Shard(index, start, stop, digest, labels_digest))
        start = stop
    lo, hi = size_bounds(size)
    return ShardPlan(tuple(shards), size, shard_size, lo, hi, n)


# --- the train/validation split ----------------------------------------------------------------------------------
#
# Each image's side comes from a 64-bit blake2b hash of its split key: `hash / 2**64 < train_ratio` is train. The key
# is the image ID (as decimal text) unless a group key is given, then the group: every image of a group lands on the
# group's side, and since the side depends on the key alone, neither an image nor a group ever changes side when the
# dataset grows. This is the one side rule: `tagflow.pack` applies it by ID when it is given no plan.

SPLIT_BY_ID = "image_id"
SPLIT_BY_REGEX = "group_regex"
SPLIT_BY_FILE = "group_file"


def side_of_key(key: str, train_ratio: float) -> str:
    """'train' or 'val' from a hash of `key` alone (the image ID as decimal text, or its group)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return "train" if int.from_bytes(digest, "big") / 2**64 < train_ratio else "val"


def show_regex(pattern: str) -> str:
    """A regex as typed, in quotes (backslashes not doubled, so it can be copied back); `quote` when unprintable."""
    return f"'{pattern}'" if pattern.isprintable() and len(pattern) <= QUOTE_LIMIT else quote(pattern)


def compile_group_regex(pattern: str) -> re.Pattern[str]:
    """The group regex, compiled; InputError naming it when it does not compile."""
    try:
        return re.compile(pattern)
    except re.error as err:
        raise InputError(f"group regex {show_regex(pattern)}: not a valid regular expression ({err})") from None


def _row(lf: ListFile, row: int) -> str:
    """Where a row is, as list errors say it: `LIST:LINE`, or `LIST: ID n` when the rows come from several files."""
    if lf.lines is not None:
        return f"{lf.name}:{int(lf.lines[row])}"
    return f"{lf.name}: ID {int(lf.ids[row])}"


def group_keys(lf: ListFile, *, regex: str | None = None, groups: GroupFile | None = None) -> list[str]:
    """Each row's split key: its group (the regex's first capture group over the path, else its whole match; or the
    group file's entry for the ID), or the ID itself without either. A row without a group is refused, naming its
    line and the regex or file: an image silently made its own group would be exactly the leak a group key prevents.
    """
    if regex is not None and groups is not None:
        raise InputError("a group regex and a group file were both given; choose one")
    if regex is None and groups is None:
        return [str(i) for i in lf.ids.tolist()]
    keys: list[str] = []
    problems: list[str] = []
    if regex is not None:
        compiled = compile_group_regex(regex)
        take = 1 if compiled.groups else 0
        for row, path in enumerate(lf.paths):
            match = compiled.search(path)
            key = match.group(take) if match else None
            if not key:
                what = "does not match" if match is None else "matches with an empty group for"
                problems.append(f"{_row(lf, row)}: path {quote(path)} {what} the group regex {show_regex(regex)}")
            keys.append(key or "")
    else:
        assert groups is not None
        for row, image_id in enumerate(lf.ids.tolist()):
            key = groups.groups.get(image_id)
            if key is None:
                problems.append(f"{_row(lf, row)}: ID {image_id} has no group in the group file {groups.name}")
            keys.append(key or "")
    if problems:
        raise ListFileError(problems)
    return keys


@dataclass(frozen=True)
class GroupFile:
    """A group file: image ID → group, one `ID<TAB>GROUP` per line (IDs absent from the list are allowed)."""

    name: str
    sha256: str
    groups: dict[int, str]


def parse_group_file(data: bytes, name: str) -> GroupFile:
    """Parse a group file (`ID`, a tab, the group; UTF-8); ListFileError naming every bad line."""
    problems: list[str] = []
    groups: dict[int, str] = {}
    first_line: dict[int, int] = {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{name}: not UTF-8 text (byte {err.start}); expected ID<TAB>GROUP lines") from None
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line:
            continue
        image_id, tab, group = line.partition("\t")
        if not tab or not group.strip():
            problems.append(f"{name}:{number}: {quote(line)}: expected ID<TAB>GROUP")
            continue
        if not image_id.isascii() or not image_id.isdigit():
            problems.append(f"{name}:{number}: ID {quote(image_id)}: expected a whole number ≥ 0")
            continue
        key = int(image_id)
        if key in groups:
            problems.append(f"{name}:{number}: ID {key} already has a group on line {first_line[key]}")
            continue
        groups[key], first_line[key] = group.strip(), number
    if problems:
        raise ListFileError(problems)
    return GroupFile(name, hashlib.sha256(data).hexdigest(), groups)


@dataclass(frozen=True)
class SplitPlan:
    """The side of every row of one list (in its row order) and how it was decided."""

    train: np.ndarray  # bool, True = training/
    record: dict[str, Any]  # what the manifest records: method, ratio, the group key, group counts

    def sides(self, start: int = 0, stop: int | None = None) -> str:
        """Rows [start, stop) as one character each, `t` or `v` (how a shard's sides are staged)."""
        return "".join("t" if t else "v" for t in self.train[start:stop].tolist())


def sides_by_id(ids: Sequence[int] | np.ndarray, sides: str) -> dict[int, str]:
    """Image ID → 'train'/'val' for rows with these IDs and these sides (`SplitPlan.sides`: `t`/`v` per row), as
    `tagflow.pack.pack` takes them."""
    if len(ids) != len(sides):
        raise ValueError(f"{len(ids)} IDs but {len(sides)} sides")
    return {int(i): "train" if side == "t" else "val" for i, side in zip(ids, sides, strict=True)}


def plan_split(
    lf: ListFile, train_ratio: float, *, regex: str | None = None, groups: GroupFile | None = None
) -> SplitPlan:
    """Decide every row's side: by image ID, or with a group key by group (see `group_keys`)."""
    keys = group_keys(lf, regex=regex, groups=groups)
    side_of = {key: side_of_key(key, train_ratio) == "train" for key in dict.fromkeys(keys)}
    train = np.fromiter(map(side_of.__getitem__, keys), bool, len(keys))
    record: dict[str, Any] = {"by": SPLIT_BY_ID, "train_ratio": train_ratio}
    if regex is not None:
        record.update(by=SPLIT_BY_REGEX, group_regex=regex)
    elif groups is not None:
        record.update(by=SPLIT_BY_FILE, group_file={"name": groups.name, "sha256": groups.sha256})
    if regex is not None or groups is not None:
        in_train = sum(side_of.values())
        record["groups"] = {"train": in_train, "val": len(side_of) - in_train}
    return SplitPlan(train, record)
