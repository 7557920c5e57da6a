"""The code sandbox: isolation, per-sandbox totals, verdicts, every reference solution passes.

These need bubblewrap and user namespaces (the CI machine and this one run as root with both).
"""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import time
from pathlib import Path

import pytest

from d3core.eval import benchmarks, confine, sandbox_fs, seccomp
from d3core.eval.codechecks import humaneval_check, mbpp_check
from d3core.eval.sandbox import (CodeCheck, SandboxLimits, SandboxUnavailable, pass_at_1, run_calls, run_check,
                                 run_checks)
from d3core.eval.tasks import get_task

NAMESPACES = ("user", "pid", "net", "mnt", "ipc", "uts")
FAST = SandboxLimits(cpu_s=2.0, wall_s=20.0)
REPO_FILE = Path(__file__).resolve()
ANSWER_KEY = sandbox_fs.PACKAGE_ROOT / "assets" / "eval" / "humaneval.jsonl.gz"


def _fail_tail(verdicts, items):
    return [(e.id, v.status, v.reason[-300:]) for v, e in zip(verdicts, items) if not v.passed][:3]


def _ns_processes(link: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and os.readlink(f"/proc/{name}/ns/pid") == link:
                found.append(int(name))
        except OSError:
            pass
    return found


def check(source: str, test: str, limits: SandboxLimits = FAST, **kw):
    return run_check(CodeCheck(source=source, test=test, **kw), limits)


# -- reference solutions ------------------------------------------------------------------------------
@pytest.mark.slow
def test_all_humaneval_canonical_solutions_pass():
    problems = benchmarks.humaneval()
    assert len(problems) == 164
    t0 = time.perf_counter()
    verdicts = run_checks([humaneval_check(e, e.target, instruct=False) for e in problems], workers=2)
    assert pass_at_1(verdicts) == 1.0, _fail_tail(verdicts, problems)
    assert all(v.calls > 0 for v in verdicts)  # each test really called the program
    print(f"164 HumanEval references judged in {time.perf_counter() - t0:.1f} s")


@pytest.mark.slow
def test_all_mbpp_reference_solutions_pass():
    problems = benchmarks.mbpp()
    assert len(problems) == 500 and problems[0].id == "mbpp/11" and problems[-1].id == "mbpp/510"
    t0 = time.perf_counter()
    verdicts = run_checks([mbpp_check(e, e.target) for e in problems], workers=2)
    assert pass_at_1(verdicts) == 1.0, _fail_tail(verdicts, problems)
    assert all(v.calls == len(e.meta["tests"]) for v, e in zip(verdicts, problems))
    print(f"500 MBPP references judged in {time.perf_counter() - t0:.1f} s")


def test_code_tasks_score_reference_answers_as_a_model_writes_them():
    he, mb = get_task("humaneval"), get_task("mbpp")
    he_items, mb_items = he.examples(6), mb.examples(6)
    chat = [f"Sure:\n```python\n{e.meta['prompt']}{e.target}\n```\n" for e in he_items]
    assert he.score(chat, he_items, "chat") == [True] * 6
    assert he.score([e.target for e in he_items], he_items, "raw") == [True] * 6
    assert mb.score([f"{e.target}\n[DONE]" for e in mb_items], mb_items, "chat") == [True] * 6
    wrong = [f"```python\n{e.meta['prompt']}    return None\n```" for e in he_items]
    assert he.score(wrong, he_items, "chat") == [False] * 6


def test_builtin_named_solution_and_setup_built_inputs():
    by_id = {e.id: e for e in benchmarks.mbpp()}
    shadow, tree = by_id["mbpp/126"], by_id["mbpp/367"]  # defines `sum`; asserts on trees setup code builds
    assert [v.passed for v in run_checks([mbpp_check(shadow, shadow.target), mbpp_check(tree, tree.target)])] == \
        [True, True]
    wrong_tree = tree.target.replace("return True", "return False", 1)
    assert not run_check(mbpp_check(tree, wrong_tree)).passed


# -- isolation --------------------------------------------------------------------------------------
ISOLATION_PROBE = r'''
import os, signal, time
def probe(unreadable):
    out = {"uid": list(os.getresuid()), "gid": list(os.getresgid()), "groups": os.getgroups(),
           "uid_map": open("/proc/self/uid_map").read().split(),
           "ns": {n: os.readlink(f"/proc/self/ns/{n}") for n in ("user", "pid", "net", "mnt", "ipc", "uts")},
           "read": [], "written": []}
    for path in unreadable:
        try:
            open(path, "rb").read(1)
            out["read"].append(path)
        except OSError:
            pass
    for path in ("/x", "/tmp/x", "/root/x", "/usr/lib/x", "/dev/x", "/proc/x", "/sandbox/ok"):
        try:
            with open(path, "w") as f:
                f.write("x")
            out["written"].append(path)
        except OSError:
            pass
    if os.fork() == 0:  # a double-forked, setsid'd survivor candidate
        os.setsid()
        if os.fork() == 0:
            time.sleep(600)
        os._exit(0)
    time.sleep(0.2)
    out["processes"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    return out
'''


def test_isolation_uid_namespaces_files_and_no_survivors():
    host_ns = {n: os.readlink(f"/proc/self/ns/{n}") for n in NAMESPACES}
    unreadable = [str(REPO_FILE), str(ANSWER_KEY), "/etc/shadow", "/etc/passwd", "/root/.bashrc",
                  str(Path(confine.__file__).resolve())]
    result = run_calls(ISOLATION_PROBE, [("probe", (unreadable,))], FAST)
    assert result.loaded and not result.error, result.error
    seen = result.values[0]
    assert seen["uid"] == [65534] * 3 and seen["gid"] == [65534] * 3 and seen["groups"] == []
    if os.getuid() == 0:  # nobody inside is nobody outside, not root
        assert seen["uid_map"] == ["0", "0", "1", "65534", "65534", "1"]
    assert all(seen["ns"][n] != host_ns[n] for n in NAMESPACES), seen["ns"]
    assert seen["read"] == []
    assert seen["written"] == ["/sandbox/ok"]
    assert len(seen["processes"]) == 4  # pid 1, the program, and its survivor (plus its zombie parent at most)
    deadline = time.monotonic() + 5
    while _ns_processes(seen["ns"]["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ns_processes(seen["ns"]["pid"]) == []  # the setsid'd grandchild died with the namespace


def test_network_is_loopback_only(tmp_path):
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        src = ("import _socket, socket\n"
               "def probe(port):\n"
               "    out = []\n"
               "    for make in (lambda: socket.create_connection(('127.0.0.1', port), timeout=1),\n"
               "                 lambda: _socket.socket().connect(('127.0.0.1', port)),\n"
               "                 lambda: socket.create_connection(('192.0.2.2', 80), timeout=1)):\n"
               "        try:\n"
               "            make()\n"
               "            out.append('connected')\n"
               "        except OSError as e:\n"
               "            out.append(type(e).__name__)\n"
               "    return out\n")
        result = run_calls(src, [("probe", (port,))], FAST)
        assert result.values == [["ConnectionRefusedError", "ConnectionRefusedError", "OSError"]], result
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


# -- limits and verdicts -------------------------------------------------------------------------------
def test_cpu_limit_is_a_total_over_processes_and_is_recorded():
    src = ("import os\nfor _ in range(3):\n    if os.fork() == 0:\n        break\n"
           "def f():\n    while True:\n        pass\n")
    t0 = time.monotonic()
    v = check(src + "while True:\n    pass\n", "assert f() == 1", SandboxLimits(cpu_s=1.5, wall_s=60))
    assert v.status == "timeout" and v.limit == "cpu" and not v.passed
    assert 1.5 <= v.cpu_s < 3.0  # four spinning processes, one budget
    assert time.monotonic() - t0 < 30


def test_wall_clock_backstop_ends_a_sleeper():
    v = check("import time\ndef f():\n    time.sleep(600)\n", "assert f() == 1", SandboxLimits(cpu_s=1, wall_s=2))
    assert v.status == "timeout" and v.limit == "wall" and 2 <= v.wall_s < 10


def test_memory_limit_per_process_and_across_children():
    for cgroups in (True, False):
        single = check("def f():\n    return len(bytearray(2 * 1024 ** 3))\n", "assert f() > 0",
                       SandboxLimits(cpu_s=5, memory_mb=256, cgroups=cgroups))
        assert single.status == "failed" and single.limit == "memory", (cgroups, single)
    children = ("import os, select, time\n"
                "def f():\n"
                "    r, w = os.pipe()\n"
                "    for _ in range(3):\n"
                "        if os.fork() == 0:\n"
                "            block = bytearray(300 * 1024 * 1024)\n"
                "            for i in range(0, len(block), 4096):\n"
                "                block[i] = 1\n"
                "            os.write(w, b'x')\n"
                "            time.sleep(60)\n"
                "    os.close(w)\n"
                "    got, deadline = b'', time.time() + 3\n"
                "    while time.time() < deadline and len(got) < 3:\n"
                "        if not select.select([r], [], [], 0.2)[0]:\n"
                "            continue\n"
                "        chunk = os.read(r, 1)\n"
                "        if not chunk:\n"
                "            break\n"
                "        got += chunk\n"
                "    return len(got)\n")
    for cgroups in (True, False):
        limits = SandboxLimits(cpu_s=10, memory_mb=512, cgroups=cgroups)
        v = check(children, "assert f() == 3", limits)
        assert v.status == "failed" and v.limit == "memory", (cgroups, v)


def test_process_limit_stops_a_fork_bomb():
    src = ("import os, time\n"
           "def f():\n"
           "    made = 0\n"
           "    for _ in range(300):\n"
           "        try:\n"
           "            if os.fork() == 0:\n"
           "                time.sleep(30)\n"
           "                os._exit(0)\n"
           "            made += 1\n"
           "        except OSError:\n"
           "            pass\n"
           "    return made\n")
    for cgroups in (True, False):
        limits = SandboxLimits(cpu_s=10, max_processes=16, cgroups=cgroups)
        result = run_calls(src, [("f", ())], limits)
        assert result.values and result.values[0] < 16, (cgroups, result)
        v = check(src, "assert f() == 300", limits)
        assert v.status == "failed" and v.limit == "processes", (cgroups, v)


def test_output_flood_hits_the_output_cap():
    v = check("def f():\n    while True:\n        print('y' * 4096)\n", "assert f() == 1",
              SandboxLimits(cpu_s=10, output_mb=1))
    assert v.status == "failed" and v.limit == "output" and v.output_tail.endswith("y" * 100), v


# the program picks the exit status or exception text of a real limit; the verdict must not believe it
SPOOFS = {
    "exit_152_as_after_sigxcpu": ("import os\ndef f():\n    os._exit(152)\n", "exit status 152"),
    "sigxcpu_to_itself": ("import os, signal\ndef f():\n    os.kill(os.getpid(), signal.SIGXCPU)\n", "152"),
    "exit_137_as_after_oom_kill": ("import os\ndef f():\n    os._exit(137)\n", "exit status 137"),
    "raise_memory_error": ("def f():\n    raise MemoryError('x')\n", "test: MemoryError: x"),
    "raise_memory_error_at_load": ("raise MemoryError('x')\ndef f():\n    pass\n", "MemoryError: x"),
    "raise_file_too_large": ("def f():\n    raise ValueError('File too large')\n", "test: ValueError: File too large"),
    "raise_efbig": ("import errno, os\ndef f():\n    raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))\n",
                    "File too large"),
    "stdout_grown_to_the_cap": (("import os\ndef f():\n    try:\n        os.ftruncate(1, 1 << 20)\n"
                                 "    except OSError:\n        pass\n    return 1\n"), "AssertionError"),
}


@pytest.mark.parametrize("name", sorted(SPOOFS))
def test_a_program_cannot_choose_which_limit_it_hit(name):
    """A limit is named only from what the harness measured: these are plain failures, with their exit status."""
    source, says = SPOOFS[name]
    for cgroups in (True, False):
        v = check(source, "assert f() == 2", SandboxLimits(cpu_s=2.0, wall_s=20.0, output_mb=1, cgroups=cgroups))
        assert v.status == "failed" and v.limit is None and says in v.reason, (cgroups, v)
        assert v.cpu_s < 1.0, v


def test_output_printed_before_a_failure_or_a_kill_is_kept():
    wrong = check("def f():\n    print('hello')\n    return 1\n", "assert f() == 2")
    assert wrong.status == "failed" and wrong.output_tail == "hello\n", wrong
    crash = check("import os\ndef f():\n    print('hello', end='')\n    os._exit(3)\n", "assert f() == 2")
    assert crash.output_tail == "hello" and crash.reason.endswith("(exit status 3)"), crash
    spin = check("print('loaded')\ndef f():\n    print('hello')\n    while True:\n        pass\n", "assert f() == 2",
                 SandboxLimits(cpu_s=1.0, wall_s=20.0))
    assert spin.limit == "cpu" and spin.output_tail == "loaded\nhello\n", spin
    child = ("import os, subprocess, sys\n"
             "def f():\n"
             "    r, w = os.pipe()\n"
             "    code = f'import os, time; print(\"child\"); os.write({w}, b\"x\"); time.sleep(60)'\n"
             "    subprocess.Popen([sys.executable, '-c', code], pass_fds=(w,))\n"
             "    os.read(r, 1)\n"
             "    return 1\n")
    started = check(child, "assert f() == 2")
    assert started.output_tail == "child\n", started  # its interpreter writes through too (PYTHONUNBUFFERED)


def test_ordinary_programs_run_under_the_system_call_filter():
    """Threads (clone3 refused: glibc falls back to clone), fork, a child interpreter, pipes, loopback sockets."""
    src = ("import os, socket, subprocess, sys, threading\n"
           "def f():\n"
           "    got = []\n"
           "    workers = [threading.Thread(target=got.append, args=(i,)) for i in range(4)]\n"
           "    [w.start() for w in workers]\n"
           "    [w.join() for w in workers]\n"
           "    pid = os.fork()\n"
           "    if pid == 0:\n"
           "        os._exit(5)\n"
           "    forked = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])\n"
           "    child = subprocess.run([sys.executable, '-c', 'print(6 * 7)'], capture_output=True, text=True)\n"
           "    server = socket.create_server(('127.0.0.1', 0))\n"
           "    socket.create_connection(server.getsockname()).sendall(b'ok')\n"
           "    status = open('/proc/self/status').read().split('Seccomp:')[1].split()[0]\n"
           "    return sorted(got), forked, child.stdout.strip(), server.accept()[0].recv(2), status\n")
    result = run_calls(src, [("f", ())], FAST)
    assert result.values == [([0, 1, 2, 3], 5, "42", b"ok", "2")], result
    assert result.confinement.endswith("+seccomp")


def test_without_libseccomp_the_sandbox_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(seccomp, "_library", lambda: (None, "ImportError: No module named 'pyseccomp'"))
    seccomp.program.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="d3core.eval.seccomp"):
            verdicts = [check("def f():\n    return 1\n", "assert f() == 1") for _ in range(2)]
    finally:
        monkeypatch.undo()
        seccomp.program.cache_clear()
    assert all(v.passed and not v.confinement.endswith("+seccomp") for v in verdicts), verdicts
    warned = [r for r in caplog.records if r.name == "d3core.eval.seccomp"]
    assert len(warned) == 1 and "NO system-call filter" in warned[0].getMessage() and "pip install pyseccomp" in \
        warned[0].getMessage()


def test_confine_and_sandbox_import_one_way():
    """sandbox -> confine -> sandbox_fs, accounting, seccomp: nothing below sandbox imports it back."""
    for module in ("confine", "sandbox_fs", "accounting", "seccomp", "wire", "_launch"):
        imported = set()
        for node in ast.walk(ast.parse((sandbox_fs.PACKAGE_ROOT / "eval" / f"{module}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        assert "d3core.eval.sandbox" not in imported, (module, sorted(imported))


def test_load_errors_and_wrong_answers_are_failures_with_reasons():
    assert check("def f(:\n", "assert f() == 1").reason.startswith("load: the candidate's module raised SyntaxError")
    wrong = check("def add(a, b):\n    return a - b\n", "assert add(2, 2) == 4")
    assert wrong.status == "failed" and wrong.limit is None and "AssertionError" in wrong.reason
    ok = check("def add(a, b):\n    return a + b\n", "assert add(2, 2) == 4\nassert add(0.1, 0.2) != 0.3")
    assert ok.passed and ok.calls == 2 and ok.confinement.startswith("bwrap")


def test_limits_are_validated():
    with pytest.raises(ValueError, match="cpu_s"):
        SandboxLimits(cpu_s=0)
    with pytest.raises(ValueError, match="wall_s=1 < cpu_s=5"):
        SandboxLimits(cpu_s=5, wall_s=1)
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=8)
    with pytest.raises(ValueError, match="uid=0"):
        SandboxLimits(uid=0)
    with pytest.raises(ValueError, match="workers"):
        run_checks([CodeCheck("pass", "pass")], FAST, workers=0)
    with pytest.raises(ValueError, match="check_function"):
        CodeCheck("pass", "pass", check_function="check")


def test_refuses_without_namespaces_unless_the_risk_is_accepted(monkeypatch):
    monkeypatch.delenv(confine.OPT_IN_ENV, raising=False)
    broken = SandboxLimits(cpu_s=2, bwrap="/bin/false")
    with pytest.raises(SandboxUnavailable, match=confine.OPT_IN_ENV):
        run_check(CodeCheck("def f():\n    return 1\n", "assert f() == 1"), broken)
    accepted = SandboxLimits(cpu_s=2, bwrap="/bin/false", allow_unsandboxed=True)
    v = run_check(CodeCheck("def f():\n    return 1\n", "assert f() == 1"), accepted)
    assert v.passed and v.confinement.startswith("unsandboxed")
    assert not run_check(CodeCheck("def f():\n    return 2\n", "assert f() == 1"), accepted).passed
    monkeypatch.setenv(confine.OPT_IN_ENV, "1")
    assert run_check(CodeCheck("def f():\n    return 1\n", "assert f() == 1"), broken).passed


SYSTEM_PYTHON = "/usr/bin/python3"
AS_NOBODY = """
from d3core.eval.sandbox import CodeCheck, SandboxLimits, run_calls, run_check
from d3core.eval import seccomp
ok = run_check(CodeCheck("def f(x):\\n    return x + 1\\n", "assert f(1) == 2"))
bad = run_check(CodeCheck("def f(x):\\n    return x\\n", "assert f(1) == 2"))
spin = run_check(CodeCheck("def f():\\n    while True:\\n        pass\\n", "assert f()"), SandboxLimits(cpu_s=1))
seen = run_calls("import os\\ndef f():\\n    return list(os.getresuid()), open('/etc/passwd').read()\\n", [("f", ())])
keys = run_calls("import ctypes\\ndef f(n):\\n    libc = ctypes.CDLL(None, use_errno=True)\\n"
                 "    return libc.syscall(n, 0, 0, 0, 0, 0), ctypes.get_errno()\\n",
                 [("f", (seccomp.number("add_key"),))])
print(ok.passed, ok.confinement, bad.passed, spin.limit, seen.values, type(seen.raised[0]).__name__,
      keys.values == [(-1, seccomp.REFUSED)])
"""


@pytest.mark.skipif(os.getuid() != 0 or not os.path.exists(SYSTEM_PYTHON), reason="needs root to become nobody, and "
                    "a system Python nobody can run")
def test_an_unprivileged_caller_gets_the_same_sandbox():
    """bubblewrap's own user namespace (``bwrap-user``): what a non-root user on a laptop gets."""
    import pyseccomp

    repo, bindings = str(sandbox_fs.PACKAGE_ROOT.parent), str(Path(pyseccomp.__file__).parent)
    bwrap = sandbox_fs.bwrap_path(SandboxLimits().bwrap)
    if not sandbox_fs.reachable_by_others([repo, bwrap, SYSTEM_PYTHON, bindings]):
        pytest.skip("the checkout, bwrap or pyseccomp is not readable by nobody")
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": f"{repo}:{bindings}", sandbox_fs.BWRAP_ENV: bwrap}
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON, "-c",
                          AS_NOBODY], env=env, capture_output=True, text=True, timeout=120, cwd="/tmp")
    assert out.stdout.split() == ["True", "bwrap-user+seccomp", "False", "cpu", "[None]", "FileNotFoundError",
                                  "True"], out.stderr
