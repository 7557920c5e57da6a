"""The d3ray main job: trajectories -> distillation -> evaluation (-> serve smoke test), one run directory.

    python pipelines/full.py                                   # tiny preset, local Ray, runs/full
    ray job submit --working-dir . -- python pipelines/full.py --run-dir /abs/or/s3/uri
    python pipelines/full.py --preset llada-8b --teacher GSAI-ML/LLaDA-8B-Instruct \\
        --ar-model meta-llama/Llama-3.1-8B-Instruct --prompts s3://b/train.jsonl --run-dir s3://b/run

Stages (each skippable with ``--skip``, each resumable from its own outputs):

1. ``pretrain`` (``--pretrain``, tiny only): rebuild the embedded teacher and AR model; off by
   default because both are shipped in the package.
2. ``trajectories``: Ray Data decodes the prompts with the teacher into ``RUN_DIR/trajectories``
   (finished shards are never redone).
3. ``distill``: Ray Train (FSDP2) distils the student into ``RUN_DIR/student`` (resumes from its
   last checkpoint; a finished export is kept).
4. ``evaluate``: threshold sweeps of every sampler on teacher and student plus the AR baseline
   (vLLM where installed) into ``RUN_DIR/eval`` (finished cells are kept).
5. ``serve`` (``--serve``): deploy the student on Ray Serve on 127.0.0.1 and check one
   completion over HTTP.

At the end ``RUN_DIR/report.md`` holds the AUP table, the plot, each stage's time and the
hardware; ``RUN_DIR/stages.json`` records which stages ran and how long they took. The
student's model card (``RUN_DIR/student/README.md``) gets the run's AUP table, and
``--push-to-hub ORG/NAME`` then publishes the student directory as is.

Checkpoints (``--teacher``, ``--ar-model``) are paths, fsspec URIs, hub ids or ``hf://`` URIs,
resolved where they are loaded (each worker's HF cache), never downloaded whole on the driver.
``--trust-remote-code`` lets tokenizers defined by the checkpoint's own code run (Dream needs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import time
from dataclasses import dataclass

import fsspec

logger = logging.getLogger("d3ray.full")

STAGES = ("pretrain", "trajectories", "distill", "evaluate", "serve")
PARALLEL_SAMPLERS = ("fast_dllm", "dparallel", "d3llm")

PRESETS: dict[str, dict] = {
    # Sized for about 10 minutes on 2 CPU cores (docs/benchmarks.md has the measured stage times).
    "tiny": dict(n_prompts=3000, n_eval=100, distill_steps=350),
    "llada-8b": dict(n_prompts=0, n_eval=0, distill_steps=0),
    "dream-7b": dict(n_prompts=0, n_eval=0, distill_steps=0),
}


@dataclass(frozen=True)
class FullConfig:
    preset: str = "tiny"
    run_dir: str = "runs/full"
    teacher: str = ""  # dLLM checkpoint: path, fsspec URI, HF hub id or hf:// URI; tiny: the shipped teacher
    ar_model: str = ""  # AR baseline (HF causal LM); tiny: the shipped AR model
    prompts: str = ""  # JSONL/Parquet of id, prompt, answer, task for trajectories; tiny: synthetic train split
    skip: tuple[str, ...] = ()
    pretrain: bool = False
    serve: bool = False
    n_prompts: int = 0  # 0: the preset's value (0 there: every prompt)
    n_eval: int = -1  # problems per task; -1: the preset's value (0: whole test split)
    distill_steps: int = -1  # -1: the preset's value (0: the preset's epochs)
    masking: str = "trajectory"
    sweeps: str = ""  # e.g. "d3llm=0.3,0.5;vanilla=" to replace the preset's evaluation sweep
    trust_remote_code: bool = False  # tokenizers defined by the checkpoint's own code (Dream) may run
    push_to_hub: str = ""  # after evaluation, upload the student (with its model card) to this hub repo

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r}: must be one of {sorted(PRESETS)}")
        skip = tuple(s for s in self.skip if s)
        object.__setattr__(self, "skip", skip)
        unknown = [s for s in skip if s not in STAGES]
        if unknown:
            raise ValueError(f"skip={list(skip)}: unknown stage(s) {unknown}; stages are {list(STAGES)}")
        if self.preset != "tiny":
            if not self.teacher or not self.ar_model:
                raise ValueError(f"preset={self.preset!r} needs --teacher (e.g. GSAI-ML/LLaDA-8B-Instruct or a "
                                 "path/URI) and --ar-model (an HF causal LM): no 8B weights ship with d3ray")
            if not self.prompts and "trajectories" not in skip:
                raise ValueError(f"preset={self.preset!r} needs --prompts (JSONL/Parquet of id, prompt, answer, task) "
                                 "for the teacher's trajectories; d3ray ships test sets only")
            if self.pretrain:
                raise ValueError("--pretrain rebuilds the embedded tiny models only; drop it for "
                                 f"preset={self.preset!r}")
        for name, default in PRESETS[self.preset].items():
            if getattr(self, name) in (-1,) or (name == "n_prompts" and self.n_prompts == 0):
                object.__setattr__(self, name, default)
        self.sweep_dict()  # parse early so a bad --sweeps fails before any stage runs
        if self.push_to_hub:
            from d3core.models.hub import HubRef

            HubRef(self.push_to_hub)
            if "://" in self.run_dir and not self.run_dir.startswith("file://"):
                raise ValueError(f"push_to_hub={self.push_to_hub!r} uploads a local student, but run_dir="
                                 f"{self.run_dir!r} is remote: upload with `hf upload` from a local copy instead")
        if self.n_prompts < 0 or self.n_eval < 0 or self.distill_steps < 0:
            raise ValueError(f"n_prompts={self.n_prompts}, n_eval={self.n_eval}, distill_steps="
                             f"{self.distill_steps}: must be >= 0")

    def sweep_dict(self) -> dict[str, tuple[float, ...]] | None:
        if not self.sweeps:
            return None
        out = {}
        for part in self.sweeps.split(";"):
            name, _, values = part.partition("=")
            try:
                out[name.strip()] = tuple(float(v) for v in values.split(",") if v.strip())
            except ValueError as err:
                raise ValueError(f"sweeps={self.sweeps!r}: {err}; write 'sampler=t1,t2;sampler2=t3'") from err
        return out

    def path(self, *parts: str) -> str:
        return "/".join([self.run_dir.rstrip("/"), *parts])


def hardware() -> dict:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}


# -- stages -----------------------------------------------------------------------------------------
def stage_pretrain(cfg: FullConfig) -> dict:
    """Retrain the embedded models (hours on 2 CPU cores; minutes on a GPU) into RUN_DIR/pretrain (local)."""
    from pipelines.pretrain import PretrainConfig, train

    if "://" in cfg.run_dir:
        raise ValueError(f"run_dir={cfg.run_dir!r}: --pretrain writes local checkpoints; use a local run dir")
    out = {}
    for kind in ("ar", "dllm"):
        target = cfg.path("pretrain", kind)
        if not os.path.exists(os.path.join(target, "pretrain_summary.json")):
            init = cfg.path("pretrain", "ar") if kind == "dllm" else ""
            train(PretrainConfig(kind=kind, out=target, init_from=init))
        out[kind] = target
    return out


def stage_trajectories(cfg: FullConfig, teacher: str) -> dict:
    from pipelines.trajectories import TrajectoriesConfig
    from pipelines.trajectories import run as trajectories

    tcfg = TrajectoriesConfig(out=cfg.path("trajectories"), preset=cfg.preset, teacher=teacher, prompts=cfg.prompts,
                              n_prompts=cfg.n_prompts or 10**9, trust_remote_code=cfg.trust_remote_code)
    return trajectories(tcfg)


def stage_distill(cfg: FullConfig, teacher: str) -> dict:
    from pipelines.distill import DistillConfig, run_distill

    dcfg = DistillConfig(trajectories=cfg.path("trajectories"), out=cfg.path("student"), preset=cfg.preset,
                         init=teacher, masking=cfg.masking, max_steps=cfg.distill_steps,
                         storage="" if "://" not in cfg.run_dir else cfg.path("_train"),
                         trust_remote_code=cfg.trust_remote_code)
    summary = run_distill(dcfg)
    return {k: summary[k] for k in ("rows", "steps", "train_seconds", "row_uses")}


def stage_evaluate(cfg: FullConfig, teacher: str, ar_model: str) -> dict:
    from pipelines.evaluate import EvaluateConfig, run_evaluation

    models = {"teacher": teacher}
    if "distill" not in cfg.skip or _exists(cfg.path("student", "config.json")):
        models["student"] = cfg.path("student")
    overrides = {"models": models, "ar_model": ar_model, "out": cfg.path("eval"),
                 "trust_remote_code": cfg.trust_remote_code}
    if cfg.n_eval:
        overrides["n"] = cfg.n_eval
    if cfg.sweep_dict() is not None:
        overrides["sweeps"] = cfg.sweep_dict()
    report = run_evaluation(EvaluateConfig.from_preset(cfg.preset, **overrides))
    if "student" in models and _exists(cfg.path("student", "README.md")):
        from d3core.models.export import set_evaluation

        try:
            set_evaluation(cfg.path("student"), card_evaluation(report))
        except ValueError as err:  # a card without d3ray's evaluation section (an older export): leave it
            logger.warning("student model card not updated: %s", err)
    return {"aup": report["aup"], "wall_seconds": report["wall_seconds"]}


def card_evaluation(report: dict) -> str:
    """The run's AUP table for the student's model card (student and teacher rows, every task)."""
    tasks = list(report["aup"])
    systems = sorted({s for t in tasks for s in report["aup"][t]})
    meta = report.get("meta", {})
    lines = [f"AUP (accuracy under parallelism, as d3LLM defines it) from this run: {meta.get('n', '?')} problems "
             f"per task, generation length {meta.get('gen_length', '?')}, block {meta.get('block_length', '?')}, "
             f"on {meta.get('hardware', '?')}.", "", "| system | " + " | ".join(tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    for system in systems:
        cells = [report["aup"][t].get(system) for t in tasks]
        lines.append(f"| {system} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in cells) + " |")
    return "\n".join(lines)


def stage_serve(cfg: FullConfig) -> dict:
    """Deploy the student on 127.0.0.1, send one chat completion, shut the app down."""
    import socket

    try:
        import httpx
    except ImportError as err:
        raise ImportError("--serve queries the deployed app over HTTP with httpx: pip install 'd3ray[serve]'") from err
    from ray import serve

    from serve_apps.openai_app import app_builder

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_builder({"preset": cfg.preset, "model": cfg.path("student"),
                               "trust_remote_code": cfg.trust_remote_code}), name="d3ray-smoke", route_prefix="/")
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=60).json()
        name = models["data"][0]["id"]
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "model": name, "messages": [{"role": "user", "content": _smoke_question(cfg)}], "temperature": 0})
        reply.raise_for_status()
        body = reply.json()
        return {"model": name, "text": body["choices"][0]["message"]["content"], "usage": body["usage"]}
    finally:
        serve.delete("d3ray-smoke")


def _smoke_question(cfg: FullConfig) -> str:
    if cfg.preset == "tiny":
        from d3core.eval import synthetic

        return synthetic.generate("test", 1, seed=0)[0].question
    return "What is 12 times 7? Answer with a number."


# -- driver ----------------------------------------------------------------------------------------
def _exists(uri: str) -> bool:
    fs, root = fsspec.core.url_to_fs(uri)
    return fs.exists(root)


def _read_json(uri: str) -> dict:
    if not _exists(uri):
        return {}
    with fsspec.open(uri, "r") as f:
        return json.load(f)


def _write_text(uri: str, text: str) -> None:
    fs, root = fsspec.core.url_to_fs(uri)
    fs.makedirs(root.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(root, "w") as f:
        f.write(text)


def run(cfg: FullConfig) -> dict:
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False)  # joins the cluster under `ray job submit`
    stages = _read_json(cfg.path("stages.json"))
    teacher, ar_model = cfg.teacher, cfg.ar_model  # resolved where they are loaded, not here
    if cfg.preset == "tiny":
        from d3core.models.shipped import TINY_AR_DIR, TINY_TEACHER_DIR

        if cfg.pretrain and "pretrain" not in cfg.skip:
            stages["pretrain"] = _timed(lambda: stage_pretrain(cfg))
            teacher = teacher or cfg.path("pretrain", "dllm")
            ar_model = ar_model or cfg.path("pretrain", "ar")
        teacher, ar_model = teacher or str(TINY_TEACHER_DIR), ar_model or str(TINY_AR_DIR)
    plan = [("trajectories", lambda: stage_trajectories(cfg, teacher)),
            ("distill", lambda: stage_distill(cfg, teacher)),
            ("evaluate", lambda: stage_evaluate(cfg, teacher, ar_model))]
    if cfg.serve:
        plan.append(("serve", lambda: stage_serve(cfg)))
    for name, fn in plan:
        if name in cfg.skip:
            logger.info("stage %s: skipped (--skip)", name)
            stages.setdefault(name, {"status": "skipped"})
            continue
        logger.info("stage %s: starting", name)
        previous = stages.get(name, {})
        result = _timed(fn)
        if previous.get("status") == "done":  # finished earlier: keep its time, note this cheap re-check
            result = {**previous, "rechecked_seconds": result["seconds"]}
        stages[name] = result
        _write_text(cfg.path("stages.json"), json.dumps(stages, indent=2, default=str))
        logger.info("stage %s: done in %.0f s", name, result["seconds"])
    summary = {"config": dataclasses.asdict(cfg), "hardware": hardware(), "teacher": teacher, "ar_model": ar_model,
               "stages": stages}
    if cfg.push_to_hub:
        from d3core.models.export import push_to_hub

        summary["published"] = push_to_hub(cfg.path("student"), cfg.push_to_hub)
    evaluation = _read_json(cfg.path("eval", "report.json"))
    from d3core.eval.records import run_metadata

    summary["provenance"] = run_metadata({"evaluation": evaluation.get("config", {}).get("seed")})
    summary["student_beats_teacher"] = compare(evaluation)
    _write_text(cfg.path("report.json"), json.dumps(summary, indent=2, default=str))
    _write_text(cfg.path("report.md"), markdown(summary, evaluation, cfg))
    logger.info("report: %s", cfg.path("report.md"))
    return summary


def _timed(fn) -> dict:
    t0 = time.perf_counter()
    out = fn()
    return {"status": "done", "seconds": round(time.perf_counter() - t0, 1), "result": out}


def compare(evaluation: dict) -> dict:
    """Per task and parallel sampler: student AUP, teacher AUP, and whether the student's is higher."""
    out: dict = {}
    for task, systems in evaluation.get("aup", {}).items():
        for sampler in PARALLEL_SAMPLERS:
            s, t = systems.get(f"student/{sampler}"), systems.get(f"teacher/{sampler}")
            if s is not None and t is not None:
                out.setdefault(task, {})[sampler] = {"student": round(s, 2), "teacher": round(t, 2),
                                                     "student_higher": s > t}
    return out


def markdown(summary: dict, evaluation: dict, cfg: FullConfig) -> str:
    hw = summary["hardware"]
    lines = [f"# d3ray run ({cfg.preset})", "",
             f"Hardware: {hw['cpu']}, {hw['cores']} CPU cores, GPUs: {', '.join(hw['gpus']) or 'none'}; "
             f"torch {hw['torch']}. Teacher: `{summary['teacher']}`.", "",
             "## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    for name in STAGES:
        st = summary["stages"].get(name)
        if st:
            lines.append(f"| {name} | {st.get('status')} | {st.get('seconds', '')} |")
    lines += ["", "## Student vs teacher (AUP)", "", "| task | sampler | teacher AUP | student AUP | student higher |",
              "|---|---|---|---|---|"]
    for task, samplers in summary["student_beats_teacher"].items():
        for sampler, row in samplers.items():
            lines.append(f"| {task} | {sampler} | {row['teacher']:.1f} | {row['student']:.1f} | "
                         f"{'yes' if row['student_higher'] else 'NO'} |")
    if summary.get("provenance"):
        from d3core.eval.report import provenance_line

        lines += ["", provenance_line(summary["provenance"])]
    if evaluation:
        from d3core.eval.report import to_markdown

        lines += ["", "## Evaluation", "", "![accuracy vs TPF](eval/aup.png)", "",
                  f"Per-sample records (prompt, output, extracted answer, verdict, NFE, unmask steps): "
                  f"`eval/cells/*.samples.jsonl`, {len(evaluation.get('samples', {}))} cells.", "",
                  to_markdown(evaluation)]
    serve = summary["stages"].get("serve", {}).get("result")
    if serve:
        lines += ["", "## Serve smoke test", "", f"`{serve['model']}` answered: {serve['text']!r} "
                  f"(usage {serve['usage']})"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> FullConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--run-dir", default="runs/full", help="fsspec URI of the run directory")
    p.add_argument("--teacher", default="", help="dLLM teacher: path, fsspec URI, hub id (ORG/NAME) or hf:// URI")
    p.add_argument("--ar-model", default="", help="AR baseline (HF causal LM): path, hub id or hf:// URI")
    p.add_argument("--prompts", default="", help="JSONL/Parquet of id, prompt, answer at any fsspec URI")
    p.add_argument("--skip", default="", help=f"comma-separated stages to skip: {','.join(STAGES)}")
    p.add_argument("--pretrain", action="store_true", help="tiny only: retrain the embedded models first")
    p.add_argument("--serve", action="store_true", help="deploy the student on Ray Serve and query it once")
    p.add_argument("--n-prompts", type=int, default=0)
    p.add_argument("--n-eval", type=int, default=-1)
    p.add_argument("--distill-steps", type=int, default=-1)
    p.add_argument("--masking", default="trajectory", choices=("trajectory", "random"))
    p.add_argument("--sweeps", default="", help="replace the evaluation sweep, e.g. 'd3llm=0.3,0.5;vanilla='")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let tokenizers defined by the checkpoint's own Python code run (Dream needs it)")
    p.add_argument("--push-to-hub", default="", metavar="ORG/NAME",
                   help="after evaluation, upload the student directory (model card included) to this hub repo")
    args = vars(p.parse_args(argv))
    args["skip"] = tuple(s.strip() for s in args["skip"].split(",") if s.strip())
    return FullConfig(**args)


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
