"""The ledger's rules, one by one, with time passed in."""

import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolbroker import protocol as p
from poolbroker.leaseids import LeaseIds
from poolbroker.ledger import AHEAD_CALM, ROTATE_AFTER, Ledger

KEY = b"k" * 32  # the key a previous run of the broker left in its state file

A, B, C = b"a", b"b", b"c"


def make(pools=None, ttl=4.0):
    ledger = Ledger(pools or {"default": 2}, ttl=ttl)
    for cid in (A, B, C):
        ledger.hello(cid, pid=1, host="h", now=0.0)
    return ledger


def ops(outs, op):
    return [(cid, f) for cid, o, f in outs if o == op]


def asked(outs):
    """What the recall messages in ``outs`` ask of each client (a target count)."""
    return {cid: f["count"] for cid, f in ops(outs, "recall")}


def issued(pool="default", n=1, key=KEY):
    """Ids a previous run of the broker (same key) granted in ``pool``."""
    ids = LeaseIds(key, first_seq=1000)
    return [ids.issue(pool) for _ in range(n)]


def restarted(pools, ttl=4.0, grace_until=4.0, **kw):
    """A ledger just after a restart: the previous run's key, in its grace period."""
    return Ledger(pools, ttl=ttl, grace_until=grace_until, lease_ids=LeaseIds(KEY), **kw)


def grant(ledger, cid, rid, now=0.0, pool="default", timeout=10.0):
    outs = ledger.acquire(cid, rid=rid, pool=pool, timeout=timeout, now=now)
    grants = ops(outs, "grant")
    return grants[0][1]["lease"] if grants else None


def test_grants_up_to_max_then_queues():
    ledger = make()
    assert grant(ledger, A, 1) is not None
    assert grant(ledger, B, 1) is not None
    assert grant(ledger, C, 1) is None
    shown = ledger.snapshot(0)["pools"]["default"]
    assert {k: shown[k] for k in ("max", "leased", "idle", "busy", "waiting", "paused",
                                  "draining", "fencing", "unconfirmed", "contended",
                                  "clients")} == {
        "max": 2, "leased": 2, "idle": 0, "busy": 2, "waiting": 1, "paused": False,
        "draining": False, "fencing": 0, "unconfirmed": 0, "contended": True, "clients": 3}


def test_counters_follow_grants_waits_timeouts_recalls_and_expiries():
    ledger = make({"default": 1})
    first = grant(ledger, A, 1, now=0.0)
    assert grant(ledger, B, 1, now=0.0, timeout=0.5) is None
    ledger.tick(1.0)  # B's request is past its deadline
    assert grant(ledger, C, 1, now=1.0) is None
    ledger.heartbeat(A, idle={"default": 1}, leases=[first], now=1.0)  # A's is idle: recalled
    outs = ledger.release(A, lease=first, now=1.5)
    assert ops(outs, "grant"), "C is served when A gives its lease back"
    # a client that gives up at its deadline cancels: a timeout too (whichever
    # side notices first); a cancel well before the deadline is not
    ledger.acquire(B, rid=2, pool="default", timeout=1.0, now=1.6)
    ledger.cancel(B, rid=2, now=2.55)
    ledger.acquire(B, rid=3, pool="default", timeout=1.0, now=2.6)
    ledger.cancel(B, rid=3, now=2.7)
    ledger.tick(10.0)  # everyone silent since: C's lease expires
    view = ledger.snapshot(10.0)["pools"]["default"]
    assert (view["grants"], view["timeouts"], view["recalls"], view["expired"]) == (2, 2, 1, 1)
    assert view["wait_count"] == 2 and view["wait_sum"] == pytest.approx(0.5)
    buckets = dict(view["wait_buckets"])
    assert buckets[0.001] == 1 and buckets[0.25] == 1 and buckets[0.5] == 2


def test_a_request_with_timeout_0_is_granted_from_room_or_refused_at_once():
    ledger = make({"default": 2})
    held = grant(ledger, A, 1)
    assert grant(ledger, B, 1, timeout=0.0) is not None, "room: granted as usual"
    ledger.heartbeat(A, idle={"default": 1}, leases=[held], now=0.1)  # A's lease is idle
    outs = ledger.acquire(C, rid=1, pool="default", timeout=0.0, now=0.2)
    assert [(cid, f["code"]) for cid, f in ops(outs, "error")] == [(C, p.E_TIMEOUT)]
    assert not ops(outs, "recall"), "nobody gives a lease back for a request that does not wait"
    view = ledger.snapshot(0.2)["pools"]["default"]
    assert (view["waiting"], view["contended"], view["timeouts"]) == (0, False, 0)
    assert grant(ledger, C, 2, now=0.3) is None, "a request that waits still queues"


def test_a_lease_asked_ahead_takes_only_room_to_spare_and_never_waits():
    ledger = make({"default": 3})
    grant(ledger, A, 1)
    outs = ledger.acquire(A, rid=2, pool="default", timeout=10.0, now=0.1, ahead=True)
    assert ops(outs, "grant"), "two slots free: one may be spared"
    outs = ledger.acquire(B, rid=1, pool="default", timeout=10.0, now=0.2, ahead=True)
    assert [(cid, f["code"]) for cid, f in ops(outs, "error")] == [(B, p.E_TIMEOUT)]
    assert "to spare" in ops(outs, "error")[0][1]["message"]
    assert not ops(outs, "recall")
    view = ledger.snapshot(0.2)["pools"]["default"]
    assert (view["leased"], view["waiting"], view["contended"]) == (2, 0, False)
    assert grant(ledger, B, 2, now=0.3) is not None, "the last slot goes to one who needs it"


def test_no_lease_is_spared_where_a_request_had_to_wait_lately():
    ledger = make({"default": 4}, ttl=60.0)
    first = grant(ledger, A, 1)
    for rid in (2, 3, 4):
        grant(ledger, A, rid)
    assert grant(ledger, B, 1, now=1.0) is None, "the pool is full: B waits"
    ledger.release(A, lease=first, now=1.1)  # B is served; then A gives back two more
    for lease in list(ledger.clients[A].leases)[:2]:
        ledger.release(A, lease=lease, now=1.2)
    calm = 1.0 + AHEAD_CALM
    ledger.tick(calm - 0.1)  # past CONTENTION_LINGER: the pool is no longer contended
    assert not ledger.snapshot(calm - 0.1)["pools"]["default"]["contended"]
    outs = ledger.acquire(C, rid=1, pool="default", timeout=0.0, now=calm - 0.1, ahead=True)
    assert ops(outs, "error") and not ops(outs, "grant"), "two slots free, but B waited lately"
    outs = ledger.acquire(C, rid=2, pool="default", timeout=0.0, now=calm + 0.1, ahead=True)
    assert ops(outs, "grant"), "calm for AHEAD_CALM: a slot may be spared again"


def test_release_goes_to_the_oldest_waiter():
    ledger = make({"default": 1})
    lease = grant(ledger, A, 1)
    assert grant(ledger, B, 1) is None
    assert grant(ledger, C, 1) is None
    outs = ledger.release(A, lease=lease, now=1.0)
    assert [cid for cid, _ in ops(outs, "grant")] == [B]


def test_retried_acquire_is_idempotent():
    ledger = make()
    lease = grant(ledger, A, 7)
    outs = ledger.acquire(A, rid=7, pool="default", timeout=1, now=0.1)
    assert ops(outs, "grant") == [(A, {"rid": 7, "pool": "default", "lease": lease, "seq": 1})]
    assert ledger.leased("default") == 1


def test_unknown_pool_error_names_the_pool_and_the_known_ones():
    ledger = make()
    outs = ledger.acquire(A, rid=1, pool="nope", timeout=1, now=0)
    [(cid, err)] = ops(outs, "error")
    assert err["code"] == p.E_UNKNOWN_POOL
    assert "'nope'" in err["message"] and "default" in err["message"]


def test_unknown_client_must_say_hello_first():
    ledger = make()
    outs = ledger.acquire(b"stranger", rid=1, pool="default", timeout=1, now=0)
    assert ops(outs, "error")[0][1]["code"] == p.E_UNKNOWN_CLIENT
    assert ledger.leased("default") == 0


def test_waiter_times_out_and_is_never_granted_afterwards():
    ledger = make({"default": 1})
    lease = grant(ledger, A, 1)
    assert grant(ledger, B, 1, timeout=2.0) is None
    # B's turn comes at ROTATE_AFTER (A is asked for its lease, but keeps it)
    assert ledger.next_deadline() == ROTATE_AFTER
    while ledger.next_deadline() < 2.0:
        ledger.tick(ledger.next_deadline())
    assert ledger.next_deadline() == 2.0
    outs = ledger.tick(2.0)
    assert ops(outs, "error")[0][1]["code"] == p.E_TIMEOUT
    outs = ledger.release(A, lease=lease, now=2.5)
    assert ops(outs, "grant") == []
    assert ledger.leased("default") == 0


def test_cancelled_request_leaves_the_queue():
    ledger = make({"default": 1})
    lease = grant(ledger, A, 1)
    grant(ledger, B, 1)
    ledger.cancel(B, rid=1, now=0.5)
    assert ops(ledger.release(A, lease=lease, now=1.0), "grant") == []


def test_silent_client_loses_its_leases_after_ttl():
    ledger = make({"default": 1}, ttl=3.0)
    grant(ledger, A, 1, now=0.0)
    ledger.heartbeat(B, idle={}, leases=[], now=2.0)
    grant(ledger, B, 1, now=2.0, timeout=30)
    ledger.heartbeat(B, idle={}, leases=[], now=3.5)
    outs = ledger.tick(3.5)  # A silent since 0.0, ttl 3.0
    assert ops(outs, "grant") == [(B, {"rid": 1, "pool": "default", "lease": ledger.clients[B]
                                      .granted[1], "seq": 2})]
    assert A not in ledger.clients


def test_a_client_waking_after_expiry_is_told_its_leases_are_lost():
    ledger = make({"default": 1}, ttl=3.0)
    lease = grant(ledger, A, 1, now=0.0)
    ledger.heartbeat(B, idle={}, leases=[], now=2.0)
    grant(ledger, B, 1, now=2.0, timeout=30)
    ledger.heartbeat(B, idle={}, leases=[], now=3.5)
    ledger.tick(3.5)  # A expired; B got its slot
    outs = ledger.heartbeat(A, idle={}, leases=[lease], now=4.0)
    assert ops(outs, "error")[0][1]["code"] == p.E_UNKNOWN_CLIENT
    outs = ledger.hello(A, pid=1, host="h", leases=[(lease, "default")], now=4.0)
    assert ops(outs, "welcome")[0][1]["rejected"] == [lease]
    assert ledger.leased("default") == 1  # B's, not A's again


def test_bye_returns_everything_at_once():
    ledger = make({"default": 2})
    grant(ledger, A, 1)
    grant(ledger, A, 2)
    grant(ledger, B, 1)
    outs = ledger.bye(A, now=1.0)
    assert len(ops(outs, "grant")) == 1
    assert ledger.clients[B].held("default") == 1


def test_idle_holders_are_recalled_when_someone_waits():
    ledger = make({"default": 2})
    grant(ledger, A, 1)
    grant(ledger, A, 2)
    ledger.heartbeat(A, idle={"default": 2}, leases=list(ledger.clients[A].leases), now=0.1)
    outs = ledger.acquire(B, rid=1, pool="default", timeout=5, now=0.2)
    assert asked(outs)[A] == 1
    assert ops(outs, "recall")[0][1]["contended"] is True
    # the waiter gives up: the recall is withdrawn
    outs = ledger.cancel(B, rid=1, now=0.3)
    assert asked(outs) == {A: 0}


def test_contention_ends_at_once_when_nobody_waits_and_a_slot_is_free():
    """Four clients each holding one lease of four; a fifth waits, is served,
    and leaves. With its slot free and nobody waiting, the holders hear at once
    that the pool is no longer contended (else, for CONTENTION_LINGER, each would
    give back its idle connection between uses and ask for it again)."""
    ledger = make({"default": 4}, ttl=60.0)
    D, E = b"d", b"e"
    for cid in (D, E):
        ledger.hello(cid, pid=1, host="h", now=0.0)
    held = {cid: grant(ledger, cid, 1) for cid in (A, B, C, D)}
    assert grant(ledger, E, 1, now=1.0) is None
    outs = ledger.release(A, lease=held[A], now=1.1)  # E is served: the pool is full
    assert [cid for cid, _ in ops(outs, "grant")] == [E]
    assert ledger.snapshot(1.1)["pools"]["default"]["contended"], "full, a wait just now"
    e_lease = next(iter(ledger.clients[E].leases))
    outs = ledger.release(E, lease=e_lease, now=1.2)
    assert not ledger.snapshot(1.2)["pools"]["default"]["contended"]
    told = {cid: f["contended"] for cid, f in ops(outs, "recall")}
    assert told and not any(told.values()) and {B, C, D} <= set(told), told


def test_idle_connections_of_a_waiting_client_are_recalled_too():
    # one process, two local pools on the same budget: one keeps an idle
    # connection warm while the other waits; only a recall moves it
    ledger = make({"default": 1})
    lease = grant(ledger, A, 1)
    assert grant(ledger, A, 2) is None
    outs = ledger.heartbeat(A, idle={"default": 1}, leases=[lease], now=1.0)
    assert asked(outs) == {A: 1}
    outs = ledger.release(A, lease=lease, now=1.1)
    assert [f["rid"] for _, f in ops(outs, "grant")] == [2]


def test_fair_share_busy_holder_above_share_gives_back_to_a_starving_client():
    # A holds all 4 and keeps wanting more; B wants 1. Pure FIFO would feed A forever.
    ledger = make({"default": 4})
    leases = [grant(ledger, A, rid) for rid in range(1, 5)]
    for rid in range(5, 9):
        assert grant(ledger, A, rid) is None
    outs = ledger.acquire(B, rid=1, pool="default", timeout=5, now=0.1)
    assert asked(outs)[A] == 1 and not asked(outs).get(B)
    outs = ledger.release(A, lease=leases[0], now=0.2)
    # B is below its share (2 of 4) and goes first although A's waiters are older
    assert [cid for cid, _ in ops(outs, "grant")] == [B]


def test_no_recall_churn_when_all_waiters_are_at_or_above_share():
    ledger = make({"default": 2})
    grant(ledger, A, 1)
    grant(ledger, B, 1)
    outs = ledger.acquire(A, rid=2, pool="default", timeout=5, now=0.1)
    outs += ledger.acquire(B, rid=2, pool="default", timeout=5, now=0.1)
    assert not any(asked(outs).values())


def test_reannounced_leases_are_taken_back_only_up_to_max_and_only_if_issued():
    ledger = restarted({"default": 2, "other": 1}, ttl=10.0)
    real = issued(n=3)
    forged = [real[0] ^ 1, 2**63 - 1, 7]
    outs = ledger.hello(A, pid=1, host="h", leases=[(real[0], "default"), (real[1], "other"),
                                                   *[(f, "default") for f in forged],
                                                   (real[2], "nope")], now=0)
    welcome = ops(outs, "welcome")[0][1]
    # another pool's id, forged ids and an unknown pool are refused
    assert sorted(welcome["rejected"]) == sorted([real[1], *forged, real[2]])
    assert list(ledger.clients[A].leases) == [real[0]]
    # never more than the pool could hold, whoever announces them
    more = issued(n=4)[1:]
    outs = ledger.hello(B, pid=2, host="h", leases=[(i, "default") for i in more], now=0)
    assert len(ops(outs, "welcome")[0][1]["rejected"]) == 2
    assert ledger.leased("default") == 2
    # the id counter is never moved by what a peer says
    ledger.hello(C, pid=3, host="h", now=0)
    ledger.tick(4.0)
    ledger.release(A, lease=real[0], now=4.1)
    lease = grant(ledger, C, 1, now=4.2)
    assert lease is not None and lease < 2**63 and ledger.ids.valid(lease, "default")


def test_ids_issued_under_the_previous_mac_are_still_adopted_after_a_restart():
    # brokers before BLAKE2b ids put HMAC-SHA256(key, "seq|pool")[:4] in the low bits
    def hmac_id(seq: int, pool: str) -> int:
        mac = hmac.digest(KEY, f"{seq}|{pool}".encode(), "sha256")[:4]
        return seq << 32 | int.from_bytes(mac, "big")

    ledger = restarted({"default": 2}, ttl=10.0)
    old, wrong_pool = hmac_id(5000, "default"), hmac_id(5001, "other")
    outs = ledger.hello(A, pid=1, host="h", leases=[(old, "default"), (wrong_pool, "default"),
                                                   (old ^ 1 << 8, "default")], now=0)
    assert sorted(ops(outs, "welcome")[0][1]["rejected"]) == sorted([wrong_pool, old ^ 1 << 8])
    assert list(ledger.clients[A].leases) == [old]


def test_outside_the_grace_period_unknown_leases_are_never_adopted():
    ledger = Ledger({"default": 2}, ttl=4.0, lease_ids=LeaseIds(KEY))
    outs = ledger.hello(A, pid=1, host="h", leases=[(i, "default") for i in issued(n=2)],
                        now=0)
    assert len(ops(outs, "welcome")[0][1]["rejected"]) == 2 and ledger.leased("default") == 0
    ledger.hello(B, pid=2, host="h", now=0)
    assert grant(ledger, B, 1) is not None  # honest clients still served


def test_without_the_previous_key_ids_cannot_be_checked_but_stay_bounded():
    ledger = restarted({"default": 2}, ids_verifiable=False)
    ledger.ids = LeaseIds()  # the state file was lost: a new key
    outs = ledger.hello(A, pid=1, host="h", leases=[(i, "default") for i in issued(n=3)],
                        now=0)
    assert len(ops(outs, "welcome")[0][1]["rejected"]) == 1 and ledger.leased("default") == 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([A, B, C]),
                          st.lists(st.one_of(st.integers(0, 2**63 - 1),
                                             st.sampled_from(issued(n=6) + issued("x", 2))),
                                   max_size=8),
                          st.sampled_from(["default", "x", "nope"])), max_size=6))
def test_reannouncing_never_adopts_a_forged_id_nor_more_than_max(hellos):
    ledger = restarted({"default": 3, "x": 1})
    issuer = LeaseIds(KEY)
    for cid, ids, pool in hellos:
        ledger.hello(cid, pid=1, host="h", leases=[(i, pool) for i in ids], now=0)
        ledger.check()
    for name, pool in ledger.pools.items():
        assert len(pool.leases) <= pool.max
        assert all(issuer.valid(lease, name) for lease in pool.leases)


def test_grace_period_grants_nothing_until_it_ends():
    ledger = restarted({"default": 2})
    old = issued(n=2)
    ledger.hello(A, pid=1, host="h", now=0)
    assert grant(ledger, A, 1, now=0.5) is None
    assert ledger.snapshot(0.5)["grace_s"] == 3.5
    # a holder from before the restart re-announces during the grace period
    ledger.hello(B, pid=2, host="h", leases=[(old[0], "default"), (old[1], "default")], now=1.0)
    assert ledger.next_deadline() == 4.0
    ledger.heartbeat(A, idle={}, leases=[], now=3.9)
    ledger.heartbeat(B, idle={}, leases=old, now=3.9)
    assert ops(ledger.tick(4.0), "grant") == []  # the budget is full: still waiting
    outs = ledger.release(B, lease=old[0], now=4.1)
    assert [cid for cid, _ in ops(outs, "grant")] == [A]


def test_too_many_queued_requests_from_one_client_are_refused():
    ledger = Ledger({"default": 0}, ttl=4.0, max_waiting_per_client=3)
    ledger.hello(A, pid=1, host="h", now=0)
    for rid in range(3):
        assert ops(ledger.acquire(A, rid=rid, pool="default", timeout=5, now=0), "error") == []
    [(cid, err)] = ops(ledger.acquire(A, rid=9, pool="default", timeout=5, now=0), "error")
    assert err["code"] == p.E_TOO_MANY_REQUESTS


def test_heartbeat_reports_leases_the_broker_does_not_know():
    ledger = make()
    lease = grant(ledger, A, 1)
    outs = ledger.heartbeat(A, idle={}, leases=[lease, 424242], now=1)
    assert ops(outs, "hb")[0][1]["unknown"] == [424242]


def test_every_message_the_ledger_emits_is_valid_on_the_wire():
    ledger = make({"default": 1})
    outs = ledger.hello(A, pid=1, host="h", now=0)
    outs += ledger.acquire(A, rid=1, pool="default", timeout=1, now=0)
    outs += ledger.acquire(B, rid=1, pool="default", timeout=1, now=0)
    outs += ledger.acquire(C, rid=1, pool="nope", timeout=1, now=0)
    outs += ledger.tick(5)
    for _, op, fields in outs:
        p.decode(p.encode(op, **fields), p.BROKER_OPS)


@pytest.mark.parametrize("bad", [{}, {"x": -1}, {"x": 1.5}])
def test_bad_pool_config_is_refused(bad):
    with pytest.raises(ValueError):
        Ledger(bad)


def test_resize_growing_serves_waiters_at_once():
    ledger = make({"default": 1})
    grant(ledger, A, 1)
    assert grant(ledger, B, 1) is None
    outs = ledger.resize("default", 2, now=1)
    assert [cid for cid, _ in ops(outs, "grant")] == [B]


def test_resize_shrinking_recalls_idle_first_and_grants_nothing_until_below():
    ledger = make({"default": 3})
    leases_a = [grant(ledger, A, r) for r in (1, 2)]
    lease_b = grant(ledger, B, 1)
    ledger.heartbeat(A, idle={"default": 2}, leases=leases_a, now=0.1)
    ledger.heartbeat(B, idle={"default": 0}, leases=[lease_b], now=0.1)
    outs = ledger.resize("default", 1, now=0.2)
    assert asked(outs) == {A: 2}  # A's idle ones
    assert grant(ledger, C, 1, now=0.3) is None
    ledger.release(A, lease=leases_a[0], now=0.4)
    outs = ledger.release(A, lease=leases_a[1], now=0.5)
    assert ops(outs, "grant") == []  # B's busy lease fills the new max of 1
    outs = ledger.release(B, lease=lease_b, now=0.6)
    assert [cid for cid, _ in ops(outs, "grant")] == [C]


def test_drain_refuses_new_requests_fails_waiters_and_asks_everything_back():
    ledger = make({"default": 1})
    lease = grant(ledger, A, 1)
    grant(ledger, B, 1)
    outs = ledger.drain("default", now=1)
    assert [(cid, f["code"]) for cid, f in ops(outs, "error")] == [(B, p.E_DRAINING)]
    assert ledger.clients[A].recall["default"] == 1  # everything A holds is asked back
    [(_, err)] = ops(ledger.acquire(C, rid=1, pool="default", timeout=5, now=1), "error")
    assert err["code"] == p.E_DRAINING and "draining" in err["message"]
    ledger.release(A, lease=lease, now=2)
    ledger.resume("default", now=3)
    assert grant(ledger, C, 2, now=3) is not None


def test_pause_holds_requests_until_resume():
    ledger = make({"default": 2})
    ledger.pause("default", now=0)
    assert grant(ledger, A, 1, now=0) is None
    assert ledger.snapshot(0)["pools"]["default"]["waiting"] == 1
    outs = ledger.resume("default", now=1)
    assert [cid for cid, _ in ops(outs, "grant")] == [A]


def test_with_fencing_expired_leases_stay_counted_until_fenced():
    ledger = Ledger({"default": 1}, ttl=3.0, fence=True, fence_tag="/pbx:")
    assert ops(ledger.hello(A, pid=1, host="h", now=0), "welcome")[0][1]["fence"] == "/pbx:"
    ledger.hello(B, pid=2, host="h", now=0)
    lease = grant(ledger, A, 1, now=0)
    ledger.connected(A, lease=lease, backend_pid=4242, now=0, user="app", db="shop")
    assert ledger.fence_scopes == {("app", "shop")}
    assert grant(ledger, B, 1, now=0, timeout=30) is None
    ledger.heartbeat(B, idle={}, leases=[], now=2.9)
    outs = ledger.tick(3.0)  # A is silent: expired, but its backend may still run
    assert [f for cid, op, f in outs if op == "fence"] == [
        {"leases": [[lease, 4242, "default", "app", "shop"]]}]
    assert ops(outs, "grant") == []
    assert ledger.snapshot(3.0)["pools"]["default"]["fencing"] == 1
    # A wakes up and re-announces: refused, its backend is being terminated
    welcome = ops(ledger.hello(A, pid=1, host="h", leases=[(lease, "default")], now=3.1),
                  "welcome")[0][1]
    assert welcome["rejected"] == [lease]
    outs = ledger.fenced([lease], now=3.5)
    assert [cid for cid, _ in ops(outs, "grant")] == [B]
    # and after fencing too (found by the chaos suite: a fenced lease re-adopted)
    welcome = ops(ledger.hello(A, pid=1, host="h", leases=[(lease, "default")], now=3.6),
                  "welcome")[0][1]
    assert welcome["rejected"] == [lease] and ledger.leased("default") == 1


def test_with_fencing_the_grace_period_ends_with_a_sweep():
    ledger = restarted({"default": 1}, ttl=3.0, fence=True, grace_until=3.0)
    [old] = issued()
    ledger.hello(A, pid=1, host="h", leases=[(old, "default")], now=1)
    ledger.hello(B, pid=2, host="h", now=1)
    assert grant(ledger, B, 1, now=1) is None
    outs = ledger.tick(3.0)
    assert [f for _, op, f in outs if op == "sweep"] == [{"known": [old], "scopes": []}]
    ledger.release(A, lease=old, now=3.1)
    assert ops(ledger.tick(3.2), "grant") == []  # still sweeping: nothing granted
    assert [cid for cid, _ in ops(ledger.swept(3.3), "grant")] == [B]


def test_heartbeats_reconcile_a_lost_release_and_a_lost_grant():
    ledger = make({"default": 2})
    first = grant(ledger, A, 1)
    outs = ledger.acquire(A, rid=2, pool="default", timeout=10, now=0.0)
    [(_, lost_grant)] = ops(outs, "grant")
    assert lost_grant["seq"] == 2
    # A saw grant 1 only (grant 2 was dropped on the way) and released lease 1,
    # but that release was lost too
    beat = dict(idle={}, leases=[], epoch=ledger.epoch, seen=1)
    outs = ledger.heartbeat(A, now=0.5, **beat)
    assert ledger.leased("default") == 1 and ops(outs, "grant") == []  # 1 freed; 2 is young
    assert first not in ledger.clients[A].leases
    outs = ledger.heartbeat(A, now=3.0, **beat)  # long after: the grant is sent again
    assert ops(outs, "grant") == [(A, lost_grant)]
    # a beat from another broker run proves nothing
    ledger.heartbeat(A, idle={}, leases=[], now=3.1, epoch="other", seen=99)
    assert ledger.leased("default") == 1
    ledger.heartbeat(A, idle={}, leases=[lost_grant["lease"]], now=3.2, epoch=ledger.epoch,
                     seen=2)
    assert ledger.leased("default") == 1  # held, listed: kept


def test_an_unconfirmed_release_keeps_the_slot_until_confirmed_or_held_long_enough():
    ledger = Ledger({"default": 1}, ttl=4.0, unconfirmed_hold=100.0)
    for cid in (A, B):
        ledger.hello(cid, pid=1, host="h", now=0.0)
    lease = grant(ledger, A, 1)
    assert ledger.release(A, lease=lease, now=1.0, unconfirmed=True) == []
    assert ledger.leased("default") == 1 and lease not in ledger.clients[A].leases
    assert grant(ledger, B, 1, now=1.0, timeout=500) is None  # still counted
    ledger.bye(A, now=2.0)  # its client leaving changes nothing
    ledger.heartbeat(B, idle={}, leases=[], now=3.0)
    assert ledger.leased("default") == 1
    outs = ledger.release(A, lease=lease, now=4.0)  # the server was seen to close it
    assert [cid for cid, _ in ops(outs, "grant")] == [B]
    # never confirmed: freed after the hold
    lease_b = ledger.clients[B].granted[1]
    ledger.release(B, lease=lease_b, now=5.0, unconfirmed=True)
    ledger.hello(C, pid=3, host="h", now=5.0)
    assert grant(ledger, C, 1, now=5.0, timeout=500) is None
    ledger.heartbeat(C, idle={}, leases=[], now=104.0)
    ledger.heartbeat(B, idle={}, leases=[], now=104.0)
    assert ops(ledger.tick(104.0), "grant") == []
    ledger.heartbeat(C, idle={}, leases=[], now=105.5)
    assert [cid for cid, _ in ops(ledger.tick(105.5), "grant")] == [C]
    ledger.check()


def test_with_fencing_an_unconfirmed_release_is_fenced():
    ledger = Ledger({"default": 1}, ttl=4.0, fence=True)
    ledger.hello(A, pid=1, host="h", now=0.0)
    lease = grant(ledger, A, 1)
    ledger.connected(A, lease=lease, backend_pid=99, now=0.0, user="u", db="d")
    outs = ledger.release(A, lease=lease, now=1.0, unconfirmed=True)
    assert [f for _, op, f in outs if op == "fence"] == [{"leases": [[lease, 99, "default",
                                                                      "u", "d"]]}]
    assert ledger.leased("default") == 1
    ledger.fenced([lease], now=2.0)
    assert ledger.leased("default") == 0


def test_a_routine_heartbeat_is_answered_only_with_news_or_when_asked():
    ledger = make({"default": 2})
    lease = grant(ledger, A, 1)
    # nothing to say and no answer asked for: no send at all (an idle fleet's beats)
    assert ops(ledger.heartbeat(A, idle={}, leases=[lease], now=1.0, ack=False), "hb") == []
    # asked for (the default, for clients that do not say): answered
    assert ops(ledger.heartbeat(A, idle={}, leases=[lease], now=1.5), "hb")
    # news: a lease the broker does not know, answered even unasked
    outs = ledger.heartbeat(A, idle={}, leases=[lease, 999], now=2.0, ack=False)
    assert ops(outs, "hb")[0][1]["unknown"] == [999]
    # a numbered beat (confirming after a stall) is always answered
    outs = ledger.heartbeat(A, idle={}, leases=[lease], now=2.5, ack=False, rid=7)
    assert ops(outs, "hb")[0][1]["rid"] == 7
    # an unanswered beat still keeps the client alive (a TTL of 4 s from 3.0)
    assert ops(ledger.heartbeat(A, idle={}, leases=[lease], now=3.0, ack=False), "hb") == []
    ledger.tick(3.0 + 3.9)
    assert A in ledger.clients


def test_holders_lists_checkouts_longest_first_then_waiters_then_idle():
    ledger = make({"default": 3})
    a1, a2 = grant(ledger, A, 1), grant(ledger, A, 2)
    b1 = grant(ledger, B, 1)
    assert grant(ledger, C, 1, now=1.0) is None
    ledger.heartbeat(A, idle={}, leases=[a1, a2], now=2.0, busy=[[a2, 1.5]])
    ledger.heartbeat(B, idle={}, leases=[b1], now=2.0, busy=[[b1, 0.5], [999, 9.0]])
    rows = ledger.holders(3.0)
    assert [(r["lease"], r["state"]) for r in rows] == [
        (a2, "busy"), (b1, "busy"), (None, "waiting"), (a1, "idle")]
    assert rows[0]["checked_out_s"] == pytest.approx(2.5)  # out since 0.5
    assert rows[0]["reported_s"] == pytest.approx(1.0)
    assert rows[2]["waiting_s"] == pytest.approx(2.0)
    # a lease given back is no longer anyone's checkout
    ledger.release(A, lease=a2, now=3.0)
    assert [(r["lease"], r["state"]) for r in ledger.holders(3.0)
            if r["lease"] in (a1, a2)] == [(a1, "idle")]
    # a heartbeat without busy leases says none is checked out
    ledger.heartbeat(B, idle={}, leases=[b1], now=4.0)
    assert [r["state"] for r in ledger.holders(4.0) if r["lease"] == b1] == ["idle"]


def test_an_exit_reported_by_the_parent_fences_the_leases_at_once():
    ledger = Ledger({"default": 1}, ttl=30.0, fence=True, fence_tag="/pbx:")
    ledger.hello(A, pid=10, host="h", now=0, ppid=7)
    ledger.hello(B, pid=11, host="h", now=0, ppid=7)
    master = b"master"
    lease = grant(ledger, A, 1, now=0)
    ledger.connected(A, lease=lease, backend_pid=4242, now=0, user="app", db="shop")
    assert grant(ledger, B, 1, now=0, timeout=60) is None
    # only the parent it named may report it: another pid, another host do nothing
    for parent, host in ((8, "h"), (7, "elsewhere")):
        outs = ledger.exited(master, rid=1, pid=10, host=host, parent=parent, now=1)
        assert ops(outs, "done")[0][1]["message"].startswith("no client")
        assert ops(outs, "fence") == [] and A in ledger.clients
    outs = ledger.exited(master, rid=2, pid=10, host="h", parent=7, now=1)
    assert [f for _, f in ops(outs, "fence")] == [
        {"leases": [[lease, 4242, "default", "app", "shop"]]}]
    [(to, done)] = ops(outs, "done")
    assert to == master and done["message"].endswith("fencing 1 lease(s)")
    assert ops(outs, "grant") == [] and A not in ledger.clients  # not before it is fenced
    outs = ledger.fenced([lease], now=1.2)
    assert [cid for cid, _ in ops(outs, "grant")] == [B]
    ledger.check()


def test_without_fencing_an_exit_report_drops_the_requests_and_leaves_the_leases():
    ledger = Ledger({"default": 1}, ttl=30.0)
    ledger.hello(A, pid=10, host="h", now=0, ppid=7)
    lease = grant(ledger, A, 1, now=0)
    assert grant(ledger, A, 2, now=0, timeout=60) is None  # A waits for a second one
    outs = ledger.exited(b"master", rid=1, pid=10, host="h", parent=7, now=1)
    assert "stay counted until the TTL" in ops(outs, "done")[0][1]["message"]
    assert ledger.clients[A].leases.keys() == {lease} and not ledger.clients[A].waiting
    assert ledger.snapshot(1)["pools"]["default"]["waiting"] == 0
    ledger.check()
