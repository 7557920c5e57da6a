"""The code sandbox: every reference solution passes; bad programs fail cleanly, host untouched."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from pathlib import Path

import pytest

from d3core.eval import benchmarks, scoring
from d3core.eval.sandbox import SandboxLimits, pass_at_1, run_program, run_programs
from d3core.eval.tasks import get_task

FAST = SandboxLimits(timeout_s=2.0)


def _fail_tail(results, items):
    return [(e.id, r.status, r.stderr_tail[-300:]) for r, e in zip(results, items) if not r.passed][:3]


def test_all_humaneval_canonical_solutions_pass():
    problems = benchmarks.humaneval()
    assert len(problems) == 164
    programs = [scoring.humaneval_program(e.meta["prompt"], e.meta["test"], e.meta["entry_point"], e.target,
                                          instruct=False) for e in problems]
    results = run_programs(programs, SandboxLimits(timeout_s=20.0), workers=2)
    assert pass_at_1(results) == 1.0, _fail_tail(results, problems)


@pytest.mark.slow
def test_all_mbpp_reference_solutions_pass():
    problems = benchmarks.mbpp()
    assert len(problems) == 500 and problems[0].id == "mbpp/11" and problems[-1].id == "mbpp/510"
    programs = [scoring.mbpp_program(e.target, e.meta["tests"], e.meta["setup"]) for e in problems]
    results = run_programs(programs, SandboxLimits(timeout_s=20.0), workers=2)
    assert pass_at_1(results) == 1.0, _fail_tail(results, problems)


def test_code_tasks_score_reference_answers_as_a_model_writes_them():
    he, mb = get_task("humaneval"), get_task("mbpp")
    he_items, mb_items = he.examples(6), mb.examples(6)
    chat = [f"Sure:\n```python\n{e.meta['prompt']}{e.target}\n```\n" for e in he_items]
    assert he.score(chat, he_items, "chat") == [True] * 6
    assert he.score([e.target for e in he_items], he_items, "raw") == [True] * 6
    assert mb.score([f"{e.target}\n[DONE]" for e in mb_items], mb_items, "chat") == [True] * 6
    wrong = [f"```python\n{e.meta['prompt']}    return None\n```" for e in he_items]
    assert he.score(wrong, he_items, "chat") == [False] * 6


def test_wrong_solution_fails():
    r = run_program("def add(a, b):\n    return a - b\nassert add(2, 2) == 4\n", FAST)
    assert r.status == "failed" and "AssertionError" in r.stderr_tail


def test_infinite_loop_times_out():
    r = run_program("while True:\n    pass\n", SandboxLimits(timeout_s=1.5))
    assert r.status == "timeout" and not r.passed
    assert r.duration_s < 6


def test_early_exit_does_not_count_as_a_pass():
    assert run_program("import sys\nsys.exit(0)\nassert False\n", FAST).status == "failed"
    assert run_program("import os\nos._exit(0)\n", FAST).status == "failed"


def test_socket_is_blocked_and_nothing_reaches_the_host():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []

    def watch():
        for _ in range(20):
            try:
                accepted.append(server.accept())
            except OSError:
                pass

    t = threading.Thread(target=watch)
    t.start()
    try:
        for code in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
                     f"import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n"):
            r = run_program(code, FAST)
            assert r.status == "failed", r.stderr_tail
            assert "Error" in r.stderr_tail
    finally:
        t.join()
        server.close()
    assert accepted == []


def test_writes_outside_the_work_directory_fail_and_leave_no_file(tmp_path):
    target = Path("/tmp") / f"d3ray-escape-{uuid.uuid4().hex}"
    home_target = tmp_path / "escape.txt"
    programs = [
        f"open({str(target)!r}, 'w').write('x')\n",
        f"import _io\n_io.FileIO({str(home_target)!r}, 'w').write(b'x')\n",
        "open('../escape-relative.txt', 'w').write('x')\n",
        f"import os\nos.remove({str(tmp_path / 'keep.txt')!r})\n",
    ]
    (tmp_path / "keep.txt").write_text("host file")
    for code in programs:
        r = run_program(code, FAST)
        assert r.status == "failed", (code, r.stderr_tail)
    assert not target.exists() and not home_target.exists()
    assert (tmp_path / "keep.txt").read_text() == "host file"


def test_writes_inside_the_work_directory_work_and_are_cleaned_up():
    r = run_program("import os\nopen('out.txt', 'w').write('hi')\nassert open('out.txt').read() == 'hi'\n"
                    "print(os.getcwd())\n", FAST)
    assert r.passed, r.stderr_tail
    workdir = r.stdout_tail.strip().splitlines()[0]
    assert workdir.startswith(os.path.realpath("/tmp")) or "d3ray-sandbox-" in workdir
    assert not os.path.exists(workdir)


def test_memory_and_output_limits():
    assert run_program("x = bytearray(2 * 1024 ** 3)\n", SandboxLimits(timeout_s=5, memory_mb=256)).status == "failed"
    flood = run_program("while True:\n    print('y' * 4096)\n", SandboxLimits(timeout_s=5, file_size_mb=1))
    assert flood.status == "failed"


def test_limits_are_validated():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=8)
    with pytest.raises(ValueError, match="workers"):
        run_programs(["pass"], FAST, workers=0)
