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


def write(tmp_path, name: str, table) -> None:
    """A shard plus a manifest listing every shard written so far (readers follow the manifest)."""
    pq.write_table(table, tmp_path / name)
    manifest = tmp_path / T.MANIFEST
    shards = json.loads(manifest.read_text())["shards"] if manifest.exists() else {}
    manifest.write_text(json.dumps({"shards": {**shards, name: {"complete": True}}}))


def test_round_trip_and_replay(tmp_path):
    write(tmp_path, "shard-00000.parquet", T.to_table([row(0), row(1)]))
    rows = T.read_trajectories(str(tmp_path))
    assert [r.id for r in rows] == ["p0", "p1"]
    assert T.replay(rows[0], mask_id=5, upto=0) == [5, 11, 5, 5]
    assert T.replay(rows[0], mask_id=5, upto=1) == [10, 11, 5, 5]
    assert T.replay(rows[0], mask_id=5) == [10, 11, 12, 3]
    assert T.order_is_blockwise(rows[0].unmask_step, 2)
    assert not T.order_is_blockwise([0, 3, 1, 2], 2)
    assert rows[0].params() == {"block_length": 2}


def test_foreign_shard_is_refused_with_its_name(tmp_path):
    write(tmp_path, "other.parquet", pa.table({"id": ["a"], "text": ["hello"]}))
    with pytest.raises(T.TrajectoryFormatError, match=r"other.parquet: not a d3ray trajectory shard"):
        T.read_trajectories(str(tmp_path))


def test_corrupt_shard_is_refused(tmp_path):
    write(tmp_path, "shard-00000.parquet", T.to_table([row(0)]))
    (tmp_path / "shard-00000.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(T.TrajectoryFormatError, match="unreadable Parquet"):
        T.read_trajectories(str(tmp_path))


def test_inconsistent_rows_and_versions_are_refused(tmp_path):
    bad = T.to_table([T.TrajectoryRow(**{**row(0).__dict__, "unmask_step": [0, 1]})])
    write(tmp_path, "a.parquet", bad)
    with pytest.raises(T.TrajectoryFormatError, match="4 response ids but 2 unmask steps"):
        T.read_trajectories(str(tmp_path))
    newer = T.to_table([T.TrajectoryRow(**{**row(0).__dict__, "schema_version": 99})])
    write(tmp_path, "a.parquet", newer)
    with pytest.raises(T.TrajectoryFormatError, match=r"schema_version \[99\] is not supported"):
        T.read_trajectories(str(tmp_path))


def test_duplicate_ids_across_shards_are_refused(tmp_path):
    write(tmp_path, "shard-00000.parquet", T.to_table([row(0)]))
    write(tmp_path, "shard-00001.parquet", T.to_table([row(0)]))
    with pytest.raises(T.TrajectoryFormatError, match="appears in both"):
        T.read_trajectories(str(tmp_path))


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        T.read_trajectories("memory://d3ray-nothing-here")


def test_readers_follow_the_manifest_never_the_directory(tmp_path):
    write(tmp_path, "shard-00000.parquet", T.to_table([row(0)]))
    pq.write_table(T.to_table([row(1)]), tmp_path / "shard-00001.parquet")  # not in the manifest
    pq.write_table(T.to_table([row(2)]), tmp_path / ".tmp-shard-00002.parquet")  # a crashed writer's file
    assert [r.id for r in T.read_trajectories(str(tmp_path))] == ["p0"]
    assert [p.rsplit("/", 1)[-1] for p in T.list_shards(str(tmp_path))] == ["shard-00000.parquet",
                                                                            "shard-00001.parquet"]


EXPECTED = T.Expected(vocab_size=20, gen_length=4, nfe=4, teacher="t", sampler="vanilla",
                      sampler_params=json.dumps({"block_length": 2}))


@pytest.mark.parametrize("change, message", [
    ({"response_ids": [10, 11, 12, 20]}, r"response_ids of rows \['p0'\] hold ids in \[3, 20\], outside the "
                                         r"teacher's vocabulary \[0, 20\)"),
    ({"prompt_ids": [2, -3, 7]}, r"prompt_ids of rows \['p0'\] hold ids in \[-3, 7\]"),
    ({"unmask_step": [9999, 0, 3, 2]}, r"unmask_step of rows \['p0'\] lie in \[0, 9999\]; the teacher's decode "
                                       r"made 4 forward passes"),
    ({"unmask_step": [-2, 0, 3, 2]}, r"unmask_step of rows \['p0'\] lie in \[-2, 3\]"),
    ({"response_ids": [10, 11, 12], "unmask_step": [0, 1, 2]}, r"have \[3\] response slots, the manifest records "
                                                             r"gen_length=4"),
    ({"teacher": "another"}, r"record teacher \['another'\], the manifest records 't'"),
    ({"sampler": "d3llm"}, r"record sampler \['d3llm'\]"),
])
def test_rows_that_the_recorded_decode_cannot_have_made_are_refused(change, message):
    good = T.to_table([row(1), row(2)])
    T.check_rows(good, "s.parquet", EXPECTED)  # a good shard passes
    T.check_rows(T.to_table([T.TrajectoryRow(**{**row(0).__dict__, "unmask_step": [-1, 0, 1, 2]})]), "s.parquet",
                 EXPECTED)  # -1 marks a slot never revealed
    bad = T.to_table([T.TrajectoryRow(**{**row(0).__dict__, **change}), row(1)])
    with pytest.raises(T.TrajectoryFormatError, match=message):
        T.check_rows(bad, "s.parquet", EXPECTED)
