"""Fuzz the broker's frame handling (the loop minus the socket): whatever arrives,
it never raises, the ledger stays consistent, the budget holds, and nothing is
granted to a peer that never said hello."""

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poolbroker import protocol as p
from poolbroker.server import Broker

PEERS = [b"peer-a", b"peer-b", b"junk"]
values = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                   st.floats(allow_nan=True), st.text(max_size=30), st.binary(max_size=30),
                   st.lists(st.integers(0, 50), max_size=4),
                   st.lists(st.lists(st.one_of(st.integers(0, 50), st.text(max_size=8)),
                                     max_size=3), max_size=3),
                   st.dictionaries(st.text(max_size=8), st.integers(-3, 5), max_size=3))
ops = st.sampled_from(sorted(p.CLIENT_OPS) + ["bogus", ""])


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
                max_size=3))},
            "acquire": {"rid": draw(st.integers(0, 20)), "pool": draw(
                st.sampled_from(["default", "other", "nope"])), "timeout": draw(
                st.floats(0, 5))},
            "cancel": {"rid": draw(st.integers(0, 20))},
            "release": {"lease": draw(st.integers(0, 2**40))},
            "connected": {"lease": draw(st.integers(0, 2**40)), "backend_pid": 1},
            "heartbeat": {"idle": {"default": draw(st.integers(0, 3))}, "leases": []},
            "bye": {}, "status": {"rid": 1},
            "resize": {"rid": 1, "pool": "other", "max": draw(st.integers(0, 4))},
            "drain": {"rid": 1, "pool": "other"}, "pause": {"rid": 1, "pool": "other"},
            "resume": {"rid": 1, "pool": "other"},
        }[op]
        return [p.encode(op, **fields)]
    fields = draw(st.dictionaries(st.sampled_from(["rid", "pool", "timeout", "lease", "pid",
                                                   "host", "name", "leases", "idle", "max",
                                                   "backend_pid", "v"]), values, max_size=6))
    fields.setdefault("v", 1)
    fields["op"] = op
    return [msgpack.packb(fields, use_bin_type=True)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(PEERS), frames(), st.floats(0, 3)), max_size=60))
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
