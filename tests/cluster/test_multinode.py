"""A real multi-node Ray cluster on loopback (a head and 2 worker raylets, each with its own object store)
and run directories on an S3 server: the fixture itself, and trajectories + distillation writing nothing
but ``s3://`` locations, with every Ray stage pinned to the worker nodes by a custom resource."""

from __future__ import annotations

import pytest
import ray

from cluster_env import OBJECT_STORE_BYTES, WORKER, alive_worker_node_ids, make_bucket, objects, s3

pytestmark = pytest.mark.cluster


def test_the_cluster_is_separate_raylets_and_custom_resources_pin_work_to_workers(cluster):
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 3 and len({n["NodeID"] for n in nodes}) == 3
    assert len({n["ObjectStoreSocketName"] for n in nodes}) == 3  # one object store per node
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes)
    for n in nodes:
        assert n["Resources"]["CPU"] == 1 and abs(n["Resources"]["object_store_memory"] - OBJECT_STORE_BYTES) < 2**20
    workers = alive_worker_node_ids()
    assert len(workers) == 2
    head = ray.get_runtime_context().get_node_id()
    assert head not in workers

    @ray.remote(num_cpus=0.5, resources={WORKER: 0.5})
    def where(x):
        return ray.get_runtime_context().get_node_id(), ray.put(b"x" * 2**20)  # 1 MiB in that node's store

    placed = ray.get([where.remote(i) for i in range(6)])
    assert {node for node, _ in placed} <= workers and head not in {node for node, _ in placed}
    assert all(len(ray.get(ref)) == 2**20 for _, ref in placed)  # fetched across object stores


def test_s3_is_reachable_from_every_worker_node(cluster):
    bucket = make_bucket("d3ray-smoke")

    @ray.remote(num_cpus=0.5, resources={WORKER: 0.5})
    def write(i):
        import fsspec

        node = ray.get_runtime_context().get_node_id()
        with fsspec.open(f"{bucket}/from-workers/{i}.txt", "w") as f:
            f.write(node)
        return node

    nodes = ray.get([write.remote(i) for i in range(4)])
    written = objects(f"{bucket}/from-workers")
    assert len(written) == 4
    assert {s3().cat_file(p).decode() for p in written} == set(nodes)


def test_a_run_directory_on_s3_trajectories_checkpoints_and_student(cluster):
    """Trajectories (2 actors) and distillation (2 FSDP2 workers, one per worker node) read and write only
    ``s3://``: shards, manifest, Ray Train's checkpoints and the exported student; the student loads from there."""
    import torch

    from d3core.models.checkpoint import load_pretrained
    from d3core.models.shipped import TINY_TEACHER_DIR
    from pipelines import trajectories as P
    from pipelines.distill import DistillConfig, run_distill
    from pipelines.train_checkpoint import list_checkpoints
    from stage_hooks import RecordNode, ship_by_value

    ship_by_value()
    run = make_bucket("d3ray-runs") + "/run-dir"
    traj = P.TrajectoriesConfig(out=f"{run}/trajectories", n_prompts=24, shard_size=6, gen_length=16, block_length=16,
                                batch_size=6, num_actors=2, resources={WORKER: 0.5})
    stats = P.run(traj)
    assert stats["rows"] == 24
    cfg = DistillConfig(trajectories=traj.out, out=f"{run}/student", storage=f"{run}/_train", only_correct=False,
                        num_workers=2, resources={WORKER: 1}, batch_size=8, max_steps=4, lr=1e-3, warmup_steps=1,
                        window_sizes=(8,), ckpt_every=2)
    summary = run_distill(cfg, hooks=RecordNode(f"{run}/nodes"))
    assert summary["steps"] == 4 and summary["checkpoint"].startswith(f"{cfg.experiment_uri}/checkpoint-step")
    assert summary["resumed_from"] == []

    keys = {k.removeprefix(run.removeprefix("s3://") + "/") for k in objects(run)}
    assert {f"trajectories/shard-{k:05d}.parquet" for k in range(4)} | {"trajectories/manifest.json"} <= keys
    newest = "_train/distill/checkpoint-step00000004"
    assert {f"{newest}/.metadata", f"{newest}/__0_0.distcp", f"{newest}/__1_0.distcp",
            f"{newest}/trainer_state.json"} <= keys
    assert {"student/model.safetensors", "student/config.json", "student/distill_summary.json"} <= keys
    assert len(list_checkpoints(cfg.experiment_uri)) <= cfg.num_to_keep
    assert not any(k.rsplit("/", 1)[-1].startswith(".tmp-") for k in keys)

    nodes = {k.rsplit("/", 1)[-1]: s3().cat_file(f"{run.removeprefix('s3://')}/{k}").decode()
             for k in keys if k.startswith("nodes/")}
    assert set(nodes) == {"rank-0-attempt-0", "rank-1-attempt-0"}
    assert len(set(nodes.values())) == 2 and set(nodes.values()) <= alive_worker_node_ids()  # one worker per node

    student, teacher = load_pretrained(cfg.out), load_pretrained(str(TINY_TEACHER_DIR))
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values()))


def test_the_pipelines_see_what_other_processes_wrote_since_they_last_listed(s3_server):
    """s3fs keeps every listing for the life of a process unless told not to. Ray Train's controller and the
    workers write a run's checkpoints while its driver waits; a cached listing hid the new checkpoints from
    the driver, and its cached ETag made reading the rewritten snapshot fail (s3fs.utils.FileExpired)."""
    import json

    from pipelines import train_checkpoint as C

    experiment = make_bucket("d3ray-listings") + "/run/distill"
    key = experiment.removeprefix("s3://")
    other = s3()  # another process: a Ray Train worker, the controller

    def checkpoint(step: int, registered: list[int]) -> None:
        other.pipe_file(f"{key}/{C.checkpoint_dir_name(step)}/{C.TRAINER_STATE}", json.dumps({"step": step}).encode())
        other.pipe_file(f"{key}/{C.RAY_SNAPSHOT}", json.dumps({"checkpoint_results": [
            {"checkpoint_dir_name": C.checkpoint_dir_name(s)} for s in registered]}).encode())

    checkpoint(2, [2])
    assert [u.rsplit("/", 1)[-1] for u in C.list_checkpoints(experiment)] == [C.checkpoint_dir_name(2)]
    assert C.registered(experiment) == {C.checkpoint_dir_name(2)}
    checkpoint(4, [2, 4])
    assert [u.rsplit("/", 1)[-1] for u in C.list_checkpoints(experiment)] == [C.checkpoint_dir_name(2),
                                                                              C.checkpoint_dir_name(4)]
    assert C.registered(experiment) == {C.checkpoint_dir_name(2), C.checkpoint_dir_name(4)}
    assert C.read_trainer_state(f"{experiment}/{C.checkpoint_dir_name(4)}") == {"step": 4}
