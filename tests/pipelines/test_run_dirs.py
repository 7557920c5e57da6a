"""Run directories you can trust (issue 18): each measured way of mixing, misreading or accepting bad input,
refused before any cluster work. In-process (no Ray): trajectories are decoded by the tiny teacher directly."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import pytest

from d3core import trajectory as T
from d3core.models.shipped import TINY_TEACHER_DIR, load_tiny_teacher, load_tiny_tokenizer
from pipelines import _cli, cli
from pipelines import distill as D
from pipelines import evaluate as E
from pipelines import fingerprint as F
from pipelines import full
from pipelines import trajectories as P
from pipelines.recipes import get_recipe, tiny
from trajectory_sets import write_set

TEACHER = str(TINY_TEACHER_DIR)
GEN = 16


def traj_cfg(out, **kw) -> P.TrajectoriesConfig:
    return P.TrajectoriesConfig(out=str(out), **{"n_prompts": 12, "shard_size": 4, "gen_length": GEN,
                                                  "block_length": GEN, **kw})


def decode_in_process(cfg: P.TrajectoriesConfig) -> dict:
    """What trajectories.run writes, decoded here without Ray (same prepare, writers and manifest)."""
    _, fp, shards, vocab = P.prepare(cfg)
    model, tok, digest, done = load_tiny_teacher(), load_tiny_tokenizer(), F.digest(fp), {}
    for s in shards:
        rows = P.decode_prompts(model, tok, cfg, s["ids"], s["prompt_ids"], s["answers"], cfg.teacher, s["task"])
        P.write_shard(cfg, s["shard"], T.to_table(rows), digest)
        done[s["shard"]] = len(rows)
    P.write_manifest(cfg, shards, done, {}, fp, vocab)
    return T.read_manifest(cfg.out)


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    """A finished 12-prompt trajectories output (3 shards); tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("decoded") / "traj"
    decode_in_process(traj_cfg(out))
    return out


def copy_of(decoded, tmp_path) -> Path:
    target = tmp_path / "traj"
    shutil.copytree(decoded, target)
    return target


def changed_teacher(tmp_path) -> str:
    """A copy of the tiny teacher with one weight byte changed: another teacher, same config and shapes."""
    target = tmp_path / "teacher-b"
    shutil.copytree(TINY_TEACHER_DIR, target)
    weights = target / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    return str(target)


# -- trajectories reruns ----------------------------------------------------------------------------
def test_a_rerun_with_other_settings_refuses_and_names_the_fields(decoded, tmp_path):
    out = copy_of(decoded, tmp_path)
    cfg = traj_cfg(out)
    for change, field in [({"seed": 1}, "decode.seed: 0 -> 1"), ({"gen_length": 32, "block_length": 16},
                                                                  "decode.gen_length: 16 -> 32"),
                          ({"n_prompts": 8}, "prompts.count: 12 -> 8"),
                          ({"teacher": changed_teacher(tmp_path)}, "teacher.content_sha256")]:
        with pytest.raises(F.OutputMismatch, match=field) as err:
            P.prepare(dataclasses.replace(cfg, **change))
        assert "--out NEW" in str(err.value) and "--overwrite trajectories" in str(err.value)
    P.prepare(cfg)  # the same settings resume
    moved = tmp_path / "teacher-copy"
    shutil.copytree(TINY_TEACHER_DIR, moved)  # the same teacher elsewhere is the same teacher
    assert F.checkpoint_identity(str(moved)) == F.checkpoint_identity(TEACHER)


def test_fewer_prompts_with_overwrite_leave_only_the_files_the_manifest_lists(decoded, tmp_path):
    out = copy_of(decoded, tmp_path)
    smaller = traj_cfg(out, n_prompts=4)
    with pytest.raises(F.OutputMismatch):
        P.prepare(smaller)
    P.prepare(smaller, overwrite=True)
    assert not out.exists()  # cleared, then decoded anew
    manifest = decode_in_process(smaller)
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(manifest["shards"]) == ["shard-00000.parquet"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"also holds files trajectories never writes \(\['notes.txt'\]\)"):
        P.prepare(traj_cfg(out), overwrite=True)
    assert (out / "notes.txt").exists()


def test_shards_without_a_manifest_are_adopted_only_when_they_carry_this_runs_fingerprint(decoded, tmp_path):
    out = copy_of(decoded, tmp_path)
    (out / T.MANIFEST).unlink()
    P.prepare(traj_cfg(out))  # same fingerprint in every shard: resumable
    with pytest.raises(F.OutputMismatch, match="shard file"):
        P.prepare(traj_cfg(out, seed=3))


def test_shards_that_do_not_match_the_decode_are_redone_not_kept(decoded, tmp_path):
    out = copy_of(decoded, tmp_path)
    cfg = traj_cfg(out)
    _, fp, shards, vocab = P.prepare(cfg)
    digest, expected = F.digest(fp), P.expected_rows(cfg, vocab)
    assert P.complete_shards(cfg, shards, digest, expected) == {0: 4, 1: 4, 2: 4}
    table = T.read_shard(str(out), str(out / "shard-00000.parquet"))
    rows = table.to_pylist()
    bad_vocab = [{**r, "response_ids": [vocab + 5] * GEN} if i == 0 else r for i, r in enumerate(rows)]
    P.write_shard(cfg, 0, T.to_table([T.TrajectoryRow(**r) for r in bad_vocab]), digest)
    foreign = [{**r, "teacher": "someone/else"} for r in T.read_shard(str(out), str(out / "shard-00001.parquet"))
               .to_pylist()]
    P.write_shard(cfg, 1, T.to_table([T.TrajectoryRow(**r) for r in foreign]), digest)
    (out / ".tmp-99-shard-00002.parquet").write_bytes(b"half a file")
    assert P.complete_shards(cfg, shards, digest, expected) == {2: 4}  # 0 and 1 are decoded again
    P.prepare(cfg)
    assert not list(out.glob(".tmp-*"))  # a crashed writer's temporary file is removed, never read


def test_a_malformed_prompt_file_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "prompt": "p", "answer": "1", "task": "gsm8k"}\n{"id": "b", "prompt": \n')
    with pytest.raises(ValueError, match=r"prompts.jsonl line 2: not valid JSON"):
        P.load_prompts(P.TrajectoriesConfig(prompts=str(path), n_prompts=5))
    with pytest.raises(ValueError, match="no such file"):
        P.load_prompts(P.TrajectoriesConfig(prompts=str(tmp_path / "nope.jsonl"), n_prompts=5))


def test_an_output_that_is_a_file_is_refused_before_any_work(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="out=.* is a file"):
        P.run(traj_cfg(path))
    with pytest.raises(ValueError, match="out=.* is a file"):
        E.run_evaluation(E.EvaluateConfig(out=str(path), n=2))
    with pytest.raises(ValueError, match="run_dir=.* is a file"):
        full.run(full.FullConfig(run_dir=str(path)))


# -- distillation reads the manifest, exactly ---------------------------------------------------------
def random_rows(n: int, vocab: int, seed: int = 0, gen: int = GEN) -> list[T.TrajectoryRow]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        steps = list(range(gen))
        rng.shuffle(steps)
        rows.append(T.TrajectoryRow(id=f"r{i:03d}", prompt_ids=[rng.randrange(10, vocab) for _ in range(5)],
                                    response_ids=[rng.randrange(10, vocab) for _ in range(gen)], unmask_step=steps,
                                    is_correct=True, attempts=1, temperature=0.0, teacher="", sampler="",
                                    sampler_params=""))
    return rows


def distill_cfg(tmp_path, **kw) -> D.DistillConfig:
    return D.DistillConfig(trajectories=str(tmp_path / "traj"), out=str(tmp_path / "student"),
                           **{"batch_size": 8, "window_sizes": (8,), **kw})


def vocab() -> int:
    from d3core.models.checkpoint import load_config

    return load_config(TEACHER).vocab_size


def test_distill_refuses_an_interrupted_set(tmp_path):
    write_set(str(tmp_path / "traj"), random_rows(24, vocab()), TEACHER, GEN, shard_size=4, complete=2)
    with pytest.raises(ValueError, match=r"incomplete: 2 of 6 shards done, missing \['shard-00002.parquet'"):
        D.prepare(distill_cfg(tmp_path))


def test_distill_refuses_listed_shards_that_are_gone_and_files_the_manifest_does_not_list(tmp_path):
    write_set(str(tmp_path / "traj"), random_rows(24, vocab()), TEACHER, GEN, shard_size=4)
    traj = tmp_path / "traj"
    (traj / ".tmp-7-shard-00009.parquet").write_bytes(b"never read")
    plan = D.prepare(distill_cfg(tmp_path))  # temporary files are not shards: never listed, never read
    assert plan.data.table.num_rows == 24
    shutil.copy(traj / "shard-00000.parquet", traj / "shard-00006.parquet")
    with pytest.raises(ValueError, match=r"shard files the manifest does not list: \['shard-00006.parquet'\]"):
        D.prepare(distill_cfg(tmp_path))
    (traj / "shard-00006.parquet").unlink()
    (traj / "shard-00001.parquet").unlink()
    with pytest.raises(ValueError, match=r"lists shards that are not there: \['shard-00001.parquet'\]"):
        D.prepare(distill_cfg(tmp_path))


@pytest.mark.parametrize("change, message", [
    (lambda r, v: {"response_ids": [v] * GEN}, r"response_ids of rows \['r000'\] hold ids in \[\d+, \d+\], "
                                                r"outside the teacher's vocabulary"),
    (lambda r, v: {"prompt_ids": [-3, *r.prompt_ids[1:]]}, r"prompt_ids of rows \['r000'\] hold ids in \[-3,"),
    (lambda r, v: {"unmask_step": [9999] * GEN}, r"unmask_step of rows \['r000'\] lie in \[0, 9999\]; the "
                                                 r"teacher's decode made 16 forward passes"),
])
def test_distill_validates_every_row_before_ray_starts(tmp_path, change, message):
    rows = random_rows(16, vocab())
    rows[0] = dataclasses.replace(rows[0], **change(rows[0], vocab()))
    write_set(str(tmp_path / "traj"), rows, TEACHER, GEN, shard_size=8)
    with pytest.raises(T.TrajectoryFormatError, match=message):
        D.prepare(distill_cfg(tmp_path))
    assert not (tmp_path / "_train").exists() and not (tmp_path / "student").exists()


def test_distill_bad_values_fail_before_ray(tmp_path):
    write_set(str(tmp_path / "traj"), random_rows(16, vocab()), TEACHER, GEN)
    with pytest.raises(ValueError, match=r"init='MISSING': no checkpoint there"):
        D.prepare(distill_cfg(tmp_path, init="MISSING"))
    with pytest.raises(ValueError, match=r"window_sizes=\[32\]: the trajectories have gen_length=16"):
        D.prepare(distill_cfg(tmp_path, window_sizes=(32,)))
    for argv, message in [(["--epochs", "-1"], "epochs=-1: must be >= 1"),
                          (["--window-sizes", "0"], r"window_sizes=\(0,\)"),
                          (["--mask-ratio-max", "1.5"], "mask_ratio_max=1.5"),
                          (["--warmup-steps", "-1"], "warmup_steps=-1")]:
        with pytest.raises(ValueError, match=message):
            cli.parse_distill(argv)


def test_a_student_of_other_trajectories_is_refused_not_kept(tmp_path):
    """full.py --n-prompts 90 after 60 kept the 60-prompt student: its fingerprint now names the difference."""
    write_set(str(tmp_path / "traj"), random_rows(16, vocab(), seed=1), TEACHER, GEN)
    cfg = distill_cfg(tmp_path)
    plan = D.prepare(cfg)
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / D.SUMMARY).write_text(json.dumps({"fingerprint": plan.fingerprint, "steps": 2}))
    assert D.claim(cfg, plan, overwrite=False)["steps"] == 2  # the same inputs: the export is reused
    shutil.rmtree(tmp_path / "traj")
    write_set(str(tmp_path / "traj"), random_rows(24, vocab(), seed=1), TEACHER, GEN)  # more prompts
    with pytest.raises(F.OutputMismatch, match=r"trajectories.prompts.count: 16 -> 24") as err:
        D.claim(cfg, D.prepare(cfg), overwrite=False)
    assert "--overwrite distill" in str(err.value)
    with pytest.raises(F.OutputMismatch, match=r"settings.lr: 0.0002 -> 0.001"):
        D.claim(dataclasses.replace(cfg, lr=1e-3), D.prepare(dataclasses.replace(cfg, lr=1e-3)), overwrite=False)
    assert D.claim(cfg, D.prepare(cfg), overwrite=True) is None and not (tmp_path / "student").exists()


# -- evaluation -----------------------------------------------------------------------------------
def test_evaluate_refuses_a_missing_model_and_another_evaluations_output(tmp_path):
    with pytest.raises(ValueError, match=r"model x=MISSING: checkpoint 'MISSING': no config.json"):
        E.prepare(E.EvaluateConfig(models={"x": "MISSING"}, out=str(tmp_path / "eval")))
    cfg = E.EvaluateConfig(out=str(tmp_path / "eval"), n=8)
    ids = E.prepare(cfg)
    with pytest.raises(F.OutputMismatch, match=r"settings.n: 8 -> 9"):
        E.prepare(dataclasses.replace(cfg, n=9))
    E.prepare(dataclasses.replace(cfg, n=9), overwrite=True)
    # a checkpoint whose content changed gets new cells (its identity is part of every key)
    other = {uri: "another" for uri in ids}
    assert {c.key(cfg) for c in E.plan_cells(cfg, ids)}.isdisjoint(c.key(cfg) for c in E.plan_cells(cfg, other))


# -- the config layer -----------------------------------------------------------------------------
def test_no_sentinels_every_value_means_itself():
    assert D.DistillConfig(warmup_steps=0).warmup_steps == 0  # the two confirmed bugs, verbatim
    llada = get_recipe("llada-8b")  # a stage config from a recipe: the recipe's, with exactly the fields given
    assert dataclasses.replace(llada.trajectories, num_gpus_per_actor=0.0).num_gpus_per_actor == 0.0
    assert dataclasses.replace(llada.distill, warmup_steps=0).warmup_steps == 0
    assert dataclasses.replace(llada.trajectories, num_gpus_per_actor=0.0).num_actors == 8  # the rest is the recipe's
    assert dataclasses.replace(llada.trajectories, num_gpus_per_actor=0.0).num_gpus_per_actor == 0.0
    cfg, _ = cli.parse_trajectories(["--preset", "llada-8b", "--num-gpus-per-actor", "0", "--prompts", "p.jsonl"])
    assert cfg.num_gpus_per_actor == 0.0 and cfg.num_actors == 8  # the rest is the preset's
    assert cli.parse_distill(["--warmup-steps", "0"])[0].warmup_steps == 0
    for argv, message in [(["--num-actors", "-1"], "num_actors=-1: must be >= 1"),
                          (["--num-actors", "0"], "num_actors=0: must be >= 1")]:
        with pytest.raises(ValueError, match=message):
            cli.parse_trajectories(argv)


def test_one_recipe_is_the_single_source_of_every_stages_defaults():
    r = tiny()
    assert (r.trajectories, r.evaluate) == (P.TrajectoriesConfig(), E.EvaluateConfig())
    assert r.distill == D.DistillConfig(max_steps=350)  # the main job's 350 steps; else the class defaults
    from serve_apps.config import ServeConfig

    for preset in ("tiny", "llada-8b", "dream-7b"):
        recipe = get_recipe(preset)
        assert ServeConfig.from_preset(preset) == dataclasses.replace(recipe.serve, preset=preset)
        assert recipe.trajectories.gen_length == recipe.evaluate.gen_length == recipe.serve.sampler_params[
            "gen_length"] == recipe.gen_length
        assert recipe.trajectories.teacher == recipe.evaluate.models["teacher"] == recipe.teacher
    wider = get_recipe("llada-8b").with_shared(gen_length=512, teacher="x/y")
    assert wider.trajectories.gen_length == wider.evaluate.gen_length == 512 and wider.trajectories.teacher == "x/y"
    with pytest.raises(ValueError, match=r"trajectories.gen_length=64 but the recipe's gen_length=48"):
        dataclasses.replace(r, trajectories=dataclasses.replace(r.trajectories, gen_length=64))


def test_every_config_field_has_help_text():
    from pipelines.recipes import Recipe
    from serve_apps.config import ServeConfig

    for cls in (P.TrajectoriesConfig, D.DistillConfig, E.EvaluateConfig, full.FullConfig, Recipe, ServeConfig):
        missing = [f.name for f in dataclasses.fields(cls) if not _cli._help(cls, f.name)]
        assert not missing, f"{cls.__name__} fields without help text: {missing}"


def test_sweeps_and_sampler_params_including_the_cache_are_reachable_from_full(tmp_path):
    cfg = full.parse_args(["--sweeps", "fast_dllm.confidence_threshold=0.9", "d3llm=0.3,0.5", "vanilla",
                           "--param", "d3llm.cache_delay_iter=1", "--evaluate.sampler-params", "fast_dllm.cache=prefix",
                           "--distill-steps", "2", "--n-prompts", "90", "--n-eval", "8"])
    ev = cfg.recipe.evaluate
    assert ev.sweeps == {"fast_dllm.confidence_threshold": (0.9,), "d3llm.entropy_threshold": (0.3, 0.5),
                         "vanilla": ()}
    assert ev.sampler_params == {"d3llm": {"cache_delay_iter": 1}, "fast_dllm": {"cache": "prefix"}}
    assert (cfg.recipe.distill.max_steps, cfg.recipe.trajectories.n_prompts, ev.n) == (2, 90, 8)
    for bad, message in [("nope=0.5", "sweepable samplers"), ("fast_dllm=1.5", "must lie in"),
                         ("d3llm.confidence_threshold=0.5", "d3llm sweeps its entropy_threshold")]:
        with pytest.raises(ValueError, match=message):
            full.parse_args(["--sweeps", bad])


def test_the_saved_recipe_repeats_the_run(tmp_path):
    cfg = full.parse_args(["--gen-length", "32", "--block-length", "16", "--trajectories.seed", "3",
                           "--distill.lr", "1e-4", "--run-dir", str(tmp_path / "run"), "--distill.window-sizes", "16"])
    assert cfg.recipe.trajectories.gen_length == cfg.recipe.evaluate.gen_length == 32
    path = tmp_path / "recipe.yaml"
    path.write_text(_cli.to_yaml(cfg.bound()))
    again = full.parse_args(["--config", str(path), "--run-dir", str(tmp_path / "run")])
    assert again.bound() == cfg.bound()
    again2 = full.parse_args(["--config", str(path), "--trajectories.seed", "4"])
    assert again2.recipe.trajectories.seed == 4 and again2.recipe.distill.lr == 1e-4  # flags apply over the file
    path.write_text("distill: {lr: 2.0}\n")
    with pytest.raises(ValueError, match=r"lr=2.0: must lie in \(0, 1\)"):
        full.parse_args(["--config", str(path)])
    path.write_text("distill: {no_such_field: 1}\n")
    with pytest.raises(ValueError, match=r"distill: unknown field\(s\) \['no_such_field'\]"):
        full.parse_args(["--config", str(path)])


def test_overwrite_redoes_the_stage_and_everything_downstream():
    assert full.FullConfig(overwrite=("trajectories",)).redo() == {"trajectories", "distill", "evaluate"}
    assert full.FullConfig(overwrite=("distill",)).redo() == {"distill", "evaluate"}
    assert full.parse_args(["--overwrite", "evaluate"]).redo() == {"evaluate"}
    with pytest.raises(ValueError, match="unknown stage"):
        full.FullConfig(overwrite=("distil",))
    with pytest.raises(ValueError, match="both skipped and overwritten"):
        full.FullConfig(overwrite=("distill",), skip=("distill",))


def test_damaged_records_are_named_not_a_traceback(decoded, tmp_path):
    out = copy_of(decoded, tmp_path)
    (out / T.MANIFEST).write_text('{"schema_version": 1, "fingerp')
    with pytest.raises(T.TrajectoryFormatError, match=r"manifest.json: not valid JSON .*--overwrite"):
        P.prepare(traj_cfg(out))
    P.prepare(traj_cfg(out), overwrite=True)  # the way out it names works
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / D.SUMMARY).write_text("{")
    with pytest.raises(ValueError, match=r"distill_summary.json: not valid JSON"):
        D.read_summary(str(tmp_path / "student"))


def test_a_run_dirs_recipe_configures_every_stage_cli(tmp_path):
    cfg = full.parse_args(["--trajectories.seed", "7", "--distill.lr", "1e-4", "--n-eval", "5", "--run-dir",
                           str(tmp_path / "run")])
    path = tmp_path / "recipe.yaml"
    path.write_text(_cli.to_yaml(cfg.bound()))
    assert cli.parse_trajectories(["--config", str(path)])[0] == cfg.bound().trajectories
    assert cli.parse_distill(["--config", str(path)])[0] == cfg.bound().distill
    assert cli.parse_evaluate(["--config", str(path)])[0] == cfg.bound().evaluate
