"""The d3ray main job: trajectories -> distillation -> evaluation (-> serve smoke test), one run directory.

    python pipelines/full.py                                   # tiny preset, local Ray, runs/full
    ray job submit --working-dir . -- python pipelines/full.py --run-dir /abs/or/s3/uri
    python pipelines/full.py --preset llada-8b --teacher GSAI-ML/LLaDA-8B-Instruct \\
        --ar-model meta-llama/Llama-3.1-8B-Instruct --prompts s3://b/train.jsonl --run-dir s3://b/run

Settings come from one recipe (``--preset``, ``pipelines/recipes.py``), changed by ``--config FILE.yaml``
and by flags: the shared ones at the top (``--teacher``, ``--gen-length``, ...), any stage's field
as ``--STAGE.FIELD`` (``--trajectories.seed 1``, ``--distill.lr 1e-4``,
``--evaluate.sampler-params d3llm.cache_delay_iter=1``), and short forms of the usual ones
(``--n-prompts``, ``--distill-steps``, ``--n-eval``, ``--sweeps``, ``--param``); ``pipelines/cli.py``
generates this command line from ``FullConfig`` and the recipe. The resolved recipe is saved as
``RUN_DIR/recipe.yaml`` (``--config RUN_DIR/recipe.yaml`` repeats the run). The console shows each
stage's progress bar and the report's path; the logs go to ``RUN_DIR/logs/`` (``pipelines/logs.py``).
Every stage output records the fingerprint of what made it; a rerun with other settings refuses,
naming the differing fields, unless given a new ``--run-dir`` or ``--overwrite STAGE`` (which redoes
that stage and everything downstream of it).

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

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field

from pipelines import _cli, _io, cli
from pipelines import fingerprint as F
from pipelines import run_report as R
from pipelines.cluster import joined_existing_cluster
from pipelines.logs import RunLogs
from pipelines.recipes import Recipe, get_recipe
from pipelines.run_report import STAGES

logger = logging.getLogger("d3ray.full")

DOWNSTREAM = {"trajectories": ("trajectories", "distill", "evaluate"), "distill": ("distill", "evaluate"),
              "evaluate": ("evaluate",)}
RECIPE_FILE = "recipe.yaml"


@dataclass(frozen=True)
class FullConfig:
    """One run of the main job: the recipe, where it goes, and which stages run."""

    run_dir: str = "runs/full"  # fsspec URI of the run directory (every stage's output lies under it)
    skip: tuple[str, ...] = ()  # stages not to run: pretrain, trajectories, distill, evaluate, serve
    overwrite: tuple[str, ...] = ()  # stages to redo (with everything downstream) although outputs exist
    pretrain: bool = False  # tiny only: retrain the embedded models first (hours on 2 CPU cores)
    serve: bool = False  # deploy the student on Ray Serve on 127.0.0.1 and query it once
    push_to_hub: str | None = None  # after evaluation, upload the student (with its model card) to this hub repo
    recipe: Recipe = field(default_factory=lambda: get_recipe("tiny"))  # every stage's settings

    def __post_init__(self) -> None:
        for name in ("skip", "overwrite"):
            unknown = [s for s in getattr(self, name) if s not in STAGES]
            if unknown:
                raise ValueError(f"{name}={list(getattr(self, name))}: unknown stage(s) {unknown}; stages are "
                                 f"{list(STAGES)}")
        bad = [s for s in self.overwrite if s not in DOWNSTREAM]
        if bad:
            raise ValueError(f"overwrite={list(self.overwrite)}: only {list(DOWNSTREAM)} keep outputs to redo")
        both = sorted(set(self.overwrite) & set(self.skip))
        if both:
            raise ValueError(f"{both} both skipped and overwritten: drop one of --skip / --overwrite")
        if not self.run_dir:
            raise ValueError("run_dir='': give the run directory (a path or fsspec URI)")
        r = self.recipe
        if r.preset != "tiny":
            if r.prompts is None and "trajectories" not in self.skip:
                raise ValueError(f"preset={r.preset!r} needs --prompts (JSONL/Parquet of id, prompt, answer, task) "
                                 "for the teacher's trajectories; d3ray ships test sets only")
            if self.pretrain:
                raise ValueError("--pretrain rebuilds the embedded tiny models only; drop it for "
                                 f"preset={r.preset!r}")
        if self.pretrain and "://" in self.run_dir:
            raise ValueError(f"run_dir={self.run_dir!r}: --pretrain writes local checkpoints; use a local run dir")
        if self.push_to_hub is not None:
            from d3core.models.hub import HubRef

            HubRef(self.push_to_hub)
            if "://" in self.run_dir and not self.run_dir.startswith("file://"):
                raise ValueError(f"push_to_hub={self.push_to_hub!r} uploads a local student, but run_dir="
                                 f"{self.run_dir!r} is remote: upload with `hf upload` from a local copy instead")

    def path(self, *parts: str) -> str:
        return _io.join(self.run_dir, *parts)

    def redo(self) -> set[str]:
        """The stages ``--overwrite`` redoes: each one named and everything downstream of it."""
        return {s for name in self.overwrite for s in DOWNSTREAM[name]}

    def bound(self) -> Recipe:
        """The recipe with every location under ``run_dir`` (what the stages actually run with)."""
        r = self.recipe
        local = "://" not in self.run_dir or self.run_dir.startswith("file://")
        models = {"teacher": r.teacher}
        if "distill" not in self.skip or _io.exists(self.path("student", "config.json")):
            models["student"] = self.path("student")
        return dataclasses.replace(
            r, trajectories=dataclasses.replace(r.trajectories, out=self.path("trajectories")),
            distill=dataclasses.replace(r.distill, trajectories=self.path("trajectories"), out=self.path("student"),
                                        storage=None if local else self.path("_train"), push_to_hub=None),
            evaluate=dataclasses.replace(r.evaluate, out=self.path("eval"), models=models, preset=r.preset),
            serve=dataclasses.replace(r.serve, model=self.path("student")))


# -- stages -----------------------------------------------------------------------------------------
def stage_pretrain(cfg: FullConfig) -> dict:
    """Retrain the embedded models (hours on 2 CPU cores; minutes on a GPU) into RUN_DIR/pretrain (local)."""
    from pipelines.pretrain import PretrainConfig, train

    out = {}
    for kind in ("ar", "dllm"):
        target = cfg.path("pretrain", kind)
        if not os.path.exists(os.path.join(target, "pretrain_summary.json")):
            init = cfg.path("pretrain", "ar") if kind == "dllm" else ""
            train(PretrainConfig(kind=kind, out=target, init_from=init))
        out[kind] = target
    return out


def stage_trajectories(cfg: FullConfig, recipe: Recipe) -> dict:
    from pipelines.trajectories import run

    return run(recipe.trajectories, overwrite="trajectories" in cfg.redo())


def stage_distill(cfg: FullConfig, recipe: Recipe) -> dict:
    from pipelines.distill import run_distill

    summary = run_distill(recipe.distill, overwrite="distill" in cfg.redo())
    return {k: summary[k] for k in ("rows", "steps", "train_seconds", "row_uses", "fingerprint_digest")}


def stage_evaluate(cfg: FullConfig, recipe: Recipe) -> dict:
    from pipelines.evaluate import run_evaluation

    report = run_evaluation(recipe.evaluate, overwrite="evaluate" in cfg.redo())
    if "student" in recipe.evaluate.models and _io.exists(cfg.path("student", "README.md")):
        from d3core.models.export import set_evaluation

        try:
            set_evaluation(cfg.path("student"), R.card_evaluation(report))
        except ValueError as err:  # a card without d3ray's evaluation section (an older export): leave it
            logger.warning("student model card not updated: %s", err)
    return {"aup": report["aup"], "wall_seconds": report["wall_seconds"],
            "fingerprint_digest": report.get("fingerprint_digest")}


def stage_serve(cfg: FullConfig, recipe: Recipe) -> dict:
    """Deploy the student on 127.0.0.1, send one chat completion, shut the app down."""
    import socket

    try:
        import httpx
    except ImportError as err:
        raise ImportError("--serve queries the deployed app over HTTP with httpx: pip install 'd3ray[serve]'") from err
    from ray import serve

    from serve_apps.openai_app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(recipe.serve), name="d3ray-smoke", route_prefix="/")
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
    if cfg.recipe.preset == "tiny":
        from d3core.eval import synthetic

        return synthetic.generate("test", 1, seed=0)[0].question
    return "What is 12 times 7? Answer with a number."


# -- driver ----------------------------------------------------------------------------------------
def check_skipped(cfg: FullConfig, recipe: Recipe) -> None:
    """Outputs of skipped stages that a later stage reads must be what this recipe would make."""
    runs = [s for s in ("trajectories", "distill", "evaluate") if s not in cfg.skip]
    if "trajectories" in cfg.skip and any(s in runs for s in ("distill", "evaluate")) \
            and _io.exists(cfg.path("trajectories", "manifest.json")):
        from pipelines.trajectories import prepare

        prepare(recipe.trajectories)  # refuses (OutputMismatch) trajectories of other settings
    if "distill" in cfg.skip and "evaluate" in runs and _io.exists(cfg.path("student", "distill_summary.json")):
        from pipelines.distill import claim, prepare

        claim(recipe.distill, prepare(recipe.distill), overwrite=False)


def check_finished(cfg: FullConfig, recipe: Recipe) -> None:
    """Before Ray: when the trajectories are finished, a student (and an evaluation) of other settings is refused now,
    not after the cluster work of the stages before it. Writes nothing."""
    manifest = _io.read_json(cfg.path("trajectories", "manifest.json")) or {}
    if not manifest.get("complete") or "distill" in cfg.skip or "distill" in cfg.redo():
        return
    from pipelines import distill as D

    if not _io.exists(cfg.path("student", D.SUMMARY)) and F.read_record(recipe.distill.storage_path) is None:
        return
    summary = D.claim(recipe.distill, D.prepare(recipe.distill), overwrite=False)
    if summary is not None and "evaluate" not in cfg.skip and "evaluate" not in cfg.redo():
        from pipelines.evaluate import check as check_evaluation

        check_evaluation(recipe.evaluate)


def check_gpus(cfg: FullConfig, recipe: Recipe) -> None:
    """Once Ray is up and before anything is written: the cluster has the GPUs and custom resources of every stage
    with work to do."""
    from pipelines.cluster import require_gpus, require_resources

    needs = [("trajectories", recipe.trajectories.num_gpus_per_actor, "trajectories.num_gpus_per_actor"),
             ("distill", recipe.distill.num_workers if recipe.distill.use_gpu else 0,
              "distill.num_workers (distill.use_gpu=True)"),
             ("evaluate", recipe.evaluate.num_gpus_per_cell, "evaluate.num_gpus_per_cell"),
             ("serve", recipe.serve.num_gpus if cfg.serve else 0, "serve.num_gpus")]
    for stage, needed, what in needs:
        if needed > 0 and stage not in cfg.skip and not _finished(cfg, stage):
            require_gpus(needed, what)
    custom = [("trajectories", recipe.trajectories.resources), ("distill", recipe.distill.resources),
              ("evaluate", recipe.evaluate.resources), ("serve", recipe.serve.resources if cfg.serve else {})]
    for stage, resources in custom:
        if resources and stage not in cfg.skip and not _finished(cfg, stage):
            require_resources(resources, f"{stage}.resources")


def _finished(cfg: FullConfig, stage: str) -> bool:
    """The stage's output is complete and kept, so a rerun asks the cluster for nothing (its settings are checked
    against the output's fingerprint when the stage runs)."""
    if stage in cfg.redo():
        return False
    if stage == "trajectories":
        return bool((_io.read_json(cfg.path("trajectories", "manifest.json")) or {}).get("complete"))
    if stage == "distill":
        from pipelines.distill import SUMMARY

        return _io.exists(cfg.path("student", SUMMARY))
    return stage == "evaluate" and _io.exists(cfg.path("eval", "report.json"))


def require_filesystems(cfg: FullConfig) -> None:
    """Every location's fsspec implementation is installed (else a ValueError naming the extra)."""
    r = cfg.recipe
    _io.require_filesystems(run_dir=cfg.run_dir, prompts=r.prompts, teacher=r.teacher, ar_model=r.ar_model)


def run(cfg: FullConfig, logs: RunLogs | None = None) -> dict:
    """Check everything that can be checked (locations, inputs, earlier outputs, GPUs), then write
    ``recipe.yaml`` and run the stages: a refusal leaves the run directory as it was.

    ``logs`` (the command line's) moves into ``RUN_DIR/logs/`` once the run directory is the run's,
    and the Ray this job starts prints there.
    """
    import ray

    require_filesystems(cfg)
    _io.require_directory(cfg.run_dir, "run_dir")
    recipe = cfg.bound()
    text = _cli.to_yaml(recipe)
    logger.info("recipe (%s):\n%s", cfg.path(RECIPE_FILE), text)
    check_skipped(cfg, recipe)
    if "trajectories" not in cfg.skip:  # prompts, teacher, output: before Ray
        from pipelines.trajectories import prepare, survey

        if "trajectories" in cfg.redo():
            survey(recipe.trajectories)  # its outputs are cleared when the stage runs
        else:
            prepare(recipe.trajectories)  # also refuses trajectories of other settings
    check_finished(cfg, recipe)
    if not ray.is_initialized():  # joins the cluster under `ray job submit`; worker output never on the console
        starts = logs is not None and not joined_existing_cluster()
        ray.init(include_dashboard=False, **(logs.ray_options() if starts else {"log_to_driver": False}))
    check_gpus(cfg, recipe)
    previous = _read_text(cfg.path(RECIPE_FILE))
    _io.write_bytes(cfg.path(RECIPE_FILE), text.encode())
    if logs is not None:
        logs.claim()
    say(f"d3ray main job ({recipe.preset}): recipe {cfg.path(RECIPE_FILE)}" + (f", logs {logs.dir}" if logs else ""))
    try:
        return _run(cfg, recipe)
    except F.OutputMismatch:
        if previous is not None:  # the run dir still holds the outputs of the recipe it had
            _io.write_bytes(cfg.path(RECIPE_FILE), previous.encode())
        raise


def _read_text(uri: str) -> str | None:
    if not _io.exists(uri):
        return None
    fs, root = _io.fs_root(uri)
    with fs.open(root, "r") as f:
        return f.read()


def _run(cfg: FullConfig, recipe: Recipe) -> dict:
    stages = _io.read_json(cfg.path("stages.json")) or {}
    teacher, ar_model = recipe.teacher, recipe.ar_model
    if cfg.pretrain and "pretrain" not in cfg.skip:
        stages["pretrain"] = _timed(lambda: stage_pretrain(cfg))
    plan = [("trajectories", lambda: stage_trajectories(cfg, recipe)),
            ("distill", lambda: stage_distill(cfg, recipe)),
            ("evaluate", lambda: stage_evaluate(cfg, recipe))]
    if cfg.serve:
        plan.append(("serve", lambda: stage_serve(cfg, recipe)))
    for name, fn in plan:
        if name in cfg.skip:
            logger.info("stage %s: skipped (--skip)", name)
            say(f"{name}: skipped (--skip)")
            stages.setdefault(name, {"status": "skipped"})
            continue
        logger.info("stage %s: starting", name)
        previous = stages.get(name, {})
        result = _timed(fn)
        redone = name in cfg.redo()
        digest = (result.get("result") or {}).get("fingerprint_digest") if isinstance(result.get("result"), dict) \
            else None
        if previous.get("status") == "done" and not redone and digest is not None \
                and (previous.get("result") or {}).get("fingerprint_digest") == digest:
            result = {**previous, "rechecked_seconds": result["seconds"]}  # finished earlier: keep its time
            say(f"{name}: finished earlier, kept")
        stages[name] = result
        _io.write_json(cfg.path("stages.json"), stages)
        logger.info("stage %s: done in %.0f s", name, result["seconds"])
    manifest = _io.read_json(cfg.path("trajectories", "manifest.json")) or {}
    made_by = (manifest.get("provenance") or {}).get("teacher", teacher)
    summary = {"recipe": _cli.to_data(recipe), "run_dir": cfg.run_dir, "hardware": R.hardware(),
               "teacher": made_by, "ar_model": ar_model, "stages": stages}
    if cfg.push_to_hub:
        from d3core.models.export import push_to_hub

        summary["published"] = push_to_hub(cfg.path("student"), cfg.push_to_hub)
    evaluation = _io.read_json(cfg.path("eval", "report.json")) or {}
    from d3core.eval.records import run_metadata

    summary["provenance"] = run_metadata({"evaluation": evaluation.get("config", {}).get("seed")})
    summary["student_beats_teacher"] = R.compare(evaluation)
    _io.write_json(cfg.path("report.json"), summary)
    _io.write_bytes(cfg.path("report.md"), R.markdown(summary, evaluation, cfg.recipe.preset).encode())
    logger.info("report: %s", cfg.path("report.md"))
    say(f"report: {cfg.path('report.md')}")
    return summary


def say(line: str) -> None:
    """One line on the console (stage bars and errors are the rest of it; the logs hold everything else)."""
    print(line, flush=True)


def _timed(fn) -> dict:
    t0 = time.perf_counter()
    out = fn()
    return {"status": "done", "seconds": round(time.perf_counter() - t0, 1), "result": out}


# -- CLI -------------------------------------------------------------------------------------------
def parse_args(argv=None) -> FullConfig:
    """The main job's command line: generated by :mod:`pipelines.cli` from FullConfig and the preset's recipe."""
    cfg = cli.parse_full(FullConfig, argv, __doc__)
    require_filesystems(cfg)
    return cfg


def main(argv=None) -> dict:
    """``python pipelines/full.py``: the console shows each stage's progress bar and the report's path; the logs
    (d3ray's, Ray's, its workers', transformers') go to ``RUN_DIR/logs/`` (:mod:`pipelines.logs`)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep a local cluster on 127.0.0.1
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    def go() -> dict:
        cfg = parse_args(argv)
        with RunLogs(cfg.run_dir) as logs:
            return run(cfg, logs)

    return _cli.run_main(go)


if __name__ == "__main__":
    main()
