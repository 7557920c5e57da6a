"""The teacher-trajectory record: schema, validation, reading, and replay of unmask orders.

One row per prompt. ``response_ids`` holds every generation slot the teacher filled (the EOS
tail included) and ``unmask_step[i]`` the forward (0-based) at which slot ``i`` was revealed;
snapshot ``k`` of the teacher's trajectory is the prompt plus the slots with
``unmask_step <= k``. Shards are Parquet files; :func:`read_trajectories` validates every
shard and refuses a foreign or corrupt one with a message naming the file and the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
UNUSED_STEP = -1  # the unmask step of a generation slot the teacher never revealed

SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("response_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("unmask_step", pa.list_(pa.int16()), nullable=False),
    pa.field("is_correct", pa.bool_(), nullable=False),
    pa.field("attempts", pa.int16(), nullable=False),
    pa.field("temperature", pa.float32(), nullable=False),
    pa.field("teacher", pa.string(), nullable=False),
    pa.field("sampler", pa.string(), nullable=False),
    pa.field("sampler_params", pa.string(), nullable=False),  # JSON
    pa.field("schema_version", pa.int16(), nullable=False),
])


class TrajectoryFormatError(ValueError):
    """A shard that is not a d3ray trajectory shard of a supported schema version."""


@dataclass(frozen=True)
class TrajectoryRow:
    id: str
    prompt_ids: list[int]
    response_ids: list[int]
    unmask_step: list[int]
    is_correct: bool
    attempts: int
    temperature: float
    teacher: str
    sampler: str
    sampler_params: str
    schema_version: int = SCHEMA_VERSION

    def params(self) -> dict[str, Any]:
        return json.loads(self.sampler_params)


def to_table(rows: Iterable[TrajectoryRow]) -> pa.Table:
    rows = list(rows)
    columns = {f.name: [getattr(r, f.name) for r in rows] for f in SCHEMA}
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def validate_table(table: pa.Table, source: str) -> None:
    """Check field names and types, the schema version and per-row consistency."""
    missing = [f.name for f in SCHEMA if f.name not in table.schema.names]
    if missing:
        raise TrajectoryFormatError(
            f"{source}: not a d3ray trajectory shard (missing columns {missing}); "
            "write shards with pipelines/trajectories.py"
        )
    for f in SCHEMA:
        got = table.schema.field(f.name).type
        if got != f.type:
            raise TrajectoryFormatError(f"{source}: column {f.name!r} has type {got}, expected {f.type}")
    versions = set(table.column("schema_version").to_pylist())
    if versions - {SCHEMA_VERSION}:
        raise TrajectoryFormatError(
            f"{source}: schema_version {sorted(versions)} is not supported (this d3ray reads {SCHEMA_VERSION}); "
            "regenerate the trajectories with this version"
        )
    resp = table.column("response_ids").to_pylist()
    steps = table.column("unmask_step").to_pylist()
    ids = table.column("id").to_pylist()
    for rid, r, s in zip(ids, resp, steps):
        if len(r) != len(s):
            raise TrajectoryFormatError(
                f"{source}: row {rid!r} has {len(r)} response ids but {len(s)} unmask steps; they must match"
            )
        if s and min(s) < UNUSED_STEP:
            raise TrajectoryFormatError(f"{source}: row {rid!r} has unmask step {min(s)}: steps are >= 0, or "
                                        f"{UNUSED_STEP} for a slot never revealed")
    if len(set(ids)) != len(ids):
        raise TrajectoryFormatError(f"{source}: duplicate ids inside one shard")


@dataclass(frozen=True)
class Expected:
    """What every row of a trajectory set must agree with (the manifest's record of how it was decoded)."""

    vocab_size: int  # the teacher's vocabulary: every token id lies in [0, vocab_size)
    gen_length: int  # response slots per row
    nfe: int  # forward passes of the teacher's decode: unmask steps lie in [0, nfe), or UNUSED_STEP
    teacher: str
    sampler: str
    sampler_params: str  # JSON, as recorded in the rows


def _bad_rows(table: pa.Table, mask) -> list[str]:
    return table.filter(mask).column("id").to_pylist()[:3]


def check_rows(table: pa.Table, source: str, expected: Expected) -> None:
    """Refuse rows that could not have come from the recorded decode: token ids, steps, shapes, metadata.

    Raises :class:`TrajectoryFormatError` naming the shard, a few offending row ids, the rule and
    the fix. Vectorised (pyarrow.compute), so a shard of thousands of rows checks in milliseconds.
    """
    import pyarrow.compute as pc

    fix = "the shard was not written by this teacher's trajectories run: delete it and rerun pipelines/trajectories.py"
    lengths = pc.list_value_length(table.column("response_ids"))
    wrong = pc.not_equal(lengths, expected.gen_length)
    if pc.any(wrong).as_py():
        raise TrajectoryFormatError(f"{source}: rows {_bad_rows(table, wrong)} have "
                                    f"{sorted(set(pc.filter(lengths, wrong).to_pylist()))[:3]} response slots, the "
                                    f"manifest records gen_length={expected.gen_length}; {fix}")
    for column in ("prompt_ids", "response_ids"):
        flat = pc.list_flatten(table.column(column))
        if len(flat) == 0:
            continue
        lo, hi = pc.min_max(flat).values()
        if lo.as_py() < 0 or hi.as_py() >= expected.vocab_size:
            mins = pa.array([min(v) if v else 0 for v in table.column(column).to_pylist()])
            maxs = pa.array([max(v) if v else 0 for v in table.column(column).to_pylist()])
            bad = pc.or_(pc.less(mins, 0), pc.greater_equal(maxs, expected.vocab_size))
            raise TrajectoryFormatError(f"{source}: {column} of rows {_bad_rows(table, bad)} hold ids in "
                                        f"[{lo.as_py()}, {hi.as_py()}], outside the teacher's vocabulary "
                                        f"[0, {expected.vocab_size}); {fix}")
    steps = pc.list_flatten(table.column("unmask_step"))
    if len(steps):
        lo, hi = pc.min_max(steps).values()
        if lo.as_py() < UNUSED_STEP or hi.as_py() >= expected.nfe:
            per_row = table.column("unmask_step").to_pylist()
            bad = pa.array([bool(s) and (min(s) < UNUSED_STEP or max(s) >= expected.nfe) for s in per_row])
            raise TrajectoryFormatError(f"{source}: unmask_step of rows {_bad_rows(table, bad)} lie in "
                                        f"[{lo.as_py()}, {hi.as_py()}]; the teacher's decode made {expected.nfe} "
                                        f"forward passes, so steps lie in [0, {expected.nfe}) (or {UNUSED_STEP} "
                                        f"for a slot never revealed); {fix}")
    for column in ("teacher", "sampler", "sampler_params"):
        want = getattr(expected, column)
        other = pc.not_equal(table.column(column), want)
        if pc.any(other).as_py():
            found = sorted(set(pc.filter(table.column(column), other).to_pylist()))[:2]
            raise TrajectoryFormatError(f"{source}: rows {_bad_rows(table, other)} record {column} {found}, the "
                                        f"manifest records {want!r}: the shard comes from another decode; {fix}")


def list_shards(uri: str) -> list[str]:
    """Every ``*.parquet`` file directly under ``uri`` (to find files a manifest does not list; never to read)."""
    fs, root = fsspec.core.url_to_fs(uri)
    if not fs.exists(root):
        return []
    return sorted(p for p in fs.ls(root, detail=False) if p.endswith(".parquet")
                  and not p.rsplit("/", 1)[-1].startswith(".tmp-"))


def read_manifest(uri: str) -> dict | None:
    fs, root = fsspec.core.url_to_fs(uri)
    path = root.rstrip("/") + "/" + MANIFEST
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise TrajectoryFormatError(f"{path}: not valid JSON ({err}); the trajectories output is damaged: "
                                        "regenerate it (pipelines/trajectories.py --overwrite)") from err


def read_shard(uri: str, path: str) -> pa.Table:
    fs, _ = fsspec.core.url_to_fs(uri)
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
    except (pa.ArrowInvalid, OSError) as err:
        raise TrajectoryFormatError(f"{path}: unreadable Parquet ({err}); delete the shard and rerun to rewrite it") \
            from err
    validate_table(table, path)
    return table


def read_trajectories(uri: str) -> list[TrajectoryRow]:
    """Every row of the shards ``uri``'s manifest lists, validated; ids must be unique across shards."""
    manifest = read_manifest(uri)
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST} under {uri!r}: not a trajectories output (pipelines/trajectories.py "
                                "writes one); readers follow the manifest, never a directory listing")
    fs, root = fsspec.core.url_to_fs(uri)
    rows: list[TrajectoryRow] = []
    seen: dict[str, str] = {}
    for name in sorted(manifest["shards"]):
        path = root.rstrip("/") + "/" + name
        for rec in read_shard(uri, path).to_pylist():
            if rec["id"] in seen:
                raise TrajectoryFormatError(f"id {rec['id']!r} appears in both {seen[rec['id']]} and {path}")
            seen[rec["id"]] = path
            rows.append(TrajectoryRow(**rec))
    return rows


def replay(row: TrajectoryRow, mask_id: int, upto: int | None = None) -> list[int]:
    """The response as the teacher saw it after step ``upto`` (default: the end): unrevealed slots are masks."""
    last = max(row.unmask_step) if upto is None else upto
    return [t if s <= last else mask_id for t, s in zip(row.response_ids, row.unmask_step)]


def order_is_blockwise(unmask_step: list[int], block_length: int) -> bool:
    """True when every slot of block ``b`` is revealed before any slot of block ``b + 1``."""
    blocks = [unmask_step[i:i + block_length] for i in range(0, len(unmask_step), block_length)]
    return all(max(a) < min(b) for a, b in zip(blocks, blocks[1:]))
