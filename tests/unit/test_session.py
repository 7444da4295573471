"""The client's lease session (client/session.py), a pure state machine: unit tests
of each rule, and a hypothesis state machine that plays a broker against it."""

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from poolbroker import protocol as p
from poolbroker_client.errors import BrokerError
from poolbroker_client.session import LeaseSession


def decode(frames):
    return [p.decode(f, p.CLIENT_OPS) for f in frames]


def ops(frames, op):
    return [m for m in decode(frames) if m["op"] == op]


def welcomed(now=0.0, epoch="e1", heartbeat=1.0, rejected=()):
    s = LeaseSession(1, "host", "")
    s.hello(now)
    s.on_message(welcome(epoch, heartbeat, rejected), now)
    return s


def welcome(epoch="e1", heartbeat=1.0, rejected=(), gen=None):
    msg = {"op": "welcome", "epoch": epoch, "heartbeat": heartbeat,
           "rejected": list(rejected)}
    if gen is not None:  # the hello it answers (a broker that does not say: the latest)
        msg["gen"] = gen
    return msg


def grant(rid, lease, pool="default", seq=1):
    return {"op": "grant", "rid": rid, "pool": pool, "lease": lease, "seq": seq}


def test_a_grant_goes_to_its_request_once():
    s = welcomed()
    rid, frame = s.acquire("default", 5.0, 0.0)
    assert decode([frame])[0]["rid"] == rid
    acts = s.on_message(grant(rid, 7), 0.1)
    assert acts.granted == [(rid, 7)] and s.leases == {7: "default"}
    # the same grant again (a retried request): nobody waits, and we hold the lease
    acts = s.on_message(grant(rid, 7), 0.2)
    assert acts.granted == [] and acts.send == []


def test_a_grant_for_a_cancelled_request_is_given_back():
    s = welcomed()
    rid, _ = s.acquire("default", 5.0, 0.0)
    assert ops([s.cancel(rid)], "cancel")
    assert s.cancel(rid) is None  # once
    acts = s.on_message(grant(rid, 7), 0.1)
    assert acts.granted == [] and [m["lease"] for m in ops(acts.send, "release")] == [7]
    assert 7 not in s.leases


def test_grants_are_held_while_suspect_and_delivered_when_the_broker_vouches():
    s = welcomed()
    r1, _ = s.acquire("default", 5.0, 0.0)
    r2, _ = s.acquire("default", 5.0, 0.0)
    check = s.stalled(1.0)
    assert check is not None and s.stalled(1.0) is None  # suspect once
    assert s.on_message(grant(r1, 1), 1.1).granted == []
    assert s.on_message(grant(r2, 2), 1.1).granted == []
    # the heartbeat still lists held grants: the broker must not free them
    assert set(decode([s.heartbeat_frame({}, 1.1, check)])[0]["leases"]) == {1, 2}
    # an answer to another beat confirms nothing
    assert not s.on_message({"op": "hb", "unknown": [], "rid": check + 100}, 1.2).confirmed
    acts = s.on_message({"op": "hb", "unknown": [2], "rid": check}, 1.3)
    assert acts.confirmed and acts.granted == [(r1, 1)]
    assert [m["lease"] for m in ops(acts.send, "release")] == [2]
    assert not s.suspect and s.held == []


def test_a_welcome_re_sends_older_requests_and_trusts_no_held_grant():
    s = welcomed()
    live, _ = s.acquire("default", 5.0, 0.0)
    expired, _ = s.acquire("default", 1.0, 0.0)
    s.stalled(0.5)
    s.on_message(grant(live, 3), 0.6)
    s.hello(2.0)  # the broker forgot us: a new generation
    acts = s.on_message(welcome(epoch="e2"), 2.0)
    resent = ops(acts.send, "acquire")
    assert [m["rid"] for m in resent] == [live]  # the expired one is not asked again
    assert 2.9 < resent[0]["timeout"] <= 3.0
    assert [m["lease"] for m in ops(acts.send, "release")] == [3]
    assert acts.confirmed and acts.granted == []
    assert s.epoch == "e2" and s.seen == 0


def test_a_welcome_read_after_a_stall_vouches_for_nothing():
    """Frozen with a welcome and a grant unread in the queue: the broker may have
    expired us since, and given the lease to another. Only an answer to what we
    say after the stall may confirm it."""
    s = LeaseSession(1, "host", "")
    s.hello(0.0)
    rid, _ = s.acquire("default", 30.0, 0.0)
    check = s.stalled(5.0)  # noticed on waking, before reading the queue
    acts = s.on_message(welcome(), 5.0)  # the answer to the hello from before
    assert s.suspect and not acts.confirmed
    assert s.on_message(grant(rid, 7), 5.0).granted == []  # held back
    # the confirming beat's answer: the broker had expired us
    acts = s.on_message({"op": "error", "rid": check, "code": p.E_UNKNOWN_CLIENT,
                         "message": "who?"}, 5.1)
    assert ops(acts.send, "hello") and s.suspect
    acts = s.on_message(welcome(), 5.2)  # to the hello said after the stall
    assert acts.confirmed and acts.granted == [] and not s.suspect
    assert [m["lease"] for m in ops(acts.send, "release")] == [7]
    assert [m["rid"] for m in ops(acts.send, "acquire")] == [rid]  # asked again


def test_a_welcome_read_after_a_stall_then_the_check_confirms():
    s = LeaseSession(1, "host", "")
    s.hello(0.0)
    rid, _ = s.acquire("default", 30.0, 0.0)
    check = s.stalled(5.0)
    s.on_message(welcome(), 5.0)
    s.on_message(grant(rid, 7), 5.0)
    acts = s.on_message({"op": "hb", "unknown": [], "rid": check}, 5.1)
    assert acts.confirmed and acts.granted == [(rid, 7)] and not s.suspect


def test_a_late_welcome_to_a_hello_from_before_the_stall_vouches_for_nothing():
    """Frozen with the first welcome unread; on waking the hello is said again
    before that welcome is read (it looked unanswered). The welcome then read
    answers the hello from before the stall, not the new one: the grant behind
    it stays held until the new hello's welcome (the broker had expired us)."""
    s = LeaseSession(1, "host", "")
    first = decode([s.hello(0.0)])[0]["gen"]
    rid, _ = s.acquire("default", 30.0, 0.0)
    s.stalled(5.0)
    hello, _ = s.retry(5.0)  # the first hello looks unanswered
    assert hello is not None
    second = decode([hello])[0]["gen"]
    assert second > first
    acts = s.on_message(welcome(gen=first), 5.0)
    assert s.suspect and not acts.confirmed and ops(acts.send, "acquire") == []
    assert s.hello_pending()  # the second hello is still unanswered
    assert s.on_message(grant(rid, 7), 5.0).granted == []  # held back
    acts = s.on_message(welcome(gen=second), 5.1)
    assert acts.confirmed and acts.granted == [] and not s.suspect
    assert [m["lease"] for m in ops(acts.send, "release")] == [7]
    assert [m["rid"] for m in ops(acts.send, "acquire")] == [rid]  # asked again
    assert not s.hello_pending()


def test_the_broker_echoes_the_hello_it_welcomes():
    from poolbroker.ledger import Ledger

    ledger = Ledger({"default": 1}, ttl=3.0)
    s = LeaseSession(1, "host", "")
    s.hello(0.0)  # (the second hello: its gen is not the default's 1)
    hello = decode([s.hello(0.0)])[0]
    outs = ledger.hello(b"c", pid=hello["pid"], host=hello["host"], name=hello["name"],
                        leases=[], now=0.0, gen=hello.get("gen"))
    (_, op, fields), = outs
    assert op == "welcome" and fields["gen"] == 2
    fields = p.decode(p.encode(op, **fields), p.BROKER_OPS)  # it crosses the wire
    assert s.on_message(fields, 0.0).urgent and not s.hello_pending()


def test_hello_announces_connected_leases_and_forfeits_the_others():
    s = welcomed()
    r1, _ = s.acquire("a", 5.0, 0.0)
    r2, _ = s.acquire("b", 5.0, 0.0)
    s.on_message(grant(r1, 1, "a"), 0.1)
    s.on_message(grant(r2, 2, "b"), 0.1)
    s.connected_frame(1, 4242, "u", "db")
    hello = decode([s.hello(1.0)])[0]
    assert hello["leases"] == [[1, "a"]]
    assert s.lost == {2} and s.leases == {1: "a"}
    assert s.release(2).send == []  # lost: the broker does not count it


def test_unknown_client_says_hello_once_until_welcomed():
    s = welcomed()
    acts = s.on_message({"op": "error", "rid": None, "code": p.E_UNKNOWN_CLIENT,
                         "message": "who?"}, 1.0)
    assert ops(acts.send, "hello") and acts.urgent
    again = s.on_message({"op": "error", "rid": None, "code": p.E_UNKNOWN_CLIENT,
                          "message": "who?"}, 1.1)
    assert again.send == []


def test_too_many_clients_fails_every_request_at_once():
    s = welcomed()
    rids = [s.acquire("default", 5.0, 0.0)[0] for _ in range(3)]
    acts = s.on_message({"op": "error", "rid": None, "code": p.E_TOO_MANY_CLIENTS,
                         "message": "max_clients 2"}, 0.1)
    assert [r for r, _ in acts.failed] == rids
    assert all(isinstance(e, BrokerError) and e.code == p.E_TOO_MANY_CLIENTS
               for _, e in acts.failed)
    assert s.requests == {}


def test_recall_debt_and_urgent_releases():
    s = welcomed()
    rid, _ = s.acquire("default", 5.0, 0.0)
    s.on_message(grant(rid, 1), 0.1)
    rid2, _ = s.acquire("default", 5.0, 0.0)
    s.on_message(grant(rid2, 2), 0.1)
    assert not s.release(1).urgent  # nobody waits: it goes with the next message
    acts = s.on_message({"op": "recall", "pool": "default", "count": 1}, 0.2)
    assert acts.recalled == ["default"]
    assert s.take_recall("default") and not s.take_recall("default")
    s.on_message({"op": "recall", "pool": "default", "count": 0, "contended": True}, 0.3)
    assert s.release(2).urgent  # others wait: send it now


def test_a_release_rides_on_the_next_request_or_heartbeat():
    """A lease costs one message: a release nobody waits for is not sent on its
    own but in the next acquire's (or heartbeat's) ``released`` field."""
    s = welcomed()
    rid, _ = s.acquire("default", 5.0, 0.0)
    s.on_message(grant(rid, 7), 0.1)
    assert s.release(7).send == []
    _, frame = s.acquire("default", 5.0, 0.2)
    assert decode([frame])[0]["released"] == [7]
    _, frame = s.acquire("default", 5.0, 0.3)
    assert "released" not in decode([frame])[0]  # sent once
    rid, _ = s.acquire("default", 5.0, 0.0)
    s.on_message(grant(rid, 8), 0.4)
    s.release(8)
    assert decode([s.heartbeat_frame({}, 0.5)])[0]["released"] == [8]
    assert s.take_releases() is None


def test_a_flush_numbers_a_heartbeat_that_carries_the_kept_back_releases():
    """Closing a pool flushes: the releases kept back go in a numbered heartbeat
    (the broker answers those), with an id no request uses; nothing to flush,
    no heartbeat."""
    s = welcomed()
    assert s.flush() is None
    rid, _ = s.acquire("default", 5.0, 0.0)
    s.on_message(grant(rid, 7), 0.1)
    s.release(7)
    beat = s.flush()
    assert beat is not None and beat != rid
    msg = decode([s.heartbeat_frame({}, 0.2, beat)])[0]
    assert msg["rid"] == beat and msg["released"] == [7] and 7 not in msg["leases"]
    assert s.flush() is None  # the beat took them
    later, _ = s.acquire("default", 5.0, 0.3)
    assert later not in (rid, beat)


def test_an_urgent_release_takes_the_waiting_ones_along():
    s = welcomed()
    for lease in (1, 2, 3):
        rid, _ = s.acquire("default", 5.0, 0.0)
        s.on_message(grant(rid, lease), 0.1)
    s.release(1)
    s.release(2)
    s.on_message({"op": "recall", "pool": "default", "count": 0, "contended": True}, 0.3)
    acts = s.release(3)
    assert acts.urgent
    (msg,) = decode(acts.send)
    assert {msg["lease"], *msg["released"]} == {1, 2, 3}
    assert s.take_releases() is None
    assert s.died() and s.releasing == []


def test_contention_is_forgotten_when_the_broker_falls_silent():
    """A broker stopped while its pool was contended never says it is over: once
    it has been silent past the quiet limit, idle connections are kept (given
    back, they could not be had again while it is away)."""
    s = welcomed()
    s.on_message({"op": "recall", "pool": "default", "count": 0, "contended": True}, 1.0)
    assert s.is_contended("default", 1.5) and not s.is_contended("other", 1.5)
    assert s.is_contended("default", 1.0 + s.quiet_limit() - 0.01)
    assert not s.is_contended("default", 1.0 + s.quiet_limit())
    s.on_message({"op": "hb", "unknown": []}, 10.0)  # it is back, still contended
    assert s.is_contended("default", 10.1)
    s.on_message({"op": "recall", "pool": "default", "count": 0, "contended": False}, 10.2)
    assert not s.is_contended("default", 10.3)


def test_lost_leases_are_reported_once_and_never_released():
    s = welcomed()
    rid, _ = s.acquire("default", 5.0, 0.0)
    s.on_message(grant(rid, 9), 0.1)
    acts = s.on_message({"op": "hb", "unknown": [9, 10]}, 0.2)
    assert acts.lost == {9} and 9 in s.lost and 9 not in s.leases
    assert s.on_message({"op": "hb", "unknown": [9]}, 0.3).lost == set()
    assert s.release(9).send == []


def test_unanswered_hello_and_check_are_sent_again():
    s = LeaseSession(1, "h", "")
    s.hello(0.0)
    hello, check = s.retry(0.4)
    assert hello is None and check is None
    hello, check = s.retry(2.1)
    assert hello is not None and check is None and s.hello_gen == 2
    s.on_message(welcome(), 2.2)
    first = s.stalled(3.0)
    _, check = s.retry(5.1)
    assert check is not None and check != first and s.check_rid == check


def test_died_fails_requests_and_loses_leases():
    s = welcomed()
    r1, _ = s.acquire("default", 5.0, 0.0)
    r2, _ = s.acquire("default", 5.0, 0.0)
    s.on_message(grant(r1, 1), 0.1)
    failed, lost = s.died()
    assert failed == [r2] and lost == {1}
    assert s.leases == {} and s.requests == {} and s.hello_gen == 0 and s.epoch is None


# ------------------------------------------------------------------ properties

class SessionAgainstABroker(RuleBasedStateMachine):
    """A broker that grants, repeats, forgets and recalls in any order, and a
    process that asks, cancels, connects, releases and stalls. Whatever happens,
    every lease the broker granted ends in exactly one place: delivered to its
    request, given back, held while suspect, or known lost; and every request is
    answered at most once, never after a successful cancel."""

    def __init__(self):
        super().__init__()
        self.s = LeaseSession(1, "h", "")
        self.now = 0.0
        self.leases = itertools.count(1)
        self.asked = set()  # rids the broker has seen
        self.cancelled = set()
        self.answered = {}  # rid -> "granted" | "failed"
        self.granted = {}  # lease -> rid, as the broker sent them
        self.given_back = set()
        self.delivered = set()
        self.released = set()
        self.forgotten = set()  # lost, and their connections closed
        self.pending = []  # the gens of hellos sent and not welcomed yet, oldest first
        self.unvouched = False  # stalled, and the broker has not answered since
        self.stall_gen = 0  # the latest hello sent when the process stalled
        self.sent_gen = 0  # the latest hello sent
        self.send(self.s.hello(self.now))
        self.broker_welcomes()

    def send(self, frame):
        for m in decode([frame]):
            if m["op"] == "acquire":
                self.asked.add(m["rid"])
            elif m["op"] == "release":
                self.given_back.add(m["lease"])
            elif m["op"] == "hello":
                self.pending.append(m["gen"])
                self.sent_gen = m["gen"]

    def apply(self, acts):
        for f in acts.send:
            self.send(f)
        for rid, lease in acts.granted:
            assert not self.unvouched, "a grant delivered after a stall, before the " \
                "broker answered anything said after it"
            assert rid not in self.answered, "a request answered twice"
            assert rid not in self.cancelled, "answered after a successful cancel"
            self.answered[rid] = "granted"
            self.delivered.add(lease)
        for rid, _ in acts.failed:
            assert rid not in self.answered and rid not in self.cancelled
            self.answered[rid] = "failed"

    @rule(timeout=st.floats(0.1, 10))
    def acquire(self, timeout):
        _, frame = self.s.acquire("default", timeout, self.now)
        self.send(frame)

    @precondition(lambda self: self.s.requests)
    @rule(data=st.data())
    def cancel(self, data):
        rid = data.draw(st.sampled_from(sorted(self.s.requests)))
        frame = self.s.cancel(rid)
        assert frame is not None
        self.cancelled.add(rid)

    @precondition(lambda self: self.asked)
    @rule(data=st.data(), repeat=st.booleans())
    def broker_grants(self, data, repeat):
        rid = data.draw(st.sampled_from(sorted(self.asked)))
        mine = [lz for lz, r in self.granted.items() if r == rid]
        if repeat and mine:  # the same grant again (a retried request)
            lease = mine[0]
        else:
            lease = next(self.leases)
            self.granted[lease] = rid
        self.apply(self.s.on_message(grant(rid, lease), self.now))

    @precondition(lambda self: self.s.leases)
    @rule(data=st.data())
    def connect_or_release(self, data):
        lease = data.draw(st.sampled_from(sorted(self.s.leases)))
        if data.draw(st.booleans()):
            self.apply(self.s.connected_frame(lease, 100 + lease, "u", "d"))
        else:
            self.apply(self.s.release(lease))
            self.released.add(lease)

    @rule(seconds=st.floats(0, 3))
    def time_passes(self, seconds):
        self.now += seconds
        hello, check = self.s.retry(self.now)
        if hello is not None:
            self.send(hello)

    @rule(seconds=st.floats(0, 5))
    def stall(self, seconds):
        self.now += seconds  # frozen meanwhile
        if self.s.stalled(self.now) is not None:
            self.unvouched, self.stall_gen = True, self.sent_gen
        hello, _ = self.s.retry(self.now)  # on waking, what looks unanswered goes again
        if hello is not None:
            self.send(hello)

    @precondition(lambda self: self.s.suspect)
    @rule(data=st.data())
    def broker_answers_the_check(self, data):
        unknown = data.draw(st.lists(st.sampled_from(sorted(self.granted) or [0]),
                                     max_size=3))
        self.unvouched = False
        self.apply(self.s.on_message({"op": "hb", "unknown": unknown,
                                      "rid": self.s.check_rid}, self.now))

    def welcome(self, gen, **fields):
        """The broker welcomes the hello ``gen``: only one said after the stall
        vouches for us."""
        if gen > self.stall_gen:
            self.unvouched = False
        self.apply(self.s.on_message(welcome(gen=gen, **fields), self.now))

    @precondition(lambda self: self.pending)
    @rule()
    def broker_welcomes(self):
        self.welcome(self.pending.pop(0))  # the oldest hello unanswered

    @rule()
    def broker_forgets_the_client(self):
        self.apply(self.s.on_message({"op": "error", "rid": None, "code": p.E_UNKNOWN_CLIENT,
                                      "message": "who?"}, self.now))

    @precondition(lambda self: self.granted)
    @rule(data=st.data())
    def broker_forgets_leases(self, data):
        unknown = data.draw(st.lists(st.sampled_from(sorted(self.granted)), max_size=3))
        self.apply(self.s.on_message({"op": "hb", "unknown": unknown}, self.now))

    @rule(rejected=st.booleans())
    def broker_restarts(self, rejected):
        self.send(self.s.hello(self.now))
        gen = self.pending[-1]
        self.pending = []  # the new run never saw the earlier hellos
        lost = sorted(self.s.leases)[:1] if rejected else []
        self.welcome(gen, epoch=f"e{self.now}", rejected=lost)

    @precondition(lambda self: self.s.requests)
    @rule(data=st.data())
    def broker_refuses(self, data):
        rid = data.draw(st.sampled_from(sorted(self.s.requests)))
        self.apply(self.s.on_message({"op": "error", "rid": rid, "code": p.E_TIMEOUT,
                                      "message": "timeout"}, self.now))

    @invariant()
    def every_granted_lease_has_one_place(self):
        held = {lease for _, _, lease in self.s.held}
        for lease in self.granted:
            places = [lease in self.s.leases, lease in held, lease in self.s.lost,
                      lease in self.given_back, lease in self.released,
                      lease in self.forgotten]
            assert any(places), f"lease {lease} leaked"
            # delivered leases are the caller's until released or lost
            if lease in self.delivered:
                assert lease in self.s.leases or lease in self.released \
                    or lease in self.s.lost or lease in self.forgotten
        assert not (set(self.s.leases) & self.s.lost)
        assert self.s.suspect or not self.s.held

    @rule(count=st.integers(0, 2), contended=st.booleans())
    def broker_recalls(self, count, contended):
        self.apply(self.s.on_message({"op": "recall", "pool": "default", "count": count,
                                      "contended": contended}, self.now))

    @rule()
    def a_recall_is_served(self):
        self.s.take_recall("default")

    @precondition(lambda self: self.s.lost)
    @rule(data=st.data())
    def a_lost_lease_is_forgotten(self, data):
        # what a pool does once it closed the lost lease's connection
        lease = data.draw(st.sampled_from(sorted(self.s.lost)))
        self.s.forget(lease)
        self.forgotten.add(lease)

    @rule()
    def the_link_dies(self):
        failed, _ = self.s.died()
        for rid in failed:
            self.answered[rid] = "failed"
        self.pending, self.unvouched, self.stall_gen = [], False, 0  # a new session
        self.send(self.s.hello(self.now))
        self.welcome(self.pending.pop(), epoch=f"d{self.now}")

    @invariant()
    def suspect_until_the_broker_answers_what_was_said_after_the_stall(self):
        assert self.s.suspect or not self.unvouched

    @invariant()
    def calm_means_nothing_to_give_back(self):
        # pools skip keeps() while calm: it must never be True with a reason to give back
        s = self.s
        assert s.calm == (not s.lost and not any(s.debt.values())
                          and not any(s.contended.values()))

    @invariant()
    def requests_are_outstanding_or_answered(self):
        for rid in self.s.requests:
            assert rid not in self.answered and rid not in self.cancelled


TestSessionAgainstABroker = SessionAgainstABroker.TestCase
TestSessionAgainstABroker.settings = settings(max_examples=150, stateful_step_count=40,
                                              deadline=None)


def test_heartbeats_ask_for_an_answer_only_after_two_quiet_beats():
    s = welcomed(now=0.0, heartbeat=1.0)
    ack = lambda now: decode([s.heartbeat_frame({}, now)])[0]["ack"]  # noqa: E731
    assert not ack(1.0)  # the welcome came a second ago
    assert ack(2.0)  # two heartbeats without a word
    s.on_message({"op": "hb", "unknown": []}, 2.1)
    assert not ack(3.0)
    assert s.quiet_limit() == 4.0  # a live broker answers well within it


def test_heartbeats_report_checkouts_only_for_leases_held():
    s = welcomed(now=0.0, heartbeat=1.0)
    assert "busy" not in decode([s.heartbeat_frame({}, 1.0, busy={})])[0]
    s.leases[7] = "default"
    sent = decode([s.heartbeat_frame({}, 1.0, busy={7: 2.5, 8: 1.0})])[0]
    assert sent["busy"] == [[7, 2.5]]  # lease 8 is not ours (any more): not reported
