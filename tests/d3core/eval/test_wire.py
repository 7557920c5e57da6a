"""The wire codec: builtin data round-trips exactly; nothing else can be rebuilt on the trusted side."""

from __future__ import annotations

import collections
import json
import math
import os

import pytest

from d3core.eval import wire


def roundtrip(value):
    return wire.from_wire(json.loads(json.dumps(wire.to_wire(value))))


def test_builtin_values_round_trip_with_their_types():
    values = [None, True, 0, -7, 10 ** 40, 1.5, -0.0, float("inf"), 2 - 3j, "héllo\n", b"\x00\xff", [1, [2, 3]],
              (1, (2,), ()), {"a": 1, 2: [3], (4, 5): None}, {1, 2}, frozenset({"x"}), set(), [(), {}, []],
              0.1 + 0.2]
    for value in values:
        back = roundtrip(value)
        assert back == value and type(back) is type(value), value
    assert math.isnan(roundtrip(float("nan")))
    assert roundtrip([True, 1, 1.0]) == [True, 1, 1.0] and [type(x) for x in roundtrip([True, 1, 1.0])] == [bool, int,
                                                                                                       float]


def test_builtin_subclasses_cross_as_their_base_type():
    Point = collections.namedtuple("Point", "x y")
    assert type(roundtrip(Point(1, 2))) is tuple and roundtrip(Point(1, 2)) == (1, 2)
    assert type(roundtrip(collections.Counter("aab"))) is dict and roundtrip(collections.Counter("aab")) == {"a": 2,
                                                                                                          "b": 1}

    class Liar(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    back = roundtrip(Liar(7))
    assert type(back) is int and back == 7 and back != 8  # the rigged __eq__ did not cross


def test_other_objects_are_refused():
    class AlwaysEqual:
        def __eq__(self, other):
            return True

    for value in (AlwaysEqual(), object(), len, iter([1]), range(3), [AlwaysEqual()], {"k": AlwaysEqual()}):
        with pytest.raises(wire.WireError, match="not plain data"):
            wire.to_wire(value)
    nested = []
    for _ in range(wire.MAX_DEPTH + 5):
        nested = [nested]
    with pytest.raises(wire.WireError, match="nested deeper"):
        wire.to_wire(nested)


def test_decoder_builds_only_builtins_from_hostile_frames():
    hostile = [{"call": "x"}, {"tuple": "abc"}, {"set": [[1]]}, {"dict": [[[1], 2]]}, {"complex": ["1", 2]},
               {"bytes": "zz"}, {"ref": "check"}, {"tuple": [1], "set": [2]}, {"__class__": "X"},
               {"dict": [[1, 2, 3]]}]
    for raw in hostile:
        with pytest.raises(wire.WireError):
            wire.from_wire(raw)
    assert wire.from_wire({"ref": "f"}, names={"f": len}) is len  # only the sandbox side resolves names
    for data in (b"{" * 100_000, b"9" * 5000, b"\xff\xfe", b"[1, 2"):
        with pytest.raises(wire.WireError):
            wire.loads(data)


def test_exceptions_come_back_as_builtins_never_as_control_flow():
    assert type(wire.rebuild_exception({"type": "ValueError", "message": "bad"})) is ValueError
    for name in ("StopIteration", "SystemExit", "KeyboardInterrupt", "GeneratorExit", "MyError", "__import__"):
        err = wire.rebuild_exception({"type": name, "message": "m"})
        assert isinstance(err, Exception) and not isinstance(err, StopIteration), name
        assert type(err) is wire.CandidateError, name
    assert type(wire.rebuild_exception("junk")) is wire.WireError


def test_channel_frames_and_their_size_cap():
    r, w = os.pipe()
    try:
        channel = wire.Channel(r, w, max_message=1000)
        channel.send({"value": wire.to_wire((1, "a"))})
        assert wire.from_wire(channel.recv(timeout=1)["value"]) == (1, "a")
        with pytest.raises(wire.WireError, match="exceeds max_message"):
            channel.send({"value": "x" * 2000})
        os.write(w, (5000).to_bytes(4, "big"))
        with pytest.raises(wire.WireError, match="exceeds max_message"):
            channel.recv(timeout=1)
        with pytest.raises(wire.ChannelTimeout):
            channel.recv(timeout=0.05)
    finally:
        os.close(r)
        os.close(w)


def test_free_names_are_what_the_test_reads_but_never_binds():
    code = "import math\ndef check(candidate):\n    x = 3\n    assert candidate(x) == helper(x)\n    for i in y: pass\n"
    assert wire.free_names(code) == {"helper", "y"}
