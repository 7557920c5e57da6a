"""Custom Ray resources per stage (``resources={"worker": 1}``): validated on construction, settable from every
CLI and config file, handed to the Ray call that places the work, and refused before any write when the cluster
has none of them. Ray is replaced by a cluster's answers here; tests/cluster runs them on real nodes."""

from __future__ import annotations

import pytest
import ray

from d3core.models.shipped import TINY_TEACHER_DIR
from pipelines import _cli, cli, full
from pipelines import distill as D
from pipelines import evaluate as E
from pipelines import trajectories as P
from serve_apps.config import ServeConfig
from trajectory_sets import random_rows, write_set

TEACHER = str(TINY_TEACHER_DIR)
GEN = 16
STAGES = {"trajectories": P.TrajectoriesConfig, "distill": D.DistillConfig, "evaluate": E.EvaluateConfig,
          "serve": lambda **kw: ServeConfig.from_preset("tiny", **kw)}


class Placed(Exception):
    """Raised by a stand-in for the Ray call that would place the work: carries its arguments."""




def cluster_with(monkeypatch, resources: dict) -> None:
    """Ray "running" on a local cluster (no autoscaling wait) with these resources, without starting it."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, **resources})


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("resources,message", [
    ({"CPU": 1}, r"'CPU' is no custom resource|CPU is not a custom resource"),
    ({"GPU": 1}, r"'GPU' is no custom resource|GPU is not a custom resource"),
    ({"worker": 0}, r"must be a number > 0"),
    ({"worker": -1.0}, r"must be a number > 0"),
    ({"worker": float("inf")}, r"must be a number > 0"),
    ({"worker": 1.5}, r"fractions of a resource only up to 1"),
    ({"worker": True}, r"must be a number > 0"),
    ({"": 1}, r"non-empty|no custom resource name"),
])
def test_every_stage_validates_its_custom_resources(stage, resources, message):
    with pytest.raises(ValueError, match=message):
        STAGES[stage](resources=resources)
    assert STAGES[stage](resources={"worker": 1, "accelerator_type:H100": 0.5}).resources["worker"] == 1
    assert STAGES[stage]().resources == {}  # no preset asks for a custom resource


def test_full_py_sets_every_stages_resources_and_its_recipe_file_repeats_them(tmp_path):
    argv = ["--trajectories.resources", "worker", "0.5", "--distill.resources", "worker", "1",
            "--evaluate.resources", "worker", "1", "gpu_pool", "2", "--serve.resources", "worker", "1"]
    recipe = full.parse_args(argv).recipe
    assert (recipe.trajectories.resources, recipe.distill.resources, recipe.evaluate.resources,
            recipe.serve.resources) == ({"worker": 0.5}, {"worker": 1.0}, {"worker": 1.0, "gpu_pool": 2.0},
                                        {"worker": 1.0})
    saved = tmp_path / "recipe.yaml"
    saved.write_text(_cli.to_yaml(recipe))
    assert full.parse_args(["--config", str(saved)]).recipe == recipe
    assert cli.parse_trajectories(["--resources", "worker", "0.5"])[0].resources == {"worker": 0.5}
    assert cli.parse_distill(["--resources", "worker", "1"])[0].resources == {"worker": 1.0}
    assert cli.parse_evaluate(["--resources", "worker", "1"])[0].resources == {"worker": 1.0}
    with pytest.raises(ValueError, match=r"resources\['worker'\]=0.0: must be a number > 0"):
        full.parse_args(["--distill.resources", "worker", "0"])


def test_resources_do_not_change_what_a_stage_computes():
    """Where work runs is not part of a result: fingerprints and cell ids ignore it."""
    a, b = E.EvaluateConfig(), E.EvaluateConfig(resources={"worker": 1})
    ids = {uri: "x" for uri in a.models.values()}
    assert E.fingerprint(a, {u: {} for u in ids}) == E.fingerprint(b, {u: {} for u in ids})
    assert [c.key(a) for c in E.plan_cells(a, ids)] == [c.key(b) for c in E.plan_cells(b, ids)]
    assert "resources" not in D.RESULT_FIELDS


def test_trajectory_actors_ask_ray_for_the_resources(monkeypatch, tmp_path):
    cluster_with(monkeypatch, {"worker": 2.0})

    class Dataset:
        def map_batches(self, fn, **kwargs):
            raise Placed(kwargs)

    monkeypatch.setattr(ray.data, "from_items", lambda items: Dataset())
    cfg = P.TrajectoriesConfig(out=str(tmp_path / "traj"), n_prompts=4, shard_size=4, resources={"worker": 0.5})
    with pytest.raises(Placed) as placed:
        P.run(cfg)
    kwargs = placed.value.args[0]
    assert kwargs["resources"] == {"worker": 0.5} and kwargs["num_cpus"] == cfg.num_cpus_per_actor


def test_distill_workers_ask_ray_for_the_resources(monkeypatch, tmp_path):
    import ray.train.torch

    cluster_with(monkeypatch, {"worker": 2.0})

    def trainer(*args, **kwargs):
        raise Placed(kwargs)

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", trainer)
    monkeypatch.setattr(ray.data, "from_arrow", lambda table: "the rows")  # no object store here
    write_set(str(tmp_path / "traj"), random_rows(16, TEACHER, GEN), TEACHER, GEN)
    cfg = D.DistillConfig(trajectories=str(tmp_path / "traj"), out=str(tmp_path / "student"), batch_size=8,
                          window_sizes=(8,), resources={"worker": 1})
    with pytest.raises(Placed) as placed:
        D.run_distill(cfg)
    assert placed.value.args[0]["scaling_config"].resources_per_worker == {"CPU": 1, "worker": 1}


def test_evaluation_cells_ask_ray_for_the_resources_and_retry_a_lost_worker(monkeypatch, tmp_path):
    cluster_with(monkeypatch, {"worker": 2.0})

    class Remote:
        def options(self, **options):
            raise Placed(options)

    monkeypatch.setattr(ray, "remote", lambda fn: Remote())
    cfg = E.EvaluateConfig(out=str(tmp_path / "eval"), ar_model=None, n=4, sweeps={"vanilla": ()},
                           resources={"worker": 1})
    with pytest.raises(Placed) as placed:
        E.run_evaluation(cfg)
    options = placed.value.args[0]
    assert options["resources"] == {"worker": 1} and options["max_retries"] == E.CELL_RETRIES >= 1


def test_serve_replicas_ask_ray_for_the_resources():
    options = ServeConfig.from_args({"resources": '{"worker": 1}'}).deployment_options()
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "resources": {"worker": 1}}


@pytest.mark.parametrize("stage", ["trajectories", "distill", "evaluate", "full"])
def test_a_resource_no_node_declares_is_refused_before_anything_is_written(stage, monkeypatch, tmp_path):
    cluster_with(monkeypatch, {})
    fix = r"resources\['worker'\]=1 but the Ray cluster has 0 of resource 'worker'.*ray start --resources"
    if stage == "trajectories":
        run = lambda: P.run(P.TrajectoriesConfig(out=str(tmp_path / "out"), n_prompts=4, shard_size=4,  # noqa: E731
                                                 resources={"worker": 1}))
    elif stage == "distill":
        write_set(str(tmp_path / "traj"), random_rows(16, TEACHER, GEN), TEACHER, GEN)
        run = lambda: D.run_distill(D.DistillConfig(trajectories=str(tmp_path / "traj"),  # noqa: E731
                                                    out=str(tmp_path / "out"), batch_size=8, window_sizes=(8,),
                                                    resources={"worker": 1}))
    elif stage == "evaluate":
        run = lambda: E.run_evaluation(E.EvaluateConfig(out=str(tmp_path / "out"), ar_model=None,  # noqa: E731
                                                        n=4, sweeps={"vanilla": ()}, resources={"worker": 1}))
    else:
        fix = fix.replace("resources", "trajectories.resources", 1)
        cfg = full.parse_args(["--run-dir", str(tmp_path / "out"), "--n-prompts", "4",
                               "--trajectories.resources", "worker", "1"])
        run = lambda: full.run(cfg)  # noqa: E731
    with pytest.raises(ValueError, match=fix):
        run()
    assert not (tmp_path / "out").exists()
