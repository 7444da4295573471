"""The lease policy's guarantees, as properties of the ledger: no recalls when
everyone wants at least an equal share, shares follow demand, no ping-pong, and
a starved client is served within a bounded number of rounds when holders do
what they are asked; with more clients than slots, the slots take turns and a
client holding nothing is served within a bounded time."""

import math

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from poolbroker.ledger import ROTATE_AFTER, Demand, Ledger, entitled, water_level

POOL = "default"


def clients(n):
    return [bytes([65 + i]) for i in range(n)]


def asked(outs):
    return {cid: f["count"] for cid, op, f in outs if op == "recall"}


class Fleet:
    """Clients that keep ``want`` requests outstanding and honour recalls the
    way poolbroker_client does: a recalled lease goes back when its connection
    next returns (here: at the next round), and is asked for again if still
    wanted (the request is queued before the release, as a busy pool's is)."""

    def __init__(self, size, wants):
        self.ledger = Ledger({POOL: size}, ttl=1e9)
        self.wants = dict(wants)
        self.now = 0.0
        self.rids = {cid: 0 for cid in wants}
        self.recalls = 0
        for cid in wants:
            self.ledger.hello(cid, pid=1, host="h", now=0.0)

    def top_up(self, cid):
        c = self.ledger.clients[cid]
        outs = []
        while c.held(POOL) + sum(w.pool == POOL for w in c.waiting.values()) < self.wants[cid]:
            self.rids[cid] += 1
            outs += self.ledger.acquire(cid, rid=self.rids[cid], pool=POOL, timeout=1e6,
                                        now=self.now)
        return outs

    def round(self):
        """Every client honours its recall target once."""
        self.now += 1.0
        for cid in self.wants:
            owed = self.ledger.clients[cid].recall.get(POOL, 0)
            self.recalls += owed
            for lease in list(self.ledger.clients[cid].leases)[:owed]:
                self.top_up(cid)
                self.ledger.release(cid, lease=lease, now=self.now)
            self.top_up(cid)
        self.ledger.check()

    def starved(self):
        demands = self.ledger.demands(POOL)
        level = water_level([d.want for d in demands.values()], self.ledger.pools[POOL].max)
        return {cid for cid, d in demands.items()
                if d.waiting and d.held < entitled(d, level)[0]}


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 6), size=st.integers(1, 16), extra=st.lists(st.integers(0, 8),
       min_size=6, max_size=6), order=st.randoms(use_true_random=False))
def test_when_everyone_wants_an_equal_share_nothing_moves_once_balanced(n, size, extra, order):
    assume(n <= size)  # fewer slots than clients: they take turns (tested below)
    cids = clients(n)
    share = math.ceil(size / n)
    fleet = Fleet(size, {cid: share + extra[i] for i, cid in enumerate(cids)})
    order.shuffle(cids)
    for cid in cids:  # arrivals in any order: the first may take everything
        fleet.top_up(cid)
    for _ in range(2 * n + 2):
        fleet.round()
    held = [fleet.ledger.clients[cid].held(POOL) for cid in cids]
    assert sum(held) == size
    assert max(held) - min(held) <= 1, held  # balanced: floor or ceiling of size / n
    # steady state: connections come and go (one breaks, is replaced; the slot
    # may be regranted to either side of a rounding) and nothing is recalled
    before = fleet.recalls
    for cid in cids * 3:
        lease = next(iter(fleet.ledger.clients[cid].leases))
        fleet.top_up(cid)
        fleet.rids[cid] += 1
        outs = fleet.ledger.acquire(cid, rid=fleet.rids[cid], pool=POOL, timeout=1e6,
                                    now=fleet.now)
        outs += fleet.ledger.release(cid, lease=lease, now=fleet.now)
        assert not any(asked(outs).values())
        fleet.round()
    assert fleet.recalls == before
    held = [fleet.ledger.clients[cid].held(POOL) for cid in cids]
    assert sum(held) == size and max(held) - min(held) <= 1, held


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 16), wants=st.lists(st.integers(0, 20), min_size=1, max_size=6),
       later=st.lists(st.integers(0, 20), min_size=6, max_size=6),
       order=st.randoms(use_true_random=False))
def test_a_starved_client_is_served_within_bounded_rounds(size, wants, later, order):
    """Whatever the demands, once holders honour their recalls no client stays
    below its entitlement for more than two rounds, and then nothing moves
    (unless more clients want a lease than there are slots: then they take
    turns, tested below)."""
    cids = clients(len(wants))
    fleet = Fleet(size, dict(zip(cids, wants)))
    shuffled = list(cids)
    order.shuffle(shuffled)
    for cid in shuffled:
        fleet.top_up(cid)
    for phase in range(2):
        for _ in range(2):
            fleet.round()
        assert fleet.starved() == set(), fleet.ledger.snapshot(fleet.now)
        # shares follow demand: everyone has at least min(want, level) rounded
        # down, and nobody waits below its ceiling while another is above its own
        demands = fleet.ledger.demands(POOL)
        level = water_level([d.want for d in demands.values()], size)
        bounds = {cid: entitled(d, level) for cid, d in demands.items()}
        assert all(d.held >= bounds[cid][0] for cid, d in demands.items())
        owed = any(d.waiting and d.held < bounds[cid][1] for cid, d in demands.items())
        over = any(d.held > bounds[cid][1] for cid, d in demands.items())
        assert not (owed and over), fleet.ledger.snapshot(fleet.now)
        settled = fleet.recalls
        for _ in range(3):
            fleet.round()
        if level >= 1:
            assert fleet.recalls == settled  # no ping-pong once served
        if phase == 0:  # demand changes: some want more, some less
            for i, cid in enumerate(cids):
                fleet.wants[cid] = later[i]
                c = fleet.ledger.clients[cid]
                for rid in list(c.waiting):
                    fleet.ledger.cancel(cid, rid=rid, now=fleet.now)
                for lease in list(c.leases)[later[i]:]:
                    fleet.ledger.release(cid, lease=lease, now=fleet.now)
                fleet.top_up(cid)


@given(wants=st.lists(st.integers(0, 50), min_size=1, max_size=10), size=st.integers(0, 40))
def test_water_level_divides_exactly_what_is_wanted_beyond_the_budget(wants, size):
    level = water_level(wants, size)
    if sum(wants) <= size:
        assert level == math.inf
    else:
        assert math.isclose(sum(min(w, level) for w in wants), size)


def test_recall_sources_cover_every_starved_shortfall():
    # 4 clients, budget 10: level 2.5. Holdings 3,3,3,1: the last is starved and
    # nobody is above 3, so a client at 3 (above its 2) gives one, ending at 2
    fleet = Fleet(10, {cid: 6 for cid in clients(4)})
    a, b, c, d = clients(4)
    for cid, n in ((a, 3), (b, 3), (c, 3), (d, 1)):
        fleet.wants[cid] = n
        fleet.top_up(cid)
    for cid in (a, b, c, d):
        fleet.wants[cid] = 6
        outs = fleet.top_up(cid)
    assert sum(asked(outs).values()) == 1
    fleet.round()
    assert sorted(fleet.ledger.clients[x].held(POOL) for x in (a, b, c, d)) == [2, 3, 3, 2] \
        or sorted(fleet.ledger.clients[x].held(POOL) for x in (a, b, c, d)) == [2, 2, 3, 3]


def test_an_idle_holder_is_not_asked_while_no_one_is_starved():
    ledger = Ledger({POOL: 2}, ttl=1e9)
    a, b = clients(2)
    for cid in (a, b):
        ledger.hello(cid, pid=1, host="h", now=0)
    ledger.acquire(a, rid=1, pool=POOL, timeout=10, now=0)
    ledger.acquire(b, rid=1, pool=POOL, timeout=10, now=0)
    ledger.heartbeat(a, idle={POOL: 1}, leases=list(ledger.clients[a].leases), now=0.1)
    outs = ledger.acquire(b, rid=2, pool=POOL, timeout=10, now=0.2)
    # B holds 1 and wants 2; A wants 0: B's entitlement is 2, so B is starved and
    # A's idle connection is the source
    assert asked(outs) == {a: 1, b: 0}
    assert Demand(held=1, waiting=1, idle=0).want == 2


class Turns:
    """A fleet with more clients than slots, on a clock: each client keeps
    ``want`` requests outstanding, a holder gives a recalled lease back at its
    next step (when its connection comes back) and asks again at once, and the
    broker's timers run when due. Records how long each client waited while
    holding nothing."""

    STEP = 0.05

    def __init__(self, size, wants):
        self.fleet = Fleet(size, wants)
        self.ledger = self.fleet.ledger
        self.empty_since = {cid: 0.0 for cid in wants}  # waiting and holding nothing
        self.longest = 0.0
        self.moves = 0

    def run(self, seconds):
        fleet, ledger = self.fleet, self.ledger
        end = fleet.now + seconds
        while fleet.now < end:
            fleet.now = round(fleet.now + self.STEP, 6)
            while ledger.next_deadline() is not None and ledger.next_deadline() <= fleet.now:
                ledger.tick(fleet.now)
            for cid in fleet.wants:
                client = ledger.clients[cid]
                for lease in list(client.leases)[:client.recall.get(POOL, 0)]:
                    fleet.top_up(cid)
                    ledger.release(cid, lease=lease, now=fleet.now)
                    self.moves += 1
                fleet.top_up(cid)
            ledger.check()
            for cid in fleet.wants:
                if ledger.clients[cid].held(POOL):
                    self.empty_since[cid] = None
                elif self.empty_since[cid] is None:
                    self.empty_since[cid] = fleet.now
                else:
                    self.longest = max(self.longest, fleet.now - self.empty_since[cid])


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 4), wants=st.lists(st.integers(1, 3), min_size=2, max_size=8))
def test_with_more_clients_than_slots_everyone_takes_turns(size, wants):
    """No client that wants a lease goes without one for longer than its turn:
    the zero-holders ahead of it, ``size`` at a time, each ``ROTATE_AFTER``,
    plus a step for the holder to give back and a step for the tick."""
    assume(len(wants) > size)
    cids = clients(len(wants))
    turns = Turns(size, dict(zip(cids, wants)))
    for cid in cids:
        turns.fleet.top_up(cid)
    turns.run(10.0)
    rounds = math.ceil((len(cids) - 1) / size)
    bound = rounds * (ROTATE_AFTER + 3 * Turns.STEP)
    assert turns.longest <= bound, (turns.longest, bound)
    held = [turns.ledger.clients[cid].held(POOL) for cid in cids]
    assert sum(held) == size
    # a move per slot per turn at most: the rotation does not thrash
    assert turns.moves <= size * (10.0 / ROTATE_AFTER + 1)


def test_a_single_slot_alternates_between_two_busy_clients():
    ledger = Ledger({POOL: 1}, ttl=1e9)
    a, b = clients(2)
    for cid in (a, b):
        ledger.hello(cid, pid=1, host="h", now=0)
    ledger.acquire(a, rid=1, pool=POOL, timeout=10, now=0)
    outs = ledger.acquire(b, rid=1, pool=POOL, timeout=10, now=0.1)
    assert not [op for _, op, _ in outs if op == "grant"] and not any(asked(outs).values())
    # nobody is starved at level 0.5; B's turn comes after ROTATE_AFTER
    assert ledger.next_deadline() == 0.1 + ROTATE_AFTER
    outs = ledger.tick(0.1 + ROTATE_AFTER)
    assert asked(outs) == {a: 1}
    lease = next(iter(ledger.clients[a].leases))
    ledger.acquire(a, rid=2, pool=POOL, timeout=10, now=0.7)
    outs = ledger.release(a, lease=lease, now=0.7)
    assert [cid for cid, op, _ in outs if op == "grant"] == [b]
    assert ledger.clients[a].recall[POOL] == 0  # its recall is over; now A waits its turn
    assert ledger.next_deadline() == 0.7 + ROTATE_AFTER
    assert asked(ledger.tick(0.7 + ROTATE_AFTER)) == {b: 1}
