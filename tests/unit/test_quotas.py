"""Quotas between kinds of clients: a group's cap, a group's reserve, as rules of the
ledger (unit and property tests) and as the config file states them."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolbroker.config import ConfigError
from poolbroker.config import load as load_config
from poolbroker.ledger import Ledger
from poolbroker.quotas import Quota, QuotaError, group_of, parse

POOL = "default"


def fleet(size, quotas, names):
    ledger = Ledger({POOL: size}, ttl=1e9)
    ledger.set_quotas(POOL, quotas, 0.0)
    for i, name in enumerate(names):
        ledger.hello(bytes([65 + i]), pid=i + 1, host="h", name=name, now=0.0)
    return ledger


def granted(outs, cid):
    return [f["lease"] for to, op, f in outs if op == "grant" and to == cid]


def ask(ledger, cid, rid, now=0.0):
    return granted(ledger.acquire(cid, rid=rid, pool=POOL, timeout=1e6, now=now), cid)


def test_a_capped_group_waits_while_others_take_the_free_slots():
    ledger = fleet(4, [Quota("batch*", max=2)], ["batch-1", "batch-2", "web"])
    a, b, c = b"A", b"B", b"C"
    assert ask(ledger, a, 1) and ask(ledger, b, 1)
    assert ask(ledger, a, 2) == [] and ask(ledger, b, 2) == []  # batch holds its 2
    assert ledger.snapshot(0)["pools"][POOL]["leased"] == 2
    assert ask(ledger, c, 1) and ask(ledger, c, 2)  # web is not held back by them
    # a batch lease comes back: the slot goes to batch's waiter (batch is under its
    # cap again), and batch never holds more than 2
    lease = next(iter(ledger.clients[a].leases))
    outs = ledger.release(a, lease=lease, now=1.0)
    assert granted(outs, a) or granted(outs, b)
    assert ledger.snapshot(1)["pools"][POOL]["quotas"][0]["held"] == 2
    ledger.check()


def test_a_reserve_is_never_taken_by_others():
    ledger = fleet(4, [Quota("web*", reserve=2)], ["batch", "web-1"])
    batch, web = b"A", b"B"
    got = [lz for rid in range(1, 5) for lz in ask(ledger, batch, rid)]
    assert len(got) == 2  # 2 shared slots; 2 kept for web
    assert ask(ledger, web, 1) and ask(ledger, web, 2)  # at once, no recall needed
    assert ledger.snapshot(0)["pools"][POOL]["waiting"] == 2  # batch's
    # web gives one back: it is web's reserve again, not batch's
    lease = next(iter(ledger.clients[web].leases))
    assert granted(ledger.release(web, lease=lease, now=1.0), batch) == []
    ledger.check()


def test_an_unnamed_client_and_the_first_matching_pattern():
    quotas = [Quota("web-admin", max=1), Quota("web*", reserve=1), Quota("*", max=3)]
    assert group_of(quotas, "web-admin") == 0
    assert group_of(quotas, "web/SyncWorker") == 1
    assert group_of(quotas, "celery") == 2
    assert group_of([Quota("batch*", max=1)], "") is None


def test_quotas_in_the_config_file(tmp_path):
    path = tmp_path / "pb.toml"
    path.write_text('[pools]\ndefault = 10\n[quotas.default]\n"batch*" = { max = 4 }\n'
                    '"web*" = { reserve = 3, max = 8 }\n')
    assert load_config(str(path))["quotas"] == {
        "default": [Quota("batch*", max=4), Quota("web*", max=8, reserve=3)]}
    for text, message in [
            ('[pools]\ndefault = 2\n[quotas.other]\n"a" = { max = 1 }\n', "not in \\[pools\\]"),
            ('[pools]\ndefault = 2\n[quotas.default]\n"a" = { reserve = 3 }\n', "more than"),
            ('[pools]\ndefault = 2\n[quotas.default]\n"a" = { cap = 1 }\n', "unknown key"),
            ('[pools]\ndefault = 9\n[quotas.default]\n"a" = { max = 1, reserve = 2 }\n',
             "above its max"),
            ('[pools]\ndefault = 9\n[quotas.default]\n"a" = { max = -1 }\n', ">= 0")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(str(path))
    with pytest.raises(QuotaError):
        parse({"default": "batch"}, {"default": 1}, "x")


NAMES = ["batch-1", "batch-2", "web-1", "web-2", "other"]


@settings(max_examples=150, deadline=None)
@given(size=st.integers(1, 8), cap=st.integers(0, 6), reserve=st.integers(0, 4),
       steps=st.lists(st.tuples(st.sampled_from(range(len(NAMES))), st.booleans()),
                      max_size=60))
def test_caps_and_reserves_hold_and_no_slot_a_waiter_could_use_sits_free(
        size, cap, reserve, steps):
    """Random requests and releases: a capped group never holds more than its cap;
    others never eat into a reserve; and after every step no waiter that the
    quotas allow sits in the queue while a slot it may take is free."""
    reserve = min(reserve, size)
    quotas = [Quota("batch*", max=cap), Quota("web*", reserve=reserve)]
    ledger = fleet(size, quotas, NAMES)
    rids = [0] * len(NAMES)
    now = 0.0
    for who, take in steps:
        cid = bytes([65 + who])
        now += 0.01
        if take or not ledger.clients[cid].leases:
            rids[who] += 1
            ledger.acquire(cid, rid=rids[who], pool=POOL, timeout=1e6, now=now)
        else:
            ledger.release(cid, lease=next(iter(ledger.clients[cid].leases)), now=now)
        ledger.check()
        held = [len(ledger.clients[bytes([65 + i])].leases) for i in range(len(NAMES))]
        batch, web, other = held[0] + held[1], held[2] + held[3], held[4]
        assert batch <= cap
        assert batch + other <= size - reserve  # web's reserve is web's alone
        free = size - sum(held)
        for waiter in ledger.pools[POOL].queue.values():
            i = waiter.client[0] - 65
            unused = max(0, reserve - web) if i not in (2, 3) else 0
            allowed = (batch < cap) if i in (0, 1) else True
            assert not (allowed and free - unused > 0), (held, i)
