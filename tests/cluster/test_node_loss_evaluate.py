"""Node loss during evaluation: a worker node is killed while it runs a cell (one Ray task per cell).

Ray retries a task whose worker or node died (``pipelines.evaluate.CELL_RETRIES``, system failures
only); the driver writes each cell once, from the attempt that returned. So the lost cell is run
again, not dropped and not counted twice, and the cells finished before the loss are not rewritten.
"""

from __future__ import annotations

import pytest
import ray

from cluster_env import WORKER, alive_worker_node_ids, make_bucket, objects, tasks, wait_until
from node_loss import Background, report

pytestmark = [pytest.mark.cluster, pytest.mark.cluster_full, pytest.mark.slow]


def cell_files(out: str) -> dict[str, tuple[str, str]]:
    return {k: v for k, v in objects(f"{out}/cells").items() if k.endswith(".json")}


def test_a_worker_node_lost_mid_evaluation_reruns_its_cell_once(cluster):
    from pipelines import evaluate as E
    from pipelines import fingerprint as F

    out = make_bucket("d3ray-eval-loss") + "/eval"
    cfg = E.EvaluateConfig(out=out, ar_model=None, n=40, batch_size=40, resources={WORKER: 1},
                           sweeps={"vanilla": (), "d3llm.entropy_threshold": (0.3, 0.5, 1.0)})
    cells = E.plan_cells(cfg, {uri: F.digest(i) for uri, i in E.model_identities(cfg).items()})
    stage = Background(lambda: E.run_evaluation(cfg))

    def running_on_a_worker() -> set[str]:
        if stage.done() or not cell_files(out):
            return set()
        return {t.node_id for t in tasks(cluster, "run_cell") if t.state == "RUNNING"} & alive_worker_node_ids()

    busy = wait_until(lambda: stage.done() or running_on_a_worker(), 300, "a finished cell and one running")
    assert not stage.done(), "the evaluation finished before a node could be removed"
    before = cell_files(out)
    victim = sorted(busy)[0]
    removed_at = cluster.remove(victim)
    cluster.add_worker()
    result = stage.result(timeout_s=600)
    seconds_after = stage.finished - removed_at

    after = cell_files(out)
    attempts = tasks(cluster, "run_cell")
    lost = [t for t in attempts if t.node_id == victim and t.state == "FAILED"]
    keys = [c.key(cfg) for c in cells]
    record = report("evaluate", removed=f"worker node {victim[:8]} (running a cell)",
                    when=f"after {len(before)} of {len(cells)} cells", cells=len(result["cells"]),
                    cell_files=len(after), cells_lost_on_the_node=len(lost),
                    retried_attempts=sum(t.attempt_number > 0 for t in attempts),
                    finished_cells_untouched=sum(after.get(k) == v for k, v in before.items()), of=len(before),
                    seconds_from_removal_to_done=round(seconds_after, 1))
    assert lost, attempts  # a cell really was running on the lost node, and died with it
    assert ray.get_runtime_context().get_node_id() not in {t.node_id for t in attempts}  # cells: worker nodes only
    assert record["retried_attempts"] >= 1  # ... and Ray ran it again
    assert len(result["cells"]) == len(cells)  # every cell once in the report: none dropped, none twice
    assert sorted(k.rsplit("/", 1)[-1].removesuffix(".json") for k in after) == sorted(keys)
    assert all(after[k] == v for k, v in before.items())  # finished cells were not rewritten
    wait_until(lambda: victim not in alive_worker_node_ids(), 60, "the lost node marked dead")
    assert len(alive_worker_node_ids()) == 2  # the survivor and the replacement
