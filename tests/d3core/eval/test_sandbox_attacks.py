"""Adversarial programs through ``Task.score``: none forges a pass, none escapes the sandbox.

Each program is a *wrong* answer plus an attack from issue 16's "What was measured" (and a few
more). A forged pass shows up as ``[True]``; an escape as a host-side effect (a file, a
connection, a stopped or killed process, a leaked secret, a surviving process). The system-call
filter (issue 33) is attacked at the end: each denied family, vsock, and other ABIs' numbers.
"""

from __future__ import annotations

import errno
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from d3core.eval import confine, sandbox_fs, seccomp
from d3core.eval.sandbox import CodeCheck, SandboxLimits, SandboxUnavailable, detect, run_calls, run_check, run_checks
from d3core.eval.tasks import get_task

LIMITS = SandboxLimits(cpu_s=3.0, wall_s=20.0)
ANSWER_KEY = sandbox_fs.PACKAGE_ROOT / "assets" / "eval" / "humaneval.jsonl.gz"
SHARED_KEY = Path(__file__).resolve().parents[4] / "shared" / "data" / "humaneval" / "HumanEval.jsonl.gz"
WRONG = "    return None\n"


@pytest.fixture(scope="module")
def humaneval():
    task = get_task("humaneval")
    return task, task.examples(1)  # HumanEval/0, has_close_elements: its tests expect both True and False


def score(humaneval, code: str) -> list[bool]:
    task, examples = humaneval
    return task.score([f"Here is my solution:\n```python\n{code}\n```\n"], examples, "chat", LIMITS)


def entry(body: str = WRONG, prefix: str = "") -> str:
    return f"{prefix}\ndef has_close_elements(numbers, threshold):\n{body}"


# -- forgery ---------------------------------------------------------------------------------------
FORGERIES = {
    "frame_walk_then_exit": entry(
        "    import sys, gc, os\n"
        "    seen, f = [], sys._getframe()\n"
        "    while f is not None:\n"
        "        seen += [repr(v) for v in list(f.f_locals.values()) + list(f.f_globals.values())]\n"
        "        f = f.f_back\n"
        "    seen += [o for o in gc.get_objects() if isinstance(o, str)]\n"
        "    print('\\n'.join(seen))\n"
        "    sys.stdout.flush()\n"
        "    os._exit(0)\n"),
    "atexit_and_thread_print_pass": entry(prefix=(
        "import atexit, threading, sys\n"
        "atexit.register(lambda: print('passed\\nOK\\n' + 'f' * 32))\n"
        "threading.Thread(target=lambda: [print('passed') for _ in range(1000)]).start()\n")),
    "exit_zero_in_the_call": entry("    import sys\n    sys.exit(0)\n"),
    "raise_stop_iteration": entry("    raise StopIteration\n"),
    "raise_keyboard_interrupt": entry("    raise KeyboardInterrupt\n"),
    "eq_always_true": entry("    return Yes()\n", prefix=(
        "class Yes:\n"
        "    def __eq__(self, other):\n        return True\n"
        "    def __ne__(self, other):\n        return False\n"
        "    def __bool__(self):\n        return True\n")),
    "int_subclass_eq_true": entry("    return Liar(1)\n", prefix=(
        "class Liar(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n")),
    "settrace_and_patched_assertion": entry(prefix=(
        "import sys, builtins\n"
        "def tracer(frame, event, arg):\n"
        "    frame.f_globals['check'] = lambda candidate: None\n"
        "    return tracer\n"
        "sys.settrace(tracer)\n"
        "builtins.AssertionError = type('Quiet', (Exception,), {})\n"
        "sys.excepthook = lambda *a: None\n")),
    "rebuild_from_own_file": entry(
        "    import re\n"
        "    source = open(__file__).read()\n"
        "    table = dict(re.findall(r'candidate\\((.*?)\\) == (True|False)', source))\n"
        "    return table.get(f'{numbers!r}, {threshold!r}') == 'True' if table else None\n"),
    "read_the_answer_keys": entry(prefix=(
        "import gzip, json, os\n"
        "def _keys():\n"
        f"    known = [{str(ANSWER_KEY)!r}, {str(SHARED_KEY)!r}]\n"
        "    def walk():\n"  # the known paths first: walking '/' can outlast the CPU limit on a full disk
        "        for root, dirs, files in os.walk('/'):\n"
        "            if root.startswith('/proc'):\n"
        "                dirs[:] = []\n"
        "            yield from (os.path.join(root, f) for f in files if 'eval' in f.lower() or f.endswith('.gz'))\n"
        "    import itertools\n"
        "    for p in itertools.chain(known, walk()):\n"
        "        try:\n"
        "            with gzip.open(p, 'rt') as f:\n"
        "                for line in f:\n"
        "                    r = json.loads(line)\n"
        "                    if r.get('task_id') == 'HumanEval/0':\n"
        "                        return r['prompt'] + r['canonical_solution']\n"
        "        except Exception:\n"
        "            pass\n"
        "    try:\n"
        "        import d3core\n"
        "    except ImportError:\n"
        "        pass\n"
        "SOLUTION = _keys()\n"
        "if SOLUTION:\n"
        "    exec(SOLUTION)\n"), body=WRONG).replace("def has_close_elements", "def _unused"),
    "write_a_verdict_everywhere": entry(prefix=(
        "import os, json\n"
        "fake = json.dumps({'passed': True, 'stage': 'done', 'error': '', 'calls': 9})\n"
        "for fd in range(0, 64):\n"
        "    try:\n"
        "        os.write(fd, fake.encode())\n"
        "    except OSError:\n"
        "        pass\n"
        "for p in ('/sandbox/result.json', '/tmp/result.json', '/result.json'):\n"
        "    try:\n"
        "        open(p, 'w').write(fake)\n"
        "    except OSError:\n"
        "        pass\n")),
    "answer_every_call_with_true_on_the_raw_channel": entry(prefix=(
        "import os, json, struct\n"
        "for fd in range(3, 16):\n"
        "    try:\n"
        "        for _ in range(50):\n"
        "            data = json.dumps({'value': True}).encode()\n"
        "            os.write(fd, struct.pack('>I', len(data)) + data)\n"
        "    except OSError:\n"
        "        pass\n")),
    "oversized_value": entry("    return 'x' * (20 * 1024 * 1024)\n"),
    "deeply_nested_value": entry("    x = []\n    for _ in range(100_000):\n        x = [x]\n    return x\n"),
    "huge_integer": entry("    return 10 ** 100_000\n"),
    "deeply_nested_raw_frame": entry(prefix=(
        "import os, struct\n"
        "data = b'[' * 200_000 + b']' * 200_000\n"
        "frame = b'{\"value\": ' + data + b'}'\n"
        "for fd in range(3, 16):\n"
        "    try:\n"
        "        os.write(fd, struct.pack('>I', len(frame)) + frame)\n"
        "    except OSError:\n"
        "        pass\n")),
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forgery_does_not_pass(humaneval, name):
    assert score(humaneval, FORGERIES[name]) == [False], name


def test_the_attacks_would_pass_a_correct_answer(humaneval):
    """Control: the same harness passes the reference, so the [False] above are real verdicts."""
    task, examples = humaneval
    reference = examples[0].meta["prompt"] + examples[0].target
    assert score(humaneval, reference) == [True]
    assert score(humaneval, "import atexit\natexit.register(print, 'bye')\n" + reference) == [True]


def test_expected_values_never_enter_the_sandbox():
    """The program searches all it can reach for the expected value; it must not find it."""
    token = "SENTINEL-" + secrets.token_hex(8)
    hunt = ("import gc, os, re, sys\n"
            "TOKEN = re.compile('SENTINEL-[0-9a-f]{16}')\n"
            "def seen(item):\n"
            "    found = TOKEN.search(item.decode('latin-1') if isinstance(item, bytes) else item)\n"
            "    return found.group(0) if found else None\n"
            "def f(x):\n"
            "    hay = [o for o in gc.get_objects() if isinstance(o, (str, bytes))]\n"
            "    frame = sys._getframe()\n"
            "    while frame is not None:\n"
            "        hay += [repr(v) for v in frame.f_locals.values()]\n"
            "        frame = frame.f_back\n"
            "    for item in hay:\n"
            "        if seen(item):\n"
            "            return seen(item)\n"
            "    paths = ['/proc/self/cmdline', '/proc/self/environ', '/proc/1/cmdline']\n"
            "    for root, dirs, files in os.walk('/'):\n"
            "        if root in ('/proc', '/dev'):\n"  # pipes and devices would block; memory is in gc
            "            dirs[:] = []\n"
            "            continue\n"
            "        paths += [os.path.join(root, name) for name in files]\n"
            "    for path in paths:\n"
            "        try:\n"
            "            with open(path, 'rb') as fh:\n"
            "                found = seen(fh.read(1 << 20))\n"
            "        except OSError:\n"
            "            continue\n"
            "        if found:\n"
            "            return found\n"
            "    return 'not found'\n")
    limits = SandboxLimits(cpu_s=30, wall_s=120)
    v = run_check(CodeCheck(hunt, f"assert f('input') == {token!r}"), limits)
    assert not v.passed and v.calls == 1 and "AssertionError" in v.reason, v
    assert run_calls(hunt, [("f", ("SENTINEL-" + "ab" * 8,))], limits).values == ["SENTINEL-" + "ab" * 8]


# -- escape ------------------------------------------------------------------------------------------
def test_remount_setns_and_raw_syscalls_cannot_write_or_connect_outside(humaneval, tmp_path):
    mark = uuid.uuid4().hex
    targets = [f"/tmp/d3ray-escape-{mark}", f"/root/d3ray-escape-{mark}", f"/d3ray-escape-{mark}",
               str(tmp_path / f"escape-{mark}")]
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.setblocking(False)
    port = server.getsockname()[1]
    attack = entry(prefix=(
        "import ctypes, os, posix, _io, _socket, glob\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.mount(None, b'/', None, 32 | 4096, None)\n"  # MS_REMOUNT | MS_BIND, writable again?
        "libc.unshare(0x10000000 | 0x00020000)\n"  # a user + mount namespace of its own?
        "for ns in glob.glob('/proc/*/ns/*'):\n"
        "    try:\n"
        "        libc.setns(os.open(ns, os.O_RDONLY), 0)\n"
        "    except OSError:\n"
        "        pass\n"
        f"for path in {targets!r}:\n"
        "    for write in (lambda p: open(p, 'w').write('x'), lambda p: _io.FileIO(p, 'w').write(b'x'),\n"
        "                  lambda p: posix.write(posix.open(p, posix.O_WRONLY | posix.O_CREAT), b'x'),\n"
        "                  lambda p: libc.creat(p.encode(), 0o644)):\n"
        "        try:\n"
        "            write(path)\n"
        "        except Exception:\n"
        "            pass\n"
        "for connect in (lambda: _socket.socket().connect(('127.0.0.1', PORT)),\n"
        "                lambda: __import__('socket').create_connection(('127.0.0.1', PORT), timeout=1)):\n"
        "    try:\n"
        "        connect()\n"
        "    except OSError:\n"
        "        pass\n"
        "try:\n"
        "    posix.system('touch /tmp/d3ray-escape-system')\n"
        "except Exception:\n"
        "    pass\n").replace("PORT", str(port)))
    try:
        assert score(humaneval, attack) == [False]
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
    assert not any(os.path.exists(p) for p in targets + ["/tmp/d3ray-escape-system"])


def test_secrets_of_the_harness_stay_outside(monkeypatch):
    token = secrets.token_hex(16)
    monkeypatch.setenv("D3RAY_TEST_SECRET", token)
    src = ("import glob, os\n"
           "def loot():\n"
           "    found = []\n"
           "    for p in ['/etc/shadow', '/proc/self/environ'] + glob.glob('/proc/*/environ') + \\\n"
           "             glob.glob('/proc/*/cmdline') + [f'/proc/{os.getppid()}/environ']:\n"
           "        try:\n"
           "            found.append(open(p, 'rb').read().decode('latin-1'))\n"
           "        except OSError:\n"
           "            pass\n"
           "    return found\n")
    result = run_calls(src, [("loot", ())], LIMITS)
    assert result.loaded and result.values and all(token not in text for text in result.values[0])
    assert all("root:" not in text for text in result.values[0])  # no /etc/shadow line


def test_cannot_stop_or_kill_the_harness_or_a_sibling():
    """The attacker signals every pid it can think of while a correct sibling runs beside it."""
    attacker = ("import os, signal, time\n"
                "def add(a, b):\n"
                "    end = time.time() + 1.5\n"
                "    while time.time() < end:\n"
                "        for sig in (signal.SIGSTOP, signal.SIGKILL):\n"
                "            try:\n"
                "                os.kill(-1, sig)\n"
                "            except OSError:\n"
                "                pass\n"
                f"            for pid in (os.getppid(), 1, {os.getpid()}):\n"
                "                try:\n"
                "                    os.kill(pid, sig)\n"
                "                except OSError:\n"
                "                    pass\n"
                "    while True:\n"  # then spin: the CPU limit must still end it
                "        pass\n")
    sibling = ("import time\n"
               "def add(a, b):\n"
               "    time.sleep(1.0)\n"
               "    return a + b\n")
    checks = [CodeCheck(attacker, "assert add(1, 2) == 3"), CodeCheck(sibling, "assert add(1, 2) == 3")] * 2
    t0 = time.monotonic()
    verdicts = run_checks(checks, SandboxLimits(cpu_s=3.0, wall_s=30.0), workers=4)
    assert [v.passed for v in verdicts] == [False, True, False, True], verdicts
    assert [v.limit for v in verdicts[::2]] == ["cpu", "cpu"]
    assert time.monotonic() - t0 < 30
    assert os.getpid() > 0  # still here, not stopped


def test_no_process_outlives_its_sandbox(humaneval):
    before = _sandboxed_processes()
    attack = entry(prefix=(
        "import os, time\n"
        "for _ in range(3):\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        "        if os.fork() == 0:\n"
        "            signal = __import__('signal')\n"
        "            signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "            signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "            time.sleep(300)\n"
        "        os._exit(0)\n"))
    assert score(humaneval, attack) == [False]
    deadline = time.monotonic() + 5
    while _sandboxed_processes() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandboxed_processes() - before == set()


def _sandboxed_processes() -> set[int]:
    """Host pids running as the sandbox uid outside this PID namespace."""
    host = os.readlink("/proc/self/ns/pid")
    out = set()
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and os.readlink(f"/proc/{name}/ns/pid") != host:
                with open(f"/proc/{name}/status") as f:
                    if any(line.split()[1:2] == ["65534"] for line in f if line.startswith("Uid:")):
                        out.add(int(name))
        except OSError:
            pass
    return out


def test_stalled_or_silent_sandboxes_end_at_the_wall_backstop():
    partial = ("import os, struct, time\n"
               "def f():\n"
               "    for fd in range(3, 16):\n"
               "        try:\n"
               "            os.write(fd, struct.pack('>I', 100))\n"  # a header, then nothing
               "        except OSError:\n"
               "            pass\n"
               "    time.sleep(600)\n")
    v = run_check(CodeCheck(partial, "assert f() == 1"), SandboxLimits(cpu_s=1.0, wall_s=3.0))
    assert v.status == "timeout" and v.limit == "wall" and v.wall_s < 15


def test_the_harness_interpreter_was_not_changed():
    """A sandboxed program cannot modify the Python it shares (read-only bind)."""
    stdlib = Path(os.__file__).resolve()
    before = stdlib.stat().st_mtime_ns
    src = f"def f():\n    open({str(stdlib)!r}, 'a').write('# pwned')\n"
    result = run_calls(src, [("f", ())], LIMITS)
    assert type(result.raised[0]) in (OSError, PermissionError), result
    assert stdlib.stat().st_mtime_ns == before
    out = subprocess.run([sys.executable, "-c", "import os; print('ok')"], capture_output=True, text=True)
    assert out.stdout.strip() == "ok"
    assert signal.getsignal(signal.SIGTERM) is not None


def test_the_answer_key_attack_is_real_without_the_sandbox(humaneval, monkeypatch):
    """Control for ``read_the_answer_keys``: run unconfined (the opted-in mode) it does pass."""
    monkeypatch.delenv(confine.OPT_IN_ENV, raising=False)
    task, examples = humaneval
    unconfined = SandboxLimits(cpu_s=10.0, wall_s=60.0, bwrap="/bin/false", allow_unsandboxed=True)
    response = f"```python\n{FORGERIES['read_the_answer_keys']}\n```"
    if os.getuid() == 0 and not sandbox_fs.reachable_by_others(sandbox_fs.interpreter_files()):
        assert task.score([response], examples, "chat", unconfined) == [True]
    assert task.score([response], examples, "chat", LIMITS) == [False]


def test_system_v_ipc_is_closed():
    """Detached System V shared memory would hold memory no process shows (and outlive a /proc scan)."""
    src = ("import ctypes\n"
           "def f():\n"
           "    libc = ctypes.CDLL(None, use_errno=True)\n"
           "    got = [libc.shmget(0, 256 << 20, 0o1600), libc.msgget(0, 0o1600), libc.semget(0, 1, 0o1600)]\n"
           "    try:\n"
           "        open('/proc/sys/kernel/shmall', 'w').write('4096')\n"
           "        got.append('reopened')\n"
           "    except OSError:\n"
           "        pass\n"
           "    return got\n")
    for cgroups in (True, False):
        result = run_calls(src, [("f", ())], SandboxLimits(cpu_s=3.0, cgroups=cgroups))
        assert result.values == [[-1, -1, -1]], (cgroups, result)


# -- the system-call filter --------------------------------------------------------------------------
SYSCALLS = """
import ctypes, mmap, os

def call(calls):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    out = {}
    for name, number, args in calls:
        ctypes.set_errno(0)
        ret = libc.syscall(ctypes.c_long(number), *(ctypes.c_long(os.getpid() if a == 'pid' else a) for a in args))
        if ret == 0 and number == 56:  # an unfiltered clone() made a child: it must not go on as the server
            os._exit(0)
        out[name] = [ret, ctypes.get_errno()]
    return out

def _die_of(attack):
    pid = os.fork()
    if pid == 0:
        attack()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return ['signal', os.WTERMSIG(status)] if os.WIFSIGNALED(status) else ['exit', os.WEXITSTATUS(status)]

def x32():  # getpid through the x32 ABI: x86_64's entry with bit 30 set
    return _die_of(lambda: ctypes.CDLL(None).syscall(0x40000000 | 39))

def i386():  # getpid through the i386 ABI: mov eax, 20; int 0x80; ret
    def attack():
        page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(bytes([0xb8, 20, 0, 0, 0, 0xcd, 0x80, 0xc3]))
        ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
    return _die_of(attack)
"""
SIGCHLD = 17
# x86_64 numbers (arch/x86/entry/syscalls/syscall_64.tbl), with arguments that change nothing when a call
# does reach the kernel (NULL pointers, bad fds, PEEKDATA, zero-length vectors; clone flags the kernel refuses)
DENIED_FAMILIES = {
    "io_uring": [("io_uring_setup", 425, [0, 0]), ("io_uring_enter", 426, [-1, 0, 0, 0, 0, 0]),
                 ("io_uring_register", 427, [-1, 0, 0, 0])],
    "keys": [("add_key", 248, [0, 0, 0, 0, 0]), ("request_key", 249, [0, 0, 0, 0]), ("keyctl", 250, [0, 0, 0, 0, 0])],
    "bpf": [("bpf", 321, [0, 0, 0])],
    "userfaultfd": [("userfaultfd", 323, [0])],
    "perf_event_open": [("perf_event_open", 298, [0, 0, -1, -1, 0])],
    "ptrace": [("ptrace", 101, [2, 1, 0, 0]), ("process_vm_readv", 310, ["pid", 0, 0, 0, 0, 0]),
               ("process_vm_writev", 311, ["pid", 0, 0, 0, 0, 0])],
    "mount": [("mount", 165, [0, 0, 0, 0, 0]), ("umount2", 166, [0, 0]), ("pivot_root", 155, [0, 0]),
              ("move_mount", 429, [-1, 0, -1, 0, 0]), ("open_tree", 428, [-1, 0, 0]), ("fsopen", 430, [0, 0]),
              ("fsmount", 432, [-1, 0, 0]), ("fsconfig", 431, [-1, 0, 0, 0, 0]), ("fspick", 433, [-1, 0, 0]),
              ("mount_setattr", 442, [-1, 0, 0, 0, 0])],
    "namespaces": [("unshare", 272, [0]), ("setns", 308, [-1, 0]),
                   ("clone_newuser", 56, [0x10000000 | SIGCHLD, 0, 0, 0, 0]),
                   ("clone_newnet", 56, [0x40000000 | SIGCHLD, 0, 0, 0, 0]),
                   ("clone_newns_high_bits", 56, [(1 << 32) | 0x00020000 | SIGCHLD, 0, 0, 0, 0]),
                   ("clone3", 435, [0, 0])],
    "kexec": [("kexec_load", 246, [0, 0, 0, 0]), ("kexec_file_load", 320, [-1, -1, 0, 0, 0])],
    "modules": [("init_module", 175, [0, 0, 0]), ("finit_module", 313, [-1, 0, 0]), ("delete_module", 176, [0, 0])],
}


@pytest.fixture(scope="module")
def filtered():
    """Skip where these x86_64 numbers mean nothing or no sandbox starts; the filter itself must be there."""
    if platform.machine() != "x86_64":
        pytest.skip(f"the attack programs use x86_64 system-call numbers; this is {platform.machine()}")
    try:
        detect(LIMITS)
    except SandboxUnavailable as err:
        pytest.skip(f"no sandbox on this machine: {err}")
    assert seccomp.program() is not None, f"libseccomp could not be loaded: {seccomp.FIX}"


@pytest.mark.parametrize("family", sorted(DENIED_FAMILIES))
def test_denied_system_calls_fail_with_enosys(filtered, family):
    calls = DENIED_FAMILIES[family]
    result = run_calls(SYSCALLS, [("call", (calls,))], LIMITS)
    assert result.confinement.endswith("+seccomp"), result
    assert result.values == [{name: [-1, errno.ENOSYS] for name, _, _ in calls}], result


def test_ordinary_clone_and_sockets_still_work(filtered):
    """fork() is clone() without namespace flags; loopback sockets are allowed; vsock (not namespaced) is not."""
    src = SYSCALLS + (
        "import socket\n"
        "def ordinary():\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        os._exit(7)\n"
        "    a, b = socket.socketpair()\n"
        "    a.send(b'x')\n"
        "    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), b.recv(1).decode()]\n")
    calls = [("vsock", 41, [40, 1, 0]), ("vsock_high_bits", 41, [(1 << 32) | 40, 1, 0])]
    result = run_calls(src, [("ordinary", ()), ("call", (calls,))], LIMITS)
    assert result.values == [[7, "x"], {"vsock": [-1, errno.EAFNOSUPPORT],
                                        "vsock_high_bits": [-1, errno.EAFNOSUPPORT]}], result


def test_other_abis_are_killed(filtered):
    """x32 numbers and int 0x80 would step around an x86_64-only list: the filter kills the process (SIGSYS)."""
    result = run_calls(SYSCALLS, [("x32", ()), ("i386", ())], LIMITS)
    assert result.values[:1] == [["signal", signal.SIGSYS]], result
    unfiltered = run_calls(SYSCALLS, [("i386", ())], SandboxLimits(cpu_s=3.0, wall_s=20.0, seccomp=False))
    if unfiltered.values != [["exit", 0]]:  # the control: without the filter, int 0x80 runs getpid
        pytest.skip(f"this kernel runs no i386 system calls (unfiltered: {unfiltered.values}); x32 was checked")
    assert result.values[1:] == [["signal", signal.SIGSYS]], result


def test_a_killed_system_call_forges_no_verdict(humaneval, filtered):
    """Dying of the filter's SIGSYS is a failure with the exit status, and names no limit."""
    attack = entry("    import ctypes\n    ctypes.CDLL(None).syscall(0x40000000 | 39)\n    return True\n")
    assert score(humaneval, attack) == [False]
    v = run_check(CodeCheck(attack, "assert has_close_elements([1.0, 2.0], 0.5) is False"), LIMITS)
    assert v.status == "failed" and v.limit is None and "exit status 159" in v.reason, v  # 128 + SIGSYS


def test_the_filter_also_binds_the_unsandboxed_mode(filtered, monkeypatch):
    monkeypatch.delenv(confine.OPT_IN_ENV, raising=False)
    unconfined = SandboxLimits(cpu_s=3.0, wall_s=20.0, bwrap="/bin/false", allow_unsandboxed=True)
    calls = [("add_key", 248, [0, 0, 0, 0, 0]), ("io_uring_setup", 425, [0, 0])]
    result = run_calls(SYSCALLS, [("call", (calls,))], unconfined)
    assert result.confinement.startswith("unsandboxed") and result.confinement.endswith("+seccomp"), result
    assert result.values == [{"add_key": [-1, errno.ENOSYS], "io_uring_setup": [-1, errno.ENOSYS]}], result


def test_without_the_filter_the_calls_reach_the_kernel(filtered):
    """Control: with ``seccomp=False`` the same calls get the kernel's own answers, so ENOSYS above is the filter."""
    calls = DENIED_FAMILIES["keys"] + DENIED_FAMILIES["namespaces"][:2]
    result = run_calls(SYSCALLS, [("call", (calls,))], SandboxLimits(cpu_s=3.0, wall_s=20.0, seccomp=False))
    assert not result.confinement.endswith("+seccomp")
    assert all(answer != [-1, errno.ENOSYS] for answer in result.values[0].values()), result
