"""Teacher trajectories on Ray Data: prompts -> stateful decoder actors -> Parquet shards.

    python pipelines/trajectories.py --out runs/traj --n-prompts 2000 --num-actors 2

Prompts (the synthetic train split for ``tiny``, or a JSONL/Parquet of ``id, prompt, answer,
task`` at any fsspec URI) are cut into fixed shards by order. ``task`` names the evaluation task
(:data:`d3core.eval.tasks.TASK_NAMES`) whose own scorer decides ``is_correct`` (and so what
``--filter-correct`` and distillation's ``only_correct`` keep); code tasks need benchmark ids
(``HumanEval/0``, ``mbpp/11``). A prompt set without a task has no scorer and is refused unless
``--keep-all`` is given: then every row is kept and marked incorrect. Each pending shard becomes one Ray
Data row; ``map_batches`` runs a :class:`TeacherDecoder` actor pool that loads the teacher
once per actor and decodes one token per step in block order (LLaDA: highest confidence,
i.e. ``vanilla``), retrying wrong answers at rising temperature when asked. The driver
writes each finished shard atomically (temporary name, then rename) and keeps
``manifest.json`` up to date, so a rerun writes only the missing shards: no row is lost or
duplicated. Works on any fsspec URI, in-memory included, because only the driver writes.
``--teacher`` takes a path, fsspec URI, hub id or ``hf://`` URI; a teacher whose tokenizer is
Python shipped with the checkpoint (Dream) needs ``--trust-remote-code``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from d3core import trajectory as T

logger = logging.getLogger("d3ray.trajectories")

PRESETS = {
    # CPU actors for the embedded model; GPU presets put one teacher replica on each GPU.
    "tiny": dict(num_actors=2, num_cpus_per_actor=0.5, num_gpus_per_actor=0.0, batch_size=125, gen_length=48,
                 block_length=16),
    "llada-8b": dict(num_actors=8, num_cpus_per_actor=4.0, num_gpus_per_actor=1.0, batch_size=16, gen_length=256,
                     block_length=32),
    "dream-7b": dict(num_actors=8, num_cpus_per_actor=4.0, num_gpus_per_actor=1.0, batch_size=16, gen_length=256,
                     block_length=32),
}


@dataclass(frozen=True)
class TrajectoriesConfig:
    out: str = "runs/trajectories"
    preset: str = "tiny"
    teacher: str = ""  # checkpoint: path, fsspec URI, hub id or hf:// URI; empty = the shipped tiny teacher
    trust_remote_code: bool = False  # run the teacher tokenizer's own Python code (Dream's tokenization_dream.py)
    prompts: str = ""  # JSONL/Parquet URI with id, prompt, answer; empty = synthetic train split
    n_prompts: int = 2000
    seed: int = 0
    shard_size: int = 250
    num_actors: int = 0  # 0: the preset's value (likewise below)
    num_cpus_per_actor: float = -1.0
    num_gpus_per_actor: float = -1.0
    batch_size: int = 0
    gen_length: int = 0
    block_length: int = 0
    max_attempts: int = 1
    filter_correct: bool = False
    keep_all: bool = False  # accept a prompt set without a task (no scorer): keep every row, is_correct=False
    threads_per_actor: int = 1

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r}: must be one of {sorted(PRESETS)}")
        for name, default in PRESETS[self.preset].items():
            value = getattr(self, name)
            if value in (0, -1.0):
                object.__setattr__(self, name, default)
        if self.n_prompts < 1 or self.shard_size < 1:
            raise ValueError(f"n_prompts={self.n_prompts}, shard_size={self.shard_size}: both must be >= 1")
        if self.num_actors < 1 or self.batch_size < 1:
            raise ValueError(f"num_actors={self.num_actors}, batch_size={self.batch_size}: both must be >= 1")
        if not 1 <= self.max_attempts <= 10:
            raise ValueError(f"max_attempts={self.max_attempts}: must lie in [1, 10] (temperature rises 0.1 a try)")
        if self.gen_length % self.block_length:
            raise ValueError(f"block_length={self.block_length} must divide gen_length={self.gen_length}")
        if self.keep_all and (self.filter_correct or self.max_attempts > 1):
            raise ValueError(f"keep_all=True with filter_correct={self.filter_correct}, max_attempts="
                             f"{self.max_attempts}: keeping every row needs no scorer, so it cannot filter or retry "
                             "wrong rows; drop --keep-all or those options")

    def sampler_params(self) -> dict:
        return {"gen_length": self.gen_length, "block_length": self.block_length, "steps": self.gen_length,
                "remasking": "low_confidence"}


# -- prompts ---------------------------------------------------------------------------------
def load_prompts(cfg: TrajectoriesConfig) -> list[dict]:
    """``[{"id", "prompt_ids", "answer", "task"}]`` in a stable order (``task`` None: no scorer)."""
    from d3core.sft import encode_prompt

    tok = _tokenizer(cfg)  # the teacher's own tokenizer, for the synthetic split as for a prompt file
    if cfg.prompts:
        records = _read_records(cfg.prompts)[: cfg.n_prompts]
        out = []
        for i, rec in enumerate(records):
            if "id" not in rec or "prompt" not in rec:
                raise ValueError(f"{cfg.prompts}: record {i} lacks 'id' or 'prompt' (fields: {sorted(rec)})")
            out.append({"id": str(rec["id"]), "prompt_ids": encode_prompt(tok, rec["prompt"]),
                        "answer": str(rec.get("answer", "")), "task": rec.get("task")})
        _check_task(cfg, out)
    else:
        from d3core.eval import synthetic

        out = [{"id": p.id, "prompt_ids": encode_prompt(tok, p.question), "answer": str(p.target),
                "task": "synthetic"} for p in synthetic.generate("train", cfg.n_prompts, seed=cfg.seed)]
    ids = [r["id"] for r in out]
    if len(set(ids)) != len(ids):
        raise ValueError("prompt ids are not unique: trajectories are joined by id, make them unique")
    return out


def _check_task(cfg: TrajectoriesConfig, records: list[dict]) -> None:
    """One task per prompt set, one with a scorer for every record, or ``keep_all``."""
    from d3core.eval.tasks import TASK_NAMES, get_task

    tasks = sorted({str(r["task"]) for r in records if r["task"] is not None})
    if len(tasks) > 1 or (tasks and any(r["task"] is None for r in records)):
        raise ValueError(f"{cfg.prompts}: records name tasks {tasks} (some none): one prompt set is one task")
    if not tasks:
        if not cfg.keep_all:
            raise ValueError(f"{cfg.prompts}: the records name no 'task', so no scorer can decide which rows are "
                             f"correct; add \"task\": one of {TASK_NAMES} to each record, or pass --keep-all to keep "
                             "every row unscored")
        return
    if tasks[0] not in TASK_NAMES:
        raise ValueError(f"{cfg.prompts}: task {tasks[0]!r} has no scorer: use one of {TASK_NAMES}")
    task = get_task(tasks[0])
    if task.code:
        known = {e.id for e in task.examples()}
        bad = [r["id"] for r in records if r["id"] not in known]
        if bad:
            raise ValueError(f"{cfg.prompts}: ids {bad[:3]} are not {task.name} problems; a code task scores "
                             f"a record by its benchmark id (e.g. {sorted(known)[0]!r})")
    else:
        bad = [r["id"] for r in records if not r["answer"].strip()]
        if bad:
            raise ValueError(f"{cfg.prompts}: records {bad[:3]} have no 'answer' for the {task.name} scorer")


def make_scorer(task_name: str | None, ids: list[str], answers: list[str]):
    """``score(texts, rows) -> [bool]`` with the task's own scorer, or None for a prompt set without a task."""
    if task_name is None:
        return None
    from d3core.eval.benchmarks import Example
    from d3core.eval.tasks import get_task

    task = get_task(task_name)
    if task.code:
        by_id = {e.id: e for e in task.examples()}
        examples = [by_id[i] for i in ids]
    else:
        examples = [Example(i, "", a) for i, a in zip(ids, answers)]

    def score(texts: list[str], rows: list[int]) -> list[bool]:
        cut = [task.cut(t, "chat")[0] for t in texts]
        return task.score(cut, [examples[i] for i in rows], "chat")

    return score


def _read_records(uri: str) -> list[dict]:
    with fsspec.open(uri, "rb") as f:
        data = f.read()
    if uri.endswith(".parquet"):
        return pq.read_table(io.BytesIO(data)).to_pylist()
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def _tokenizer(cfg: TrajectoriesConfig):
    from d3core.models.shipped import TINY_TEACHER_DIR
    from d3core.models.tokenizer import load_tokenizer

    return load_tokenizer(cfg.teacher or str(TINY_TEACHER_DIR), cfg.trust_remote_code)


# -- the actor ----------------------------------------------------------------------------------
class TeacherDecoder:
    """Ray Data actor: loads the teacher once, decodes whole shards (one input row per shard)."""

    def __init__(self, cfg_json: str) -> None:
        import torch

        from d3core.models.checkpoint import load_pretrained
        from d3core.models.shipped import TINY_TEACHER_DIR

        self.cfg = TrajectoriesConfig(**json.loads(cfg_json))
        torch.set_num_threads(self.cfg.threads_per_actor)
        device = "cuda" if self.cfg.num_gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.teacher_uri = self.cfg.teacher or str(TINY_TEACHER_DIR)
        self.model = load_pretrained(self.teacher_uri, device=device)
        self.tok = _tokenizer(self.cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables = [self.decode_shard(row) for row in batch.to_pylist()]
        return pa.concat_tables(tables)

    def decode_shard(self, shard: dict) -> pa.Table:
        rows = decode_prompts(self.model, self.tok, self.cfg, shard["ids"], shard["prompt_ids"], shard["answers"],
                              teacher_name=self.teacher_uri, task=shard["task"])
        table = T.to_table(rows)
        table = table.append_column("shard", pa.array([shard["shard"]] * len(rows), pa.int32()))
        return table.append_column("shard_rows", pa.array([len(rows)] * len(rows), pa.int32()))


def decode_prompts(model, tok, cfg: TrajectoriesConfig, ids, prompts, answers, teacher_name: str,
                   task: str | None = "synthetic"):
    """Decode with ``vanilla`` one token per step; retry wrong answers at temperature 0.1, 0.2, ...

    Correctness is ``task``'s own scorer; ``task=None`` (no scorer) marks every row incorrect.
    """
    import torch

    from d3core.samplers.vanilla import VanillaParams, generate

    scorer = make_scorer(task, list(ids), list(answers))

    results: dict[int, tuple] = {}
    pending = list(range(len(ids)))
    for attempt in range(cfg.max_attempts):
        temperature = round(0.1 * attempt, 3)
        params = VanillaParams(gen_length=cfg.gen_length, block_length=cfg.block_length, temperature=temperature)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + attempt)
        still = []
        for start in range(0, len(pending), cfg.batch_size):
            chunk = pending[start: start + cfg.batch_size]
            out = generate(model, [prompts[i] for i in chunk], params, generator=gen)
            texts = [tok.decode(seq.response_ids, skip_special_tokens=True) for seq in out.sequences]
            verdicts = scorer(texts, chunk) if scorer is not None else [False] * len(chunk)
            for i, seq, correct in zip(chunk, out.sequences, verdicts):
                results[i] = (seq, correct, attempt + 1, temperature)
                if not correct:
                    still.append(i)
        pending = still
        if not pending:
            break
    rows = []
    for i in range(len(ids)):
        seq, correct, attempts, temperature = results[i]
        rows.append(T.TrajectoryRow(
            id=ids[i], prompt_ids=list(prompts[i]), response_ids=seq.tokens, unmask_step=seq.unmask_step,
            is_correct=correct, attempts=attempts, temperature=temperature, teacher=teacher_name,
            sampler="vanilla", sampler_params=json.dumps(cfg.sampler_params(), sort_keys=True)))
    return rows


# -- shards, manifest, driver -------------------------------------------------------------------
def shard_name(k: int) -> str:
    return f"shard-{k:05d}.parquet"


def plan_shards(prompts: list[dict], shard_size: int) -> list[dict]:
    return [{"shard": k, "ids": [p["id"] for p in prompts[i:i + shard_size]],
             "prompt_ids": [p["prompt_ids"] for p in prompts[i:i + shard_size]],
             "answers": [p["answer"] for p in prompts[i:i + shard_size]],
             "task": prompts[i]["task"]}
            for k, i in enumerate(range(0, len(prompts), shard_size))]


def complete_shards(cfg: TrajectoriesConfig, shards: list[dict]) -> set[int]:
    """Shards whose file exists, validates, and holds exactly the planned ids (or a filtered subset)."""
    fs, root = fsspec.core.url_to_fs(cfg.out)
    done = set()
    for shard in shards:
        path = root.rstrip("/") + "/" + shard_name(shard["shard"])
        if not fs.exists(path):
            continue
        try:
            ids = T.read_shard(cfg.out, path).column("id").to_pylist()
        except T.TrajectoryFormatError as err:
            logger.warning("rewriting %s: %s", path, err)
            continue
        planned = set(shard["ids"])
        if set(ids) == planned or (cfg.filter_correct and set(ids) <= planned):
            done.add(shard["shard"])
    return done


def write_shard(cfg: TrajectoriesConfig, k: int, table: pa.Table) -> None:
    fs, root = fsspec.core.url_to_fs(cfg.out)
    fs.makedirs(root, exist_ok=True)
    final = root.rstrip("/") + "/" + shard_name(k)
    tmp = root.rstrip("/") + f"/.tmp-{shard_name(k)}"
    buf = io.BytesIO()
    pq.write_table(table.select([f.name for f in T.SCHEMA]), buf)
    with fs.open(tmp, "wb") as f:
        f.write(buf.getvalue())
    fs.mv(tmp, final)


def write_manifest(cfg: TrajectoriesConfig, shards: list[dict], done: set[int], stats: dict) -> None:
    fs, root = fsspec.core.url_to_fs(cfg.out)
    fs.makedirs(root, exist_ok=True)
    manifest = {
        "schema_version": T.SCHEMA_VERSION,
        "config": dataclasses.asdict(cfg),
        "prompt_set_sha256": hashlib.sha256(json.dumps([s["ids"] for s in shards]).encode()).hexdigest(),
        "shards": {shard_name(s["shard"]): {"rows_planned": len(s["ids"]), "complete": s["shard"] in done}
                   for s in shards},
        "complete": len(done) == len(shards),
        "stats": stats,
    }
    with fs.open(root.rstrip("/") + "/manifest.json", "w") as f:
        json.dump(manifest, f, indent=2)


def run(cfg: TrajectoriesConfig) -> dict:
    import ray
    from tqdm import tqdm

    t0 = time.perf_counter()
    prompts = load_prompts(cfg)
    shards = plan_shards(prompts, cfg.shard_size)
    done = complete_shards(cfg, shards)
    pending = [s for s in shards if s["shard"] not in done]
    logger.info("%d prompts in %d shards; %d already complete, %d to decode", len(prompts), len(shards), len(done),
                len(pending))
    stats = {"rows": 0, "correct": 0, "tokens": 0}
    if pending:
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        ds = ray.data.from_items(pending).map_batches(
            TeacherDecoder,
            fn_constructor_kwargs={"cfg_json": json.dumps(dataclasses.asdict(cfg))},
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=min(cfg.num_actors, len(pending))),
            num_cpus=cfg.num_cpus_per_actor,
            num_gpus=cfg.num_gpus_per_actor,
        )
        buffers: dict[int, list[pa.Table]] = {}
        bar = tqdm(total=len(pending), desc="trajectory shards", unit="shard")
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            for k in sorted(set(batch.column("shard").to_pylist())):
                part = batch.filter(pc.equal(batch.column("shard"), k))
                buffers.setdefault(k, []).append(part)
                table = pa.concat_tables(buffers[k])
                if table.num_rows >= table.column("shard_rows")[0].as_py():
                    _finish(cfg, k, table, stats)
                    done.add(k)
                    del buffers[k]
                    bar.update(1)
                    write_manifest(cfg, shards, done, stats)
        bar.close()
    stats["wall_seconds"] = time.perf_counter() - t0
    stats["rows_per_second"] = stats["rows"] / stats["wall_seconds"] if stats["rows"] else 0.0
    stats["tokens_per_second"] = stats["tokens"] / stats["wall_seconds"] if stats["tokens"] else 0.0
    stats["correct_fraction"] = stats["correct"] / stats["rows"] if stats["rows"] else None
    write_manifest(cfg, shards, done, stats)
    logger.info("trajectories: %s", json.dumps(stats))
    return stats


def _finish(cfg: TrajectoriesConfig, k: int, table: pa.Table, stats: dict) -> None:
    logger.debug("shard %d decoded (%d rows)", k, table.num_rows)
    table = table.drop_columns(["shard", "shard_rows"])
    if cfg.filter_correct:  # keep only rows whose answer the teacher got right (after retries)
        table = table.filter(table.column("is_correct"))
    write_shard(cfg, k, table)
    stats["rows"] += table.num_rows
    stats["correct"] += sum(table.column("is_correct").to_pylist())
    stats["tokens"] += sum(len(r) for r in table.column("response_ids").to_pylist())


def parse_args(argv=None) -> TrajectoriesConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrajectoriesConfig):
        kind = type(f.default)
        if kind is bool:
            parser.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                                default=f.default)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    return TrajectoriesConfig(**vars(parser.parse_args(argv)))


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    run(parse_args(argv))


if __name__ == "__main__":
    main()
