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

import io
import json
import logging
import time
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from d3core import trajectory as T
from d3core.models.shipped import TINY_TEACHER_DIR
from pipelines import _io
from pipelines import fingerprint as F
from pipelines.cluster import validate_resources
from pipelines.trajectory_store import (  # noqa: F401  (the writer's API, re-exported)
    SAMPLER,
    SHARD_META_KEY,
    STAGE,
    PromptSet,
    check_shard,
    claim,
    complete_shards,
    expected_rows,
    fingerprint,
    plan_shards,
    shard_digest,
    shard_name,
    write_manifest,
    write_shard,
)

logger = logging.getLogger("d3ray.trajectories")


@dataclass(frozen=True)
class TrajectoriesConfig:
    """Teacher trajectories: what to decode, with which teacher, and on how many actors."""

    out: str = "runs/trajectories"  # output directory (fsspec URI): Parquet shards and manifest.json
    teacher: str = str(TINY_TEACHER_DIR)  # dLLM checkpoint: path, fsspec URI, hub id (ORG/NAME) or hf:// URI
    trust_remote_code: bool = False  # run the teacher tokenizer's own Python code (Dream's tokenization_dream.py)
    prompts: str | None = None  # JSONL/Parquet of id, prompt, answer, task at any fsspec URI; None: synthetic split
    n_prompts: int | None = 3000  # the first N prompts; None: every record of the prompts file
    seed: int = 0  # seeds the synthetic split and the decode's sampling (retries)
    shard_size: int = 250  # prompts per Parquet shard (a shard is the unit of resume)
    num_actors: int = 2  # decoder actors (each loads the teacher once)
    num_cpus_per_actor: float = 0.5  # CPUs each actor reserves (0.5 on 2 cores leaves room for the writers)
    num_gpus_per_actor: float = 0.0  # > 0: one teacher replica per GPU share (needs GPUs in the cluster)
    # custom Ray resources each actor reserves, e.g. {"worker": 1}: actors run only on nodes that declare them
    resources: dict[str, float] = field(default_factory=dict)
    batch_size: int = 125  # prompts decoded together by one actor
    gen_length: int = 48  # generation slots per prompt
    block_length: int = 16  # block size of the semi-autoregressive decode (divides gen_length)
    max_attempts: int = 1  # decode attempts per prompt; a retry of a wrong answer runs 0.1 hotter
    filter_correct: bool = False  # keep only rows the task's scorer marks correct
    keep_all: bool = False  # accept a prompt set without a task (no scorer): keep every row, is_correct=False
    threads_per_actor: int = 1  # torch threads inside each actor

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("out='': give the output directory (a path or fsspec URI)")
        if not self.teacher:
            raise ValueError("teacher='': give the teacher checkpoint (path, fsspec URI, hub id or hf:// URI)")
        if self.prompts is not None and not self.prompts:
            raise ValueError("prompts='': give a JSONL/Parquet prompt file, or None for the synthetic split")
        if self.n_prompts is not None and self.n_prompts < 1:
            raise ValueError(f"n_prompts={self.n_prompts}: must be >= 1 (or None: every record of the prompt file)")
        for name in ("shard_size", "num_actors", "batch_size", "threads_per_actor", "gen_length", "block_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not self.num_cpus_per_actor > 0 or self.num_gpus_per_actor < 0:
            raise ValueError(f"num_cpus_per_actor={self.num_cpus_per_actor}, num_gpus_per_actor="
                             f"{self.num_gpus_per_actor}: need CPUs > 0 and GPUs >= 0 (0: decode on CPU)")
        validate_resources(self.resources, "resources")
        if not 1 <= self.max_attempts <= 10:
            raise ValueError(f"max_attempts={self.max_attempts}: must lie in [1, 10] (temperature rises 0.1 a try)")
        if self.gen_length % self.block_length:
            raise ValueError(f"block_length={self.block_length} must divide gen_length={self.gen_length}")
        if self.keep_all and (self.filter_correct or self.max_attempts > 1):
            raise ValueError(f"keep_all=True with filter_correct={self.filter_correct}, max_attempts="
                             f"{self.max_attempts}: keeping every row needs no scorer, so it cannot filter or retry "
                             "wrong rows; drop --keep-all or those options")

    def sampler_params(self) -> dict:
        """The teacher decode's parameters (recorded in every row): one token per step, in block order."""
        return {"gen_length": self.gen_length, "block_length": self.block_length, "steps": self.gen_length,
                "remasking": "low_confidence"}

    def nfe(self) -> int:
        return self.gen_length  # one forward per step, one step per generation slot


# -- prompts ---------------------------------------------------------------------------------
def load_prompt_set(cfg: TrajectoriesConfig) -> PromptSet:
    from d3core.sft import encode_prompt

    tok = _tokenizer(cfg)  # the teacher's own tokenizer, for the synthetic split as for a prompt file
    if cfg.prompts is not None:
        records, sha = _read_records(cfg.prompts)
        records = records[: cfg.n_prompts] if cfg.n_prompts is not None else records
        out = []
        for i, rec in enumerate(records):
            if "id" not in rec or "prompt" not in rec:
                raise ValueError(f"{cfg.prompts}: record {i} lacks 'id' or 'prompt' (fields: {sorted(rec)})")
            out.append({"id": str(rec["id"]), "prompt_ids": encode_prompt(tok, rec["prompt"]),
                        "answer": str(rec.get("answer", "")), "task": rec.get("task")})
        _check_task(cfg, out)
        source = {"file_sha256": sha}
    else:
        from d3core.eval import synthetic

        if cfg.n_prompts is None:
            raise ValueError("prompts=None (the synthetic split) with n_prompts=None (every record): the synthetic "
                             "split has no end; give --prompts FILE, or --n-prompts N")
        out = [{"id": p.id, "prompt_ids": encode_prompt(tok, p.question), "answer": str(p.target),
                "task": "synthetic"} for p in synthetic.generate("train", cfg.n_prompts, seed=cfg.seed)]
        source = {"synthetic": "train", "seed": cfg.seed}
    if not out:
        raise ValueError(f"{cfg.prompts}: no prompt records; the file must hold at least one")
    ids = [r["id"] for r in out]
    if len(set(ids)) != len(ids):
        raise ValueError("prompt ids are not unique: trajectories are joined by id, make them unique")
    return PromptSet(out, source)


def load_prompts(cfg: TrajectoriesConfig) -> list[dict]:
    """``[{"id", "prompt_ids", "answer", "task"}]`` in a stable order (``task`` None: no scorer)."""
    return load_prompt_set(cfg).prompts


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


def _read_records(uri: str) -> tuple[list[dict], str]:
    """The records of a JSONL or Parquet prompt file and the file's sha256; errors name the file and line."""
    if not _io.exists(uri):
        raise ValueError(f"prompts={uri!r}: no such file; give a JSONL/Parquet of id, prompt, answer, task")
    if _io.fs_root(uri)[0].isdir(_io.fs_root(uri)[1]):
        raise ValueError(f"prompts={uri!r} is a directory: give one JSONL or Parquet file")
    with fsspec.open(uri, "rb") as f:
        data = f.read()
    sha = F.bytes_sha256(data)
    if uri.endswith(".parquet"):
        try:
            return pq.read_table(io.BytesIO(data)).to_pylist(), sha
        except pa.ArrowInvalid as err:
            raise ValueError(f"prompts={uri!r}: not a readable Parquet file ({err})") from err
    records = []
    try:
        text = data.decode()
    except UnicodeDecodeError as err:
        raise ValueError(f"prompts={uri!r}: not UTF-8 text ({err}); write JSONL (one JSON object per line)") from err
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{uri} line {number}: not valid JSON ({err.msg} at column {err.colno}); each line "
                             "must be one JSON object with id, prompt, answer, task: fix or remove that line") \
                from err
        if not isinstance(rec, dict):
            raise ValueError(f"{uri} line {number}: a JSON {type(rec).__name__}, not an object with id, prompt, "
                             "answer, task")
        records.append(rec)
    return records, sha


def _tokenizer(cfg: TrajectoriesConfig):
    from d3core.models.tokenizer import load_tokenizer

    return load_tokenizer(cfg.teacher, cfg.trust_remote_code)


# -- the actor ----------------------------------------------------------------------------------
class TeacherDecoder:
    """Ray Data actor: loads the teacher once, decodes whole shards (one input row per shard)."""

    def __init__(self, cfg: TrajectoriesConfig) -> None:
        import torch

        from d3core.models.checkpoint import load_pretrained

        self.cfg = cfg
        torch.set_num_threads(cfg.threads_per_actor)
        device = "cuda" if cfg.num_gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.model = load_pretrained(cfg.teacher, device=device)
        self.tok = _tokenizer(cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables = [self.decode_shard(row) for row in batch.to_pylist()]
        return pa.concat_tables(tables)

    def decode_shard(self, shard: dict) -> pa.Table:
        rows = decode_prompts(self.model, self.tok, self.cfg, shard["ids"], shard["prompt_ids"], shard["answers"],
                              teacher_name=self.cfg.teacher, task=shard["task"])
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


def check_resources(cfg: TrajectoriesConfig) -> None:
    """Before any actor starts: the cluster has the GPUs and custom resources the actors ask for (a
    request no node can meet waits forever)."""
    from pipelines.cluster import require_gpus, require_resources

    if cfg.num_gpus_per_actor > 0:
        require_gpus(cfg.num_gpus_per_actor, "num_gpus_per_actor")
    require_resources(cfg.resources, "resources")


def require_filesystems(cfg: TrajectoriesConfig) -> None:
    """Every location's fsspec implementation is installed (else a ValueError naming the extra)."""
    _io.require_filesystems(out=cfg.out, prompts=cfg.prompts, teacher=cfg.teacher)


def survey(cfg: TrajectoriesConfig) -> tuple:
    """Every check that writes nothing: locations, teacher, prompts; the fingerprint and the shard plan."""
    from d3core.models.checkpoint import load_config

    require_filesystems(cfg)
    _io.require_directory(cfg.out, "out")
    try:
        vocab_size = load_config(cfg.teacher).vocab_size  # also: the teacher exists
    except FileNotFoundError as err:
        raise ValueError(f"teacher={cfg.teacher!r}: {err}") from err
    prompt_set = load_prompt_set(cfg)
    fp = fingerprint(cfg, prompt_set)
    shards = plan_shards(prompt_set.prompts, cfg.shard_size)
    return prompt_set, fp, shards, vocab_size


def prepare(cfg: TrajectoriesConfig, overwrite: bool = False) -> tuple:
    """Everything up to the first decode, on the driver: prompts, teacher, fingerprint, the output dir."""
    prompt_set, fp, shards, vocab_size = survey(cfg)
    claim(cfg, fp, shards, overwrite)
    return prompt_set, fp, shards, vocab_size


def _start_ray(cfg: TrajectoriesConfig) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    check_resources(cfg)


def run(cfg: TrajectoriesConfig, overwrite: bool = False) -> dict:
    """Decode the missing shards; returns this run's stats. Finished shards of the same settings are kept.

    A refusal leaves ``out`` as it was: the GPU check comes before the first write (and before
    ``overwrite`` clears anything).
    """
    import ray
    from tqdm import tqdm

    t0 = time.perf_counter()
    prompt_set, fp, shards, vocab_size = survey(cfg)
    if overwrite:
        _start_ray(cfg)  # every shard will be decoded
    claim(cfg, fp, shards, overwrite)
    digest = F.digest(fp)
    expected = expected_rows(cfg, vocab_size)
    done = complete_shards(cfg, shards, digest, expected)
    pending = [s for s in shards if s["shard"] not in done]
    logger.info("%d prompts in %d shards; %d already complete, %d to decode", len(prompt_set.prompts), len(shards),
                len(done), len(pending))
    stats = {"rows": 0, "correct": 0, "tokens": 0, "fingerprint_digest": digest}
    if pending:
        _start_ray(cfg)
    write_manifest(cfg, shards, done, stats, fp, vocab_size)
    if pending:
        ds = ray.data.from_items(pending).map_batches(
            TeacherDecoder,
            fn_constructor_kwargs={"cfg": cfg},
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=min(cfg.num_actors, len(pending))),
            num_cpus=cfg.num_cpus_per_actor,
            num_gpus=cfg.num_gpus_per_actor,
            **({"resources": dict(cfg.resources)} if cfg.resources else {}),
        )
        buffers: dict[int, list[pa.Table]] = {}
        bar = tqdm(total=len(pending), desc="trajectory shards", unit="shard")
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            for k in sorted(set(batch.column("shard").to_pylist())):
                part = batch.filter(pc.equal(batch.column("shard"), k))
                buffers.setdefault(k, []).append(part)
                table = pa.concat_tables(buffers[k])
                if table.num_rows >= table.column("shard_rows")[0].as_py():
                    done[k] = _finish(cfg, k, table, stats, digest, expected)
                    del buffers[k]
                    bar.update(1)
                    write_manifest(cfg, shards, done, stats, fp, vocab_size)
        bar.close()
    stats["wall_seconds"] = time.perf_counter() - t0
    stats["rows_per_second"] = stats["rows"] / stats["wall_seconds"] if stats["rows"] else 0.0
    stats["tokens_per_second"] = stats["tokens"] / stats["wall_seconds"] if stats["tokens"] else 0.0
    stats["correct_fraction"] = stats["correct"] / stats["rows"] if stats["rows"] else None
    write_manifest(cfg, shards, done, stats, fp, vocab_size)
    logger.info("trajectories: %s", json.dumps(stats))
    return stats


def _finish(cfg: TrajectoriesConfig, k: int, table: pa.Table, stats: dict, digest: str, expected: T.Expected) -> int:
    logger.debug("shard %d decoded (%d rows)", k, table.num_rows)
    table = table.drop_columns(["shard", "shard_rows"])
    if cfg.filter_correct:  # keep only rows whose answer the teacher got right (after retries)
        table = table.filter(table.column("is_correct"))
    T.check_rows(table, f"decoded shard {k}", expected)
    write_shard(cfg, k, table, digest)
    stats["rows"] += table.num_rows
    stats["correct"] += sum(table.column("is_correct").to_pylist())
    stats["tokens"] += sum(len(r) for r in table.column("response_ids").to_pylist())
    return table.num_rows


if __name__ == "__main__":  # the command line is pipelines/cli.py's (it reads the recipes, which import this stage)
    import runpy

    runpy.run_module("pipelines.cli", run_name="__main__")
