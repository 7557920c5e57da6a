"""Plain data across the sandbox boundary: the codec, the in-sandbox server and the trusted judge.

The sandbox never returns a verdict. It returns *values*: what the candidate's functions give
back on inputs that a trusted process chooses, encoded as JSON over a pipe. :func:`from_wire`
can only ever build ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``, ``bytes``,
``list``, ``tuple``, ``dict``, ``set`` and ``frozenset``, so an object with a rigged ``__eq__``
(or anything else the candidate defines) cannot cross. The judge runs the benchmark's own test
code on those values, in its own process; the test code and its expected values never enter
the sandbox, and nothing the sandbox sends is ever executed.

This file imports only the standard library and has three users:

* ``serve`` runs inside the sandbox (``python -I -S -u -c <this file> serve R W``): it drops to
  the unprivileged uid, sets the per-process limits (and, unsandboxed, loads the system-call
  filter that bubblewrap loads otherwise), runs the candidate, then answers calls;
* ``judge`` runs in a trusted process (``python -I -S wire.py judge R W``): it executes the
  test code with the candidate's names bound to :class:`Remote` proxies;
* the harness imports the codec and :class:`Channel` (:func:`d3core.eval.sandbox.run_calls`).

Frames are a 4-byte big-endian length and a UTF-8 JSON object, at most ``max_message`` bytes.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import random
import resource
import select
import struct
import sys
import time

MAX_DEPTH = 100  # nesting of one value; deeper data is refused, not truncated
MESSAGE_TAIL = 500  # characters of an exception message that cross
_HEADER = struct.Struct(">I")
_TAGS = ("tuple", "set", "frozenset", "dict", "complex", "bytes", "ref")
_SANDBOX_FILE = "/sandbox/candidate.py"
_CAP_VERSION_3 = 0x20080522
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_BPF_INSTRUCTION = 8  # bytes in one struct sock_filter


class WireError(ValueError):
    """Data that is not plain builtin data, or a frame that breaks the protocol."""


class ChannelClosed(EOFError):
    """The other side closed the channel (in the sandbox's case: it exited or was killed)."""


class ChannelTimeout(TimeoutError):
    """No frame arrived within the wait asked for."""


class CandidateError(Exception):
    """The candidate raised an exception that is not a builtin one (its type name and message)."""


# -- the codec ----------------------------------------------------------------------------------
def to_wire(value, depth: int = 0):
    """A JSON-able form of builtin ``value``; builtin subclasses are reduced to their base type."""
    if depth > MAX_DEPTH:
        raise WireError(f"value nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, Remote):
        return {"ref": value.name}
    if value is None or isinstance(value, bool):
        return None if value is None else bool(value)
    if isinstance(value, int):
        return int.__index__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)
    nxt = depth + 1
    if isinstance(value, complex):
        return {"complex": [complex.__complex__(value).real, complex.__complex__(value).imag]}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, list):
        return [to_wire(v, nxt) for v in list.__iter__(value)]
    if isinstance(value, tuple):
        return {"tuple": [to_wire(v, nxt) for v in tuple.__iter__(value)]}
    if isinstance(value, dict):
        return {"dict": [[to_wire(k, nxt), to_wire(v, nxt)] for k, v in dict.items(value)]}
    if isinstance(value, frozenset):
        return {"frozenset": [to_wire(v, nxt) for v in frozenset.__iter__(value)]}
    if isinstance(value, set):
        return {"set": [to_wire(v, nxt) for v in set.__iter__(value)]}
    raise WireError(f"a {type(value).__name__} is not plain data: return builtin values (numbers, strings, "
                    "lists, tuples, dicts, sets, bytes, None)")


def from_wire(raw, names: dict | None = None, depth: int = 0):
    """Rebuild a value from its JSON form; refuses anything but the builtin types.

    ``names``: where ``{"ref": name}`` resolves (the sandbox's globals); ``None`` refuses refs.
    """
    if depth > MAX_DEPTH:
        raise WireError(f"value nested deeper than {MAX_DEPTH} levels")
    kind = type(raw)
    if raw is None or kind in (bool, int, float, str):
        return raw
    nxt = depth + 1
    if kind is list:
        return [from_wire(v, names, nxt) for v in raw]
    if kind is dict and len(raw) == 1:
        (tag, body), = raw.items()
        try:
            if tag == "complex" and type(body) is list and len(body) == 2 and all(type(x) in (int, float)
                                                                                  for x in body):
                return complex(body[0], body[1])
            if tag == "bytes" and type(body) is str:
                return bytes.fromhex(body)
            if tag == "ref" and type(body) is str and names is not None and body in names:
                return names[body]
            if type(body) is not list:
                raise WireError(f"tag {tag!r} needs a list, got {type(body).__name__}")
            if tag == "tuple":
                return tuple(from_wire(v, names, nxt) for v in body)
            if tag == "set":
                return {from_wire(v, names, nxt) for v in body}
            if tag == "frozenset":
                return frozenset(from_wire(v, names, nxt) for v in body)
            if tag == "dict" and all(type(p) is list and len(p) == 2 for p in body):
                return {from_wire(k, names, nxt): from_wire(v, names, nxt) for k, v in body}
        except (TypeError, ValueError) as err:  # unhashable set member or key, bad hex
            raise WireError(f"malformed {tag!r} value: {err}") from None
    raise WireError(f"not plain data: {str(raw)[:80]!r} (tags are {_TAGS})")


def loads(data: bytes):
    """``json.loads`` that turns every failure (syntax, depth, huge ints) into :class:`WireError`."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError, UnicodeDecodeError) as err:
        raise WireError(f"undecodable frame: {str(err)[:200]}") from None


# -- framing ------------------------------------------------------------------------------------
class Channel:
    """Length-prefixed JSON frames over a pair of pipe fds."""

    def __init__(self, rfd: int, wfd: int, max_message: int) -> None:
        self.rfd, self.wfd, self.max_message = rfd, wfd, max_message
        self.calls = 0

    def send(self, obj: dict) -> None:
        data = json.dumps(obj).encode("ascii")
        if len(data) > self.max_message:
            raise WireError(f"a frame of {len(data)} bytes exceeds max_message={self.max_message}")
        view = memoryview(_HEADER.pack(len(data)) + data)
        try:
            while view:
                view = view[os.write(self.wfd, view):]
        except (BrokenPipeError, ConnectionResetError):
            raise ChannelClosed("the other side closed the channel") from None

    def recv(self, timeout: float | None = None) -> dict:
        """The next frame; ``timeout`` (seconds) bounds the wait for all of it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        (size,) = _HEADER.unpack(self._read(_HEADER.size, deadline))
        if size > self.max_message:
            raise WireError(f"frame of {size} bytes exceeds max_message={self.max_message}")
        obj = loads(self._read(size, deadline))
        if type(obj) is not dict:
            raise WireError(f"a frame must be a JSON object, got {type(obj).__name__}")
        return obj

    def _read(self, n: int, deadline: float | None) -> bytes:
        parts, left = [], n
        while left:
            if deadline is not None and not select.select([self.rfd], [], [], max(deadline - time.monotonic(),
                                                                                   0.0))[0]:
                raise ChannelTimeout("the frame did not arrive in time")
            chunk = os.read(self.rfd, min(left, 1 << 20))
            if not chunk:
                raise ChannelClosed("the other side closed the channel")
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    def call(self, name: str, args: tuple, kwargs: dict, timeout: float | None = None):
        """Call the candidate's ``name`` in the sandbox; its value, or its exception re-raised here."""
        self.calls += 1
        self.send({"call": name, "args": [to_wire(a) for a in args],
                   "kwargs": {str(k): to_wire(v) for k, v in kwargs.items()}})
        reply = self.recv(timeout)
        if "value" in reply:
            return from_wire(reply["value"])
        if "raised" in reply:
            raise rebuild_exception(reply["raised"])
        raise WireError("a reply needs 'value' or 'raised'")


class Remote:
    """Stands for one of the candidate's names in trusted code: calls run in the sandbox."""

    __slots__ = ("channel", "name")

    def __init__(self, channel: Channel, name: str) -> None:
        self.channel, self.name = channel, name

    def __call__(self, *args, **kwargs):
        return self.channel.call(self.name, args, kwargs)

    def __repr__(self) -> str:
        return f"<candidate {self.name}>"


def describe(err: BaseException) -> dict:
    return {"type": type(err).__name__, "message": str(err)[:MESSAGE_TAIL]}


def rebuild_exception(raised) -> Exception:
    """The candidate's exception as a builtin exception of the same name, else :class:`CandidateError`.

    Never a ``BaseException`` outside ``Exception`` and never ``StopIteration``: those would end
    a test's loop or the judge instead of failing the call.
    """
    if type(raised) is not dict:
        return WireError("'raised' must be an object")
    name, message = str(raised.get("type", "?"))[:100], str(raised.get("message", ""))[:MESSAGE_TAIL]
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, (StopIteration,
                                                                                       StopAsyncIteration)):
        try:
            return cls(message)
        except Exception:  # an exception type whose constructor needs other arguments
            pass
    return CandidateError(f"{name}: {message}")


def free_names(code: str) -> set[str]:
    """Names that ``code`` reads but never binds (assignments, defs, imports, parameters)."""
    loaded, bound = set(), set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return loaded - bound


# -- the sandbox side ---------------------------------------------------------------------------
def _drop_privileges(uid: int | None, gid: int | None) -> None:
    """Become ``uid``/``gid`` with no supplementary groups and no capabilities, or refuse to go on.

    ``uid=None`` (only in the opted-in unsandboxed mode, when the interpreter is unreachable for
    an unprivileged uid) keeps the caller's identity.
    """
    if uid is None:
        return
    if os.getuid() == 0:
        import ctypes  # before the uid change: the interpreter's files may be root-only outside a sandbox

        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # clears the permitted and effective capabilities
        header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
        empty = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable; two words each
        if ctypes.CDLL(None, use_errno=True).capset(header, empty) != 0:
            raise SystemExit("d3ray sandbox: could not clear the inheritable capabilities; refusing to run")
    with open("/proc/self/status") as f:
        caps = [line.split()[1] for line in f if line.startswith(("CapEff:", "CapPrm:", "CapInh:", "CapAmb:"))]
    if os.getresuid() != (uid, uid, uid) or os.getgroups() or any(int(c, 16) for c in caps):
        raise SystemExit(f"d3ray sandbox: still privileged (uid {os.getresuid()}, caps {caps}); refusing to run")


def _close_ipc() -> None:
    """No System V shared memory, queues or semaphores: their memory outlives any process, so a
    /proc scan would not see it. The sandbox's IPC namespace is its own and, while still its
    root, the server may set its limits; the candidate cannot undo them."""
    for name, value in (("shmall", "0"), ("shmmni", "0"), ("msgmni", "0"), ("sem", "0 0 0 0")):
        try:
            with open(f"/proc/sys/kernel/{name}", "w") as f:
                f.write(value)
        except OSError:  # bubblewrap's unprivileged mode: not the namespace's root
            pass


def _limit_self(limits: dict) -> None:
    cpu = int(limits["cpu_s"]) + 1
    for name, soft, hard in (("RLIMIT_CORE", 0, 0), ("RLIMIT_CPU", cpu, cpu + 1),
                             ("RLIMIT_FSIZE", limits["output"], limits["output"]),
                             ("RLIMIT_NPROC", limits["processes"], limits["processes"]),
                             ("RLIMIT_NOFILE", limits["files"], limits["files"])):
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if limits.get("address_space"):  # only where the harness has no total of its own for memory
        resource.setrlimit(resource.RLIMIT_AS, (limits["address_space"], limits["address_space"]))


def _filter_syscalls(program: str | None) -> None:
    """Load the harness's system-call filter (BPF that libseccomp built, as hex) on this process and all
    it starts; ``no_new_privs`` first, as the kernel requires. Unsandboxed only: bubblewrap loads it otherwise."""
    if not program:
        return
    import ctypes

    code = bytes.fromhex(program)

    class _Program(ctypes.Structure):  # struct sock_fprog
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    fprog = _Program(len(code) // _BPF_INSTRUCTION, code)
    libc = ctypes.CDLL(None, use_errno=True)
    if (libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            or libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0):
        raise SystemExit(f"d3ray sandbox: could not load the system-call filter (errno {ctypes.get_errno()}); "
                         "refusing to run")


def _close_other_fds(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:  # the fd listdir itself used
                pass


def serve(rfd: int, wfd: int) -> None:
    """Inside the sandbox: load the candidate named on stdin, then answer calls until EOF."""
    payload = json.loads(sys.stdin.buffer.read())
    _close_other_fds({0, 1, 2, rfd, wfd})
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    if os.getuid() == 0 and payload["uid"] is not None and payload.get("own_ipc"):  # never the host's
        _close_ipc()
    _drop_privileges(payload["uid"], payload["gid"])
    _limit_self(payload["limits"])
    _filter_syscalls(payload.get("seccomp"))
    channel = Channel(rfd, wfd, payload["max_message"])
    path = payload.get("filename") or _SANDBOX_FILE
    namespace = {"__name__": "__main__", "__file__": path, "__builtins__": builtins}
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(payload["source"])
        exec(compile(payload["source"], path, "exec"), namespace)
        if payload.get("setup"):
            exec(compile(payload["setup"], "setup.py", "exec"), namespace)
    except BaseException as err:  # whatever the candidate's module does, the judge hears it
        channel.send({"ready": False, "raised": describe(err)})
        return
    channel.send({"ready": True})
    while True:
        try:
            request = channel.recv()
        except ChannelClosed:
            return
        try:
            name = request["call"]
            if name not in namespace:
                raise NameError(f"name {name!r} is not defined")
            fn = namespace[name]
            args = [from_wire(a, namespace) for a in request["args"]]
            kwargs = {k: from_wire(v, namespace) for k, v in request["kwargs"].items()}
            reply = {"value": to_wire(fn(*args, **kwargs))}
        except BaseException as err:
            reply = {"raised": describe(err)}
        channel.send(reply)


# -- the trusted side ---------------------------------------------------------------------------
def _fail(stage: str, err: BaseException | str, calls: int) -> dict:
    text = err if isinstance(err, str) else f"{type(err).__name__}: {str(err)[:MESSAGE_TAIL]}"
    return {"passed": False, "stage": stage, "error": text, "calls": calls}


def run_test(spec: dict, channel: Channel) -> dict:
    """Execute the benchmark's test code against the sandbox; the verdict as a dict."""
    try:
        hello = channel.recv()
    except ChannelClosed:
        return _fail("sandbox", "the sandbox exited before it loaded the candidate", 0)
    except WireError as err:
        return _fail("protocol", err, 0)
    if hello.get("ready") is not True:
        raised = rebuild_exception(hello.get("raised"))
        return _fail("load", f"the candidate's module raised {type(raised).__name__}: {raised}", 0)
    random.seed(spec.get("seed", 0))
    namespace = {"__name__": "__judge__", "__builtins__": builtins}
    try:
        exec(compile(spec.get("prelude", ""), "<prelude>", "exec"), namespace)
        remote = set(spec.get("remote", ())) | {n for n in free_names(spec["test"])
                                                if n not in namespace and not hasattr(builtins, n)}
        for name in remote:
            namespace[name] = Remote(channel, name)
        exec(compile(spec["test"], "<test>", "exec"), namespace)
        if spec.get("check"):
            namespace[spec["check"]](namespace[spec["entry_point"]])
    except ChannelClosed:
        return _fail("sandbox", "the sandbox exited or was killed during the test", channel.calls)
    except WireError as err:
        return _fail("protocol", err, channel.calls)
    except BaseException as err:  # an assertion, or whatever else the test raised
        return _fail("test", err, channel.calls)
    return {"passed": True, "stage": "done", "error": "", "calls": channel.calls}


def judge(rfd: int, wfd: int) -> None:
    """The judge process: spec on stdin, verdict on stdout; prints from the test go to stderr."""
    spec = json.loads(sys.stdin.read())
    cpu = int(spec["cpu_s"]) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (spec["memory"], spec["memory"]))
    out = os.fdopen(os.dup(1), "w")
    sys.stdout = sys.stderr
    t0 = time.perf_counter()
    verdict = run_test(spec, Channel(rfd, wfd, spec["max_message"]))
    verdict["judge_s"] = time.perf_counter() - t0
    out.write(json.dumps(verdict))
    out.flush()


if __name__ == "__main__":
    role, r, w = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    {"serve": serve, "judge": judge}[role](r, w)
