"""The wire protocol: round trips, and every kind of malformed frame rejected."""

import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolbroker import protocol as p


def test_round_trip_every_client_op():
    samples = {
        "hello": dict(pid=1, host="h", name="", leases=[[5, "default"]], ppid=7),
        "acquire": dict(rid=1, pool="default", timeout=2.5),
        "cancel": dict(rid=1),
        "release": dict(lease=9),
        "connected": dict(lease=9, backend_pid=1234),
        "heartbeat": dict(idle={"default": 2}, leases=[9]),
        "bye": {},
        "status": dict(rid=3),
        "exited": dict(rid=8, pid=10, host="h", parent=7),
        "resize": dict(rid=4, pool="default", max=3),
        "drain": dict(rid=5, pool="default"),
        "pause": dict(rid=6, pool="default"),
        "resume": dict(rid=7, pool="default"),
    }
    assert set(samples) == set(p.CLIENT_OPS)
    for op, fields in samples.items():
        msg = p.decode(p.encode(op, **fields))
        assert msg["op"] == op and msg["v"] == p.PROTOCOL_VERSION
        for key, value in fields.items():
            assert msg[key] == value


@pytest.mark.parametrize("frame,code", [
    (b"", p.E_BAD_MESSAGE),
    (b"\xc1", p.E_BAD_MESSAGE),  # never-used msgpack byte
    (msgpack.packb([1, 2, 3]), p.E_BAD_MESSAGE),
    (msgpack.packb({"v": 99, "op": "bye"}), p.E_BAD_VERSION),
    (msgpack.packb({"v": 1, "op": "explode"}), p.E_UNKNOWN_OP),
    (msgpack.packb({"v": 1, "op": 7}), p.E_UNKNOWN_OP),
    (msgpack.packb({"v": 1, "op": "acquire", "rid": 1, "pool": "x"}), p.E_BAD_MESSAGE),
    (msgpack.packb({"v": 1, "op": "acquire", "rid": -1, "pool": "x", "timeout": 1}),
     p.E_BAD_MESSAGE),
    (msgpack.packb({"v": 1, "op": "acquire", "rid": True, "pool": "x", "timeout": 1}),
     p.E_BAD_MESSAGE),
    (msgpack.packb({"v": 1, "op": "acquire", "rid": 1, "pool": "", "timeout": 1}),
     p.E_BAD_MESSAGE),
    (msgpack.packb({"v": 1, "op": "acquire", "rid": 1, "pool": "x", "timeout": float("nan")}),
     p.E_BAD_MESSAGE),
    (msgpack.packb({"v": 1, "op": "acquire", "rid": 1, "pool": "x" * 500, "timeout": 1}),
     p.E_BAD_MESSAGE),
    (msgpack.packb({"v": 1, "op": "release", "lease": "9"}), p.E_BAD_MESSAGE),
    (msgpack.packb({"v": 1, "op": "hello", "pid": 1, "host": "h", "name": "",
                    "leases": [[1]]}), p.E_BAD_MESSAGE),
    (msgpack.packb({"v": 1, "op": "heartbeat", "idle": {"a": -1}, "leases": []}),
     p.E_BAD_MESSAGE),
    (msgpack.packb({1: 2}), p.E_BAD_MESSAGE),  # non-string map keys
    (b"\x00" * (p.MAX_MESSAGE_BYTES + 1), p.E_BAD_MESSAGE),
])
def test_malformed_frames_are_rejected_with_a_code(frame, code):
    with pytest.raises(p.ProtocolError) as info:
        p.decode(frame)
    assert info.value.code == code


def test_rid_survives_in_the_error_so_the_reply_can_name_it():
    frame = msgpack.packb({"v": 1, "op": "acquire", "rid": 42, "pool": 3, "timeout": 1})
    with pytest.raises(p.ProtocolError) as info:
        p.decode(frame)
    assert info.value.rid == 42


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_escape_as_anything_but_protocol_error(data):
    try:
        p.decode(data)
    except p.ProtocolError:
        pass


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(sorted(p.CLIENT_OPS)), st.dictionaries(st.text(max_size=10), json_like))
def test_valid_msgpack_of_wrong_shapes_is_rejected_or_valid(op, fields):
    fields.update(v=1, op=op)
    try:
        msg = p.decode(msgpack.packb(fields, use_bin_type=True))
    except p.ProtocolError:
        return
    for field, valid in p.CLIENT_OPS[op].items():  # whatever passes really is well-formed
        assert valid(msg[field])


@pytest.mark.parametrize("depth", [100, 1000, 5000])
def test_deep_nesting_is_a_protocol_error_and_nothing_else(depth):
    deep = b"\x91" * depth + b"\xc0"
    frame = b"\x82" + msgpack.packb("v") + deep + msgpack.packb("op") + msgpack.packb("bye")
    with pytest.raises(p.ProtocolError) as info:
        p.decode(frame)
    assert len(info.value.message) < 200


def test_shown_never_formats_untrusted_values():
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    assert p.shown(deep) == "a list"
    assert p.shown("\x1b[2Jhi\n" * 40, 20).endswith("...")
    assert "\x1b" not in p.shown("\x1b[2J") and "\\x1b" in p.shown("\x1b[2J")
    assert p.shown(2**70) == "a huge int" and p.shown(7) == "7" and p.shown(None) == "None"


def test_error_messages_are_clipped_so_the_peer_can_decode_them():
    fields = p.error_fields(3, p.E_UNKNOWN_POOL, "unknown pool " + "x" * 5000)
    msg = p.decode(p.encode("error", **fields), p.BROKER_OPS)
    assert msg["message"].startswith("unknown pool x") and msg["message"].endswith("...")
    assert p.known_names([f"p{i}" for i in range(30)], 3) == "p0, p1, p10 and 27 more"


def test_optional_fields_are_validated_when_present():
    ok = p.decode(p.encode("connected", lease=1, backend_pid=2, user="app", db="shop"))
    assert ok["user"] == "app"
    for bad in ({"user": ["x"] * 3}, {"db": ""}, {"user": "u" * 500}):
        with pytest.raises(p.ProtocolError):
            p.decode(p.encode("connected", lease=1, backend_pid=2, **bad))
    with pytest.raises(p.ProtocolError):
        p.decode(p.encode("heartbeat", idle={}, leases=[], rid=-1))
    assert p.decode(p.encode("acquire", rid=1, pool="a", timeout=0.0, ahead=True))["ahead"]
    with pytest.raises(p.ProtocolError):
        p.decode(p.encode("acquire", rid=1, pool="a", timeout=0.0, ahead="yes"))


@pytest.mark.parametrize("busy", [[[1, -1.0]], [[1]], [["x", 1.0]], [[1, float("nan")]],
                                  [[1, True]], "x"])
def test_a_heartbeat_with_a_malformed_busy_list_is_refused(busy):
    frame = p.encode("heartbeat", idle={}, leases=[1], busy=busy)
    with pytest.raises(p.ProtocolError):
        p.decode(frame)


def _valid_id(x):
    return type(x) is int and 0 <= x < 2**63


def _valid_busy(v):
    """What a heartbeat's busy list must be, spelled out: the reference for the
    decoder's inline checks."""
    return (type(v) is list and len(v) <= p.MAX_LIST_ITEMS
            and all(type(x) is list and len(x) == 2 and _valid_id(x[0])
                    and type(x[1]) in (int, float) and 0 <= x[1] < math.inf for x in v))


# (msgpack packs integers up to 2**64 - 1: a larger one could not be sent at all)
_packable = st.integers(min_value=-2, max_value=2**64 - 1)
_items = st.one_of(_packable, st.booleans(), st.none(),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3))
_pairs = st.one_of(st.lists(_items, min_size=0, max_size=3),
                   st.tuples(st.integers(min_value=0, max_value=2**63 + 1),
                             st.one_of(st.floats(), _packable)).map(list),
                   _items)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(_pairs, max_size=6), _items),
       st.one_of(st.lists(_items, max_size=6), _items))
def test_a_heartbeat_is_accepted_exactly_when_its_lists_are_well_formed(busy, leases):
    frame = p.encode("heartbeat", idle={}, leases=leases, busy=busy)
    want = _valid_busy(busy) and type(leases) is list and all(map(_valid_id, leases))
    try:
        msg = p.decode(frame)
    except p.ProtocolError:
        assert not want
    else:
        assert want and msg["busy"] == busy and msg["leases"] == leases


@pytest.mark.parametrize("op,fields", [("acquire", {"rid": 1, "pool": "p", "timeout": 1.0}),
                                       ("release", {"lease": 1}),
                                       ("heartbeat", {"idle": {}, "leases": []})])
def test_released_is_a_list_of_lease_ids_where_it_is_honoured(op, fields):
    assert p.decode(p.encode(op, released=[1, 2**62], **fields))["released"] == [1, 2**62]
    for bad in ([-1], ["x"], [True], 3, [[1]], list(range(p.MAX_LIST_ITEMS + 1))):
        with pytest.raises(p.ProtocolError):
            p.decode(p.encode(op, released=bad, **fields))
