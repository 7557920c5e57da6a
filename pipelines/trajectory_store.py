"""The trajectories output on storage: fingerprint, shards, manifest, and the manifest-driven reader.

``pipelines/trajectories.py`` writes through these functions (the driver only), distillation reads
through :func:`read_trajectory_set`. A shard is a Parquet file whose key-value metadata holds the
fingerprint digest of the run that wrote it; ``manifest.json`` holds the fingerprint, how the rows
were decoded (teacher, sampler, NFE, vocabulary) and every planned shard's state. Readers follow
the manifest, never a directory listing; temporary files (``.tmp-*``) are never read.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from dataclasses import dataclass
from typing import Protocol

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from d3core import trajectory as T
from pipelines import _io
from pipelines import fingerprint as F

logger = logging.getLogger("d3ray.trajectories")

STAGE = "trajectories"
SAMPLER = "vanilla"
# Parquet key-value metadata of every shard: the fingerprint digest of the run that wrote it.
SHARD_META_KEY = b"d3ray.fingerprint"


class Settings(Protocol):
    """What the store reads of :class:`pipelines.trajectories.TrajectoriesConfig` (the store sits below the stage)."""

    out: str
    teacher: str
    trust_remote_code: bool
    prompts: str | None
    seed: int
    shard_size: int
    batch_size: int
    gen_length: int
    max_attempts: int
    filter_correct: bool
    keep_all: bool

    def sampler_params(self) -> dict: ...

    def nfe(self) -> int: ...


@dataclass(frozen=True)
class PromptSet:
    """The prompts of a run in their stable order, and where they came from (for the fingerprint)."""

    prompts: list[dict]  # [{"id", "prompt_ids", "answer", "task"}]; task None: no scorer
    source: dict  # {"file_sha256": ...} or {"synthetic": "train", "seed": ...}

    def fingerprint(self) -> dict:
        planned = [[p["id"], p["prompt_ids"], p["answer"], p["task"]] for p in self.prompts]
        return {**self.source, "count": len(self.prompts), "planned_sha256": F.digest(planned)}


# -- fingerprint, shards, manifest ----------------------------------------------------------------
def fingerprint(cfg: Settings, prompt_set: PromptSet) -> dict:
    """Everything that decides the rows: prompts, teacher, decode, seed, row selection, shard layout."""
    decode = {"sampler": SAMPLER, **cfg.sampler_params(), "max_attempts": cfg.max_attempts, "seed": cfg.seed}
    if cfg.max_attempts > 1:  # sampled retries draw per-row seeds batch by batch
        decode["batch_size"] = cfg.batch_size
    return {"stage": STAGE, "schema_version": T.SCHEMA_VERSION, "prompts": prompt_set.fingerprint(),
            "teacher": F.checkpoint_identity(cfg.teacher, cfg.trust_remote_code), "decode": decode,
            "rows": {"filter_correct": cfg.filter_correct, "keep_all": cfg.keep_all},
            "shard_size": cfg.shard_size}


def expected_rows(cfg: Settings, vocab_size: int) -> T.Expected:
    return T.Expected(vocab_size=vocab_size, gen_length=cfg.gen_length, nfe=cfg.nfe(), teacher=cfg.teacher,
                      sampler=SAMPLER, sampler_params=json.dumps(cfg.sampler_params(), sort_keys=True))


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.parquet"


def plan_shards(prompts: list[dict], shard_size: int) -> list[dict]:
    return [{"shard": k, "ids": [p["id"] for p in prompts[i:i + shard_size]],
             "prompt_ids": [p["prompt_ids"] for p in prompts[i:i + shard_size]],
             "answers": [p["answer"] for p in prompts[i:i + shard_size]],
             "task": prompts[i]["task"]}
            for k, i in enumerate(range(0, len(prompts), shard_size))]


def shard_digest(path: str, fs) -> str | None:
    """The fingerprint digest a shard was written under (None: a shard without one, i.e. not ours)."""
    with fs.open(path, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    value = meta.get(SHARD_META_KEY)
    return value.decode() if value else None


def check_shard(cfg: Settings, path: str, digest: str, expected: T.Expected, planned: set[str]) -> pa.Table:
    """Read and validate one shard: format, the run that wrote it, token ranges, metadata, the planned ids."""
    fs, _ = fsspec.core.url_to_fs(cfg.out)
    table = T.read_shard(cfg.out, path)
    found = shard_digest(path, fs)
    if found != digest:
        raise T.TrajectoryFormatError(f"{path}: written under fingerprint {found}, this run's is {digest}")
    T.check_rows(table, path, expected)
    ids = set(table.column("id").to_pylist())
    if not (ids == planned or (cfg.filter_correct and ids <= planned)):
        raise T.TrajectoryFormatError(f"{path}: holds ids other than the {len(planned)} planned for it")
    return table


def complete_shards(cfg: Settings, shards: list[dict], digest: str, expected: T.Expected) -> dict[int, int]:
    """``{shard: rows}`` of the shards whose file exists and validates; the others are (re)decoded."""
    fs, root = _io.fs_root(cfg.out)
    done = {}
    for shard in shards:
        path = root + "/" + shard_name(shard["shard"])
        if not fs.exists(path):
            continue
        try:
            table = check_shard(cfg, path, digest, expected, set(shard["ids"]))
        except T.TrajectoryFormatError as err:
            logger.warning("redoing %s: %s", path, err)
            continue
        done[shard["shard"]] = table.num_rows
    return done


def write_shard(cfg: Settings, k: int, table: pa.Table, digest: str) -> None:
    fs, root = _io.fs_root(cfg.out)
    fs.makedirs(root, exist_ok=True)
    table = table.select([f.name for f in T.SCHEMA])
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), SHARD_META_KEY: digest.encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    _io.write_bytes(_io.join(cfg.out, shard_name(k)), buf.getvalue())


def write_manifest(cfg: Settings, shards: list[dict], done: dict[int, int], stats: dict, fp: dict,
                   vocab_size: int) -> None:
    """The manifest: the fingerprint, how the rows were decoded, and every planned shard's state.

    Readers (distill) read exactly the shards listed here and refuse the set unless ``complete``.
    """
    manifest = {
        "schema_version": T.SCHEMA_VERSION,
        "fingerprint": fp, "fingerprint_digest": F.digest(fp),
        "provenance": {"teacher": cfg.teacher, "prompts": cfg.prompts, "out": cfg.out},
        "config": dataclasses.asdict(cfg),
        "decode": {"teacher": cfg.teacher, "sampler": SAMPLER, "sampler_params": cfg.sampler_params(),
                   "gen_length": cfg.gen_length, "nfe": cfg.nfe(), "vocab_size": vocab_size},
        "shards": {shard_name(s["shard"]): {"rows_planned": len(s["ids"]), "rows": done.get(s["shard"]),
                                            "complete": s["shard"] in done} for s in shards},
        "complete": len(done) == len(shards),
        "stats": stats,
    }
    _io.write_json(_io.join(cfg.out, T.MANIFEST), manifest)


def claim(cfg: Settings, fp: dict, shards: list[dict], overwrite: bool) -> None:
    """Make ``cfg.out`` this run's: refuse outputs of other settings, or clear them all with ``overwrite``.

    Leftover temporary files of a crashed writer are removed; shard files the plan does not name
    make the directory foreign too (a rerun never leaves files the manifest does not list).
    """
    _io.require_directory(cfg.out, "out")
    fs, root = _io.fs_root(cfg.out)
    if not fs.exists(root):
        return
    if overwrite:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
        foreign = [n for n in names if not (n == T.MANIFEST or n.endswith(".parquet") or n.startswith(_io.TMP_PREFIX))]
        if foreign:
            raise ValueError(f"--overwrite {STAGE}: {cfg.out} also holds files trajectories never writes "
                             f"({foreign[:5]}); it clears only its own outputs: choose another --out, or move them")
        if names:
            logger.warning("--overwrite: clearing %s (%d files) to decode it anew", cfg.out, len(names))
        _io.remove_tree(cfg.out)
        return
    manifest = T.read_manifest(cfg.out)
    planned = {shard_name(s["shard"]) for s in shards}
    present = [p.rsplit("/", 1)[-1] for p in T.list_shards(cfg.out)]
    diffs: list = []
    if manifest is not None and "fingerprint" not in manifest:
        diffs = [("manifest", "written by an older d3ray (no fingerprint)", f"fingerprint {F.digest(fp)}")]
    elif manifest is not None:
        diffs = F.differences(manifest["fingerprint"], fp)
    elif present:  # shards without a manifest: they are this run's only if they say so
        digests = sorted({str(shard_digest(root + "/" + name, fs)) for name in present})
        if digests != [F.digest(fp)]:
            diffs = [("shard files' fingerprint", digests, F.digest(fp))]
    others = sorted(set(present) - planned)
    if others and not diffs:
        diffs = [("shard files", others[:5], f"only the {len(planned)} planned shards")]
    if diffs:
        raise F.OutputMismatch(STAGE, cfg.out, diffs)
    _io.remove_tmp_files(cfg.out)



# -- the reader (distillation) --------------------------------------------------------------------
@dataclass(frozen=True)
class TrajectorySet:
    """The rows distillation trains on, read exactly as the trajectories manifest lists them."""

    table: object  # pyarrow.Table of id, prompt_ids, response_ids, unmask_step (sorted by id)
    manifest: dict
    rows_total: int  # before the only_correct filter

    @property
    def teacher(self) -> str:
        return self.manifest["decode"]["teacher"]

    @property
    def gen_length(self) -> int:
        return int(self.manifest["decode"]["gen_length"])


def read_trajectory_set(cfg) -> TrajectorySet:
    """The manifest's shards, validated; refuses a missing, incomplete or inconsistent set before any training.

    Only files the manifest lists are read (never temporary files, never a directory listing);
    every row is checked against the manifest's decode record (token ids within the teacher's
    vocabulary, unmask steps within the decode's forward passes, teacher and sampler metadata).
    """
    where = cfg.trajectories
    fix = ("rerun pipelines/trajectories.py with the same settings to finish it, "
           "or point --trajectories at a complete run")
    manifest = T.read_manifest(where)
    if manifest is None:
        raise ValueError(f"trajectories={where!r}: no {T.MANIFEST} there, so it is not a trajectories output; run "
                         "pipelines/trajectories.py first, or point --trajectories at its --out")
    if "fingerprint" not in manifest or "decode" not in manifest:
        raise ValueError(f"{where}/{T.MANIFEST} was written by an older d3ray (no fingerprint): regenerate the "
                         "trajectories with pipelines/trajectories.py --overwrite")
    shards = manifest["shards"]
    unfinished = sorted(name for name, entry in shards.items() if not entry.get("complete"))
    if unfinished or not manifest.get("complete"):
        raise ValueError(f"trajectories at {where} are incomplete: {len(shards) - len(unfinished)} of {len(shards)} "
                         f"shards done, missing {unfinished[:5]}{' ...' if len(unfinished) > 5 else ''}; {fix}")
    fs, root = _io.fs_root(where)
    missing = sorted(name for name in shards if not fs.exists(f"{root}/{name}"))
    if missing:
        raise ValueError(f"trajectories at {where}: the manifest lists shards that are not there: {missing[:5]}; "
                         f"their rows are lost: rerun pipelines/trajectories.py with the same settings to redo them")
    extra = sorted(set(p.rsplit("/", 1)[-1] for p in T.list_shards(where)) - set(shards))
    if extra:
        raise ValueError(f"trajectories at {where}: shard files the manifest does not list: {extra[:5]}; they come "
                         "from another run: delete them (or regenerate with pipelines/trajectories.py --overwrite)")
    expected = T.Expected(vocab_size=int(manifest["decode"]["vocab_size"]),
                          gen_length=int(manifest["decode"]["gen_length"]), nfe=int(manifest["decode"]["nfe"]),
                          teacher=manifest["decode"]["teacher"], sampler=manifest["decode"]["sampler"],
                          sampler_params=json.dumps(manifest["decode"]["sampler_params"], sort_keys=True))
    tables = []
    for name in sorted(shards):
        path = f"{root}/{name}"
        table = T.read_shard(where, path)
        if shard_digest(path, fs) != manifest["fingerprint_digest"]:
            raise T.TrajectoryFormatError(f"{path}: written by another run ({SHARD_META_KEY.decode()} "
                                          f"{shard_digest(path, fs)}, the manifest's is "
                                          f"{manifest['fingerprint_digest']}); "
                                          "regenerate with pipelines/trajectories.py --overwrite")
        if shards[name].get("rows") is not None and table.num_rows != shards[name]["rows"]:
            raise T.TrajectoryFormatError(f"{path}: {table.num_rows} rows, the manifest records {shards[name]['rows']}")
        T.check_rows(table, path, expected)
        tables.append(table)
    table = pa.concat_tables(tables)
    if len(set(table.column("id").to_pylist())) != table.num_rows:
        raise T.TrajectoryFormatError(f"{where}: row ids repeat across shards")
    total = table.num_rows
    if cfg.only_correct:
        table = table.filter(pc.field("is_correct"))
    table = table.select(["id", "prompt_ids", "response_ids", "unmask_step"])
    table = table.take(pc.sort_indices(table, sort_keys=[("id", "ascending")]))
    return TrajectorySet(table, manifest, total)
