"""Teacher trajectories on local Ray Data: rows equal in-process decoding, resumable, any fsspec URI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from d3core import trajectory as T
from d3core.models.shipped import load_tiny_teacher, load_tiny_tokenizer
from d3core.samplers.vanilla import VanillaParams, generate
from pipelines import cli
from pipelines import trajectories as P

ROOT = Path(__file__).resolve().parents[2]
MASK_ID = load_tiny_tokenizer().mask_token_id


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def check_rows_against_in_process(rows, cfg):
    prompts = P.load_prompts(cfg)
    by_id = {r.id: r for r in rows}
    assert sorted(by_id) == sorted(p["id"] for p in prompts)  # exactly one row per id
    teacher = load_tiny_teacher()
    params = VanillaParams(gen_length=cfg.gen_length, block_length=cfg.block_length)
    reference = generate(teacher, [p["prompt_ids"] for p in prompts], params).sequences
    for p, ref in zip(prompts, reference):
        r = by_id[p["id"]]
        assert r.prompt_ids == p["prompt_ids"]
        assert r.response_ids == ref.tokens and r.unmask_step == ref.unmask_step
        assert T.replay(r, MASK_ID) == r.response_ids
        assert sorted(r.unmask_step) == list(range(cfg.gen_length))  # one slot revealed per step
        assert T.order_is_blockwise(r.unmask_step, cfg.block_length)
        assert MASK_ID not in T.replay(r, MASK_ID, upto=cfg.gen_length - 1)
        assert MASK_ID in T.replay(r, MASK_ID, upto=cfg.gen_length - 2)


@pytest.mark.slow
def test_two_actors_write_rows_equal_to_in_process_decoding(ray_local, tmp_path):
    cfg = P.TrajectoriesConfig(out="file://" + str(tmp_path / "traj"), n_prompts=300, shard_size=50, num_actors=2)
    stats = P.run(cfg)
    assert stats["rows"] == 300 and 0.5 < stats["correct_fraction"] <= 1.0
    rows = T.read_trajectories(cfg.out)
    check_rows_against_in_process(rows, cfg)
    manifest = fsspec.open(cfg.out + "/manifest.json", "r").open().read()
    assert '"complete": true' in manifest
    again = P.run(cfg)  # everything complete: nothing decoded, nothing rewritten
    assert again["rows"] == 0


@pytest.mark.slow
def test_in_memory_filesystem_and_correctness_filter(ray_local):
    cfg = P.TrajectoriesConfig(out="memory://d3ray-traj-test", n_prompts=60, shard_size=30, num_actors=1,
                               filter_correct=True, max_attempts=2)
    P.run(cfg)
    rows = T.read_trajectories(cfg.out)
    assert rows and all(r.is_correct for r in rows)
    assert all(r.attempts in (1, 2) for r in rows)
    assert all(r.temperature == pytest.approx(0.1) for r in rows if r.attempts == 2)
    assert all(r.temperature == 0.0 for r in rows if r.attempts == 1)
    fsspec.filesystem("memory").rm("/d3ray-traj-test", recursive=True)


@pytest.mark.slow
def test_kill_and_rerun_gives_exactly_one_row_per_id(tmp_path):
    out = tmp_path / "traj"
    cmd = [sys.executable, str(ROOT / "pipelines" / "trajectories.py"), "--out", str(out), "--n-prompts", "240",
           "--shard-size", "20", "--num-actors", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("shard-*.parquet"))) < 3:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")}
    assert 3 <= len(first) < 12, "the run should be interrupted part-way"
    subprocess.run(cmd, env=env, check=True, timeout=400, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = T.read_trajectories(str(out))
    ids = [r.id for r in rows]
    assert len(ids) == len(set(ids)) == 240
    for name, mtime in first.items():  # finished shards were not redone
        assert (out / name).stat().st_mtime_ns == mtime
    assert not list(out.glob(".tmp-*"))


def test_a_gpu_request_the_cluster_cannot_meet_is_refused_not_left_hanging(ray_local, tmp_path):
    import time

    if ray_local.cluster_resources().get("GPU", 0) >= 1:
        pytest.skip("this machine has a GPU")
    cfg = P.TrajectoriesConfig(out=str(tmp_path / "traj"), n_prompts=4, shard_size=4, num_gpus_per_actor=1.0)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"num_gpus_per_actor=1 but the Ray cluster has 0 GPU\(s\).*set "
                                         r"num_gpus_per_actor=0"):
        P.run(cfg)
    assert time.perf_counter() - t0 < 60


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="preset='gpt'"):
        cli.parse_trajectories(["--preset", "gpt"])
    with pytest.raises(ValueError, match="max_attempts=0"):
        P.TrajectoriesConfig(max_attempts=0)
    with pytest.raises(ValueError, match="block_length=20 must divide gen_length=48"):
        P.TrajectoriesConfig(block_length=20)


def test_prompt_file_without_ids_is_refused(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "ann has 3 apples . how many apples now ?"}\n')
    with pytest.raises(ValueError, match="record 0 lacks 'id' or 'prompt'"):
        P.load_prompts(P.TrajectoriesConfig(prompts=str(path), n_prompts=5))


def _prompt_file(tmp_path, records):
    import json

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_a_prompt_set_without_a_task_needs_keep_all(tmp_path):
    path = _prompt_file(tmp_path, [{"id": "a", "prompt": "ann has 3 apples . how many now ?", "answer": "3"}])
    with pytest.raises(ValueError, match="no 'task'.*--keep-all"):
        P.load_prompts(P.TrajectoriesConfig(prompts=path, n_prompts=5))
    rows = P.load_prompts(P.TrajectoriesConfig(prompts=path, n_prompts=5, keep_all=True))
    assert [r["task"] for r in rows] == [None] and P.make_scorer(None, ["a"], ["3"]) is None
    with pytest.raises(ValueError, match="keep_all=True with filter_correct=True"):
        P.TrajectoriesConfig(keep_all=True, filter_correct=True)


def test_bad_task_fields_are_refused(tmp_path):
    mixed = _prompt_file(tmp_path, [{"id": "a", "prompt": "p", "answer": "1", "task": "gsm8k"},
                                    {"id": "b", "prompt": "p", "answer": "1", "task": "math500"}])
    with pytest.raises(ValueError, match="one prompt set is one task"):
        P.load_prompts(P.TrajectoriesConfig(prompts=mixed, n_prompts=5))
    unknown = _prompt_file(tmp_path, [{"id": "a", "prompt": "p", "answer": "1", "task": "gsm9k"}])
    with pytest.raises(ValueError, match="'gsm9k' has no scorer"):
        P.load_prompts(P.TrajectoriesConfig(prompts=unknown, n_prompts=5))
    code = _prompt_file(tmp_path, [{"id": "my-own-7", "prompt": "write f", "task": "humaneval"}])
    with pytest.raises(ValueError, match="not humaneval problems"):
        P.load_prompts(P.TrajectoriesConfig(prompts=code, n_prompts=5))
    unanswered = _prompt_file(tmp_path, [{"id": "a", "prompt": "p", "task": "gsm8k"}])
    with pytest.raises(ValueError, match="no 'answer' for the gsm8k scorer"):
        P.load_prompts(P.TrajectoriesConfig(prompts=unanswered, n_prompts=5))


def test_rows_are_judged_by_their_own_tasks_scorer(tmp_path):
    from d3core.eval import benchmarks, synthetic

    text = "She makes 9 * 2 = 18 dollars. The answer is 18. Check: 16 - 3 - 4 = 9 eggs."
    assert not synthetic.score(text, 18)  # the old scorer, the last integer, would drop this row
    assert P.make_scorer("gsm8k", ["g"], ["18"])([text], [0]) == [True]
    assert P.make_scorer("gsm8k", ["g"], ["18"])(["It is 18 or 19."], [0]) == [False]
    assert P.make_scorer("math500", ["m"], ["\\frac{1}{2}"])(["so \\boxed{0.5}"], [0]) == [True]
    he = benchmarks.humaneval()[0]
    code = f"```python\n{he.meta['prompt']}{he.target}\n```"
    assert P.make_scorer("humaneval", [he.id], [""])([code, "```python\nx = 1\n```"], [0, 0]) == [True, False]
    path = _prompt_file(tmp_path, [{"id": he.id, "prompt": he.question, "task": "humaneval"}])
    assert P.load_prompts(P.TrajectoriesConfig(prompts=path, n_prompts=5))[0]["task"] == "humaneval"


def test_decode_prompts_marks_rows_of_an_unscored_set_incorrect():
    cfg = P.TrajectoriesConfig(n_prompts=2, keep_all=True)
    prompts = P.load_prompts(P.TrajectoriesConfig(n_prompts=2))
    teacher, tok = load_tiny_teacher(), load_tiny_tokenizer()
    args = ([p["id"] for p in prompts], [p["prompt_ids"] for p in prompts], [p["answer"] for p in prompts])
    scored = P.decode_prompts(teacher, tok, cfg, *args, teacher_name="tiny", task="synthetic")
    unscored = P.decode_prompts(teacher, tok, cfg, *args, teacher_name="tiny", task=None)
    assert [r.response_ids for r in scored] == [r.response_ids for r in unscored]
    assert any(r.is_correct for r in scored) and not any(r.is_correct for r in unscored)
