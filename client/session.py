"""LeaseSession: what this process's link to a broker decides, without I/O.

The broker's shape on the client side: a pure state machine (no sockets, threads,
locks or clocks; the time is passed in) that takes the caller's requests and the
broker's messages and returns what to do (:class:`Actions`): frames to send,
grants and refusals to hand to their callers, leases lost, pools recalled.
:class:`poolbroker_client.leases.LeaseClient` is the thin shell around it that
owns the socket, the I/O thread and the callbacks.

The subtle parts live here, each with its rule:

* **hello generations.** Every hello starts a generation. Requests belong to the
  generation they were sent in; a welcome re-sends (same request id, so the broker
  stays idempotent) those of older generations that are still wanted.
* **held grants while suspect.** After a stall (the process was frozen for longer
  than a heartbeat) our leases may have expired and gone to others. Until the
  broker answers a fresh heartbeat, grants are held back; the answer delivers the
  ones it still knows and gives the others back. A re-hello trusts none.
* **lost leases.** A lease the broker says it does not know is lost: no release is
  sent for it, and its connection must go (the pools are told).
* **recall debt.** The broker says how many leases of a pool it wants back; a
  returning connection pays one (:meth:`LeaseSession.take_recall`).
* **calm.** While no lease is lost, no recall is owed and no pool is contended,
  :attr:`LeaseSession.calm` is True: every connection may simply go back to its
  pool's idle ones (the pools' hot path reads this one flag).
* **deferred releases.** A release while nobody waits in its pool is not urgent:
  it rides on the next request or heartbeat (their ``released`` field), or goes
  out with whatever the shell sends next (:meth:`LeaseSession.take_releases`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

from poolbroker import protocol as p

from .errors import BrokerError


@dataclass
class Actions:
    """What the shell must do after a call into the session."""

    send: List[bytes] = field(default_factory=list)
    #: (request id, lease): hand the lease to the request's caller
    granted: List[Tuple[int, int]] = field(default_factory=list)
    #: (request id, error): the request failed
    failed: List[Tuple[int, BaseException]] = field(default_factory=list)
    #: leases the broker no longer counts: cut their connections
    lost: Set[int] = field(default_factory=set)
    #: pools whose owners must look at their recall debt / contention
    recalled: List[str] = field(default_factory=list)
    #: the broker vouched for us again after a stall: wake those waiting on it
    confirmed: bool = False
    #: send now rather than with the next message
    urgent: bool = False
    #: a log line for the shell (level name, message)
    log: List[Tuple[str, str]] = field(default_factory=list)

    def merge(self, other: "Actions") -> "Actions":
        self.send += other.send
        self.granted += other.granted
        self.failed += other.failed
        self.lost |= other.lost
        self.recalled += other.recalled
        self.confirmed = self.confirmed or other.confirmed
        self.urgent = self.urgent or other.urgent
        self.log += other.log
        return self


@dataclass
class _Request:
    pool: str
    deadline: float
    gen: int


class LeaseSession:
    """The state of one process's session with one broker. Not thread-safe: the
    shell calls it under its own lock."""

    def __init__(self, pid: int, host: str, name: str, ppid: int = 0) -> None:
        self.pid, self.host, self.name = pid, host, name
        self.ppid = ppid  # the parent that may report this process exited
        self._rids = itertools.count(1)
        self.requests: Dict[int, _Request] = {}  # outstanding, not cancelled
        self.leases: Dict[int, str] = {}  # lease id -> pool
        self.connected: Set[int] = set()  # leases whose connection exists (reported)
        self.lost: Set[int] = set()
        self.debt: Dict[str, int] = {}  # pool -> leases the broker wants back
        self.contended: Dict[str, bool] = {}  # pool -> others wait there
        #: ``not lost and not any(debt.values()) and not any(contended.values())``,
        #: kept up to date by every change to them (:meth:`_settle`): read on every
        #: return of a connection, without the shell's lock
        self.calm = True
        self.hello_gen = 0
        self.welcomed_gen = 0
        self.heartbeat = 1.0
        self.epoch: Optional[str] = None
        self.fence = ""
        self.suspect = False
        self.held: List[Tuple[int, str, int]] = []  # (rid, pool, lease) held while suspect
        self.check_rid = 0  # the heartbeat whose answer confirms us
        self.check_gen = 0  # the hello generation when we became suspect
        self.check_at = 0.0
        self.hello_at = 0.0
        self.seen = 0  # the highest grant seq received from this broker run
        self.last_reply: Optional[float] = None
        self.releasing: List[int] = []  # released leases not sent yet

    # ------------------------------------------------------------- callers

    def hello(self, now: float) -> bytes:
        """A hello opening a new generation. Re-announces only leases with a live
        connection: that is what a restarted broker must count. A lease granted
        but not connected yet is forfeited (the broker may have expired it before
        a restart that made it forget), and so are grants held across a stall."""
        self.hello_gen += 1
        self.hello_at = now
        announced = [[lease, pool] for lease, pool in self.leases.items()
                     if lease in self.connected]
        for lease in [lz for lz in self.leases if lz not in self.connected]:
            del self.leases[lease]
            self.lost.add(lease)
        self._settle()
        return p.encode("hello", pid=self.pid, host=self.host, name=self.name,
                        leases=announced, ppid=self.ppid, gen=self.hello_gen)

    def acquire(self, pool: str, timeout: float, now: float,
                ahead: bool = False) -> Tuple[int, bytes]:
        """A new request: its id and the frame to send. ``ahead``: asked ahead
        of need (timeout 0, granted only from room to spare; see the broker's
        ``Ledger.acquire``)."""
        timeout = 0.0 if ahead else min(timeout, p.MAX_TIMEOUT)
        rid = next(self._rids)
        self.requests[rid] = _Request(pool, now + timeout, self.hello_gen)
        extra: Dict[str, Any] = {"ahead": True} if ahead else {}
        if self.releasing:  # the releases since the last message come along
            return rid, p.encode("acquire", rid=rid, pool=pool, timeout=timeout,
                                 released=self._released(), **extra)
        return rid, p.encode("acquire", rid=rid, pool=pool, timeout=timeout, **extra)

    def cancel(self, rid: int) -> Optional[bytes]:
        """Withdraw a request: the cancel frame, or None if it was answered already."""
        if self.requests.pop(rid, None) is None:
            return None
        return p.encode("cancel", rid=rid)

    def release(self, lease: int) -> Actions:
        """Give ``lease`` back (its connection is closed and the server saw it).
        Urgent only while others wait in its pool or the broker wants it back."""
        pool = self._drop(lease)
        if pool is None:
            return Actions()  # lost or released already: the broker does not count it
        self.releasing.append(lease)
        if (self.contended.get(pool, False) or self.debt.get(pool, 0) > 0
                or len(self.releasing) >= p.MAX_RELEASED):
            frame = self.take_releases()
            assert frame is not None
            return Actions(send=[frame], urgent=True)
        return Actions()

    def take_releases(self) -> Optional[bytes]:
        """The releases not sent yet, as one frame (None if there are none)."""
        if not self.releasing:
            return None
        first, *rest = self._released()
        if rest:
            return p.encode("release", lease=first, released=rest)
        return p.encode("release", lease=first)

    def _released(self) -> List[int]:
        taken = self.releasing[:p.MAX_RELEASED]
        del self.releasing[:p.MAX_RELEASED]
        return taken

    def release_unconfirmed(self, lease: int) -> Optional[bytes]:
        """Give ``lease`` back before the server was seen to close its connection:
        the frame, or None if the broker no longer counts the lease."""
        if self._drop(lease) is None:
            return None
        return p.encode("release", lease=lease, unconfirmed=True)

    def forget(self, lease: int) -> None:
        """Drop a lease the broker no longer knows (no release is sent)."""
        self._drop(lease)

    def _drop(self, lease: int) -> Optional[str]:
        if self.lost:
            self.lost.discard(lease)
            self._settle()
        self.connected.discard(lease)
        return self.leases.pop(lease, None)

    def _settle(self) -> None:
        """Bring :attr:`calm` up to date: call after changing lost, debt or contended."""
        self.calm = not (self.lost or any(self.debt.values()) or any(self.contended.values()))

    def connected_frame(self, lease: int, backend_pid: int, user: Optional[str],
                        db: Optional[str]) -> Actions:
        """``lease``'s connection exists: tell the broker its backend (urgent when
        the broker fences: the fencer matches on it)."""
        fields: Dict[str, Any] = {"lease": lease, "backend_pid": backend_pid}
        if user and db and len(user) <= p.MAX_NAME_CHARS and len(db) <= p.MAX_NAME_CHARS:
            fields.update(user=user, db=db)
        self.connected.add(lease)
        return Actions(send=[p.encode("connected", **fields)], urgent=bool(self.fence))

    def take_recall(self, pool: str) -> bool:
        """True (and one less owed) if the broker wants a lease of ``pool`` back."""
        if self.debt.get(pool, 0) > 0:
            self.debt[pool] -= 1
            self._settle()
            return True
        return False

    def stalled(self, now: float) -> Optional[int]:
        """The process stalled: become suspect. Returns the id of the heartbeat to
        send, whose answer will vouch for us (None if suspect already)."""
        if self.suspect:
            return None
        self.suspect = True
        self.check_gen = self.hello_gen
        self.check_rid = next(self._rids)
        self.check_at = now
        return self.check_rid

    def is_contended(self, pool: str, now: float) -> bool:
        """The broker's word that others wait in ``pool``, while it is worth
        anything: from a broker silent for longer than :meth:`quiet_limit`
        (stopped, unreachable) it is stale, and idle connections are better kept
        than given back to nobody (a pool could not get them back while the
        broker is away)."""
        return bool(self.contended.get(pool)) and self.last_reply is not None \
            and now - self.last_reply < self.quiet_limit()

    def quiet_limit(self) -> float:
        """Seconds without a message after which the broker counts as not answering:
        a live broker answers at least every third heartbeat (see heartbeat_frame)."""
        return max(3.0, 4 * self.heartbeat)

    def hello_pending(self) -> bool:
        return self.hello_gen > self.welcomed_gen

    def retry(self, now: float) -> Tuple[Optional[bytes], Optional[int]]:
        """Unanswered for too long: a hello to say again (or None), and the id of a
        confirming heartbeat to send again (or None): a lost message must not
        wedge us."""
        wait = max(0.5, 2 * self.heartbeat)
        hello = self.hello(now) if self.hello_pending() and now - self.hello_at > wait \
            else None
        check = None
        if self.suspect and now - self.check_at > wait:
            check = self.check_rid = next(self._rids)
            self.check_at = now
        return hello, check

    def heartbeat_frame(self, idle: Dict[str, int], now: float,
                        rid: Optional[int] = None,
                        busy: Optional[Dict[int, float]] = None) -> bytes:
        """A heartbeat: every lease we hold (grants held back across a stall
        included: the broker frees what a client that has seen its grant does not
        list), the idle counts, and what we have seen of this broker run. The
        broker answers only with news, unless we ask (``ack``): we do when it has
        been quiet for two heartbeats, so that :attr:`last_reply` says whether it
        is there (see :meth:`quiet_limit`). ``busy``: lease id -> seconds its
        connection has been checked out, for the leases in use (sent only for
        leases we hold, and only when there are any)."""
        fields: Dict[str, Any] = {
            "idle": idle, "leases": list(self.leases) + [lz for _, _, lz in self.held],
            "ack": self.last_reply is None or now - self.last_reply >= 2 * self.heartbeat}
        if self.epoch is not None:
            fields.update(epoch=self.epoch, seen=self.seen)
        if rid is not None:
            fields["rid"] = rid
        if busy:
            held = [[lease, secs] for lease, secs in busy.items() if lease in self.leases]
            if held:
                fields["busy"] = held[:p.MAX_LIST_ITEMS]
        if self.releasing:
            fields["released"] = self._released()
        return p.encode("heartbeat", **fields)

    def flush(self) -> Optional[int]:
        """Releases kept back ride on the next message, which may never come (a
        process that ends with ``os._exit`` or is killed next): the id of a
        heartbeat to send now, which carries them, and whose answer (``hb`` with
        that ``rid``) says the broker has them. None if nothing is kept back."""
        if not self.releasing:
            return None
        return next(self._rids)

    def died(self) -> Tuple[List[int], Set[int]]:
        """The link is gone for good: the requests to fail and the leases lost; the
        session starts over (a new hello generation 0, nothing held)."""
        failed = list(self.requests)
        lost = set(self.leases) | {lease for _, _, lease in self.held}
        self.lost |= lost
        self.requests.clear()
        self.leases.clear()
        self.connected.clear()
        self.held = []
        self.releasing = []  # the broker drops what this identity held
        self.debt.clear()
        self.contended.clear()
        self._settle()
        self.suspect = False
        self.hello_gen = self.welcomed_gen = self.check_gen = 0
        self.epoch = None
        return failed, lost

    # ------------------------------------------------------------- the broker

    def on_message(self, msg: Dict[str, Any], now: float) -> Actions:
        """One decoded message from the broker."""
        self.last_reply = now
        op = msg["op"]
        if op == "grant":
            self.seen = max(self.seen, msg.get("seq", 0))
            return self._on_grant(msg["rid"], msg["pool"], msg["lease"])
        if op == "error":
            return self._on_error(msg["rid"], msg["code"], msg["message"], now)
        if op == "recall":
            self.debt[msg["pool"]] = msg["count"]
            self.contended[msg["pool"]] = msg.get("contended", False)
            self._settle()
            if msg["count"] or msg.get("contended", False):
                return Actions(recalled=[msg["pool"]])
            return Actions()
        if op == "welcome":
            return self._on_welcome(msg, now)
        if op == "hb":
            actions = self._on_lost(msg["unknown"])
            if self.suspect and msg.get("rid") == self.check_rid:
                # the answer to a beat sent after the stall: it still knows us, so
                # the grants it sent are good (unless it says otherwise)
                unknown = set(msg["unknown"])
                actions.merge(self._confirm({lz for _, _, lz in self.held
                                             if lz not in unknown}))
            return actions
        return Actions()

    def _on_grant(self, rid: int, pool: str, lease: int) -> Actions:
        if self.suspect:
            self.held.append((rid, pool, lease))
            return Actions()
        return self._deliver(rid, pool, lease)

    def _deliver(self, rid: int, pool: str, lease: int) -> Actions:
        if self.requests.pop(rid, None) is None:
            # nobody waits for it (timed out, cancelled) or a duplicate grant of a
            # retried request: give it straight back unless we use it
            if lease not in self.leases:
                return Actions(send=[p.encode("release", lease=lease)])
            return Actions()
        self.leases[lease] = pool
        return Actions(granted=[(rid, lease)])

    def _on_error(self, rid: Optional[int], code: str, message: str, now: float) -> Actions:
        if code == p.E_UNKNOWN_CLIENT:
            # The broker does not know us: it restarted, or it expired us. Say
            # hello again with what we hold; outstanding requests are re-sent
            # (same rid) once it has welcomed us.
            if self.hello_pending():
                return Actions()
            return Actions(send=[self.hello(now)], urgent=True)
        if code == p.E_TOO_MANY_CLIENTS:
            # refused at hello: nothing we asked for can be granted. Callers hear
            # why now rather than at their deadline; the hello is retried.
            error: BaseException = BrokerError(code, message)
            failed = [(r, error) for r in self.requests]
            self.requests.clear()
            return Actions(failed=failed, log=[("ERROR", f"refused this process: {message}")])
        if rid is None:
            return Actions(log=[("WARNING", f"{message} ({code})")])
        if self.requests.pop(rid, None) is None:
            return Actions()
        return Actions(failed=[(rid, BrokerError(code, message))])

    def _on_welcome(self, msg: Dict[str, Any], now: float) -> Actions:
        # The hello this welcome answers (a broker that does not echo ``gen``
        # answers the latest). Across a stall, the welcome to an earlier hello
        # may still sit in our queue when a later hello has gone out: it must
        # not pass for the later one's answer.
        gen = min(msg.get("gen", self.hello_gen), self.hello_gen)
        actions = Actions(urgent=True)
        if self.epoch is not None and msg["epoch"] != self.epoch:
            actions.log.append(("WARNING", f"broker restarted (epoch {self.epoch} -> "
                                           f"{msg['epoch']}); re-announced "
                                           f"{len(self.leases)} lease(s)"))
        if msg["epoch"] != self.epoch:
            self.seen = 0  # grant numbers start again with every broker run
        self.epoch = msg["epoch"]
        fence = msg.get("fence")
        self.fence = fence if isinstance(fence, str) and len(fence) < 20 else ""
        self.heartbeat = max(0.05, float(msg["heartbeat"]))
        self.welcomed_gen = max(self.welcomed_gen, gen)
        for rid, req in self.requests.items():
            if req.gen < gen:
                left = req.deadline - now
                if left > 0:
                    req.gen = gen
                    actions.send.append(p.encode("acquire", rid=rid, pool=req.pool,
                                                 timeout=left))
        if msg["rejected"]:
            actions.merge(self._on_lost(msg["rejected"]))
        # A welcome to a hello said after the stall vouches for us; a re-hello
        # forfeits grants held across it (see hello): none is trusted. A welcome
        # to an earlier hello may have waited out the stall in our queue, the
        # broker may have expired us since: the confirming heartbeat decides.
        if gen > self.check_gen:
            actions.merge(self._confirm(set()))
        return actions

    def _confirm(self, trusted: Set[int]) -> Actions:
        """The broker answered while we were suspect: deliver the held grants it
        vouches for, give the others back."""
        if not self.suspect:
            return Actions()
        held, self.held = self.held, []
        self.suspect = False
        actions = Actions(confirmed=True, urgent=True)
        for rid, pool, lease in held:
            if lease in trusted:
                actions.merge(self._deliver(rid, pool, lease))
            else:
                actions.log.append(("WARNING", f"dropping grant of lease {lease} received "
                                               "across a stall"))
                actions.send.append(p.encode("release", lease=lease))
        return actions

    def _on_lost(self, leases: List[int]) -> Actions:
        lost = {lease for lease in leases if lease in self.leases}
        for lease in lost:
            del self.leases[lease]
            self.lost.add(lease)
        self._settle()
        if not lost:
            return Actions()
        return Actions(lost=lost, log=[(
            "WARNING", f"the broker no longer knows {len(lost)} lease(s) of ours: they "
                       "expired (no heartbeat for a TTL: was this process frozen?) or the "
                       "broker lost them; their connections are cut and will be replaced "
                       "under new leases")])
