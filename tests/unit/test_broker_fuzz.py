"""Fuzz the broker's frame handling (the loop minus the socket): whatever arrives,
it never raises, the ledger stays consistent, the budget holds, and nothing is
granted to a peer that never said hello. Also the lease client's frame handler."""

import msgpack
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from poolbroker import protocol as p
from poolbroker.server import Broker
from poolbroker_client.leases import LeaseClient


def nested(depth: int, kind: str = "array") -> bytes:
    """A msgpack value nested ``depth`` deep: within msgpack's own limits, deep
    enough to exhaust the stack of anything that formats it with repr()."""
    head = {"array": b"\x91", "map": b"\x81\xa1k"}[kind]
    return head * depth + b"\xc0"


def message_with(field: str, raw_value: bytes, op: str = "hello") -> bytes:
    """A map {"v": 1, "op": op, field: <raw msgpack value>} (field may be v or op)."""
    items = {"v": msgpack.packb(1), "op": msgpack.packb(op)}
    items[field] = raw_value
    body = b"".join(msgpack.packb(k) + v for k, v in items.items())
    return bytes([0x80 | len(items)]) + body


# Frames written by hand to be hostile: deep nesting in every position, values of
# every wrong type, huge numbers, ext types, non-string keys, truncations.
ADVERSARIAL = [
    nested(1000), nested(3000), nested(1000, "map"),
    *[message_with(f, nested(1000)) for f in ("v", "op", "rid", "leases", "pid", "host")],
    *[message_with(f, nested(1000, "map")) for f in ("v", "op", "idle")],
    message_with("rid", nested(1000), "acquire"), message_with("idle", nested(900), "heartbeat"),
    message_with("v", msgpack.packb(2**64 - 1)), message_with("v", msgpack.packb(-(2**63))),
    message_with("v", msgpack.packb(float("nan"))), message_with("v", b"\xd4\x01\x00"),
    message_with("leases", msgpack.packb([[2**63 - 1, "default"]] * 3)),
    message_with("leases", msgpack.packb([[1, nested(5)]])),
    msgpack.packb({1: 2, "v": 1, "op": "bye"}), msgpack.packb({b"v": 1, b"op": b"bye"}),
    b"\xdf\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff",
    msgpack.packb({"v": 1, "op": "hello"})[:-1], msgpack.packb({"v": "\x1b[2J" * 50, "op": 1}),
]

PEERS = [b"peer-a", b"peer-b", b"junk"]
values = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                   st.floats(allow_nan=True), st.text(max_size=30), st.binary(max_size=30),
                   st.lists(st.integers(0, 50), max_size=4),
                   st.lists(st.lists(st.one_of(st.integers(0, 50), st.text(max_size=8)),
                                     max_size=3), max_size=3),
                   st.dictionaries(st.text(max_size=8), st.integers(-3, 5), max_size=3))
ops = st.sampled_from(sorted(p.CLIENT_OPS) + ["bogus", ""])


# releases riding on another message: real-looking ids (granted ones are small
# here only by chance: the ledger must ignore what it did not grant)
released = st.one_of(st.just({}), st.lists(st.integers(0, 2**40), max_size=4).map(
    lambda ids: {"released": ids}))


@st.composite
def frames(draw):
    kind = draw(st.sampled_from(["random", "shaped", "valid", "multi"]))
    if kind == "random":
        return [draw(st.binary(max_size=200))]
    if kind == "multi":
        return draw(st.lists(st.binary(max_size=20), min_size=0, max_size=4))
    op = draw(ops)
    if kind == "valid" and op in p.CLIENT_OPS:
        fields = {
            "hello": {"pid": 1, "host": "h", "name": "", "leases": draw(st.lists(
                st.tuples(st.integers(0, 40), st.sampled_from(["default", "x"])).map(list),
                max_size=3)), "ppid": draw(st.sampled_from([0, 2]))},
            "exited": {"rid": 1, "pid": 1, "host": "h", "parent": draw(st.sampled_from([0, 2]))},
            "acquire": {"rid": draw(st.integers(0, 20)), "pool": draw(
                st.sampled_from(["default", "other", "nope"])), "timeout": draw(
                st.floats(0, 5)), **draw(released)},
            "cancel": {"rid": draw(st.integers(0, 20))},
            "release": {"lease": draw(st.integers(0, 2**40)), **draw(released)},
            "connected": {"lease": draw(st.integers(0, 2**40)), "backend_pid": 1},
            "heartbeat": {"idle": {"default": draw(st.integers(0, 3))}, "leases": [],
                          **draw(released)},
            "bye": {}, "status": {"rid": 1},
            "resize": {"rid": 1, "pool": "other", "max": draw(st.integers(0, 4))},
            "drain": {"rid": 1, "pool": "other"}, "pause": {"rid": 1, "pool": "other"},
            "resume": {"rid": 1, "pool": "other"},
        }[op]
        return [p.encode(op, **fields)]
    fields = draw(st.dictionaries(st.sampled_from(["rid", "pool", "timeout", "lease", "pid",
                                                   "host", "name", "leases", "idle", "max",
                                                   "backend_pid", "v", "released"]),
                                  values, max_size=6))
    fields.setdefault("v", 1)
    fields["op"] = op
    return [msgpack.packb(fields, use_bin_type=True)]


@st.composite
def frames_with_hostile(draw):
    if draw(st.integers(0, 9)) == 0:
        return [draw(st.sampled_from(ADVERSARIAL))]
    return draw(frames())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(PEERS), frames_with_hostile(), st.floats(0, 3)),
                max_size=60))
@example([(b"peer-a", [frame], 0.0) for frame in ADVERSARIAL])
def test_any_frames_keep_the_broker_consistent(events):
    broker = Broker("ipc:///tmp/never-bound.sock", {"default": 2, "other": 1}, ttl=4.0)
    greeted = set()
    now = 0.0
    for peer, frame, dt in events:
        now += dt
        outs = broker._handle([peer] + frame, now) + broker.ledger.tick(now)
        if len(frame) == 1:
            try:
                if p.decode(frame[0])["op"] == "hello":
                    greeted.add(peer)
            except p.ProtocolError:
                pass
        for cid, op, fields in outs:
            p.decode(p.encode(op, **fields), p.BROKER_OPS)  # everything sent is well-formed
            if op == "grant":
                assert cid in greeted, "granted to a peer that never said hello"
            # the loop turns exceptions into "internal" replies; here that is a bug
            assert not (op == "error" and fields["code"] == "internal"), fields
        broker.ledger.check()
        for pool in broker.ledger.pools.values():
            # re-announced leases may exceed max; nothing is granted past it
            if any(op == "grant" and f["pool"] == pool.name for _, op, f in outs):
                assert len(pool.leases) <= pool.max


def test_deeply_nested_frames_get_an_error_reply_not_an_exception():
    broker = Broker("ipc:///tmp/never-bound.sock", {"default": 2}, ttl=4.0)
    for frame in ADVERSARIAL:
        outs = broker._handle([b"peer", frame], 0.0)
        assert [op for _, op, _ in outs] == ["error"]
        assert outs[0][2]["code"] in (p.E_BAD_MESSAGE, p.E_BAD_VERSION, p.E_UNKNOWN_OP)
    assert broker.frame_errors == 0


def test_the_lease_client_survives_hostile_frames_from_its_broker():
    client = LeaseClient("ipc:///tmp/never-bound.sock")  # no thread: frames fed by hand
    replies = [*ADVERSARIAL, *(message_with(f, nested(1000), "grant")
                               for f in ("rid", "pool", "lease")),
               message_with("message", nested(1000), "error"),
               msgpack.packb({"v": 1, "op": "hb", "epoch": "e", "unknown": [2**63 - 1]})]
    for frame in replies:
        client._on_frame(frame)  # must not raise
    assert client.bad_frames >= len(ADVERSARIAL)


def test_releases_riding_on_an_acquire_free_the_slot_before_it_queues():
    """One message per lease: ``released`` is handled first, so with a budget of
    one the next acquire gets the slot its own message gave back; the field is
    honoured only where it is validated (not on a hello), and is ignored from a
    client the broker does not know."""
    broker = Broker("ipc:///tmp/never-bound.sock", {"default": 1}, ttl=4.0)
    hello = p.encode("hello", pid=1, host="h", name="n", leases=[])
    assert broker._handle([b"a", hello], 0.0)[0][1] == "welcome"
    (grant,) = broker._handle([b"a", p.encode("acquire", rid=1, pool="default",
                                              timeout=5.0)], 0.1)
    lease = grant[2]["lease"]
    outs = broker._handle([b"a", p.encode("acquire", rid=2, pool="default", timeout=5.0,
                                          released=[lease])], 0.2)
    assert [(op, f["rid"]) for _, op, f in outs] == [("grant", 2)]
    second = outs[0][2]["lease"]
    # a hello carrying a release does not release anything
    broker._handle([b"a", p.encode("hello", pid=1, host="h", name="n",
                                   leases=[[second, "default"]], released=[second])], 0.3)
    assert second in broker.ledger.pools["default"].leases
    # a stranger's released ids are not looked at; its acquire hears it is unknown
    outs = broker._handle([b"z", p.encode("acquire", rid=3, pool="default", timeout=5.0,
                                          released=[second])], 0.4)
    assert [f["code"] for _, op, f in outs if op == "error"] == [p.E_UNKNOWN_CLIENT]
    assert second in broker.ledger.pools["default"].leases
    broker.ledger.check()
