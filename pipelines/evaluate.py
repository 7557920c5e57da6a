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
``<cell id>.samples.jsonl``, so a rerun decodes only missing cells. Finally it writes ``report.json``, ``report.md`` (leaderboard
table) and ``aup.png`` (accuracy vs TPF) under ``out``. Models are paths, fsspec URIs, hub ids
or ``hf://`` URIs; ``--trust-remote-code`` allows tokenizers defined by checkpoint code (Dream).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import platform
import re
import time
from dataclasses import dataclass, field

import fsspec

logger = logging.getLogger("d3ray.evaluate")

DLLM_SAMPLERS = ("vanilla", "fast_dllm", "dparallel", "d3llm")
USE_VLLM = ("auto", "on", "off")
AR_NAME = "AR"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")

PRESETS: dict[str, dict] = {
    # the embedded default: the synthetic task, thresholds spanning each sampler's useful range
    "tiny": dict(
        tasks=("synthetic",),
        sweeps={"vanilla": (), "fast_dllm": (0.95, 0.9, 0.7, 0.5), "dparallel": (0.1, 0.3, 0.5, 1.0),
                "d3llm": (0.1, 0.3, 0.5, 1.0)},
        sampler_params={"d3llm": {"cache_delay_iter": 2}, "fast_dllm": {"cache": "dual"}},
        n=100, batch_size=50, gen_length=48, block_length=16, num_cpus_per_cell=1.0, num_gpus_per_cell=0.0),
    # d3LLM's settings (research digest 2.6 / 5): 256 new tokens, block 32, the five leaderboard tasks
    "llada-8b": dict(
        tasks=("gsm8k", "math500", "mbpp", "humaneval", "long_gsm8k"),
        sweeps={"vanilla": (), "fast_dllm": (0.95, 0.9, 0.8, 0.7), "dparallel": (0.3, 0.4, 0.5, 0.6),
                "d3llm": (0.3, 0.4, 0.5, 0.6)},
        sampler_params={"d3llm": {"cache_delay_iter": 2}, "fast_dllm": {"cache": "dual"}},
        n=0, batch_size=16, gen_length=256, block_length=32, num_cpus_per_cell=4.0, num_gpus_per_cell=1.0),
    "dream-7b": dict(
        tasks=("gsm8k", "math500", "mbpp", "humaneval", "long_gsm8k"),
        sweeps={"vanilla": (), "fast_dllm": (0.95, 0.9, 0.8, 0.7), "dparallel": (0.3, 0.4, 0.45, 0.5),
                "d3llm": (0.3, 0.4, 0.45, 0.5)},
        sampler_params={"d3llm": {"cache_delay_iter": 1}, "fast_dllm": {"cache": "dual"}},
        n=0, batch_size=16, gen_length=256, block_length=32, num_cpus_per_cell=4.0, num_gpus_per_cell=1.0),
}


@dataclass(frozen=True)
class EvaluateConfig:
    """One evaluation sweep. ``n=0`` evaluates the whole test split of each task."""

    models: dict[str, str]  # display name -> dLLM checkpoint URI
    ar_model: str | None  # AR baseline (HF causal-LM directory) or None
    out: str  # fsspec URI of the output directory
    tasks: tuple[str, ...] = ("synthetic",)
    sweeps: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(PRESETS["tiny"]["sweeps"]))
    n: int = 100
    batch_size: int = 50
    gen_length: int = 48
    block_length: int = 16
    sampler_params: dict[str, dict] = field(default_factory=dict)  # fixed extra params per sampler
    num_cpus_per_cell: float = 1.0
    num_gpus_per_cell: float = 0.0
    threads_per_cell: int = 1
    use_vllm: str = "auto"
    seed: int = 0
    prompt_style: str = "auto"
    anchor_vanilla: bool = False  # True: start each parallel curve at the model's vanilla accuracy, TPF 1
    unit_tpf_single: bool = True
    sandbox_timeout_s: float = 10.0  # CPU seconds per program (all its processes)
    code_workers: int = 1
    trust_remote_code: bool = False  # tokenizers defined by checkpoint code (Dream) may run
    preset: str = "custom"

    def __post_init__(self) -> None:
        from d3core.eval.tasks import STYLES, TASK_NAMES

        if not self.models:
            raise ValueError("models is empty: give at least one display name -> checkpoint URI")
        for name in self.models:
            if not _NAME.match(name) or name == AR_NAME:
                raise ValueError(f"model name {name!r}: use letters, digits, '_', '-', '.' only, and not "
                                 f"{AR_NAME!r} (reserved for the AR baseline)")
        bad = [t for t in self.tasks if t not in TASK_NAMES]
        if not self.tasks or bad:
            raise ValueError(f"tasks={self.tasks}: each must be one of {TASK_NAMES}")
        for sampler, thresholds in self.sweeps.items():
            if sampler not in DLLM_SAMPLERS:
                raise ValueError(f"sweeps has sampler {sampler!r}: sweepable samplers are {DLLM_SAMPLERS} "
                                 "(the AR baseline comes from ar_model)")
            if sampler != "vanilla" and not thresholds:
                raise ValueError(f"sweeps[{sampler!r}] is empty: give at least one threshold")
            if any(not t > 0 for t in thresholds):
                raise ValueError(f"sweeps[{sampler!r}]={thresholds}: thresholds must be > 0")
        object.__setattr__(self, "sweeps", {k: tuple(float(t) for t in v) for k, v in self.sweeps.items()})
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if not self.sweeps and self.ar_model is None:
            raise ValueError("nothing to evaluate: give sweeps or an ar_model")
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
        if self.code_workers < 1 or not self.sandbox_timeout_s > 0:
            raise ValueError(f"code_workers={self.code_workers}, sandbox_timeout_s={self.sandbox_timeout_s}: "
                             "both must be positive")
        self._check_sampler_params()

    def _check_sampler_params(self) -> None:
        """Build every cell's sampler params now, so a bad threshold fails before any Ray task starts."""
        from d3core.samplers import get_sampler

        for sampler, thresholds in self.sweeps.items():
            cls = get_sampler(sampler).params_cls
            for t in thresholds or (None,):
                try:
                    cls(**sampler_kwargs(self, Cell("check", "", sampler, t, self.tasks[0]), cls))
                except TypeError as err:
                    raise ValueError(f"sampler_params[{sampler!r}]={self.sampler_params.get(sampler)}: {err}; use "
                                     f"fields of {cls.__name__}") from err

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "EvaluateConfig":
        """A preset's settings with ``overrides``; ``tiny`` defaults to the shipped teacher and AR model."""
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r}: must be one of {sorted(PRESETS)}")
        values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[preset].items()}
        if preset == "tiny":
            from d3core.models.shipped import TINY_AR_DIR, TINY_TEACHER_DIR

            values.update(models={"teacher": str(TINY_TEACHER_DIR)}, ar_model=str(TINY_AR_DIR))
        values.update(out="runs/eval", preset=preset)
        values.update(overrides)
        if "models" not in values or "ar_model" not in values:
            raise ValueError(f"preset {preset!r} has no default models: pass models={{name: URI}} and ar_model")
        return cls(**values)


@dataclass(frozen=True)
class Cell:
    model: str
    uri: str
    sampler: str  # "ar" for the AR baseline
    threshold: float | None
    task: str

    def key(self, cfg: EvaluateConfig) -> str:
        """A readable, unique id: changes whenever anything that changes the result changes."""
        spec = {"cell": dataclasses.asdict(self), "n": cfg.n, "batch_size": cfg.batch_size, "seed": cfg.seed,
                "gen_length": cfg.gen_length, "block_length": cfg.block_length, "style": cfg.prompt_style,
                "params": cfg.sampler_params.get(self.sampler, {}), "threads": cfg.threads_per_cell,
                "vllm": cfg.use_vllm if self.sampler == "ar" else None}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
        thr = "" if self.threshold is None else f"_t{self.threshold:g}"
        return f"{self.task}__{self.model}__{self.sampler}{thr}__{digest}"


def plan_cells(cfg: EvaluateConfig) -> list[Cell]:
    """Every cell of the sweep, slowest first (one-token-per-step decoders, then low thresholds)."""
    cells = []
    for task in cfg.tasks:
        if cfg.ar_model is not None:
            cells.append(Cell(AR_NAME, cfg.ar_model, "ar", None, task))
        for name, uri in cfg.models.items():
            for sampler, thresholds in cfg.sweeps.items():
                if sampler == "vanilla":
                    cells.append(Cell(name, uri, "vanilla", None, task))
                else:
                    cells += [Cell(name, uri, sampler, t, task) for t in thresholds]
    return cells


# -- one cell (runs inside a Ray task) ---------------------------------------------------------
def sampler_kwargs(cfg: EvaluateConfig, cell: Cell, params_cls) -> dict:
    names = {f.name for f in dataclasses.fields(params_cls)}
    base = {"gen_length": cfg.gen_length, "block_length": cfg.block_length, "threshold": cell.threshold}
    kwargs = {k: v for k, v in base.items() if k in names and v is not None}
    kwargs.update(cfg.sampler_params.get(cell.sampler, {}))
    return kwargs


def _ar_backend(cfg: EvaluateConfig, cell: Cell, device: str):
    """(model, sampler, backend name): vLLM when allowed and importable, else d3core's ``ar``."""
    from d3core.samplers import get_sampler

    if cfg.use_vllm != "off":
        try:
            from d3core.eval.vllm_ar import VLLM_SAMPLER, VLLMModel

            return VLLMModel(cell.uri, seed=cfg.seed, dtype="auto" if device == "cuda" else "float32"), \
                VLLM_SAMPLER, "vllm"
        except (ImportError, OSError, RuntimeError) as err:  # vllm absent or broken in this environment
            if cfg.use_vllm == "on":
                raise RuntimeError(f"use_vllm='on' but vLLM could not start ({err}): install the 'vllm' extra "
                                   "or set use_vllm='auto' to fall back to the ar sampler") from err
            logger.info("vLLM unavailable (%s): AR baseline via d3core's ar sampler", type(err).__name__)
    from d3core.models.ar import load_ar_model

    return load_ar_model(cell.uri, device=device), get_sampler("ar"), "d3core-ar"


def run_cell(cfg_json: str, cell_json: str) -> dict:
    """Load the cell's model, decode the task's first ``n`` examples, score them; returns the cell record.

    The record's ``samples`` are the per-sample records (:mod:`d3core.eval.records`); the driver
    writes them beside the cell as JSON Lines.
    """
    import torch

    from d3core.eval.harness import evaluate_task
    from d3core.eval.sandbox import SandboxLimits
    from d3core.eval.stats import bootstrap_ci
    from d3core.eval.tasks import get_task
    from d3core.models.checkpoint import load_pretrained
    from d3core.models.hub import resolve_checkpoint
    from d3core.models.tokenizer import load_tokenizer
    from d3core.samplers import get_sampler

    cfg = config_from_json(cfg_json)
    cell = Cell(**json.loads(cell_json))
    torch.set_num_threads(cfg.threads_per_cell)
    device = "cuda" if cfg.num_gpus_per_cell > 0 and torch.cuda.is_available() else "cpu"
    t0, cpu0 = time.perf_counter(), time.process_time()
    tokenizer = load_tokenizer(cell.uri, cfg.trust_remote_code)
    if cell.sampler == "ar":  # vLLM and transformers get the local snapshot of a hub id or hf:// URI
        local = dataclasses.replace(cell, uri=resolve_checkpoint(cell.uri, trust_remote_code=cfg.trust_remote_code))
        model, spec, backend = _ar_backend(cfg, local, device)
    else:
        model, spec, backend = load_pretrained(cell.uri, device=device), get_sampler(cell.sampler), "d3core"
    params = spec.params_cls(**sampler_kwargs(cfg, cell, spec.params_cls))
    task = get_task(cell.task)
    examples = task.examples(cfg.n or None, seed=cfg.seed)
    report = evaluate_task(model, tokenizer, task, spec, params, examples, batch_size=cfg.batch_size,
                           generator=torch.Generator().manual_seed(cfg.seed), style=cfg.prompt_style,
                           limits=SandboxLimits(cpu_s=cfg.sandbox_timeout_s), code_workers=cfg.code_workers,
                           protocol=_ar_protocol(cfg, cell), truncate_prompts=True)
    hardware = torch.cuda.get_device_name() if device == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {cfg.threads_per_cell} torch thread(s)"
    return {**dataclasses.asdict(cell), **report.summary(), "params": dataclasses.asdict(params),
            "backend": backend, "device": device, "hardware": hardware,
            "accuracy_ci": list(bootstrap_ci(report.correct, seed=cfg.seed)),
            "cell_seconds": time.perf_counter() - t0, "cell_cpu_seconds": time.process_time() - cpu0,
            "samples": [dataclasses.asdict(r) for r in report.samples]}


def _ar_protocol(cfg: EvaluateConfig, cell: Cell):
    """The AR baseline's protocol on the leaderboard of the evaluated dLLMs' family (None: the harness decides)."""
    if cell.sampler != "ar" or cfg.prompt_style != "auto":
        return None
    from d3core.eval.protocols import ar_family_for, checkpoint_family, get_protocol
    from d3core.models.hub import resolve_checkpoint

    first = next(iter(cfg.models.values()))
    family = checkpoint_family(resolve_checkpoint(first, weights=False, trust_remote_code=cfg.trust_remote_code))
    return get_protocol(ar_family_for(family), cell.task)


def config_to_json(cfg: EvaluateConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg))


def config_from_json(text: str) -> EvaluateConfig:
    raw = json.loads(text)
    raw["tasks"] = tuple(raw["tasks"])
    raw["sweeps"] = {k: tuple(v) for k, v in raw["sweeps"].items()}
    return EvaluateConfig(**raw)


# -- the driver ------------------------------------------------------------------------------
def _cells_dir(cfg: EvaluateConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(cfg.out)
    return fs, root.rstrip("/")


def read_samples(cfg: EvaluateConfig, cell: Cell) -> list[dict] | None:
    """The per-sample records of a finished cell (None for a cell written before they existed)."""
    from d3core.eval.records import from_jsonl

    fs, root = _cells_dir(cfg)
    path = f"{root}/cells/{cell.key(cfg)}.samples.jsonl"
    return from_jsonl(fs.cat_file(path).decode()) if fs.exists(path) else None


def read_done(cfg: EvaluateConfig, cells: list[Cell]) -> dict[str, dict]:
    fs, root = _cells_dir(cfg)
    done = {}
    for cell in cells:
        path = f"{root}/cells/{cell.key(cfg)}.json"
        if fs.exists(path):
            done[cell.key(cfg)] = json.loads(fs.cat_file(path))
    return done


def _write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write-then-rename so a reader never sees half a file."""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def _ray_init() -> None:
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep a local cluster on 127.0.0.1
        ray.init(include_dashboard=False, log_to_driver=False)


def write_cell(fs: fsspec.AbstractFileSystem, root: str, key: str, result: dict) -> None:
    """The cell's per-sample records (``<key>.samples.jsonl``), then its summary (``<key>.json``, which marks it done)."""
    from d3core.eval.records import to_jsonl

    samples = result.pop("samples", None)
    if samples is not None:
        _write(fs, f"{root}/cells/{key}.samples.jsonl", to_jsonl(samples).encode())
    _write(fs, f"{root}/cells/{key}.json", json.dumps(result, indent=1).encode())


def run_cells(cfg: EvaluateConfig, pending: list[Cell]) -> None:
    """Fan ``pending`` out as Ray tasks; the driver writes each result as it arrives."""
    import ray
    from tqdm import tqdm

    from d3core.eval.vllm_ar import CPU_ENV

    _ray_init()
    fs, root = _cells_dir(cfg)
    remote = ray.remote(run_cell)
    cfg_json = config_to_json(cfg)
    refs = {}
    for cell in pending:
        options = {"num_cpus": cfg.num_cpus_per_cell, "num_gpus": cfg.num_gpus_per_cell, "max_retries": 0}
        if cell.sampler == "ar":
            options["runtime_env"] = {"env_vars": CPU_ENV if cfg.num_gpus_per_cell == 0 else
                                      {"VLLM_HOST_IP": "127.0.0.1"}}
        refs[remote.options(**options).remote(cfg_json, json.dumps(dataclasses.asdict(cell)))] = cell
    bar = tqdm(total=len(refs), desc="evaluation cells", unit="cell")
    waiting = list(refs)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1)
        result = ray.get(ready[0])
        cell = refs[ready[0]]
        write_cell(fs, root, cell.key(cfg), result)
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


def run_evaluation(cfg: EvaluateConfig) -> dict:
    """Run the missing cells, then write ``report.json``, ``report.md`` and ``aup.png``; returns the report."""
    from d3core.eval.plots import plot_report
    from d3core.eval.report import build_report, to_markdown

    t0 = time.perf_counter()
    check_tokenizers(cfg)
    cells = plan_cells(cfg)
    done = read_done(cfg, cells)
    pending = [c for c in cells if c.key(cfg) not in done]
    logger.info("%d cells: %d already written, %d to run", len(cells), len(done), len(pending))
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
    report["config"] = json.loads(config_to_json(cfg))
    report["wall_seconds"] = time.perf_counter() - t0
    fs, root = _cells_dir(cfg)
    _write(fs, f"{root}/report.json", json.dumps(report, indent=1).encode())
    _write(fs, f"{root}/report.md", to_markdown(report).encode())
    _write(fs, f"{root}/aup.png", plot_report(report))
    logger.info("report written to %s (%.0f s)", cfg.out, report["wall_seconds"])
    return report


# -- CLI -------------------------------------------------------------------------------------
def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--{what} {item!r}: expected NAME=VALUE")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def parse_args(argv=None) -> EvaluateConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--model", action="append", default=[], help="NAME=URI (repeatable); replaces the preset's models")
    p.add_argument("--ar-model", default=None, help="AR baseline directory, or 'none'")
    p.add_argument("--out", default="runs/eval")
    p.add_argument("--tasks", default=None, help="comma-separated task names")
    p.add_argument("--sweep", action="append", default=[],
                   help="SAMPLER=T1,T2,... (repeatable; 'vanilla=' adds vanilla); replaces the preset's sweeps")
    p.add_argument("--param", action="append", default=[],
                   help="SAMPLER.FIELD=JSON fixed sampler parameter, e.g. d3llm.cache_delay_iter=1")
    for name in ("n", "batch_size", "gen_length", "block_length", "threads_per_cell", "seed", "code_workers"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    for name in ("num_cpus_per_cell", "num_gpus_per_cell", "sandbox_timeout_s"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    p.add_argument("--use-vllm", choices=USE_VLLM, default=None)
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow tokenizers defined by the checkpoint's own Python code (Dream)")
    p.add_argument("--prompt-style", default=None)
    args = p.parse_args(argv)
    overrides: dict = {"out": args.out}
    if args.model:
        overrides["models"] = _pairs(args.model, "model")
    if args.ar_model is not None:
        overrides["ar_model"] = None if args.ar_model.lower() == "none" else args.ar_model
    if args.tasks:
        overrides["tasks"] = tuple(t for t in args.tasks.split(",") if t)
    if args.sweep:
        overrides["sweeps"] = {k: tuple(float(t) for t in v.split(",") if t) for k, v in
                               _pairs(args.sweep, "sweep").items()}
    if args.param:
        params = {k: dict(v) for k, v in PRESETS[args.preset].get("sampler_params", {}).items()}
        for k, v in _pairs(args.param, "param").items():
            sampler, _, name = k.partition(".")
            params.setdefault(sampler, {})[name] = json.loads(v)
        overrides["sampler_params"] = params
    for name in ("n", "batch_size", "gen_length", "block_length", "threads_per_cell", "seed", "code_workers",
                 "num_cpus_per_cell", "num_gpus_per_cell", "sandbox_timeout_s", "use_vllm", "prompt_style",
                 "trust_remote_code"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return EvaluateConfig.from_preset(args.preset, **overrides)


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    report = run_evaluation(parse_args(argv))
    for task, systems in report["aup"].items():
        for system, value in systems.items():
            print(f"{task:12s} {system:28s} AUP {value:8.2f}")
    return report


if __name__ == "__main__":
    main()
