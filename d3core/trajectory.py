"""The teacher-trajectory record: schema, validation, reading, and replay of unmask orders.

One row per prompt. ``response_ids`` holds every generation slot the teacher filled (the EOS
tail included) and ``unmask_step[i]`` the forward (0-based) at which slot ``i`` was revealed;
snapshot ``k`` of the teacher's trajectory is the prompt plus the slots with
``unmask_step <= k``. Shards are Parquet files; :func:`read_trajectories` validates every
shard and refuses a foreign or corrupt one with a message naming the file and the problem.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

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
        if s and min(s) < 0:
            raise TrajectoryFormatError(f"{source}: row {rid!r} has a negative unmask step (a slot never revealed)")
    if len(set(ids)) != len(ids):
        raise TrajectoryFormatError(f"{source}: duplicate ids inside one shard")


def list_shards(uri: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(uri)
    if not fs.exists(root):
        return []
    return sorted(p for p in fs.ls(root, detail=False) if p.endswith(".parquet"))


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
    """Every row of every shard under ``uri``, validated; ids must be unique across shards."""
    shards = list_shards(uri)
    if not shards:
        raise FileNotFoundError(f"no trajectory shards (*.parquet) under {uri!r}")
    rows: list[TrajectoryRow] = []
    seen: dict[str, str] = {}
    for path in shards:
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
