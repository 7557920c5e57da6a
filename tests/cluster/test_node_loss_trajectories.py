"""Node loss during teacher trajectories: a worker node running a decoder actor is killed mid-stage.

Ray Data restarts the lost actor (``max_restarts=-1``) and retries its shard (``max_task_retries=-1``);
the driver alone writes shards, so the run finishes with every row exactly once, and the shards
finished before the loss are not rewritten (same ETag and Last-Modified on S3).
"""

from __future__ import annotations

import pytest

from cluster_env import WORKER, alive_worker_node_ids, make_bucket, nodes_of_actors, objects, wait_until
from node_loss import Background, report

pytestmark = pytest.mark.cluster


def shard_objects(uri: str) -> dict[str, tuple[str, str]]:
    return {k: v for k, v in objects(uri).items() if k.endswith(".parquet") and "/.tmp-" not in k}


@pytest.mark.slow
def test_a_worker_node_lost_mid_trajectories_loses_and_doubles_no_row(cluster):
    from d3core import trajectory as T
    from pipelines import trajectories as P

    out = make_bucket("d3ray-node-loss") + "/trajectories"
    cfg = P.TrajectoriesConfig(out=out, n_prompts=128, shard_size=8, batch_size=8, num_actors=2,
                               resources={WORKER: 0.5})
    shards = -(-cfg.n_prompts // cfg.shard_size)
    stage = Background(lambda: P.run(cfg))
    wait_until(lambda: len(shard_objects(out)) >= 3 or stage.done(), 300, "3 finished shards on S3")
    before = shard_objects(out)
    busy = set(nodes_of_actors(cluster, "MapWorker(MapBatches(TeacherDecoder))").values())
    assert not stage.done() and len(before) < shards, "the stage finished before a node could be removed"
    assert busy and busy <= alive_worker_node_ids(), busy  # the actors run on worker nodes only (resources)
    victim = sorted(busy)[0]
    removed_at = cluster.remove(victim)
    cluster.add_worker()  # the replacement (the surviving node has room for the restarted actor as well)
    stats = stage.result(timeout_s=400)
    seconds_after = stage.finished - removed_at

    rows = T.read_trajectories(out)
    ids = [r.id for r in rows]
    planned = [p["id"] for p in P.load_prompts(cfg)]
    after = shard_objects(out)
    untouched = {k: after.get(k) == v for k, v in before.items()}
    record = report("trajectories", removed=f"worker node {victim[:8]} (decoder actor on it)",
                    when=f"after {len(before)} of {shards} shards", rows=len(ids), unique=len(set(ids)),
                    lost=len(set(planned) - set(ids)), doubled=len(ids) - len(set(ids)),
                    finished_shards_untouched=sum(untouched.values()), of=len(before),
                    rows_this_run=stats["rows"], seconds_from_removal_to_done=round(seconds_after, 1),
                    wall_seconds=round(stats["wall_seconds"], 1))
    assert sorted(ids) == sorted(planned) and len(ids) == len(set(ids)) == cfg.n_prompts  # 0 lost, 0 doubled
    assert all(untouched.values()), untouched  # finished shards were not rewritten
    assert stats["rows"] == cfg.n_prompts  # one run finished it: the lost shard was retried, not left for a rerun
    assert record["lost"] == record["doubled"] == 0
    assert T.read_manifest(out)["complete"] is True
    assert not [k for k in objects(out) if "/.tmp-" in k]
    wait_until(lambda: victim not in alive_worker_node_ids(), 60, "the lost node marked dead")
    assert len(alive_worker_node_ids()) == 2  # the survivor and the replacement
