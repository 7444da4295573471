"""LeaseClient: this process's link to the broker.

One I/O thread per process (per broker URL) keeps the link: it sends heartbeats,
reconnects (ZeroMQ retries with backoff by itself), re-announces held leases when
the broker does not know us (restart, expiry), hands grants and errors to
callbacks, and acts on recalls.

A lease should cost one round trip, not four thread hand-offs, so the ZeroMQ
DEALER socket is shared under a lock (ZeroMQ sockets are not thread-safe, but may
pass between threads behind a full memory barrier). A thread that asks for a
lease sends its request itself when the socket is free, and while it waits it
may *lead*: read the socket on its own thread, for up to :data:`LEAD_FOR`
(:meth:`LeaseClient.serve_until`), so that the grant wakes it directly. Whoever
holds the socket does everything the I/O thread would (reads and dispatches every
message in order, sends what is queued, heartbeats when due) and leaves nothing
unread: the I/O thread waits on the socket's edge-triggered ``ZMQ_FD``, which
only signals arrivals after the last reader emptied the queue. When the socket is
busy a thread queues its message and pokes the I/O thread through a pipe.

A grant that arrives for a request nobody waits for any more is released at once,
so a lease is never lost between a caller's timeout and the broker's answer.

After a stall (the process was frozen, or starved, for longer than a heartbeat
interval) the client's leases may have expired at the broker and gone to others.
Until the broker has answered a fresh heartbeat, the client is *suspect*: grants
are held back, and connections opened across the stall are not handed out. If the
broker no longer knows us, the held grants are dropped (it rejects their leases).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import sys
import threading
import time
import uuid
import weakref
from typing import Any, Callable, Dict, List, Optional, Protocol, Set, Tuple

import zmq
from zmq.backend import zmq_poll

from poolbroker import protocol as p
from poolbroker.security import InsecureEndpoint, apply_client_curve, client_keys
from poolbroker.sockets import NOBLOCK, descriptor, readable, send

from . import closing, lifecycle, threads
from .errors import PoolError
from .session import Actions, LeaseSession
from .stalls import StallWatch

log = logging.getLogger("poolbroker_client")

# How long a socket whose close was not confirmed is watched for the server's EOF
# (the broker's default hold: a server notices a vanished client by TCP keepalive).
UNCONFIRMED_WATCH = 8000.0

# How long closing a pool waits for the broker to confirm the releases it sent
# (one round trip, unless the broker is slow; see LeaseClient.flush).
FLUSH_TIMEOUT = 1.0

# How long a waiting thread may read the socket itself (it does the I/O thread's
# whole job meanwhile, heartbeats included, and hands other threads their
# answers): a grant usually comes long before; a caller still waiting then goes
# on waiting for its answer from the I/O thread.
LEAD_FOR = 1.0
# How long a thread that wants to lead waits for the socket (held by the I/O
# thread's own turn, or by another leader that will read its answer anyway).
LEAD_WAIT = 0.0003
# While callers lead, the I/O thread waits on its pipe only; a leader that leaves
# pokes it when someone may still need the socket read, else it looks again
# after this long.
LED_CHECK = 0.25
# Two looks at the socket further apart than this many heartbeats: the process
# stalled (see client.stalls). Every wait ends by the next heartbeat, so a live
# process stays within one, plus scheduling delays; the broker expires a client
# silent for three heartbeats (its TTL), which a stall of two after a heartbeat's
# silence reaches.
STALL_GAP = 1.5

Callback = Callable[["LeaseRequest", Optional[int], Optional[BaseException]], None]


class LeaseOwner(Protocol):
    """What the lease client needs of a pool that registers with it
    (:meth:`LeaseClient.register`); :class:`poolbroker_client.core.PoolCore` is one.
    Both calls come from the I/O thread: they must not block."""

    @property
    def pool(self) -> str:
        """The broker pool it leases from."""
        ...

    def idle_leases(self) -> int:
        """Leases whose connections sit idle (the broker recalls those first)."""
        ...

    def on_recall(self) -> None:
        """The broker wants leases of :attr:`pool` back (see
        :meth:`LeaseClient.take_recall`), or says others wait there
        (:meth:`LeaseClient.contended`)."""
        ...

    def on_lost(self, leases: Set[int]) -> None:
        """The broker no longer counts these leases: their connections must go."""
        ...

    def checkouts(self) -> Dict[int, float]:
        """Lease id -> ``time.monotonic()`` when its connection was checked out,
        for connections in use now (reported to the broker with each heartbeat)."""
        ...


class LeaseRequest:
    """One outstanding ``acquire``. Exactly one of these happens: the callback runs
    (grant or error, from the I/O thread), or :meth:`LeaseClient.cancel` returns True."""

    __slots__ = ("rid", "pool", "deadline", "callback", "created")

    def __init__(self, rid: int, pool: str, deadline: float, callback: Callback) -> None:
        self.rid = rid
        self.pool = pool
        self.deadline = deadline
        self.callback = callback
        self.created = time.monotonic()


class LeaseClient:
    """The process-wide link to one broker. Get it with :meth:`for_url`.

    A thin shell: what to send and whom to tell is decided by its
    :class:`~poolbroker_client.session.LeaseSession`, :attr:`session` (changed
    only by this client, under its lock; others may read it, e.g. its ``calm``);
    the shell owns the socket, the I/O thread, the callbacks and the pools."""

    _registry: Dict[str, "LeaseClient"] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def for_url(cls, url: str) -> "LeaseClient":
        """The client for ``url`` in this process (a new one after ``fork()``)."""
        with cls._registry_lock:
            client = cls._registry.get(url)
            if client is None or not client.in_this_process():
                client = cls._registry[url] = cls(url)
            return client

    @classmethod
    def in_process(cls) -> List["LeaseClient"]:
        """Every client of this process (for saying bye at exit)."""
        with cls._registry_lock:
            return [c for c in cls._registry.values() if c.in_this_process()]

    @classmethod
    def forget_all(cls) -> List["LeaseClient"]:
        """In a forked child: drop every client (their sockets and threads are
        the parent's) and return them, to be kept referenced but never used."""
        cls._registry_lock = threading.Lock()  # the parent's may be held
        inherited = list(cls._registry.values())
        cls._registry = {}
        return inherited

    def __init__(self, url: str) -> None:
        self.url = url
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self.session = LeaseSession(os.getpid(), socket.gethostname(), application_name(),
                                     os.getppid())
        self._outbox: List[bytes] = []
        self._callbacks: Dict[int, LeaseRequest] = {}  # rid -> its request
        self._pools: "weakref.WeakSet[LeaseOwner]" = weakref.WeakSet()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # the socket and what goes with it: whoever holds _sock_lock uses them
        self._sock_lock = threading.Lock()
        self._sock: Optional[zmq.Socket] = None  # set by the I/O thread while it runs
        # for leaders: zmq_poll's items, the socket and the wake pipe
        self._sock_poll: Optional[List[Tuple[Any, Any]]] = None
        self._next_beat = 0.0
        self._watch = StallWatch(time.monotonic())  # reset when the I/O thread starts
        self._backlog = False  # the queue to the broker was full at the last send
        self._leader: Optional[int] = None  # thread id of a caller reading the socket
        self._io_aside = False  # the I/O thread found a leader and watches its pipe only
        self.confirmed = threading.Event()  # set while not suspect
        self._direct: Dict[int, float] = {}  # lease() blocks: lease id -> since
        self._flushes: Dict[int, threading.Event] = {}  # flush(): heartbeat rid -> answered
        self.confirmed.set()
        self.bad_frames = 0  # messages from the broker we could not read or handle
        self.started: Optional[float] = None
        self._curve: Optional[tuple] = None  # CURVE keys (tcp brokers), see poolbroker.security
        self.identity = _new_identity()
        self.deaths = 0  # times the I/O thread died and was replaced

    # ------------------------------------------------------------- any thread

    def register(self, pool: LeaseOwner) -> None:
        """Pools register so that recalls and lost leases reach them."""
        self._pools.add(pool)

    def unregister(self, pool: LeaseOwner) -> None:
        self._pools.discard(pool)

    @property
    def heartbeat(self) -> float:
        """Seconds between heartbeats (the broker's setting): a thread that was
        frozen for longer may hold leases the broker expired."""
        return self.session.heartbeat

    @property
    def epoch(self) -> Optional[str]:
        """The broker run we talk to (None before the first welcome)."""
        return self.session.epoch

    @property
    def fence(self) -> str:
        """When the broker fences: the tag connections carry before their lease id."""
        return self.session.fence

    @property
    def last_reply(self) -> Optional[float]:
        """``time.monotonic()`` of the broker's last message (None: never)."""
        return self.session.last_reply

    def in_this_process(self) -> bool:
        """False in a forked child: the client belongs to the parent."""
        return self._pid == os.getpid()

    def acquire(self, pool: str, timeout: float, callback: Callback, *,
                lead: bool = False, ahead: bool = False) -> LeaseRequest:
        """Ask for a lease in ``pool``; ``callback(req, lease, error)`` runs on the
        I/O thread (or a leading caller's, see :meth:`serve_until`) when the broker
        answers, unless :meth:`cancel` wins first. ``lead``: the caller calls
        :meth:`serve_until` next, which sends the request (else the I/O thread
        is woken to send it: cheap enough to do under a pool's lock).
        ``ahead``: asked ahead of need, now or never (``timeout`` is ignored),
        and granted only if the pool keeps a free slot besides."""
        with self._lock:
            self._ensure_started()
            now = time.monotonic()
            rid, frame = self.session.acquire(pool, timeout, now, ahead)
            req = LeaseRequest(rid, pool, now + min(timeout, p.MAX_TIMEOUT), callback)
            self._callbacks[rid] = req
            self._outbox.append(frame)
        if not lead:
            self._wake()
        return req

    def cancel(self, req: LeaseRequest) -> bool:
        """Withdraw ``req``. True if it took effect (the callback will not run); a
        grant that is already on its way will be released on arrival."""
        with self._lock:
            frame = self.session.cancel(req.rid)
            if frame is None:
                return False
            self._callbacks.pop(req.rid, None)
            self._outbox.append(frame)
        self._wake()
        return True

    def release(self, lease: int) -> None:
        """Give ``lease`` back. Only call this once the server has seen the
        connection close (see :mod:`poolbroker_client.closing`).

        While nobody waits in its pool the release is not worth a message of its
        own: it rides on the next request or heartbeat, or goes with whatever is
        sent next (the answer to the broker telling us the pool became
        contended, for one). Until then the broker counts the slot: late, never
        over the budget."""
        with self._lock:
            actions = self.session.release(lease)
            self._outbox += actions.send
        if actions.urgent:
            self._wake()

    def release_unconfirmed(self, lease: int, fd: int) -> None:
        """Give ``lease`` back although the server was not seen to close its
        connection in time (``fd``, a duplicate of the socket, is still open). The
        broker keeps counting the slot (or fences it) until we confirm, which
        happens when the server is seen to close the socket, in the background."""
        with self._lock:
            frame = self.session.release_unconfirmed(lease)
            if frame is not None:
                self._outbox.append(frame)
        if frame is None:  # lost meanwhile: the broker does not count it
            os.close(fd)
            return
        self._wake()

        def done(seen: bool) -> None:
            if seen:
                self._send_soon(p.encode("release", lease=lease))

        closing.watch_until_eof(fd, done, UNCONFIRMED_WATCH)

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> bool:
        """Send the releases kept back (see :meth:`release`) now, and wait up to
        ``timeout`` seconds for the broker to confirm it has them: after True the
        slots are free however this process ends (``os._exit``, a kill). Waits
        only for a broker that has been answering; False if nothing confirmed
        (the releases then go with the next message, or the slots come back at
        the TTL)."""
        now = time.monotonic()
        with self._lock:
            if self._thread is None or self._stopping:
                return not self.session.releasing
            rid = self.session.flush()
            if rid is None:
                return True
            done = self._flushes[rid] = threading.Event()
        try:
            self._send_soon(self._heartbeat_frame(rid))
            answering = self.last_reply is not None and \
                now - self.last_reply < self.quiet_limit()
            return answering and done.wait(timeout)
        finally:
            with self._lock:
                self._flushes.pop(rid, None)

    def give_back(self, lease: int, late_fd: Optional[int] = None) -> None:
        """After its connection was closed: release ``lease``; unconfirmed if the
        server was not seen to close it (``late_fd``, a duplicate of its socket,
        still open); or just forget it if the broker no longer counts it."""
        if self.is_lost(lease):
            self.forget(lease)
            if late_fd is not None:
                os.close(late_fd)
        elif late_fd is not None:
            self.release_unconfirmed(lease, late_fd)
        else:
            self.release(lease)

    def forget(self, lease: int) -> None:
        """Drop a lease the broker no longer knows (no release is sent)."""
        with self._lock:
            self.session.forget(lease)

    def connected(self, lease: int, backend_pid: int, user: Optional[str] = None,
                  db: Optional[str] = None) -> None:
        """Tell the broker which backend serves ``lease``, as which role in which
        database (what fencing matches; sent with the next batch, nobody waits)."""
        with self._lock:
            actions = self.session.connected_frame(lease, backend_pid, user, db)
            self._outbox += actions.send
        if actions.urgent:
            self._wake()

    def take_recall(self, pool: str) -> bool:
        """True (and one less owed) if the broker wants a lease of ``pool`` back."""
        if not self.session.debt.get(pool):  # the hot path: a dict read, no lock
            return False
        with self._lock:
            return self.session.take_recall(pool)

    def contended(self, pool: str) -> bool:
        """True while the broker says requests wait in ``pool``: connections idle
        longer than a move costs should go back. False once the broker has been
        silent too long to know (see :meth:`LeaseSession.is_contended`)."""
        return self.session.is_contended(pool, time.monotonic())

    def recall_owed(self, pool: str) -> int:
        """How many leases of ``pool`` the broker wants back."""
        return self.session.debt.get(pool, 0)

    def keeps(self, pool: str, lease: int) -> bool:
        """True if a connection of ``pool`` on ``lease`` may simply go back to its
        pool's idle connections: the lease is not lost, the broker wants none of
        the pool's leases back, and nobody waits for one (three dict reads, no
        lock). Always True while ``session.calm``: a pool's hot path reads that
        first."""
        session = self.session
        return not (lease in session.lost or session.debt.get(pool)
                    or (session.contended.get(pool)
                        and session.is_contended(pool, time.monotonic())))

    def is_lost(self, lease: int) -> bool:
        """True if the broker no longer counts ``lease`` (its connection must go)."""
        return lease in self.session.lost

    def quiet_limit(self) -> float:
        """Seconds without a message after which the broker is not answering."""
        return self.session.quiet_limit()

    def describe_broker(self) -> str:
        """A phrase for error messages: is the broker answering?"""
        now = time.monotonic()
        last = self.session.last_reply
        if last is None:
            waited = now - self.started if self.started else 0.0
            return f"broker {self.url} has not answered at all ({waited:.1f}s since first contact)"
        return f"broker {self.url} last answered {now - last:.1f}s ago"

    def _check_stall(self) -> None:
        """Any holder of the socket, after each wait: a stall since the last look
        makes us suspect (see client.stalls)."""
        with self._lock:
            check = self._stall_check_locked()
        self._confirm_after(check)

    def _stall_check_locked(self) -> Optional[Tuple[int, float]]:
        # The look and becoming suspect are one step under the lock, which
        # handling a frame also holds: another thread's look that finds no gap
        # (this one took it) must not let a grant through before we are suspect.
        now = time.monotonic()
        gap = self._watch.check(now, STALL_GAP * self.heartbeat)
        # once we said hello, grants may be on their way, from before the stall
        if not gap or not self.session.hello_gen:
            return None
        return self._stalled_locked(gap, now)

    def _stalled_locked(self, stalled: float, now: float) -> Optional[Tuple[int, float]]:
        rid = self.session.stalled(now)
        if rid is None:
            return None
        self.confirmed.clear()
        return rid, stalled

    def _confirm_after(self, check: Optional[Tuple[int, float]]) -> None:
        """After becoming suspect (outside the lock): ask the broker."""
        if check is None:
            return
        rid, stalled = check
        log.warning("process stalled for %.1fs: confirming leases with broker %s before "
                    "using new ones", stalled, self.url)
        self._send_soon(self._heartbeat_frame(rid))

    def suspect(self, stalled: float) -> None:
        """This process stalled (any thread may say so): confirm our leases with
        the broker before new ones are used."""
        with self._lock:
            check = self._stalled_locked(stalled, time.monotonic())
        self._confirm_after(check)

    def close(self, timeout: float = 2.0) -> None:
        """Say bye (the broker drops whatever we still hold) and stop the thread."""
        with self._lock:
            if self._thread is None or self._stopping:
                return
            self._stopping = True
            self._outbox.append(p.encode("bye"))
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ------------------------------------------------------------- internals

    def _ensure_started(self) -> None:
        # Called with the lock held. Started lazily so that a pool created before
        # fork() (gunicorn --preload) has no thread or socket to inherit.
        if self._thread is not None:
            return
        # CURVE keys for a tcp broker: read now, so a wrong setting is the caller's
        # error (naming it) rather than a dead I/O thread
        if self.url.startswith("tcp://"):
            try:
                self._curve = client_keys()
            except InsecureEndpoint as exc:
                raise PoolError(f"broker {self.url}: {exc}") from None
        self.started = time.monotonic()
        # hello goes first, and requests made from now on belong to its generation
        # (so the welcome does not make us re-send them)
        self._outbox.insert(0, self.session.hello(time.monotonic()))
        self._thread = threading.Thread(target=self._run, name=f"poolbroker-io-{self.url}",
                                        daemon=True)
        threads.start(self._thread)
        lifecycle.on_first_start()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: the I/O thread is awake anyway

    def _wake_if_queued(self) -> None:
        # what a caller queued to send itself (acquire(lead=True)) must go out
        if self._outbox or self.session.releasing:
            self._wake()

    def _send_soon(self, frame: bytes) -> None:
        with self._lock:
            self._outbox.append(frame)
        self._wake()

    def serve_until(self, done: Callable[[], bool], until: float) -> None:
        """Read the broker's messages on this thread until ``done()`` or
        ``time.monotonic() >= until`` (at most :data:`LEAD_FOR` from now), if the
        socket can be had at once: a grant then wakes its caller directly, not
        through the I/O thread. Call it holding no lock a callback could take
        (callbacks run here), never from the I/O thread or an event loop. A
        caller's own ``done`` may be set by another thread meanwhile: that thread
        calls :meth:`nudge`. If the socket is busy it only wakes the I/O thread
        (to send what :meth:`acquire` queued with ``lead=True``); so it does if
        ``done()`` already and the socket is not free at once (else it sends,
        reads what came, and returns)."""
        until = min(until, time.monotonic() + LEAD_FOR)
        # someone else leads (and hands us our answer): no waiting for the socket
        if threading.current_thread() is self._thread or self._leader is not None:
            self._wake_if_queued()
            return
        if done():  # served already: send what was queued here if the socket is free
            if not (self._outbox or self.session.releasing):
                return
            got = self._sock_lock.acquire(blocking=False)
        else:
            got = self._sock_lock.acquire(timeout=LEAD_WAIT)
        if not got:
            self._wake_if_queued()
            return
        failure: Optional[Exception] = None
        sock, waiter = self._sock, self._sock_poll
        try:
            if sock is None or waiter is None:  # starting, or starting over
                self._wake_if_queued()
                return
            self._leader = threading.get_ident()
            poked, read, ready = False, False, False
            while True:
                # (nothing to read before the first wait, nor a look after sending:
                # zmq_poll sees what waits; a leader leaving without a wait looks)
                if self._pump(sock, poked, io_turn=False, read=read, look=read,
                              ready=ready):
                    return
                now = time.monotonic()
                left = until - now
                if done() or left <= 0:
                    if not read:  # the look skipped: leave nothing unread
                        self._pump(sock, False, io_turn=False)
                    return
                read = True
                left = min(left, self._next_beat - now)  # heartbeats are ours to send too
                # (zmq_poll without zmq.Poller's wrapper: this runs once per lease)
                poked = ready = False
                for item, _ in zmq_poll(waiter, int(max(0.0, left) * 1000) + 1):
                    if item is sock:
                        ready = True  # a message waits: no need to ask first
                    else:
                        poked = True
                if not ready:  # (a message's handler looks for a stall first)
                    self._check_stall()
        except Exception as exc:  # as if the I/O thread had met it
            failure = exc
        finally:
            self._leader = None
            self._sock_lock.release()
            # (here, not after the try: every way out of the loop is a return)
            # The I/O thread stood aside (it looks at its pipe only): if answers
            # are awaited (another thread's, a lease asked ahead), or pools may be
            # sent recalls, it must watch the socket again, or they wait for its
            # next look, up to LED_CHECK. (It says so before it tries the socket,
            # and we look after letting go.)
            if failure is None and self._io_aside and (self._callbacks or len(self._pools)):
                self._wake()
        if failure is not None and sock is not None:
            self._link_failed(sock, failure)

    @property
    def leader(self) -> Optional[int]:
        """The id (``threading.get_ident()``) of the caller reading the socket
        now (:meth:`serve_until`); None while the I/O thread does."""
        return self._leader

    def nudge(self, waiter: int) -> None:
        """Another thread served what the thread ``waiter`` (an id from
        ``threading.get_ident()``) waits for: if that thread is reading the
        socket (:meth:`serve_until`), make it look at ``done()`` again."""
        if self._leader == waiter != threading.get_ident():
            self._wake()

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.identity)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)  # well inside the grace period
        sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_MESSAGE_BYTES)
        if self._curve is not None:
            apply_client_curve(sock, self._curve)
        sock.connect(self.url)
        # edge-triggered: signals arrivals since the last operation on the socket,
        # which is why every holder of the socket reads until nothing is left
        waiter = select.poll()
        waiter.register(descriptor(sock), select.POLLIN)
        waiter.register(self._wake_r.fileno(), select.POLLIN)
        # Callers that lead wait in zmq_poll, which sees through the signals of
        # libzmq's own housekeeping: on a busy machine those woke a leader
        # polling ZMQ_FD several times per answer.
        leader_waiter: List[Tuple[Any, Any]] = [(sock, zmq.POLLIN),
                                                (self._wake_r.fileno(), zmq.POLLIN)]
        pipe_only = select.poll()  # while a caller leads
        wake_fd = self._wake_r.fileno()
        pipe_only.register(wake_fd, select.POLLIN)
        with self._sock_lock:
            self._sock, self._sock_poll = sock, leader_waiter
            self._next_beat = time.monotonic() + self.heartbeat
            self._watch = StallWatch(time.monotonic())
        aside = False
        try:
            while True:
                wait = max(0.0, self._next_beat - time.monotonic())
                if self._backlog:
                    wait = min(wait, 0.1)
                if aside:
                    # A caller had the socket at our last turn and reads it (the
                    # heartbeats too): waking for each of its arrivals would only
                    # contend for the socket. It pokes us when it lets go.
                    # (Within a heartbeat all the same: see STALL_GAP.)
                    wait = min(LED_CHECK, self.heartbeat)
                events = (pipe_only if aside else waiter).poll(wait * 1000.0 + 0.5)
                poked = any(fd == wake_fd for fd, _ in events)
                self._check_stall()
                self._io_aside = True  # before trying: see serve_until's end
                # A holder leaves nothing unread, so a busy socket can wait; but a
                # poke is for us (or the leader, which may have missed it): wait
                # for the socket rather than leave the pipe full and spin on it.
                if poked:
                    self._sock_lock.acquire()
                elif not self._sock_lock.acquire(blocking=False):
                    aside = True
                    self._retry_unanswered()  # needs no socket: queues, and pokes
                    continue
                aside = self._io_aside = False
                try:
                    # a leader met a failure: this socket is done, a successor has its own
                    stopping = self._sock is not sock or self._pump(sock, poked)
                finally:
                    self._sock_lock.release()
                if stopping:
                    break
        except Exception as exc:
            self._link_failed(sock, exc)
        finally:
            self._detach(sock)
            sock.close()  # linger lets the bye go out
            ctx.term()

    def _take_outbox(self) -> Tuple[List[bytes], bool]:
        """What to send now (releases not sent yet last), and whether we stop."""
        with self._lock:
            outbox, self._outbox = self._outbox, []
            frame = self.session.take_releases()
            if frame is not None:
                outbox.append(frame)
            return outbox, self._stopping

    def _link_failed(self, sock: zmq.Socket, exc: Exception) -> None:
        """Handling the socket failed (on the I/O thread or a leading caller's): a
        bug, or the socket broke. Give up this link (see :meth:`_died`); the I/O
        thread closes the socket at its next turn."""
        info = (type(exc), exc, exc.__traceback__)
        if not self._detach(sock):  # the other thread holding it got there first
            log.debug("poolbroker client link to %s: failed again", self.url, exc_info=info)
            return
        log.error("poolbroker client link to %s failed; cutting this process's connections "
                  "and starting over under a new identity", self.url, exc_info=info)
        self._died(exc)
        self._wake()

    def _detach(self, sock: zmq.Socket) -> bool:
        """Stop using ``sock``; False if it was not in use (a successor's is)."""
        with self._sock_lock:
            if self._sock is not sock:
                return False
            self._sock = self._sock_poll = None
            return True

    def _pump(self, sock: zmq.Socket, poked: bool = True, io_turn: bool = True,
              read: bool = True, look: bool = True, ready: bool = False) -> bool:
        """One turn with the socket held (``_sock_lock``): read and handle every
        message, send what is queued, heartbeat when due; leaves nothing unread.
        ``poked``: the wake pipe has bytes to drain; ``io_turn``: the I/O thread's
        turn (it also retries what went unanswered); ``read``: False skips the
        first read (a leader about to wait in zmq_poll); ``look``: False skips
        the look for arrivals after sending (that leader again: zmq_poll sees
        them; a holder that does not wait next must look); ``ready``: zmq_poll
        said a message waits (read it without asking). True once the client is
        stopping (the bye has gone out)."""
        if poked:
            try:
                while self._wake_r.recv(4096):
                    pass
            except OSError:  # BlockingIOError: drained
                pass
        while True:
            # asking first is cheaper than the exception of an empty recv; the
            # last answer (nothing waits) stands until the socket is used again
            if ready:
                ready = False
                try:
                    frame = sock.recv(NOBLOCK)
                except zmq.Again:  # (zmq_poll said otherwise; then nothing waits)
                    pass
                else:
                    self._on_frame(frame)
            while read and readable(sock):
                # (read after a stall, a grant may be one the broker has expired
                # since: _on_frame looks for a stall first, so that the session
                # holds it back)
                self._on_frame(sock.recv(NOBLOCK))
            read = True
            # after reading: what the answers queued (and releases kept back
            # while the pool was not contended, if it now is) goes out now
            sent = bool(self._outbox or self._stopping or self.session.releasing)
            if sent:
                outbox, stopping = self._take_outbox()
                self._backlog = self._send_all(sock, outbox)
                if stopping:
                    return True
            if io_turn:
                self._retry_unanswered()
            if time.monotonic() >= self._next_beat:
                try:
                    send(sock, self._heartbeat_frame(), NOBLOCK)
                except zmq.Again:
                    pass  # the queue to the broker is full: the next beat will do
                self._next_beat = time.monotonic() + self.heartbeat
                sent = True
            # sending may have taken the signal of a message that came meanwhile
            if not sent or not look or not readable(sock):
                return False

    def _died(self, exc: BaseException) -> None:
        """The I/O thread is dying: nobody heartbeats for our leases any more, so
        the broker will expire them. Cut every connection (they must not outlive
        their leases), fail every waiting request with the cause, and forget this
        identity: the next request starts a new thread that says hello afresh."""
        cause = PoolError(f"the link to broker {self.url} failed ({type(exc).__name__}: "
                          f"{exc}); this process's connections were cut, and the next "
                          "request starts over")
        with self._lock:
            failed, lost = self.session.died()
            requests = [self._callbacks.pop(rid) for rid in failed if rid in self._callbacks]
            self._callbacks.clear()
            self._outbox = []
            self.confirmed.set()
            self.identity = _new_identity()
            self._thread = None
            self.deaths += 1
        self._tell_pools_lost(lost)
        for req in requests:
            _run_callback(req, None, cause)

    def _send_all(self, sock: zmq.Socket, frames: List[bytes]) -> bool:
        """Send without blocking; if the queue to an unreachable broker is full,
        keep the rest (releases must not be lost) and report a backlog."""
        for i, frame in enumerate(frames):
            try:
                send(sock, frame, NOBLOCK)
            except BaseException as exc:  # nothing is lost: the rest goes first next time
                with self._lock:
                    self._outbox[:0] = frames[i:]
                if isinstance(exc, zmq.Again):
                    return True
                raise
        return False

    def checked_out(self, lease: int, since: float) -> None:
        """A lease held outside any pool (``lease()``) is in use since ``since``
        (``time.monotonic()``); :meth:`checked_in` when it is not any more."""
        self._direct[lease] = since

    def checked_in(self, lease: int) -> None:
        self._direct.pop(lease, None)

    def _heartbeat_frame(self, rid: Optional[int] = None) -> bytes:
        idle: Dict[str, int] = {}
        since = dict(self._direct)
        for pool in list(self._pools):
            try:
                name, n = pool.pool, pool.idle_leases()
                since.update(pool.checkouts())
            except Exception:  # a hint for recalls only: never worth the thread
                log.exception("%s: counting idle connections failed", pool)
                continue
            idle[name] = idle.get(name, 0) + n
        now = time.monotonic()
        busy = {lease: max(0.0, round(now - t, 3)) for lease, t in since.items()}
        with self._lock:
            return self.session.heartbeat_frame(idle, now, rid, busy=busy)

    def _retry_unanswered(self) -> None:
        """I/O thread: say hello again if no welcome came, and check again after a
        stall if no answer came (a lost message must not wedge us)."""
        with self._lock:
            hello, check = self.session.retry(time.monotonic())
            if hello is not None:
                self._outbox.append(hello)
        if hello is not None:
            log.info("broker %s has not answered our hello: saying it again", self.url)
        if check is not None:
            self._send_soon(self._heartbeat_frame(check))

    def _on_frame(self, frame: bytes) -> None:
        """Handle one message from the broker. Never raises: one bad frame must not
        stop the I/O thread (nothing would heartbeat, callers would hang)."""
        try:
            msg = p.decode(frame, p.BROKER_OPS)
        except p.ProtocolError as exc:
            self.bad_frames += 1
            log.warning("unreadable message from broker %s: %s", self.url, exc.message)
            return
        try:
            with self._lock:
                check = self._stall_check_locked()
                actions = self.session.on_message(msg, time.monotonic())
                self._outbox += actions.send
                answered: List[Tuple[Optional[LeaseRequest], Optional[int],
                                     Optional[BaseException]]] = [
                    (self._callbacks.pop(rid, None), lease, None)
                    for rid, lease in actions.granted]
                answered += [(self._callbacks.pop(rid, None), None, error)
                             for rid, error in actions.failed]
            self._confirm_after(check)
            if msg["op"] == "hb" and msg.get("rid") in self._flushes:
                with self._lock:
                    flushed = self._flushes.get(msg["rid"])
                if flushed is not None:
                    flushed.set()
            if msg["op"] == "welcome":
                # the broker's heartbeat may be shorter than the one the I/O
                # thread waits for: no wait may run past it (its TTL, STALL_GAP)
                beat = time.monotonic() + self.heartbeat
                if beat < self._next_beat:
                    self._next_beat = beat
                    self._wake()
            self._perform(actions, answered)
        except Exception:
            self.bad_frames += 1
            log.exception("error handling %s from broker %s; continuing", msg.get("op"),
                          self.url)

    def _perform(self, actions: Actions,
                 answered: List[Tuple[Optional[LeaseRequest], Optional[int],
                                      Optional[BaseException]]]) -> None:
        """Carry out what the session decided (outside the lock: callbacks and
        pools take their own locks)."""
        for level, message in actions.log:
            log.log(logging.getLevelName(level), "broker %s: %s", self.url, message)
        # (what the answer queued, urgent or not, goes out in this same turn)
        if actions.confirmed:
            self.confirmed.set()
        for req, lease, error in answered:
            if req is not None:
                _run_callback(req, lease, error)
            elif lease is not None:  # its caller is gone (cannot happen): give it back
                self.release(lease)
        self._tell_pools_lost(actions.lost)
        for pool in actions.recalled:
            for owner in list(self._pools):
                if owner.pool == pool:
                    try:
                        owner.on_recall()
                    except Exception:
                        log.exception("%s: acting on a recall failed", owner)

    def _tell_pools_lost(self, lost: Set[int]) -> None:
        if not lost:
            return
        for owner in list(self._pools):
            try:
                owner.on_lost(lost)
            except Exception:
                log.exception("%s: cutting connections of lost leases failed", owner)


def settings(pool: Optional[str], broker: Optional[str]) -> "tuple[str, str]":
    """The broker pool and broker URL to use: as given, else ``$POOLBROKER_POOL``
    (then ``"default"``) and ``$POOLBROKER_URL``; :class:`PoolError` without a URL."""
    url = broker or os.environ.get("POOLBROKER_URL") or ""
    if not url:
        raise PoolError("no broker address: pass broker=... or set POOLBROKER_URL")
    return pool or os.environ.get("POOLBROKER_POOL") or "default", url


def _new_identity() -> bytes:
    # 128 random bits: an identity must not be guessable (a peer using it could say
    # bye for us); status shows only a hash of it
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex}".encode()


def _run_callback(req: LeaseRequest, lease: Optional[int], error: Optional[BaseException]) -> None:
    try:
        req.callback(req, lease, error)
    except Exception:
        log.exception("lease callback failed")


def application_name() -> str:
    """Who this process is, as ``poolbroker clients`` shows it and per-name quotas
    match it: ``$POOLBROKER_APPLICATION_NAME``, else the program's name (e.g.
    ``gunicorn``, ``celery``, ``worker.py``), with a multiprocessing child's name
    after a slash."""
    name = os.environ.get("POOLBROKER_APPLICATION_NAME", "")
    if not name:
        argv = getattr(sys, "argv", None) or [""]
        name = os.path.basename(argv[0] or "") or "python"
        if name in ("__main__.py", "-c", "-m"):
            name = os.path.basename(sys.executable or "python")
    try:
        import multiprocessing

        child = multiprocessing.current_process().name
    except Exception:
        child = "MainProcess"
    if child != "MainProcess":
        name = f"{name}/{child}"
    return name[:200]
