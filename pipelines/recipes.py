"""One frozen :class:`Recipe` per preset: every stage's settings, the single source of defaults.

    from pipelines.recipes import get_recipe
    recipe = get_recipe("llada-8b")            # or tiny(), llada_8b(), dream_7b()
    recipe.trajectories.num_gpus_per_actor     # 1.0
    recipe.with_shared(gen_length=512)         # one decode shape for every stage

A recipe holds the settings a run is made of: the checkpoints (``teacher``, ``ar_model``), the
prompt file, the decode shape that trajectories, evaluation and serving share, and the config
of each stage (:class:`~pipelines.trajectories.TrajectoriesConfig`,
:class:`~pipelines.distill.DistillConfig`, :class:`~pipelines.evaluate.EvaluateConfig`,
:class:`~serve_apps.config.ServeConfig`). There are no "use the preset's value" sentinels: the
``tiny`` recipe is the stage classes' own defaults, and the GPU recipes change exactly the
fields they list. A field that several stages share (``SHARED``) is set once at the top and
must agree with every stage (:meth:`Recipe.with_shared` changes it everywhere); locations are
filled in by the caller (``full.py`` derives them from ``--run-dir``).

Recipes import the stage configs, never the reverse: a stage module is its config and its
``run``, and the command lines (``pipelines/cli.py``) take their defaults from
``get_recipe(--preset)``. The serve settings are the serve app's own presets
(:func:`serve_apps.config.preset_config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from d3core.models import dream, llada
from d3core.models.shipped import TINY_AR_DIR, TINY_TEACHER_DIR
from pipelines.distill import DistillConfig
from pipelines.evaluate import EvaluateConfig
from pipelines.trajectories import TrajectoriesConfig
from serve_apps.config import ServeConfig, preset_config

# Fields set once per recipe and copied into every stage that has them.
SHARED = ("teacher", "ar_model", "prompts", "trust_remote_code", "gen_length", "block_length")
LLADA_8B, DREAM_7B = llada.OFFICIAL_REPO, dream.OFFICIAL_REPO
AR_8B = "Qwen/Qwen2.5-7B-Instruct"
TINY_DISTILL_STEPS = 350  # the main job's distillation length on the tiny preset (docs/benchmarks.md)


@dataclass(frozen=True)
class Recipe:
    """Every setting of a run of the main job, by stage (locations excepted)."""

    preset: str  # the recipe's name: tiny, llada-8b or dream-7b
    teacher: str  # the dLLM teacher: decodes the trajectories, starts the student, is evaluated beside it
    ar_model: str | None  # the AR baseline evaluated beside them (an HF causal LM); None: no AR baseline
    prompts: str | None  # JSONL/Parquet of id, prompt, answer, task for the trajectories; None: synthetic split
    trust_remote_code: bool  # let tokenizers defined by a checkpoint's own Python code run (Dream needs it)
    gen_length: int  # generation slots: trajectories, evaluation and serving decode this many
    block_length: int  # block size of the semi-autoregressive decoders (divides gen_length)
    trajectories: TrajectoriesConfig  # teacher trajectories on Ray Data
    distill: DistillConfig  # the student on Ray Train (FSDP2)
    evaluate: EvaluateConfig  # accuracy-vs-parallelism sweeps and AUP
    serve: ServeConfig  # the OpenAI-compatible Ray Serve app (full.py --serve deploys the student with it)

    def __post_init__(self) -> None:
        if self.preset not in RECIPES:
            raise ValueError(f"preset={self.preset!r}: must be one of {sorted(RECIPES)}")
        for stage, name, value in self._stage_values():
            want = getattr(self, name)
            if value != want:
                raise ValueError(f"{stage}.{name}={value!r} but the recipe's {name}={want!r}: {name} is one setting "
                                 f"shared by every stage; set it at the top level (--{name.replace('_', '-')})")
        largest = max(self.distill.window_sizes)
        if largest > self.gen_length:
            raise ValueError(f"distill.window_sizes={list(self.distill.window_sizes)} exceed gen_length="
                             f"{self.gen_length}: a window covers at most the whole response; lower them")

    def _stage_values(self):
        t, e, s = self.trajectories, self.evaluate, self.serve
        yield "trajectories", "teacher", t.teacher
        yield "trajectories", "prompts", t.prompts
        yield "trajectories", "trust_remote_code", t.trust_remote_code
        yield "trajectories", "gen_length", t.gen_length
        yield "trajectories", "block_length", t.block_length
        yield "distill", "trust_remote_code", self.distill.trust_remote_code
        yield "evaluate", "teacher", e.models.get("teacher")
        yield "evaluate", "ar_model", e.ar_model
        yield "evaluate", "trust_remote_code", e.trust_remote_code
        yield "evaluate", "gen_length", e.gen_length
        yield "evaluate", "block_length", e.block_length
        yield "serve", "trust_remote_code", s.trust_remote_code
        for name in ("gen_length", "block_length"):
            if name in s.sampler_params:
                yield "serve", name, s.sampler_params[name]

    def with_shared(self, **changes) -> "Recipe":
        """This recipe with shared fields changed in every stage that has them."""
        unknown = sorted(set(changes) - set(SHARED))
        if unknown:
            raise ValueError(f"with_shared({unknown}): only {SHARED} are shared; replace a stage's config instead")
        values = {name: changes.get(name, getattr(self, name)) for name in SHARED}
        stages = {name: getattr(self, name) for name in STAGE_FIELDS}
        return dataclasses.replace(self, **changes, **bound_stages(stages, values))


STAGE_FIELDS = ("trajectories", "distill", "evaluate", "serve")


def bound_stages(stages: dict, values: dict) -> dict:
    """The stage configs ``stages`` with the shared ``values`` copied in."""
    shape = {"gen_length": values["gen_length"], "block_length": values["block_length"]}
    trc = values["trust_remote_code"]
    ev, sv = stages["evaluate"], stages["serve"]
    serve_params = dict(sv.sampler_params)
    serve_params.update({k: v for k, v in shape.items() if k in serve_params})
    return dict(
        trajectories=dataclasses.replace(stages["trajectories"], teacher=values["teacher"], prompts=values["prompts"],
                                         trust_remote_code=trc, **shape),
        distill=dataclasses.replace(stages["distill"], trust_remote_code=trc),
        evaluate=dataclasses.replace(ev, models={**ev.models, "teacher": values["teacher"]},
                                     ar_model=values["ar_model"], trust_remote_code=trc, **shape),
        serve=dataclasses.replace(sv, trust_remote_code=trc, sampler_params=serve_params))


def build(values: dict) -> Recipe:
    """A Recipe from field values whose stage configs may disagree with the shared fields: the shared win."""
    shared = {name: values[name] for name in SHARED}
    stages = bound_stages({name: values[name] for name in STAGE_FIELDS}, shared)
    return Recipe(preset=values["preset"], **shared, **stages)


# -- the recipes -------------------------------------------------------------------------------------
def tiny() -> Recipe:
    """The embedded default: the shipped ~1M-parameter teacher and AR model on 2 CPU cores (~10 minutes).

    The stage classes' defaults *are* this recipe (measured on 2 cores: docs/benchmarks.md), but for
    the 350 distillation steps of the main job and of ``distill.py --preset tiny`` (3.9 epochs of the
    ~2910 correct rows of 3000 prompts). ``DistillConfig()`` itself trains 5 epochs of whatever rows it
    is given; on the command line that is ``--max-steps None``.
    """
    return Recipe(preset="tiny", teacher=str(TINY_TEACHER_DIR), ar_model=str(TINY_AR_DIR), prompts=None,
                  trust_remote_code=False, gen_length=48, block_length=16, trajectories=TrajectoriesConfig(),
                  distill=DistillConfig(max_steps=TINY_DISTILL_STEPS), evaluate=EvaluateConfig(),
                  serve=preset_config("tiny"))


def llada_8b() -> Recipe:
    """LLaDA-8B-Instruct on GPUs with d3LLM's settings (256 new tokens, block 32, the five leaderboard tasks).

    One teacher replica per GPU for trajectories, 8 FSDP2 workers, one GPU per evaluation cell,
    bf16 replicas for serving. ``prompts`` has no default: d3ray ships test sets only.
    """
    shape = dict(gen_length=256, block_length=32)
    tasks = ("gsm8k", "math500", "mbpp", "humaneval", "long_gsm8k")
    return Recipe(
        preset="llada-8b", teacher=LLADA_8B, ar_model=AR_8B, prompts=None, trust_remote_code=False, **shape,
        trajectories=TrajectoriesConfig(teacher=LLADA_8B, n_prompts=None, num_actors=8, num_cpus_per_actor=4.0,
                                        num_gpus_per_actor=1.0, batch_size=16, **shape),
        distill=DistillConfig(num_workers=8, use_gpu=True, threads_per_worker=8, batch_size=64, epochs=3, lr=2e-5,
                              warmup_steps=50, window_sizes=(32, 64), mask_ratio_max=0.8, ckpt_every=200,
                              entropy_weight=2.0, export_dtype="bfloat16"),
        evaluate=EvaluateConfig(
            models={"teacher": LLADA_8B}, ar_model=AR_8B, tasks=tasks, n=0, batch_size=16,
            num_cpus_per_cell=4.0, num_gpus_per_cell=1.0,
            sweeps={"vanilla": (), "fast_dllm.confidence_threshold": (0.95, 0.9, 0.8, 0.7),
                    "dparallel.entropy_threshold": (0.3, 0.4, 0.5, 0.6),
                    "d3llm.entropy_threshold": (0.3, 0.4, 0.5, 0.6)}, **shape),
        serve=preset_config("llada-8b"))


def dream_7b() -> Recipe:
    """Dream-v0-Instruct-7B: the llada-8b recipe with Dream's teacher, sweep and cache delay.

    Dream's tokenizer is code shipped with the checkpoint, so a run needs ``--trust-remote-code``
    (off by default, as in transformers and vLLM).
    """
    base = llada_8b()
    ev = base.evaluate
    sweeps = {**ev.sweeps, "dparallel.entropy_threshold": (0.3, 0.4, 0.45, 0.5),
              "d3llm.entropy_threshold": (0.3, 0.4, 0.45, 0.5)}
    params = {**ev.sampler_params, "d3llm": {**ev.sampler_params.get("d3llm", {}), "cache_delay_iter": 1}}
    recipe = dataclasses.replace(base, preset="dream-7b", serve=preset_config("dream-7b"),
                                 evaluate=dataclasses.replace(ev, sweeps=sweeps, sampler_params=params))
    return recipe.with_shared(teacher=DREAM_7B)


RECIPES: dict[str, Callable[[], Recipe]] = {"tiny": tiny, "llada-8b": llada_8b, "dream-7b": dream_7b}


def get_recipe(preset: str) -> Recipe:
    if preset not in RECIPES:
        raise ValueError(f"preset={preset!r}: must be one of {sorted(RECIPES)}")
    return RECIPES[preset]()
