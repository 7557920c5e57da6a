"""Test helper: write a trajectories output (shards + manifest + fingerprint) from given rows, without Ray.

The directory is exactly what ``pipelines/trajectories.py`` writes (the same writers), so readers
(distillation) see a complete, consistent set; tests then damage it on purpose.
"""

from __future__ import annotations

import dataclasses
import json
import random

from d3core import trajectory as T
from d3core.models.checkpoint import load_config
from pipelines import fingerprint as F
from pipelines import trajectories as P


def config(out: str, teacher: str, gen_length: int, n: int, shard_size: int) -> P.TrajectoriesConfig:
    return P.TrajectoriesConfig(out=out, teacher=teacher, gen_length=gen_length, block_length=gen_length,
                                n_prompts=n, shard_size=shard_size)


def random_rows(n: int, teacher: str, gen_length: int) -> list[T.TrajectoryRow]:
    """``n`` rows of random tokens within ``teacher``'s vocabulary, every slot unmasked at some step."""
    rng, vocab = random.Random(0), load_config(teacher).vocab_size
    return [T.TrajectoryRow(id=f"r{i:03d}", prompt_ids=[rng.randrange(10, vocab) for _ in range(5)],
                            response_ids=[rng.randrange(10, vocab) for _ in range(gen_length)],
                            unmask_step=rng.sample(range(gen_length), gen_length), is_correct=True, attempts=1,
                            temperature=0.0, teacher="", sampler="", sampler_params="") for i in range(n)]


def conform(rows: list[T.TrajectoryRow], cfg: P.TrajectoriesConfig) -> list[T.TrajectoryRow]:
    """The rows with the decode metadata a run of ``cfg`` records."""
    params = json.dumps(cfg.sampler_params(), sort_keys=True)
    return [dataclasses.replace(r, teacher=cfg.teacher, sampler=P.SAMPLER, sampler_params=params) for r in rows]


def write_set(out: str, rows: list[T.TrajectoryRow], teacher: str, gen_length: int, shard_size: int | None = None,
              complete: int | None = None, tag: str = "test") -> dict:
    """Write ``rows`` as a trajectories output; ``complete`` shards written (default: all). Returns the manifest."""
    shard_size = shard_size or len(rows)
    cfg = config(out, teacher, gen_length, len(rows), shard_size)
    rows = conform(rows, cfg)
    prompts = [{"id": r.id, "prompt_ids": r.prompt_ids, "answer": "", "task": None} for r in rows]
    fp = P.fingerprint(cfg, P.PromptSet(prompts, {"test": tag}))
    shards = P.plan_shards(prompts, shard_size)
    done = {}
    for shard in shards[:complete if complete is not None else len(shards)]:
        k = shard["shard"]
        P.write_shard(cfg, k, T.to_table(rows[k * shard_size:(k + 1) * shard_size]), F.digest(fp))
        done[k] = len(shard["ids"])
    P.write_manifest(cfg, shards, done, {"rows": sum(done.values())}, fp, load_config(teacher).vocab_size)
    return T.read_manifest(out)
