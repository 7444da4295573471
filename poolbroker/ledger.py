"""The connection budget as a pure state machine.

No sockets and no clock: every method takes ``now`` (monotonic seconds) and returns
the messages to send as a list of ``(client_id, op, fields)``. The server is a thin
shell that feeds it frames and timer ticks. This is where every rule lives:

* **grant**: a pool never has more than ``max`` leases;
* **queue**: requests that cannot be granted wait (FIFO, with the caller's deadline);
* **fair share**: shares follow *demand* (connections in use plus requests
  waiting), divided by water-filling: a client that wants less than an equal
  share gets all it wants, the rest split the remainder equally (the *level*).
  A waiter whose client holds less than its entitlement rounded down is
  *starved* and goes first when a slot frees;
* **recall**: only for starved waiters: idle connections first, then clients
  holding more than their entitlement rounded *up* return one when a connection
  comes back instead of reusing it. The gap between the two roundings is the
  hysteresis: a client that gives a lease back is never starved by it, so a
  lease does not ping-pong, and when everyone wants at least an equal share
  nothing moves at all;
* **turns**: with more clients wanting leases than a pool has slots (nobody is
  starved by the rounding above, yet some hold nothing), a client that has
  held nothing for ``ROTATE_AFTER`` seconds has the oldest lease recalled for
  it, and freed slots go to whoever has held nothing the longest;
* **contention**: while requests wait, clients are told the pool is
  *contended*; they give back connections that stay idle longer than a move
  costs (see ``docs/lease-policy.md``). The flag lingers ``CONTENTION_LINGER``
  seconds after the queue empties while the pool stays full, so a queue that
  empties and refills does not cost a message per client each time; it ends at
  once when nobody waits and a slot is free (a connection given back then would
  go to nobody);
* **expire**: a client not heard from for ``ttl`` seconds loses its leases and its
  queued requests; a waiter past its deadline gets a ``timeout`` error;
* **cancel**: a request nobody waits for any more leaves the queue;
* **caps**: at most ``max_clients`` clients and ``max_waiting`` queued requests
  in all (like PgBouncer's ``max_client_conn``), besides ``max_waiting_per_client``.

Cost: nothing here scans every waiter or every lease per message. Each pool keeps
its demand per client up to date as leases and waiters come and go, and timers
(waiter deadlines, client TTLs, unconfirmed holds) sit in one heap, cleaned
lazily: a message costs O(clients in that pool) at most (the fair-share
arithmetic), and a tick O(log n) per timer due.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

from . import protocol as p
from .leaseids import LeaseIds
from .quotas import Quota, group_of

log = logging.getLogger("poolbroker")

ClientId = bytes
Out = Tuple[ClientId, str, Dict[str, Any]]

#: Seconds a full pool stays contended after its queue has emptied.
CONTENTION_LINGER = 1.0
#: Seconds after a request last had to wait in a pool before a lease asked ahead
#: of need is granted there again: where demand came near the budget lately, a
#: spare slot would only make the next request wait, and that contention makes
#: every process give back its idle connections.
AHEAD_CALM = 10.0

#: A request cancelled this close to its deadline is counted as a timeout: its
#: client gave up at the same deadline (the cancel may arrive before the broker's
#: own deadline passes).
TIMEOUT_MARGIN = 0.1

#: With more clients wanting leases than a pool has slots, the slots take turns:
#: a request whose client holds nothing there and has waited this long (seconds)
#: has the oldest lease recalled for it, if that lease has been held as long. A
#: move costs a few milliseconds of slot time, so this costs the pool well under
#: 1% of its time, and bounds the wait of a client that holds nothing.
ROTATE_AFTER = 0.5

#: Upper bounds (seconds) of the lease wait histogram's buckets (Prometheus' ``le``).
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# kinds of timer in the ledger's heap
_WAITER, _CLIENT, _UNCONFIRMED = 0, 1, 2


@dataclass
class Lease:
    id: int
    pool: str
    client: ClientId
    granted_at: float
    rid: Optional[int] = None
    seq: Optional[int] = None  # grant sequence number; None for a re-announced lease
    backend_pid: Optional[int] = None
    user: Optional[str] = None  # the session's role and database, as the client saw them
    db: Optional[str] = None
    fencing: bool = False  # its client expired; counted until its backend is gone
    # given back without proof that the server saw its connection close (the
    # client could not reach the database): counted until the client confirms,
    # or until held_until
    unconfirmed: bool = False
    held_until: float = 0.0

    @property
    def owned(self) -> bool:
        """False for a lease counted on behalf of nobody (fencing, unconfirmed)."""
        return not (self.fencing or self.unconfirmed)


@dataclass
class Waiter:
    client: ClientId
    rid: int
    pool: str
    deadline: float
    since: float


@dataclass
class Client:
    id: ClientId
    pid: int = 0
    ppid: int = 0  # its parent's pid, as it said: the one process that may report it exited
    host: str = ""
    name: str = ""
    last_seen: float = 0.0
    timer: float = 0.0  # when its TTL entry in the ledger's timer heap is due
    leases: Dict[int, Lease] = field(default_factory=dict)
    waiting: Dict[int, Waiter] = field(default_factory=dict)  # rid -> waiter
    granted: Dict[int, int] = field(default_factory=dict)  # rid -> lease id (idempotency)
    idle: Dict[str, int] = field(default_factory=dict)  # as last reported
    recall: Dict[str, int] = field(default_factory=dict)  # pool -> leases asked back
    contended: Dict[str, bool] = field(default_factory=dict)  # pool -> as last told
    # [[lease, seconds its connection has been checked out], ...] as of the last
    # heartbeat, kept as it came: only ``poolbroker clients`` reads it
    busy: List[List[Any]] = field(default_factory=list)
    busy_at: float = 0.0  # when that heartbeat came

    def checkouts(self) -> Dict[int, float]:
        """Lease -> when its connection was checked out (ledger time), as of the
        last heartbeat."""
        return {lease: self.busy_at - secs for lease, secs in self.busy}

    def held(self, pool: str) -> int:
        """Leases held in ``pool``, counted (for tests; the ledger keeps ``Pool.demand``)."""
        return sum(1 for lease in self.leases.values() if lease.pool == pool)


@dataclass
class Counters:
    """What happened in one pool since the broker started (for metrics)."""

    grants: int = 0
    recalls: int = 0  # leases asked back
    expired: int = 0  # leases of clients that went silent (or were declared gone)
    timeouts: int = 0  # requests that waited until their deadline
    # how long granted requests waited: a count per WAIT_BUCKETS bound (not
    # cumulative) and one more for longer waits, and the total
    wait_counts: List[int] = field(default_factory=lambda: [0] * (len(WAIT_BUCKETS) + 1))
    wait_sum: float = 0.0

    def waited(self, seconds: float) -> None:
        self.grants += 1
        self.wait_sum += seconds
        for i, bound in enumerate(WAIT_BUCKETS):
            if seconds <= bound:
                self.wait_counts[i] += 1
                return
        self.wait_counts[-1] += 1

    def view(self) -> Dict[str, Any]:
        """The counters as plain data; ``wait_buckets`` is cumulative, as
        Prometheus wants it: ``[[bound, waits <= bound], ...]``."""
        running, buckets = 0, []
        for bound, n in zip(WAIT_BUCKETS, self.wait_counts):
            running += n
            buckets.append([bound, running])
        return {"grants": self.grants, "recalls": self.recalls, "expired": self.expired,
                "timeouts": self.timeouts, "wait_buckets": buckets,
                "wait_count": running + self.wait_counts[-1],
                "wait_sum": round(self.wait_sum, 6)}


@dataclass
class Pool:
    name: str
    max: int
    counters: Counters = field(default_factory=Counters)
    paused: bool = False  # grant nothing; requests wait (PgBouncer's PAUSE)
    draining: bool = False  # refuse new requests; every lease is asked back
    leases: Dict[int, Lease] = field(default_factory=dict)
    # FIFO of waiters keyed by (client, rid); OrderedDict gives O(1) removal.
    queue: "OrderedDict[Tuple[ClientId, int], Waiter]" = field(default_factory=OrderedDict)
    # requests wait (or did, less than CONTENTION_LINGER ago, and no slot is free)
    contended: bool = False
    quiet_since: Optional[float] = None  # when the queue last emptied while contended
    queued_at: Optional[float] = None  # when a request last had to wait here
    # per client holding or wanting leases here, kept up to date on every change
    # (so that a message never has to scan every lease or waiter)
    demand: Dict[ClientId, "Demand"] = field(default_factory=dict)
    # clients last told a recall or contention here: they must hear when it ends
    told: Set[ClientId] = field(default_factory=set)
    # when a tick should look again whether a waiter's turn has come (more
    # clients want leases than there are slots); None when nobody takes turns
    rotate_at: Optional[float] = None
    # clients waiting here while holding nothing, in the order they got so, with
    # since when: whose turn comes first when clients take turns
    empty: "OrderedDict[ClientId, float]" = field(default_factory=OrderedDict)
    # quotas between kinds of clients (see poolbroker.quotas): the groups, the
    # leases each group holds (kept up to date like demand), each client's group
    quotas: List[Quota] = field(default_factory=list)
    group_held: List[int] = field(default_factory=list)
    group: Dict[ClientId, Optional[int]] = field(default_factory=dict)


@dataclass
class Demand:
    """What one client holds and wants in one pool."""

    held: int = 0
    waiting: int = 0
    idle: int = 0  # idle connections it reported (a hint, at most held)

    @property
    def want(self) -> int:
        """Connections in use plus requests waiting."""
        return self.held - self.idle + self.waiting


def water_level(wants: List[int], capacity: int) -> float:
    """The level L at which ``sum(min(w, L) for w in wants) == capacity`` (max-min
    fairness); infinity when every want fits."""
    if sum(wants) <= capacity:
        return math.inf
    remaining = float(capacity)
    ordered = sorted(wants)
    for i, want in enumerate(ordered):
        others = len(ordered) - i
        if want * others >= remaining:
            return remaining / others
        remaining -= want
    return math.inf  # not reached: the wants exceed the capacity


def entitled(demand: Demand, level: float) -> Tuple[int, int]:
    """A client's entitlement at ``level``, rounded down and up: below the first
    its waiters are starved; above the second it gives leases back."""
    if level == math.inf:
        return demand.want, demand.want
    return min(demand.want, math.floor(level)), min(demand.want, math.ceil(level))


class Ledger:
    """All broker state and rules. Not thread-safe: one loop owns it."""

    def __init__(
        self,
        pools: Dict[str, int],
        *,
        ttl: float = 4.0,
        epoch: str = "0",
        max_waiting_per_client: int = 1000,
        max_clients: int = 1000,
        max_waiting: int = 10000,
        lease_ids: Optional[LeaseIds] = None,
        ids_verifiable: bool = True,
        grace_until: float = 0.0,
        fence: bool = False,
        fence_tag: str = "",
        unconfirmed_hold: float = 8000.0,
    ) -> None:
        if not pools:
            raise ValueError("at least one pool is needed")
        for name, size in pools.items():
            if not isinstance(size, int) or size < 0:
                raise ValueError(f"pool {name!r}: max must be an integer >= 0, not {size!r}")
        self.pools: Dict[str, Pool] = {n: Pool(n, m) for n, m in pools.items()}
        self.clients: Dict[ClientId, Client] = {}
        self.ttl = ttl
        self.epoch = epoch
        self.max_waiting_per_client = max_waiting_per_client
        self.max_clients = max_clients
        self.max_waiting = max_waiting
        self.waiting = 0  # queued requests in all pools
        # (due, n, kind, key): waiter deadlines, client TTLs, unconfirmed holds.
        # Entries are never removed early; one that no longer matches is skipped
        # when it comes up (see _due).
        self._timers: List[Tuple[float, int, int, Any]] = []
        self._timer_n = itertools.count()
        # Ids clients cannot forge; ``ids_verifiable`` is False when the key of
        # the previous run is lost (no state file): re-announced ids then cannot be
        # checked, and only the bounds in hello() apply.
        self.ids = lease_ids or LeaseIds()
        self._grant_seq = 0  # grants in this run, in order (clients echo the highest seen)
        self.ids_verifiable = ids_verifiable
        # After a restart that may have left leases outstanding, nothing is granted
        # until this time, so that clients can re-announce what they hold first.
        self.grace_until = grace_until
        self._in_grace = grace_until > 0
        # With fencing, leases of expired clients stay counted (in pool.leases,
        # owned by nobody) until the fencer reports their backends gone.
        self.fence = fence
        self.fence_tag = fence_tag  # what clients put before the lease id
        self._sweeping = False
        self.fencing: Dict[int, Lease] = {}
        # Leases released without the server having been seen to close them. Their
        # backends may live on (a partition: the server notices only when its TCP
        # keepalive fires, after about 2 h 11 min by default), so they stay counted
        # until the client confirms or for unconfirmed_hold seconds (with fencing,
        # they are fenced instead).
        self.unconfirmed: Dict[int, Lease] = {}
        self.unconfirmed_hold = unconfirmed_hold
        # (role, database) pairs of leased sessions: a restart sweep terminates
        # tagged backends only there (the server keeps them in its state file)
        self.fence_scopes: Set[Tuple[str, str]] = set()
        # Lease ids this broker expired: their slots went to others, so a client
        # waking up with them is told they are lost (a restarted broker, knowing
        # none, takes re-announced leases back instead).
        self.expired: "OrderedDict[int, None]" = OrderedDict()

    # ------------------------------------------------------------------ helpers

    @property
    def heartbeat_interval(self) -> float:
        """How often clients should say they are alive: three chances per TTL."""
        return self.ttl / 3.0

    def _error(self, cid: ClientId, rid: Optional[int], code: str, message: str) -> Out:
        return (cid, "error", p.error_fields(rid, code, message))

    def _known(
        self, cid: ClientId, rid: Optional[int], now: float
    ) -> Tuple[Optional[Client], List[Out]]:
        client = self.clients.get(cid)
        if client is None:
            return None, [
                self._error(cid, rid, p.E_UNKNOWN_CLIENT, "unknown client: send hello first")
            ]
        client.last_seen = now
        return client, []

    def leased(self, pool: str) -> int:
        return len(self.pools[pool].leases)

    @property
    def in_grace(self) -> bool:
        """True until the grace period after a restart is over."""
        return self._in_grace

    def start_grace(self, until: float) -> None:
        """Grant nothing before ``until`` (and, with fencing, the sweep after it)."""
        self.grace_until = until
        self._in_grace = True

    # ------------------------------------------------------------------ ops

    def hello(
        self,
        cid: ClientId,
        *,
        pid: int,
        host: str,
        name: str = "",
        leases: List[Tuple[int, str]] = (),  # type: ignore[assignment]
        now: float,
        ppid: int = 0,
        gen: Optional[int] = None,
    ) -> List[Out]:
        """A client (re)introduces itself, listing the leases it holds (after a
        broker restart, or after it was expired while frozen). ``gen`` (which of
        its hellos this is) comes back in the welcome, so that a client reading
        a late welcome knows which hello it answers.

        A listed lease is taken back only if it can be real: during the grace
        period after a restart (afterwards its slot may have gone to someone else),
        for a known pool, with an id this broker's key issued for that pool (unless
        the key was lost with the state file), not held by another client nor
        expired here, and no more than the pool's max in total. Everything else is
        rejected; the client must close those connections (which only ever lowers
        the count on the server)."""
        client = self.clients.get(cid)
        if client is None:
            if len(self.clients) >= self.max_clients:
                log.warning("client pid %s on %s refused: already %d clients (max_clients)",
                            pid, p.shown(host), len(self.clients))
                return [self._error(cid, None, p.E_TOO_MANY_CLIENTS,
                                    f"the broker already serves {len(self.clients)} clients "
                                    f"(max_clients = {self.max_clients})")]
            client = Client(cid)
            self.clients[cid] = client
            log.info("client %s joined (pid %s on %s%s)", _label(cid), pid, p.shown(host),
                     f", {p.shown(name)}" if name else "")
        client.pid, client.host, client.name, client.last_seen = pid, host, name, now
        client.ppid = ppid
        if not client.timer:
            self._schedule_client(client)
        rejected: List[int] = []
        why: Dict[str, int] = {}
        touched = set()
        for lease_id, pool_name in leases:
            if lease_id in client.leases:
                continue
            reason = self._unadoptable(lease_id, pool_name)
            if reason:
                rejected.append(lease_id)
                why[reason] = why.get(reason, 0) + 1
                continue
            self._hold(self.pools[pool_name], client, Lease(lease_id, pool_name, cid, now))
            touched.add(pool_name)
        if rejected:
            log.warning("client %s (pid %s) re-announced %d lease(s) that cannot be taken "
                        "back (%s); it must close their connections", _label(cid), pid,
                        len(rejected), ", ".join(f"{n} {r}" for r, n in sorted(why.items())))
        welcome: Dict[str, Any] = {"epoch": self.epoch, "ttl": self.ttl,
                                   "heartbeat": self.heartbeat_interval, "rejected": rejected,
                                   "fence": self.fence_tag if self.fence else ""}
        if gen is not None:
            welcome["gen"] = gen
        outs: List[Out] = [(cid, "welcome", welcome)]
        for pool_name in touched:
            outs += self._rebalance(pool_name, now)
        return outs

    def _unadoptable(self, lease_id: int, pool_name: str) -> str:
        """Why a re-announced lease cannot be taken back ("" if it can)."""
        pool = self.pools.get(pool_name)
        if pool is None:
            return "of an unknown pool"
        if not self._in_grace:
            return "announced outside a grace period"
        if any(lease_id in pl.leases for pl in self.pools.values()):
            return "held by another client"
        if lease_id in self.fencing or lease_id in self.expired:
            return "expired here"
        if self.ids_verifiable and not self.ids.valid(lease_id, pool_name):
            return "never issued for that pool"
        if len(pool.leases) >= pool.max:
            return "beyond the pool's max"
        return ""

    def acquire(
        self, cid: ClientId, *, rid: int, pool: str, timeout: float, now: float,
        ahead: bool = False,
    ) -> List[Out]:
        """Ask for one lease in ``pool``; granted at once if the pool has room,
        otherwise queued until ``now + timeout``. With ``timeout`` 0, never
        queued: a timeout error at once. ``ahead``: asked ahead of need (a pool
        that will want it a moment later), now or never whatever the timeout,
        and only from room to spare: never the pool's last free slot, which
        someone else may be about to ask for, nor in a pool where a request had
        to wait less than :data:`AHEAD_CALM` ago."""
        client, outs = self._known(cid, rid, now)
        if client is None:
            return outs
        if pool not in self.pools:
            return [self._error(cid, rid, p.E_UNKNOWN_POOL,
                                f"unknown pool {p.shown(pool)} (this broker has: "
                                f"{p.known_names(self.pools)})")]
        if self.pools[pool].draining and rid not in client.granted:
            return [self._error(cid, rid, p.E_DRAINING,
                                f"pool {pool!r} is draining for maintenance: no new leases "
                                "until it is resumed")]
        granted = client.leases.get(client.granted.get(rid, -1))
        if granted is not None:  # a retry of a request we already granted
            return [(cid, "grant", self._grant_fields(granted))]
        if rid in client.waiting:  # a retry of a request still queued: new deadline
            waiter = client.waiting[rid]
            waiter.deadline = now + timeout
            self._schedule(waiter.deadline, _WAITER, (cid, rid))
            return []
        if len(client.waiting) >= self.max_waiting_per_client:
            return [self._error(cid, rid, p.E_TOO_MANY_REQUESTS,
                                f"client already has {len(client.waiting)} queued requests "
                                f"(max_waiting_per_client = {self.max_waiting_per_client})")]
        if self.waiting >= self.max_waiting:
            return [self._error(cid, rid, p.E_TOO_MANY_REQUESTS,
                                f"the broker already queues {self.waiting} requests "
                                f"(max_waiting = {self.max_waiting})")]
        # a client that asks has no idle connection there (it would use it)
        the_pool = self.pools[pool]
        if client.idle.get(pool):
            client.idle[pool] = 0
            self._count(the_pool, cid)
        if ((not ahead or self._spare_room(the_pool, now)) and not the_pool.queue
                and len(the_pool.leases) < the_pool.max and not self._in_grace
                and not the_pool.paused and not the_pool.contended and not the_pool.told
                and (not the_pool.quotas or self._room(the_pool, cid))):
            # the common case, a pool with room that nobody waits for: granted
            # straight away, nothing to queue, recall or tell anyone
            return [self._grant(the_pool, client, rid, now, waited=0.0)]
        if ahead:  # now or never: it queues and moves nothing
            return [self._error(cid, rid, p.E_TIMEOUT, f"no slot to spare in pool {pool!r} "
                                "now (a lease asked ahead of need takes only room to spare)")]
        if timeout <= 0:  # now or never: it queues and moves nothing
            return [self._error(cid, rid, p.E_TIMEOUT, f"no free slot in pool {pool!r} now "
                                "(a request with timeout 0 does not wait)")]
        self._enqueue(client, Waiter(cid, rid, pool, now + timeout, now))
        return self._rebalance(pool, now)

    @staticmethod
    def _spare_room(pool: Pool, now: float) -> bool:
        """Whether ``pool`` has a slot to spare for a lease asked ahead of need:
        another stays free besides, and no request had to wait there lately
        (demand near the budget: a spare would make the next one wait, and
        contention makes every process give its idle connections back)."""
        return (len(pool.leases) + 1 < pool.max
                and (pool.queued_at is None or now - pool.queued_at >= AHEAD_CALM))

    def cancel(self, cid: ClientId, *, rid: int, now: float) -> List[Out]:
        """Nobody waits for request ``rid`` any more. If it was already granted the
        client will release the lease itself when the grant reaches it."""
        client, outs = self._known(cid, rid, now)
        if client is None:
            return []  # nothing to cancel; no reply needed
        waiter = client.waiting.get(rid)
        if waiter is None:
            return []
        if now >= waiter.deadline - TIMEOUT_MARGIN:
            # the client gave up at the same deadline and its cancel came first
            self.pools[waiter.pool].counters.timeouts += 1
        self._dequeue(client, waiter)
        return self._rebalance(waiter.pool, now)

    def release(self, cid: ClientId, *, lease: int, now: float,
                unconfirmed: bool = False) -> List[Out]:
        """The client closed the connection of ``lease`` and the server saw it go.
        With ``unconfirmed``, the client could not see the server close it: the
        slot stays counted (see :attr:`unconfirmed`). A plain release of an
        unconfirmed lease, from its client, is the confirmation."""
        orphan = self.unconfirmed.get(lease)
        if orphan is not None and orphan.client == cid and not unconfirmed:
            del self.unconfirmed[lease]
            del self.pools[orphan.pool].leases[lease]  # owned by nobody: not in demand
            log.info("client %s: the backend of lease %d is gone after all: slot freed",
                     _label(cid), lease)
            return self._rebalance(orphan.pool, now)
        client, outs = self._known(cid, None, now)
        if client is None:
            return outs
        held = client.leases.pop(lease, None)
        if held is None:
            return []  # released twice, or expired meanwhile: nothing to do
        if unconfirmed:
            return self._hold_unconfirmed(client, held, now)
        self._drop_lease(client, held, now)
        return self._rebalance(held.pool, now)

    def release_all(self, cid: ClientId, leases: List[int], now: float) -> List[Out]:
        """Releases that came with another message (its ``released`` field): as
        many plain :meth:`release` calls; nothing if the client is unknown (the
        message they came with gets that answer)."""
        if cid not in self.clients:
            return []
        outs: List[Out] = []
        for lease in leases:
            outs += self.release(cid, lease=lease, now=now)
        return outs

    def _hold_unconfirmed(self, client: Client, lease: Lease, now: float) -> List[Out]:
        self._orphan(client, lease, now)
        if self.fence:
            lease.fencing = True
            self.fencing[lease.id] = lease
            log.warning("client %s (pid %s) could not see the backend of lease %d go: "
                        "fencing it", _label(client.id), client.pid, lease.id)
            return [(b"", "fence", {"leases": [self._fence_entry(lease)]})]
        lease.unconfirmed = True
        lease.held_until = now + self.unconfirmed_hold
        self.unconfirmed[lease.id] = lease
        self._schedule(lease.held_until, _UNCONFIRMED, lease.id)
        log.warning("client %s (pid %s) could not see the backend of lease %d (pid %s) go: "
                    "its slot stays counted until the client confirms it or for %.0fs (set "
                    "--fence-dsn to end such backends, or tcp_keepalives_idle on the server)",
                    _label(client.id), client.pid, lease.id, lease.backend_pid or "?",
                    self.unconfirmed_hold)
        return self._rebalance(lease.pool, now)

    def connected(self, cid: ClientId, *, lease: int, backend_pid: int, now: float,
                  user: Optional[str] = None, db: Optional[str] = None) -> List[Out]:
        """The connection of ``lease`` is open: its backend pid, role and database
        are what fencing matches before it terminates anything."""
        client, outs = self._known(cid, None, now)
        if client is None:
            return outs
        held = client.leases.get(lease)
        if held is not None:
            held.backend_pid, held.user, held.db = backend_pid, user, db
            if self.fence and user and db:
                self.fence_scopes.add((user, db))
        return []

    def heartbeat(
        self, cid: ClientId, *, idle: Dict[str, int], leases: List[int], now: float,
        rid: Optional[int] = None, epoch: Optional[str] = None, seen: Optional[int] = None,
        ack: bool = True, busy: Optional[List[List[Any]]] = None,
    ) -> List[Out]:
        """The client is alive; ``idle`` says how many idle connections it keeps per
        pool (a hint for recalls), ``leases`` which leases it holds. With ``seen``
        (the highest grant seq it received from this run, ``epoch``) both sides
        converge on lost messages: a lease whose grant the client has seen but
        that it no longer lists was released (the release got lost): freed; a
        grant the client has not seen long after it was sent got lost (ZeroMQ drops
        silently to a peer that was away): sent again. The answer (``hb``) goes out
        when it has news (leases we do not know), when it answers a numbered beat
        (``rid``), or when the client asks (``ack``, the default): an idle fleet's
        routine beats cost the broker no send. ``busy`` lists the leases whose
        connections are checked out, with for how many seconds (for
        ``poolbroker clients``)."""
        client, outs = self._known(cid, None, now)
        if client is None:
            return outs
        # (no client has more connections checked out than leases: what a beat
        # lists beyond that is not kept)
        client.busy, client.busy_at = (busy or [])[:len(client.leases)], now
        changed: Set[str] = set()
        if idle != client.idle:  # (a routine beat reports what the last one did)
            changed = {pool for pool in set(idle) | set(client.idle)
                       if pool in self.pools and idle.get(pool, 0) != client.idle.get(pool, 0)}
            client.idle = {k: v for k, v in idle.items() if k in self.pools}
        for pool in changed:
            self._count(self.pools[pool], cid)
        unknown = [lease for lease in leases if lease not in client.leases]
        reply: Dict[str, Any] = {"epoch": self.epoch, "unknown": unknown}
        if rid is not None:  # the client wants to know it is this beat's answer
            reply["rid"] = rid
        outs = [(cid, "hb", reply)] if ack or unknown or rid is not None else []
        listed = set(leases)
        # (a routine beat lists every lease we know of: nothing to reconcile)
        if epoch == self.epoch and seen is not None and not listed.issuperset(client.leases):
            outs += self._reconcile(client, listed, seen, now, changed)
        for pool in changed:
            outs += self._rebalance(pool, now)
        return outs

    def _reconcile(self, client: Client, listed: Set[int], seen: int, now: float,
                   changed: Set[str]) -> List[Out]:
        outs: List[Out] = []
        for lease in list(client.leases.values()):
            if lease.seq is None or lease.id in listed:
                continue
            if lease.seq <= seen:
                log.warning("client %s (pid %s) no longer holds lease %d, but its release "
                            "never arrived: freeing it", _label(client.id), client.pid,
                            lease.id)
                del client.leases[lease.id]
                self._drop_lease(client, lease, now)
                changed.add(lease.pool)
            elif now - lease.granted_at > 2 * self.heartbeat_interval:
                log.warning("client %s (pid %s) never received the grant of lease %d: "
                            "sending it again", _label(client.id), client.pid, lease.id)
                outs.append((client.id, "grant", self._grant_fields(lease)))
        return outs

    @staticmethod
    def _grant_fields(lease: Lease) -> Dict[str, Any]:
        return {"rid": lease.rid, "pool": lease.pool, "lease": lease.id, "seq": lease.seq}

    def bye(self, cid: ClientId, *, now: float) -> List[Out]:
        """The client leaves: everything it holds or waits for goes."""
        client = self.clients.get(cid)
        if client is None:
            return []
        log.info("client %s (pid %s) said bye, returning %d lease(s)",
                 _label(cid), client.pid, len(client.leases))
        return self._forget(client, now)

    def exited(self, cid: ClientId, *, rid: int, pid: int, host: str, parent: int,
               now: float) -> List[Out]:
        """A parent reports that its child ``pid`` on ``host`` has exited (a gunicorn
        master, after reaping a worker that was killed or timed out). Only a
        client that named ``parent`` as its parent in its hello is affected.

        With fencing, its leases are fenced at once: their backends are ended
        if still there, and each slot is free once its backend has left
        ``pg_stat_activity``, well before the TTL. Without fencing the broker
        cannot see the server (a backend may still be running the dead
        process's last query), so the leases stay counted until the TTL as
        before; its queued requests go either way."""
        dead = [c for c in self.clients.values()
                if c.pid == pid and c.host == host and parent and c.ppid == parent]
        if not dead:
            return [(cid, "done", {"rid": rid, "message": (
                f"no client pid {pid} on {p.shown(host)} with parent {parent} "
                "(it said bye, or never connected)")})]
        outs: List[Out] = []
        leases = sum(len(c.leases) for c in dead)
        for client in dead:
            if self.fence:
                log.warning("client %s (pid %s on %s) exited, reported by its parent %s: "
                            "fencing %d lease(s) now", _label(client.id), pid,
                            p.shown(host), parent, len(client.leases))
                outs += self._forget(client, now, expired=True)
                continue
            log.warning("client %s (pid %s on %s) exited, reported by its parent %s: its "
                        "%d lease(s) stay counted until the TTL (no fencing: the broker "
                        "cannot see whether their backends are gone)", _label(client.id),
                        pid, p.shown(host), parent, len(client.leases))
            pools = {w.pool for w in client.waiting.values()}
            for waiter in list(client.waiting.values()):
                self._dequeue(client, waiter)
            for name in pools:
                outs += self._rebalance(name, now)
        if self.fence:
            text = f"pid {pid} on {p.shown(host)}: fencing {leases} lease(s)"
        else:
            text = (f"pid {pid} on {p.shown(host)}: {leases} lease(s) stay counted until the "
                    f"TTL ({self.ttl:g}s): the broker has no fencing")
        return outs + [(cid, "done", {"rid": rid, "message": text})]

    def tick(self, now: float) -> List[Out]:
        """Expire what is due: waiters past their deadline, clients past the TTL;
        at the end of the grace period, grant what waited."""
        outs: List[Out] = []
        touched = set()
        if self._in_grace and now >= self.grace_until and not self._sweeping:
            if self.fence:
                # before granting: end the backends of leases nobody re-announced
                self._sweeping = True
                known = [lz for pl in self.pools.values() for lz in pl.leases]
                outs.append((b"", "sweep", {"known": known,
                                            "scopes": sorted(self.fence_scopes)}))
            else:
                outs += self.swept(now)
        while True:
            entry = self._due(now)
            if entry is None:
                break
            kind, key = entry
            if kind == _WAITER:
                cid, rid = key
                client = self.clients[cid]
                waiter = client.waiting[rid]
                self._dequeue(client, waiter)
                pool = self.pools[waiter.pool]
                pool.counters.timeouts += 1
                outs.append(self._error(
                    cid, rid, p.E_TIMEOUT,
                    f"no lease in pool {pool.name!r} within the deadline "
                    f"(max {pool.max}, {len(pool.leases)} leased, {len(pool.queue)} waiting)"))
                touched.add(pool.name)
            elif kind == _CLIENT:
                client = self.clients[key]
                if client.leases:
                    log.warning("client %s (pid %s on %s) silent for %.1fs: expiring %d lease(s)",
                                _label(client.id), client.pid, p.shown(client.host),
                                now - client.last_seen, len(client.leases))
                outs += self._forget(client, now, expired=True)
            else:
                lease = self.unconfirmed.pop(key)
                log.warning("lease %d: its backend was never confirmed gone; after %.0fs it "
                            "is assumed to be: slot freed", lease.id, self.unconfirmed_hold)
                del self.pools[lease.pool].leases[lease.id]
                touched.add(lease.pool)
        touched.update(name for name, pool in self.pools.items()
                       if pool.rotate_at is not None and now >= pool.rotate_at)
        for name in touched:
            outs += self._rebalance(name, now)
        return outs + self._settle(now)

    def next_deadline(self) -> Optional[float]:
        """The earliest time at which :meth:`tick` has something to do."""
        # (asked before every wait of the broker's loop: one pass, no lists)
        due = self._clean_top()
        for pool in self.pools.values():
            if pool.contended and pool.quiet_since is not None:
                at = pool.quiet_since + CONTENTION_LINGER
                due = at if due is None or at < due else due
            if pool.rotate_at is not None:
                at = pool.rotate_at
                due = at if due is None or at < due else due
        if self._in_grace and not self._sweeping:
            at = self.grace_until
            due = at if due is None or at < due else due
        return due

    # ------------------------------------------------------------------ admin

    def resize(self, pool_name: str, size: int, now: float) -> List[Out]:
        """Change a pool's max at run time (adding the pool if it is new). Growing
        grants to waiters at once; shrinking recalls idle leases first, and busy
        ones are given back when their connection returns, not reused."""
        if size < 0:
            raise ValueError("max must be >= 0")
        pool = self.pools.get(pool_name)
        if pool is None:
            pool = self.pools[pool_name] = Pool(pool_name, size)
            log.info("pool %r added with max %d", pool_name, size)
        else:
            log.info("pool %r resized: max %d -> %d (%d leased, %d waiting)", pool_name,
                     pool.max, size, len(pool.leases), len(pool.queue))
            pool.max = size
        return self._rebalance(pool_name, now)

    def drain(self, pool_name: str, now: float) -> List[Out]:
        """For maintenance: refuse new requests (waiters get an error) and ask every
        lease back (idle connections close at once, busy ones when returned)."""
        pool = self.pools[pool_name]
        pool.draining = True
        outs: List[Out] = []
        for waiter in list(pool.queue.values()):
            self._dequeue(self.clients[waiter.client], waiter)
            outs.append(self._error(waiter.client, waiter.rid, p.E_DRAINING,
                                    f"pool {pool_name!r} is draining for maintenance"))
        log.warning("pool %r draining: %d lease(s) asked back, %d waiter(s) refused",
                    pool_name, len(pool.leases), len(outs))
        return outs + self._rebalance(pool_name, now)

    def pause(self, pool_name: str, now: float) -> List[Out]:
        """Grant nothing new; requests wait (within their timeout); leases held
        stay valid."""
        self.pools[pool_name].paused = True
        log.warning("pool %r paused", pool_name)
        return []

    def resume(self, pool_name: str, now: float) -> List[Out]:
        """Undo pause and drain."""
        pool = self.pools[pool_name]
        pool.paused = pool.draining = False
        log.info("pool %r resumed", pool_name)
        return self._rebalance(pool_name, now)

    # ------------------------------------------------------------------ counts

    def _count(self, pool: Pool, cid: ClientId, held: int = 0, waiting: int = 0,
               now: float = 0.0) -> None:
        """Bring ``cid``'s demand in ``pool`` up to date after a change (``now``
        matters when the change may leave it waiting with nothing held)."""
        d = pool.demand.get(cid)
        if d is None:
            d = Demand()
        d.held += held
        d.waiting += waiting
        if held and pool.quotas:
            g = self._group(pool, cid)
            if g is not None:
                pool.group_held[g] += held
        if d.held == 0 and d.waiting:
            pool.empty.setdefault(cid, now)
        else:
            pool.empty.pop(cid, None)
        if d.held == 0 and d.waiting == 0:
            pool.demand.pop(cid, None)
            pool.group.pop(cid, None)
            return
        d.idle = min(d.held, self.clients[cid].idle.get(pool.name, 0))
        pool.demand[cid] = d

    def _hold(self, pool: Pool, client: Client, lease: Lease) -> None:
        pool.leases[lease.id] = lease
        client.leases[lease.id] = lease
        self._count(pool, client.id, held=1)

    def _enqueue(self, client: Client, waiter: Waiter) -> None:
        client.waiting[waiter.rid] = waiter
        pool = self.pools[waiter.pool]
        pool.queue[(client.id, waiter.rid)] = waiter
        pool.queued_at = waiter.since
        self.waiting += 1
        self._count(pool, client.id, waiting=1, now=waiter.since)
        self._schedule(waiter.deadline, _WAITER, (client.id, waiter.rid))

    def _dequeue(self, client: Client, waiter: Waiter) -> None:
        del client.waiting[waiter.rid]
        pool = self.pools[waiter.pool]
        del pool.queue[(client.id, waiter.rid)]
        self.waiting -= 1
        self._count(pool, client.id, waiting=-1)

    # ------------------------------------------------------------------ timers

    def _schedule(self, due: float, kind: int, key: Any) -> None:
        heapq.heappush(self._timers, (due, next(self._timer_n), kind, key))
        # entries made stale (cancelled waiters, renewed deadlines) stay until
        # they come up; rebuild before they outnumber the live ones
        live = self.waiting + len(self.clients) + len(self.unconfirmed)
        if len(self._timers) > 4 * live + 1024:
            self._timers = [entry for entry in self._timers if self._live(entry)]
            heapq.heapify(self._timers)

    def _schedule_client(self, client: Client) -> None:
        client.timer = client.last_seen + self.ttl
        self._schedule(client.timer, _CLIENT, client.id)

    def _live(self, entry: Tuple[float, int, int, Any]) -> bool:
        due, _, kind, key = entry
        if kind == _WAITER:
            client = self.clients.get(key[0])
            waiter = client.waiting.get(key[1]) if client is not None else None
            return waiter is not None and waiter.deadline == due
        if kind == _CLIENT:
            client = self.clients.get(key)
            return client is not None and client.timer == due
        lease = self.unconfirmed.get(key)
        return lease is not None and lease.held_until == due

    def _clean_top(self) -> Optional[float]:
        """Drop stale entries from the top of the timer heap (moving a client's
        TTL entry to when it is really due); the earliest live time, if any."""
        timers = self._timers
        while timers:
            entry = timers[0]
            if not self._live(entry):
                heapq.heappop(timers)
                continue
            if entry[2] == _CLIENT:
                client = self.clients[entry[3]]
                if client.last_seen + self.ttl > entry[0]:  # heard from since
                    heapq.heappop(timers)
                    self._schedule_client(client)
                    continue
            return entry[0]
        return None

    def _due(self, now: float) -> Optional[Tuple[int, Any]]:
        """Take the next timer due at ``now``: (kind, key), or None."""
        due = self._clean_top()
        if due is None or due > now:
            return None
        _, _, kind, key = heapq.heappop(self._timers)
        return kind, key

    # ------------------------------------------------------------------ rules

    def _drop_lease(self, client: Client, lease: Lease, now: float) -> None:
        del self.pools[lease.pool].leases[lease.id]
        self._orphan(client, lease, now)

    def _orphan(self, client: Client, lease: Lease, now: float) -> None:
        """Detach ``lease`` (already out of ``client.leases``) from its client."""
        if lease.rid is not None:
            client.granted.pop(lease.rid, None)
        if client.recall.get(lease.pool):
            client.recall[lease.pool] -= 1
        self._count(self.pools[lease.pool], client.id, held=-1, now=now)

    @staticmethod
    def _fence_entry(lease: Lease) -> List[Any]:
        return [lease.id, lease.backend_pid or 0, lease.pool, lease.user, lease.db]

    def swept(self, now: float) -> List[Out]:
        """The grace period is over (and, with fencing, unknown backends are gone)."""
        self._in_grace = self._sweeping = False
        leased = sum(len(pl.leases) for pl in self.pools.values())
        log.info("grace period over: %d lease(s) re-announced by %d client(s); granting",
                 leased, len(self.clients))
        outs: List[Out] = []
        for name in self.pools:
            outs += self._rebalance(name, now)
        return outs

    def _remember_expired(self, lease_id: int) -> None:
        self.expired[lease_id] = None
        while len(self.expired) > 100_000:
            self.expired.popitem(last=False)

    def fenced(self, lease_ids: List[int], now: float) -> List[Out]:
        """The fencer saw these leases' backends leave the server: free them."""
        pools = set()
        for lease_id in lease_ids:
            lease = self.fencing.pop(lease_id, None)
            if lease is not None:
                del self.pools[lease.pool].leases[lease_id]
                pools.add(lease.pool)
        outs: List[Out] = []
        for name in pools:
            outs += self._rebalance(name, now)
        return outs

    def _forget(self, client: Client, now: float, expired: bool = False) -> List[Out]:
        pools = {lease.pool for lease in client.leases.values()}
        pools |= {w.pool for w in client.waiting.values()}
        outs: List[Out] = []
        if expired:
            for lease in client.leases.values():  # whatever happens next, never adopt these
                self._remember_expired(lease.id)
                self.pools[lease.pool].counters.expired += 1
        if expired and self.fence and client.leases:
            to_fence = []
            for lease in list(client.leases.values()):
                lease.fencing = True
                self.fencing[lease.id] = lease
                to_fence.append(self._fence_entry(lease))
                self._orphan(client, lease, now)
            client.leases.clear()
            outs.append((b"", "fence", {"leases": to_fence}))  # for the server's fencer
        for lease in list(client.leases.values()):
            self._drop_lease(client, lease, now)
        client.leases.clear()
        for waiter in list(client.waiting.values()):
            self._dequeue(client, waiter)
        del self.clients[client.id]
        for pool in self.pools.values():
            pool.told.discard(client.id)
        for name in pools:
            outs += self._rebalance(name, now)
        return outs

    def demands(self, pool_name: str) -> Dict[ClientId, Demand]:
        """Clients that hold or want leases in ``pool_name``, with their demand (a
        copy: the ledger keeps its own up to date)."""
        return {cid: Demand(d.held, d.waiting, d.idle)
                for cid, d in self.pools[pool_name].demand.items()}

    def _rebalance(self, pool_name: str, now: float) -> List[Out]:
        """Grant what fits, then decide who should give leases back."""
        pool = self.pools[pool_name]
        outs: List[Out] = []
        while (pool.queue and len(pool.leases) < pool.max and not self._in_grace
               and not pool.paused and not pool.draining):
            waiter = self._pick(pool)
            if waiter is None:
                break  # the free slots are reserved for others, or the groups are full
            client = self.clients[waiter.client]
            self._dequeue(client, waiter)
            outs.append(self._grant(pool, client, waiter.rid, now, waited=now - waiter.since))
        if pool.queue:
            pool.contended, pool.quiet_since = True, None
        elif pool.contended and len(pool.leases) < pool.max:
            # nobody waits and a slot is free: the next request is granted at
            # once, so an idle connection given back now would go to nobody (and
            # its pool would have to ask for it again: the churn the linger kept
            # up for a second after every wait)
            pool.contended, pool.quiet_since = False, None
        elif pool.contended and pool.quiet_since is None:
            pool.quiet_since = now
        wanted = self._recall_targets(pool, now)
        contended = pool.contended
        if not (wanted or contended or pool.told):
            return outs  # nobody is owed a lease, nobody was told otherwise
        # who holds or wants leases here, and who must hear that a recall or the
        # contention ended; nobody else has anything to hear
        for cid in list(pool.demand) + [c for c in pool.told if c not in pool.demand]:
            client = self.clients[cid]
            target = wanted.get(cid, 0)
            before = client.recall.get(pool.name, 0)
            if target > before:
                pool.counters.recalls += target - before
            if before != target or client.contended.get(pool.name, False) != contended:
                client.recall[pool.name] = target
                client.contended[pool.name] = contended
                outs.append((cid, "recall",
                             {"pool": pool.name, "count": target, "contended": contended}))
            if target or contended:
                pool.told.add(cid)
            else:
                pool.told.discard(cid)
        return outs

    def _grant(self, pool: Pool, client: Client, rid: int, now: float, waited: float) -> Out:
        pool.counters.waited(waited)
        self._grant_seq += 1
        lease = Lease(self.ids.issue(pool.name, self._id_in_use), pool.name, client.id,
                      now, rid=rid, seq=self._grant_seq)
        self._hold(pool, client, lease)
        client.granted[rid] = lease.id
        return (client.id, "grant", self._grant_fields(lease))

    def _settle(self, now: float) -> List[Out]:
        """Clear the contended flag of pools whose queue stayed empty long enough."""
        outs: List[Out] = []
        for pool in self.pools.values():
            if (pool.contended and not pool.queue and pool.quiet_since is not None
                    and now >= pool.quiet_since + CONTENTION_LINGER):
                pool.contended, pool.quiet_since = False, None
                outs += self._rebalance(pool.name, now)
        return outs

    def _id_in_use(self, lease_id: int) -> bool:
        if lease_id in self.expired or lease_id in self.fencing:
            return True
        for pool in self.pools.values():  # (once per grant: no generator)
            if lease_id in pool.leases:
                return True
        return False

    def _pick(self, pool: Pool) -> Optional[Waiter]:
        """The oldest waiter whose client is starved (holds less than its
        entitlement rounded down), else the oldest whose client holds less than
        its entitlement rounded up, else the oldest (so a slot freed in a
        balanced pool stays where it keeps the balance, and moves nothing).
        With fewer slots than clients (they take turns), the client that has
        held nothing the longest goes first, however old another's requests.
        With quotas, only waiters with room (see :meth:`_room`); None if none."""
        demands, capacity = self._shares(pool)
        level = water_level([d.want for d in demands.values()], capacity)
        quotas = bool(pool.quotas)
        if level < 1 and pool.empty:
            for cid in pool.empty:
                if not quotas or self._room(pool, cid):
                    return next(w for w in self.clients[cid].waiting.values()
                                if w.pool == pool.name)
        below_ceiling = oldest = None
        for waiter in pool.queue.values():
            if quotas and not self._room(pool, waiter.client):
                continue
            d = demands[waiter.client]
            floor, ceiling = entitled(d, level)
            if d.held < floor:
                return waiter
            if below_ceiling is None and d.held < ceiling:
                below_ceiling = waiter
            if oldest is None:
                oldest = waiter
        return below_ceiling or oldest

    # ------------------------------------------------------------------ quotas

    def set_quotas(self, pool_name: str, quotas: List[Quota], now: float) -> List[Out]:
        """Replace a pool's quotas (see :mod:`poolbroker.quotas`); leases held
        beyond a new cap are not recalled, the group just gets no more until it
        is back under it."""
        pool = self.pools[pool_name]
        pool.quotas = list(quotas)
        pool.group = {}
        pool.group_held = [0] * len(quotas)
        for lease in pool.leases.values():
            if lease.owned:
                g = self._group(pool, lease.client)
                if g is not None:
                    pool.group_held[g] += 1
        if quotas:
            log.info("pool %r quotas: %s", pool_name, "; ".join(q.describe() for q in quotas))
        return self._rebalance(pool_name, now)

    def _group(self, pool: Pool, cid: ClientId) -> Optional[int]:
        """The client's group in the pool, fixed while it holds or wants leases
        there (a client that says hello again under another name changes group
        only once it has left the pool)."""
        if cid not in pool.group:
            pool.group[cid] = group_of(pool.quotas, self.clients[cid].name)
        return pool.group[cid]

    def _unused_reserve(self, pool: Pool, mine: Optional[int] = None) -> int:
        """Slots reserved for groups (but ``mine``) and not used by them."""
        return sum(max(0, q.reserve - pool.group_held[g]) for g, q in enumerate(pool.quotas)
                   if q.reserve and g != mine)

    def _room(self, pool: Pool, cid: ClientId) -> bool:
        """Whether a lease may go to ``cid`` now: its group is under its cap, and
        a free slot is left once the other groups' unused reserves are kept."""
        if not pool.quotas:
            return len(pool.leases) < pool.max
        g = self._group(pool, cid)
        if g is not None:
            cap = pool.quotas[g].max
            if cap is not None and pool.group_held[g] >= cap:
                return False
        return len(pool.leases) + self._unused_reserve(pool, g) < pool.max

    def _shares(self, pool: Pool) -> Tuple[Dict[ClientId, Demand], int]:
        """The demands and the capacity fair shares are computed over: with
        quotas, a client whose group is at its cap wants nothing more (its
        requests wait for its group, not for a share), and unused reserves are
        not shared out."""
        if not pool.quotas:
            return pool.demand, pool.max
        full = {g for g, q in enumerate(pool.quotas)
                if q.max is not None and pool.group_held[g] >= q.max}
        demands = {cid: (Demand(d.held, 0, d.idle)
                         if d.waiting and self._group(pool, cid) in full else d)
                   for cid, d in pool.demand.items()}
        return demands, max(0, pool.max - self._unused_reserve(pool))

    def _recall_targets(self, pool: Pool, now: float) -> Dict[ClientId, int]:
        """How many leases to ask back from each client, so that starved waiters
        (clients below their entitlement rounded down) get theirs.

        Sources, cheapest first: idle connections (closing one costs nobody
        anything; a client that waits while reporting idle ones runs several local
        pools on this budget, and only a recall moves them), then clients above
        their entitlement rounded up: they return a lease when a connection comes
        back instead of reusing it. Nobody is asked to go below that, so whoever
        gives a lease back is not starved by it (no ping-pong), and when every
        client wants at least an equal share nothing is recalled at all. A pool
        over its max (the budget shrank) recalls the excess the same way.

        With more clients wanting leases than the pool has slots, everyone's
        entitlement rounded down is 0 and nobody above is over; the slots then
        take turns (:meth:`_rotation`).
        """
        pool.rotate_at = None
        if pool.draining:  # everything back: idle at once, busy ones when returned
            return {cid: d.held for cid, d in pool.demand.items() if d.held}
        excess = len(pool.leases) - pool.max
        if not pool.queue and excess <= 0:
            return {}
        demands, capacity = self._shares(pool)
        level = water_level([d.want for d in demands.values()], capacity)
        bounds = {cid: entitled(d, level) for cid, d in demands.items()}
        # below the entitlement rounded down: starved; below it rounded up: owed
        # a lease by anyone above theirs rounded up (with fewer slots than
        # clients, rounded down is 0 for everyone: this keeps the queue moving)
        starved = sum(min(d.waiting, bounds[cid][0] - d.held)
                      for cid, d in demands.items() if d.waiting and d.held < bounds[cid][0])
        owed = sum(min(d.waiting, bounds[cid][1] - d.held)
                   for cid, d in demands.items() if d.waiting and d.held < bounds[cid][1])
        targets: Dict[ClientId, int] = {}

        def take(cid: ClientId, most: int, need: int) -> int:
            n = min(most - targets.get(cid, 0), need)
            if n > 0:
                targets[cid] = targets.get(cid, 0) + n
                return need - n
            return need

        # a client's own idle connections serve its own waiters
        for cid, d in demands.items():
            if d.waiting and d.idle:
                take(cid, min(d.idle, d.waiting), d.waiting)
        own = sum(targets.values())
        need = max(owed, excess)
        # 1. idle connections of clients that are not starved, the most idle first
        for cid, d in sorted(demands.items(), key=lambda item: -item[1].idle):
            if need <= 0:
                break
            if d.idle and d.held >= bounds[cid][0]:
                need = take(cid, d.idle, need)
        # 2. above the entitlement rounded up; then, for the starved (and to shed
        # an excess) only, above it rounded down: a giver keeps at least that
        # much, so giving never starves it
        for rounding in (1, 0):
            if rounding == 0:
                need = max(starved, excess) - (sum(targets.values()) - own)
            above = sorted(((cid, d.held - bounds[cid][rounding])
                            for cid, d in demands.items() if d.held > bounds[cid][rounding]),
                           key=lambda item: -item[1])
            for cid, surplus in above:
                if need <= 0:
                    break
                need = take(cid, surplus, need)
        if level < 1 and not (pool.paused or self._in_grace):
            self._rotation(pool, now, targets, sum(targets.values()) - own, demands)
        return targets

    def _rotation(self, pool: Pool, now: float, targets: Dict[ClientId, int],
                  asked: int, demands: Dict[ClientId, Demand]) -> None:
        """Turns, for a pool with fewer slots than clients that want one: every
        client that has held nothing there while waiting for ``ROTATE_AFTER``
        seconds (the longest first, however old its requests) gets the oldest
        lease that has been held at least as long (its holder
        returns it when its connection next comes back), on top of the
        ``asked`` leases already recalled. Adds to ``targets``; sets when a
        tick should look again."""
        turns, soonest = 0, math.inf
        for cid, since in pool.empty.items():  # the longest without a lease first
            if not demands[cid].waiting:
                continue  # its group is at its cap: a turn would not reach it
            if since + ROTATE_AFTER > now:
                soonest = since + ROTATE_AFTER
                break  # later ones waited even less
            turns += 1
        turns -= asked
        for lease in pool.leases.values():  # in grant order: the oldest first
            if turns <= 0:
                break
            if not lease.owned or targets.get(lease.client, 0) >= pool.demand[lease.client].held:
                continue
            if lease.granted_at + ROTATE_AFTER > now:
                soonest = min(soonest, lease.granted_at + ROTATE_AFTER)
                continue
            targets[lease.client] = targets.get(lease.client, 0) + 1
            turns -= 1
        if pool.empty:  # somebody takes turns: look again when the next turn may come
            pool.rotate_at = soonest if soonest < math.inf else now + ROTATE_AFTER

    # ------------------------------------------------------------------ views

    def holders(self, now: float) -> List[Dict[str, Any]]:
        """Every lease and every queued request, with who holds or wants it
        (``poolbroker clients``, like PgBouncer's ``SHOW CLIENTS``): the longest
        checkouts first, then the longest waits, then idle leases. Checkouts are
        known as of each client's last heartbeat (``reported_s`` ago): one that
        began before it counts as going on since (a connection checked in and
        out again since then shows up to one heartbeat too long)."""
        rows: List[Dict[str, Any]] = []

        def who(cid: ClientId) -> Dict[str, Any]:
            client = self.clients.get(cid)
            if client is None:  # fencing or unconfirmed after its client left
                return {"client": _label(cid), "pid": 0, "host": "", "name": ""}
            return {"client": _label(cid), "pid": client.pid, "host": client.host,
                    "name": client.name}

        checkouts: Dict[ClientId, Dict[int, float]] = {}
        for pool in self.pools.values():
            for lease in pool.leases.values():
                client = self.clients.get(lease.client)
                since = None
                if client is not None:
                    if lease.client not in checkouts:
                        checkouts[lease.client] = client.checkouts()
                    since = checkouts[lease.client].get(lease.id)
                state = ("fencing" if lease.fencing else "unconfirmed" if lease.unconfirmed
                         else "busy" if since is not None else "idle")
                rows.append({"lease": lease.id, "pool": pool.name, **who(lease.client),
                             "state": state, "backend_pid": lease.backend_pid,
                             "held_s": round(now - lease.granted_at, 3),
                             "checked_out_s": None if since is None else
                             round(now - since, 3),
                             "reported_s": None if client is None else
                             round(now - client.busy_at, 3)})
            for waiter in pool.queue.values():
                rows.append({"lease": None, "pool": pool.name, **who(waiter.client),
                             "state": "waiting", "backend_pid": None,
                             "waiting_s": round(now - waiter.since, 3)})
        order = {"busy": 0, "waiting": 1, "fencing": 2, "unconfirmed": 3, "idle": 4}
        rows.sort(key=lambda r: (order[r["state"]], -(r.get("checked_out_s") or 0.0),
                                 -(r.get("waiting_s") or 0.0), -r.get("held_s", 0.0)))
        return rows

    def snapshot(self, now: float) -> Dict[str, Any]:
        """What ``poolbroker status`` shows: per pool and per client figures."""
        pools = {}
        for pool in self.pools.values():
            idle = sum(d.idle for d in pool.demand.values())
            pools[pool.name] = {
                "max": pool.max,
                "fencing": sum(1 for lz in self.fencing.values() if lz.pool == pool.name),
                "unconfirmed": sum(1 for lz in self.unconfirmed.values()
                                   if lz.pool == pool.name),
                "paused": pool.paused,
                "draining": pool.draining,
                "leased": len(pool.leases),
                "idle": idle,
                "busy": len(pool.leases) - idle,
                "waiting": len(pool.queue),
                "clients": len(pool.demand),
                "contended": pool.contended,
                "quotas": [{"pattern": q.pattern, "max": q.max, "reserve": q.reserve,
                            "held": pool.group_held[g]} for g, q in enumerate(pool.quotas)],
                **pool.counters.view(),
            }
        clients = []
        for client in self.clients.values():
            per_pool: Dict[str, int] = {}
            for lease in client.leases.values():
                per_pool[lease.pool] = per_pool.get(lease.pool, 0) + 1
            clients.append({
                "id": _label(client.id),
                "pid": client.pid,
                "host": client.host,
                "name": client.name,
                "leases": per_pool,
                "waiting": len(client.waiting),
                "idle": dict(client.idle),
                "backend_pids": sorted(lz.backend_pid for lz in client.leases.values()
                                       if lz.backend_pid is not None),
                "last_heartbeat_s": round(now - client.last_seen, 3),
            })
        grace = max(0.0, self.grace_until - now) if self._in_grace else 0.0
        return {"epoch": self.epoch, "ttl": self.ttl, "grace_s": round(grace, 3),
                "max_clients": self.max_clients, "max_waiting": self.max_waiting,
                "pools": pools, "clients": clients}

    def check(self) -> None:
        """Assert the internal invariants (used by the property tests)."""
        for pool in self.pools.values():
            for lease in pool.leases.values():
                if lease.fencing:
                    assert self.fencing[lease.id] is lease
                    continue
                if lease.unconfirmed:
                    assert self.unconfirmed[lease.id] is lease
                    continue
                assert self.clients[lease.client].leases[lease.id] is lease
            for (cid, rid), waiter in pool.queue.items():
                assert self.clients[cid].waiting[rid] is waiter
        for client in self.clients.values():
            for lease in client.leases.values():
                assert self.pools[lease.pool].leases[lease.id] is lease
            for rid, waiter in client.waiting.items():
                assert (client.id, rid) in self.pools[waiter.pool].queue
                assert rid not in client.granted
        # the incremental counts agree with counting from scratch
        assert self.waiting == sum(len(pool.queue) for pool in self.pools.values())
        for pool in self.pools.values():
            scratch: Dict[ClientId, Demand] = {}
            for lease in pool.leases.values():
                if lease.owned:
                    scratch.setdefault(lease.client, Demand()).held += 1
            for waiter in pool.queue.values():
                scratch.setdefault(waiter.client, Demand()).waiting += 1
            for cid, d in scratch.items():
                d.idle = min(d.held, self.clients[cid].idle.get(pool.name, 0))
            assert pool.demand == scratch, (pool.name, pool.demand, scratch)
            assert set(pool.empty) == {cid for cid, d in scratch.items()
                                       if d.waiting and not d.held}, (pool.name, pool.empty)
            groups = [0] * len(pool.quotas)
            for cid, d in scratch.items():
                g = pool.group.get(cid)
                if g is not None:
                    groups[g] += d.held
            assert groups == pool.group_held, (pool.name, groups, pool.group_held)
            assert set(pool.group) <= set(pool.demand)
            assert pool.told <= set(self.clients)
        # every live timer is in the heap
        pending = {(kind, key) for _, _, kind, key in self._timers}
        for client in self.clients.values():
            assert (_CLIENT, client.id) in pending
            for waiter in client.waiting.values():
                assert (_WAITER, (client.id, waiter.rid)) in pending


def _label(cid: ClientId) -> str:
    """A stable name for a client in ``status``. Not its routing id: whoever can
    read the status must not learn the ids to impersonate (say ``bye`` as) others."""
    return hashlib.blake2b(cid, digest_size=6, person=b"pb-client").hexdigest()
