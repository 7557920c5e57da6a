"""Accuracy-vs-parallelism sweeps on Ray, AR baselines (vLLM where installed), AUP report.

    python pipelines/evaluate.py --preset tiny --out runs/eval
    python pipelines/evaluate.py --preset tiny --model teacher=URI --model student=URI --out DIR \\
        --sweep d3llm=0.3,0.5,1.0 --n 100

Every (model, sampler, threshold, task) combination is one *cell* and one Ray task
(``num_cpus_per_cell`` CPUs, ``threads_per_cell`` torch threads inside). The AR baseline is one
cell per task, decoded by vLLM when ``use_vllm`` allows and ``vllm`` imports in the worker,
otherwise by d3core's ``ar`` sampler. Prompts follow the peers' protocol of each model family
(``d3core.eval.protocols``). The driver writes each finished cell to ``out/cells/<cell id>.json``
(the id hashes everything that changes the result) and its per-sample records to
``<cell id>.samples.jsonl``, so a rerun decodes only missing cells. Finally it writes ``report.json``,
``report.md`` (leaderboard table) and ``aup.png`` (accuracy vs TPF) under ``out``. Models are paths,
fsspec URIs, hub ids or ``hf://`` URIs; ``--trust-remote-code`` allows tokenizers defined by checkpoint
code (Dream).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field

from d3core.models.shipped import TINY_AR_DIR, TINY_TEACHER_DIR
from pipelines import _io
from pipelines import fingerprint as F
from pipelines.cluster import validate_resources
from pipelines.eval_cell import run_cell
from pipelines.sweeps import DLLM_SAMPLERS, SHAPE_FIELDS, VANILLA, SweepPoint, ar_point, split_sweep_key, sweep_points

logger = logging.getLogger("d3ray.evaluate")

USE_VLLM = ("auto", "on", "off")
AR_NAME = "AR"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
STAGE = "evaluate"
# Ray reruns a cell whose worker process or node died this many times (system failures only: an exception
# the cell raises is not retried). A cell writes nothing itself; the driver writes each one once, from the
# attempt that returned, so a rerun cell is neither lost nor counted twice.
CELL_RETRIES = 2


@dataclass(frozen=True)
class EvaluateConfig:
    """One evaluation sweep (the defaults are the tiny recipe). ``n=0`` evaluates each task's whole test split."""

    # NAME -> dLLM checkpoint
    models: dict[str, str] = field(default_factory=lambda: {"teacher": str(TINY_TEACHER_DIR)})
    ar_model: str | None = str(TINY_AR_DIR)  # AR baseline (HF causal LM); None: no AR baseline
    out: str = "runs/eval"  # output directory (fsspec URI): cells/, report.json, report.md, aup.png
    tasks: tuple[str, ...] = ("synthetic",)  # evaluation tasks (d3core.eval.tasks.TASK_NAMES)
    # SAMPLER.AXIS -> values swept (vanilla: no values); fast_dllm.confidence_threshold in (0, 1],
    # dparallel.entropy_threshold / d3llm.entropy_threshold in nats
    sweeps: dict[str, tuple[float, ...]] = field(default_factory=lambda: {
        "vanilla": (), "fast_dllm.confidence_threshold": (0.95, 0.9, 0.7, 0.5),
        "dparallel.entropy_threshold": (0.1, 0.3, 0.5, 1.0), "d3llm.entropy_threshold": (0.1, 0.3, 0.5, 1.0)})
    n: int = 100  # problems per task (0: the whole test split)
    batch_size: int = 50  # problems decoded together in one cell
    gen_length: int = 48  # generation slots per problem
    block_length: int = 16  # block size of the semi-autoregressive decoders (divides gen_length)
    # SAMPLER -> fixed params of its cells (fields of its params class other than the shape and the swept axis)
    sampler_params: dict[str, dict] = field(default_factory=lambda: {"d3llm": {"cache_delay_iter": 2},
                                                                     "fast_dllm": {"cache": "dual"}})
    num_cpus_per_cell: float = 1.0  # CPUs each cell (a Ray task) reserves
    num_gpus_per_cell: float = 0.0  # > 0: one GPU share per cell (needs GPUs in the cluster)
    # custom Ray resources each cell reserves, e.g. {"worker": 1}: cells run only on nodes that declare them
    resources: dict[str, float] = field(default_factory=dict)
    threads_per_cell: int = 1  # torch threads inside each cell
    use_vllm: str = "auto"  # AR baseline through vLLM: auto (when it imports), on, off
    seed: int = 0  # seeds the task's example order and sampling
    prompt_style: str = "auto"  # how problems are put to the model (d3core.eval.tasks.STYLES; auto: per model)
    anchor_vanilla: bool = False  # True: start each parallel curve at the model's vanilla accuracy, TPF 1
    unit_tpf_single: bool = True  # AUP: one-token-per-step decoders (vanilla, AR) enter at TPF 1
    sandbox_timeout_s: float = 10.0  # CPU seconds per program (all its processes)
    code_workers: int = 1  # sandboxed programs judged in parallel (code tasks)
    trust_remote_code: bool = False  # tokenizers defined by checkpoint code (Dream) may run
    preset: str = "tiny"  # the recipe these settings came from (recorded in the report)

    def __post_init__(self) -> None:
        from d3core.eval.tasks import STYLES, TASK_NAMES

        if not self.models:
            raise ValueError("models is empty: give at least one display name -> checkpoint URI")
        for name, uri in self.models.items():
            if not _NAME.match(name) or name == AR_NAME:
                raise ValueError(f"model name {name!r}: use letters, digits, '_', '-', '.' only, and not "
                                 f"{AR_NAME!r} (reserved for the AR baseline)")
            if not isinstance(uri, str) or not uri:
                raise ValueError(f"models[{name!r}]={uri!r}: give a checkpoint path, fsspec URI or hub id")
        if not self.out:
            raise ValueError("out='': give the output directory (a path or fsspec URI)")
        bad = [t for t in self.tasks if t not in TASK_NAMES]
        if not self.tasks or bad:
            raise ValueError(f"tasks={self.tasks}: each must be one of {TASK_NAMES}")
        for key, values in self.sweeps.items():
            sampler, _ = split_sweep_key(key)
            if sampler != VANILLA and not values:
                raise ValueError(f"sweeps[{key!r}] is empty: give at least one value")
            if sampler == VANILLA and values:
                raise ValueError(f"sweeps['vanilla']={values}: vanilla has no threshold; give it no values")
            if any(not v > 0 for v in values):
                raise ValueError(f"sweeps[{key!r}]={values}: thresholds must be > 0")
        if not self.sweeps and self.ar_model is None:
            raise ValueError("nothing to evaluate: give sweeps or an ar_model")
        if self.ar_model is not None and not self.ar_model:
            raise ValueError("ar_model='': give the AR baseline's checkpoint, or None for no AR baseline")
        if self.n < 0 or self.batch_size < 1:
            raise ValueError(f"n={self.n}, batch_size={self.batch_size}: need n >= 0 (0 = all) and batch_size >= 1")
        if self.gen_length < 1 or self.block_length < 1 or self.gen_length % self.block_length:
            raise ValueError(f"block_length={self.block_length} must be positive and divide "
                             f"gen_length={self.gen_length}")
        if self.use_vllm not in USE_VLLM:
            raise ValueError(f"use_vllm={self.use_vllm!r}: must be one of {USE_VLLM}")
        if self.prompt_style not in STYLES:
            raise ValueError(f"prompt_style={self.prompt_style!r}: must be one of {STYLES}")
        if self.num_cpus_per_cell <= 0 or self.num_gpus_per_cell < 0 or self.threads_per_cell < 1:
            raise ValueError(f"num_cpus_per_cell={self.num_cpus_per_cell}, num_gpus_per_cell="
                             f"{self.num_gpus_per_cell}, threads_per_cell={self.threads_per_cell}: need CPUs > 0, "
                             "GPUs >= 0, threads >= 1")
        validate_resources(self.resources, "resources")
        if self.code_workers < 1 or not self.sandbox_timeout_s > 0:
            raise ValueError(f"code_workers={self.code_workers}, sandbox_timeout_s={self.sandbox_timeout_s}: "
                             "both must be positive")
        for sampler, params in self.sampler_params.items():
            if sampler not in DLLM_SAMPLERS:
                raise ValueError(f"sampler_params has {sampler!r}: use one of {DLLM_SAMPLERS}")
            fixed = sorted(set(params) & {*SHAPE_FIELDS, "threshold"})
            if fixed:
                raise ValueError(f"sampler_params[{sampler!r}] sets {fixed}: the decode shape comes from gen_length / "
                                 "block_length and the threshold from sweeps; set them there")
        _ = self.points  # every cell's sampler params, built now: a bad threshold fails before any Ray task starts

    @functools.cached_property
    def points(self) -> tuple[SweepPoint, ...]:
        """Every sweep point with its sampler's params, built once (here, on the driver) and carried by the cells."""
        return sweep_points(self.sweeps, self.sampler_params, self.gen_length, self.block_length)

    def sweep_values(self) -> dict[str, tuple[float, ...]]:
        """sampler -> values of its sweep axis (vanilla: ())."""
        return {split_sweep_key(k)[0]: v for k, v in self.sweeps.items()}


@dataclass(frozen=True)
class Cell:
    """One model decoded with one sweep point on one task: one Ray task."""

    model: str
    uri: str
    point: SweepPoint  # the sampler and its complete params (EvaluateConfig.points; sweeps.ar_point for AR)
    task: str
    identity: str = ""  # fingerprint digest of the checkpoint's identity (its content, not its location)

    @property
    def sampler(self) -> str:
        return self.point.sampler

    @property
    def threshold(self) -> float | None:
        """The value of the sampler's sweep axis; None: vanilla, AR."""
        return self.point.value

    def record(self) -> dict:
        """The cell as its result records it."""
        return {"model": self.model, "uri": self.uri, "sampler": self.sampler, "threshold": self.threshold,
                "task": self.task, "identity": self.identity}

    def key(self, cfg: EvaluateConfig) -> str:
        """A readable, unique id: changes whenever anything that changes the result changes."""
        spec = {"cell": self.record(), "n": cfg.n, "batch_size": cfg.batch_size, "seed": cfg.seed,
                "gen_length": cfg.gen_length, "block_length": cfg.block_length, "style": cfg.prompt_style,
                "params": cfg.sampler_params.get(self.sampler, {}), "threads": cfg.threads_per_cell,
                "vllm": cfg.use_vllm if self.sampler == "ar" else None}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
        thr = "" if self.threshold is None else f"_t{self.threshold:g}"
        return f"{self.task}__{self.model}__{self.sampler}{thr}__{digest}"


def plan_cells(cfg: EvaluateConfig, identities: dict[str, str] | None = None) -> list[Cell]:
    """Every cell of the sweep, per task: the AR baseline, then each model's sweep points in ``sweeps`` order.

    ``identities`` (checkpoint URI -> identity digest, :func:`model_identities`) goes into each
    cell and so into its key: a checkpoint whose content changed gets new cells.
    """
    ids = identities or {}
    baseline = ar_point(cfg.gen_length)
    cells = []
    for task in cfg.tasks:
        if cfg.ar_model is not None:
            cells.append(Cell(AR_NAME, cfg.ar_model, baseline, task, ids.get(cfg.ar_model, "")))
        for name, uri in cfg.models.items():
            cells += [Cell(name, uri, point, task, ids.get(uri, "")) for point in cfg.points]
    return cells


def model_identities(cfg: EvaluateConfig) -> dict[str, dict]:
    """Checkpoint URI -> identity (content hash, hub commit, or the d3ray student's fingerprint), on the driver.

    Also the check that every model exists: a name that is no checkpoint fails here, before Ray.
    """
    out = {}
    named = [*cfg.models.items(), *([(AR_NAME, cfg.ar_model)] if cfg.ar_model else [])]
    for name, uri in named:
        try:
            out[uri] = F.checkpoint_identity(uri, cfg.trust_remote_code)
        except FileNotFoundError as err:
            what = "ar_model" if name == AR_NAME else f"model {name}={uri}"
            raise ValueError(f"{what}: {err}") from err
    return out


def fingerprint(cfg: EvaluateConfig, identities: dict[str, dict]) -> dict:
    """Every model's identity and every setting that decides the report's numbers."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("models", "ar_model", "out", "num_cpus_per_cell", "num_gpus_per_cell", "resources",
                             "code_workers", "trust_remote_code", "preset")}
    settings["sweeps"] = {k: list(v) for k, v in cfg.sweeps.items()}
    settings["tasks"] = list(cfg.tasks)
    return {"stage": STAGE, "models": {name: identities[uri] for name, uri in cfg.models.items()},
            "ar_model": identities.get(cfg.ar_model) if cfg.ar_model else None, "settings": settings}


# -- the driver ------------------------------------------------------------------------------
def read_samples(cfg: EvaluateConfig, cell: Cell) -> list[dict] | None:
    """The per-sample records of a finished cell (None for a cell written before they existed)."""
    from d3core.eval.records import from_jsonl

    fs, root = _io.fs_root(cfg.out)
    path = f"{root}/cells/{cell.key(cfg)}.samples.jsonl"
    return from_jsonl(fs.cat_file(path).decode()) if fs.exists(path) else None


def read_done(cfg: EvaluateConfig, cells: list[Cell]) -> dict[str, dict]:
    fs, root = _io.fs_root(cfg.out)
    done = {}
    for cell in cells:
        path = f"{root}/cells/{cell.key(cfg)}.json"
        if fs.exists(path):
            try:
                done[cell.key(cfg)] = json.loads(fs.cat_file(path))
            except json.JSONDecodeError:  # a damaged cell file is decoded again, never read
                logger.warning("cell %s is not valid JSON: decoding it again", path)
    return done


def _ray_init() -> None:
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep a local cluster on 127.0.0.1
        ray.init(include_dashboard=False, log_to_driver=False)


def _require_gpus(cfg: EvaluateConfig) -> None:
    """Ray is up and has the GPUs and custom resources the cells ask for (a request no node can meet waits
    forever)."""
    from pipelines.cluster import require_gpus, require_resources

    _ray_init()
    if cfg.num_gpus_per_cell > 0:
        require_gpus(cfg.num_gpus_per_cell, "num_gpus_per_cell")
    require_resources(cfg.resources, "resources")


def write_cell(cfg: EvaluateConfig, key: str, result: dict) -> None:
    """The cell's per-sample records (``<key>.samples.jsonl``), then its summary (``<key>.json``,
    which marks it done); each written whole or not at all."""
    from d3core.eval.records import to_jsonl

    samples = result.pop("samples", None)
    if samples is not None:
        _io.write_bytes(_io.join(cfg.out, "cells", f"{key}.samples.jsonl"), to_jsonl(samples).encode())
    _io.write_bytes(_io.join(cfg.out, "cells", f"{key}.json"), json.dumps(result, indent=1).encode())


def run_cells(cfg: EvaluateConfig, pending: list[Cell]) -> None:
    """Fan ``pending`` out as Ray tasks; the driver writes each result as it arrives."""
    import ray
    from tqdm import tqdm

    from d3core.eval.vllm_ar import CPU_ENV

    _require_gpus(cfg)
    remote = ray.remote(run_cell)
    refs = {}
    for cell in pending:
        options = {"num_cpus": cfg.num_cpus_per_cell, "num_gpus": cfg.num_gpus_per_cell,
                   "max_retries": CELL_RETRIES}
        if cfg.resources:
            options["resources"] = dict(cfg.resources)
        if cell.sampler == "ar":
            options["runtime_env"] = {"env_vars": CPU_ENV if cfg.num_gpus_per_cell == 0 else
                                      {"VLLM_HOST_IP": "127.0.0.1"}}
        refs[remote.options(**options).remote(cfg, cell)] = cell
    bar = tqdm(total=len(refs), desc="evaluation cells", unit="cell")
    waiting = list(refs)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1)
        result = ray.get(ready[0])
        cell = refs[ready[0]]
        write_cell(cfg, cell.key(cfg), result)
        logger.info("%s: accuracy %.3f TPF %.2f tok/s %.0f (%s)", cell.key(cfg), result["accuracy"], result["tpf"],
                    result["tokens_per_second"], result["backend"])
        bar.update(1)
    bar.close()


def check_tokenizers(cfg: EvaluateConfig) -> None:
    """Before any cell runs: every model resolves, and remote-code tokenizers have the flag they need."""
    from d3core.models.hub import resolve_checkpoint
    from d3core.models.tokenizer import check_remote_code

    for uri in [*cfg.models.values(), *([cfg.ar_model] if cfg.ar_model else [])]:
        check_remote_code(resolve_checkpoint(uri, weights=False, trust_remote_code=cfg.trust_remote_code),
                          cfg.trust_remote_code)


_OWN_FILES = ("cells", "report.json", "report.md", "aup.png", F.RECORD)


def require_filesystems(cfg: EvaluateConfig) -> None:
    """Every location's fsspec implementation is installed (else a ValueError naming the extra)."""
    _io.require_filesystems(out=cfg.out, ar_model=cfg.ar_model, **{f"model {k}": v for k, v in cfg.models.items()})


def survey(cfg: EvaluateConfig) -> tuple[dict[str, dict], dict]:
    """Every check that writes nothing: locations, every model exists (and may run its tokenizer), the fingerprint.

    Returns (checkpoint URI -> identity, fingerprint).
    """
    require_filesystems(cfg)
    _io.require_directory(cfg.out, "out")
    identities = model_identities(cfg)
    check_tokenizers(cfg)
    return identities, fingerprint(cfg, identities)


def check(cfg: EvaluateConfig) -> tuple[dict[str, dict], dict]:
    """:func:`survey`, and refuse an ``out`` that holds an evaluation of other models or settings; writes nothing."""
    identities, fp = survey(cfg)
    F.check(STAGE, cfg.out, (F.read_record(cfg.out) or {}).get("fingerprint"), fp)
    return identities, fp


def prepare(cfg: EvaluateConfig, overwrite: bool = False) -> dict[str, str]:
    """Before any cell: the output is a directory of this evaluation (or cleared), every model exists.

    Returns checkpoint URI -> identity digest for :func:`plan_cells`.
    """
    identities, fp = survey(cfg)
    claim(cfg, fp, overwrite)
    return {uri: F.digest(identity) for uri, identity in identities.items()}


def claim(cfg: EvaluateConfig, fp: dict, overwrite: bool) -> None:
    """Make ``out`` this evaluation's: refuse another evaluation's output, or clear it with ``overwrite``."""
    fs, root = _io.fs_root(cfg.out)
    if overwrite and fs.exists(root):
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
        foreign = [n for n in names if n not in _OWN_FILES and not n.startswith(_io.TMP_PREFIX)
                   and ".tmp-" not in n]
        if foreign:
            raise ValueError(f"--overwrite {STAGE}: {cfg.out} also holds files evaluation never writes "
                             f"({foreign[:5]}); it clears only its own outputs: choose another --out, or move them")
        logger.warning("--overwrite: clearing %s", cfg.out)
        _io.remove_tree(cfg.out)
    recorded = F.read_record(cfg.out)
    F.check(STAGE, cfg.out, recorded.get("fingerprint") if recorded else None, fp)
    F.write_record(cfg.out, STAGE, fp, {"models": dict(cfg.models), "ar_model": cfg.ar_model})


def run_evaluation(cfg: EvaluateConfig, overwrite: bool = False) -> dict:
    """Run the missing cells, then write ``report.json``, ``report.md`` and ``aup.png``; returns the report.

    Refuses an ``out`` that holds an evaluation of other models or settings (:mod:`pipelines.fingerprint`);
    ``overwrite`` clears it first.
    """
    from d3core.eval.plots import plot_report
    from d3core.eval.report import build_report, to_markdown

    t0 = time.perf_counter()
    identities, fp = survey(cfg) if overwrite else check(cfg)  # nothing is written before the GPU check
    cells = plan_cells(cfg, {uri: F.digest(identity) for uri, identity in identities.items()})
    done = {} if overwrite else read_done(cfg, cells)
    pending = [c for c in cells if c.key(cfg) not in done]
    logger.info("%d cells: %d already written, %d to run", len(cells), len(done), len(pending))
    if pending:
        _require_gpus(cfg)
    claim(cfg, fp, overwrite)
    if pending:
        run_cells(cfg, pending)
        done = read_done(cfg, cells)
    missing = [c.key(cfg) for c in cells if c.key(cfg) not in done]
    if missing:
        raise RuntimeError(f"cells {missing[:3]} produced no result: see the Ray task errors above and rerun")
    results = [done[c.key(cfg)] for c in cells]
    from d3core.eval.records import run_metadata

    meta = {"preset": cfg.preset, "n": cfg.n or "all", "gen_length": cfg.gen_length,
            "block_length": cfg.block_length, "batch_size": cfg.batch_size,
            "hardware": sorted({r["hardware"] for r in results})[0],
            "provenance": run_metadata({"seed": cfg.seed, "bootstrap": cfg.seed})}
    report = build_report(results, anchor_vanilla=cfg.anchor_vanilla, unit_tpf_single=cfg.unit_tpf_single,
                          meta=meta, samples=[read_samples(cfg, c) for c in cells], seed=cfg.seed)
    report["samples"] = {c.key(cfg): f"cells/{c.key(cfg)}.samples.jsonl" for c in cells}
    report["config"] = json.loads(json.dumps(dataclasses.asdict(cfg)))
    report["fingerprint_digest"] = F.read_record(cfg.out)["digest"]
    report["wall_seconds"] = time.perf_counter() - t0
    _io.write_bytes(_io.join(cfg.out, "report.json"), json.dumps(report, indent=1).encode())
    _io.write_bytes(_io.join(cfg.out, "report.md"), to_markdown(report).encode())
    _io.write_bytes(_io.join(cfg.out, "aup.png"), plot_report(report))
    logger.info("report written to %s (%.0f s)", cfg.out, report["wall_seconds"])
    return report


if __name__ == "__main__":  # the command line is pipelines/cli.py's (it reads the recipes, which import this stage)
    import runpy

    runpy.run_module("pipelines.cli", run_name="__main__")
