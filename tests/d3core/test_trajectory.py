"""The trajectory record: schema validation, replay, block order, foreign and corrupt shards."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from d3core import trajectory as T


def row(i: int, steps=None) -> T.TrajectoryRow:
    return T.TrajectoryRow(id=f"p{i}", prompt_ids=[2, 6, 7], response_ids=[10, 11, 12, 3],
                           unmask_step=steps or [1, 0, 3, 2], is_correct=True, attempts=1, temperature=0.0,
                           teacher="t", sampler="vanilla", sampler_params=json.dumps({"block_length": 2}))


def test_round_trip_and_replay(tmp_path):
    pq.write_table(T.to_table([row(0), row(1)]), tmp_path / "shard-00000.parquet")
    rows = T.read_trajectories(str(tmp_path))
    assert [r.id for r in rows] == ["p0", "p1"]
    assert T.replay(rows[0], mask_id=5, upto=0) == [5, 11, 5, 5]
    assert T.replay(rows[0], mask_id=5, upto=1) == [10, 11, 5, 5]
    assert T.replay(rows[0], mask_id=5) == [10, 11, 12, 3]
    assert T.order_is_blockwise(rows[0].unmask_step, 2)
    assert not T.order_is_blockwise([0, 3, 1, 2], 2)
    assert rows[0].params() == {"block_length": 2}


def test_foreign_shard_is_refused_with_its_name(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "text": ["hello"]}), tmp_path / "other.parquet")
    with pytest.raises(T.TrajectoryFormatError, match=r"other.parquet: not a d3ray trajectory shard"):
        T.read_trajectories(str(tmp_path))


def test_corrupt_shard_is_refused(tmp_path):
    (tmp_path / "shard-00000.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(T.TrajectoryFormatError, match="unreadable Parquet"):
        T.read_trajectories(str(tmp_path))


def test_inconsistent_rows_and_versions_are_refused(tmp_path):
    bad = T.to_table([T.TrajectoryRow(**{**row(0).__dict__, "unmask_step": [0, 1]})])
    pq.write_table(bad, tmp_path / "a.parquet")
    with pytest.raises(T.TrajectoryFormatError, match="4 response ids but 2 unmask steps"):
        T.read_trajectories(str(tmp_path))
    newer = T.to_table([T.TrajectoryRow(**{**row(0).__dict__, "schema_version": 99})])
    pq.write_table(newer, tmp_path / "a.parquet")
    with pytest.raises(T.TrajectoryFormatError, match=r"schema_version \[99\] is not supported"):
        T.read_trajectories(str(tmp_path))


def test_duplicate_ids_across_shards_are_refused(tmp_path):
    pq.write_table(T.to_table([row(0)]), tmp_path / "shard-00000.parquet")
    pq.write_table(T.to_table([row(0)]), tmp_path / "shard-00001.parquet")
    with pytest.raises(T.TrajectoryFormatError, match="appears in both"):
        T.read_trajectories(str(tmp_path))


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="no trajectory shards"):
        T.read_trajectories("memory://d3ray-nothing-here")
