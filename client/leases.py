"""LeaseClient: this process's link to the broker.

One I/O thread per process (per broker URL) owns the ZeroMQ DEALER socket; ZeroMQ
sockets are not thread-safe, so application threads never touch it. They queue a
message, poke the I/O thread through a pipe and wait on their own deadline. The I/O
thread sends heartbeats, reconnects (ZeroMQ retries with backoff by itself),
re-announces held leases when the broker does not know us (restart, expiry),
hands grants and errors to callbacks, and acts on recalls.

A grant that arrives for a request nobody waits for any more is released at once,
so a lease is never lost between a caller's timeout and the broker's answer.

After a stall (the process was frozen, or starved, for longer than a heartbeat
interval) the client's leases may have expired at the broker and gone to others.
Until the broker has answered a fresh heartbeat, the client is *suspect*: grants
are held back, and connections opened across the stall are not handed out. If the
broker no longer knows us, the held grants are dropped (it rejects their leases).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from typing import Any, Callable, Dict, List, Optional, Protocol, Set

import zmq

from poolbroker import protocol as p
from poolbroker.security import InsecureEndpoint, apply_client_curve, client_keys

from . import closing, lifecycle
from .errors import BrokerError, PoolError

log = logging.getLogger("poolbroker_client")

# How long a socket whose close was not confirmed is watched for the server's EOF
# (the broker's default hold: a server notices a vanished client by TCP keepalive).
UNCONFIRMED_WATCH = 8000.0

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


class LeaseRequest:
    """One outstanding ``acquire``. Exactly one of these happens: the callback runs
    (grant or error, from the I/O thread), or :meth:`LeaseClient.cancel` returns True."""

    __slots__ = ("rid", "pool", "deadline", "callback", "done", "hello_gen", "created")

    def __init__(self, rid: int, pool: str, deadline: float, callback: Callback, gen: int) -> None:
        self.rid = rid
        self.pool = pool
        self.deadline = deadline
        self.callback = callback
        self.done = False
        self.hello_gen = gen
        self.created = time.monotonic()


class LeaseClient:
    """The process-wide link to one broker. Get it with :meth:`for_url`."""

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
        self._rids = itertools.count(1)
        self._outbox: List[bytes] = []
        self._requests: Dict[int, LeaseRequest] = {}
        self._leases: Dict[int, str] = {}  # lease id -> pool name
        self._connected: set = set()  # leases whose connection exists (reported)
        self._lost: set = set()
        self._debt: Dict[str, int] = {}  # pool -> leases the broker wants back
        self._contended: Dict[str, bool] = {}  # pool -> others wait for leases there
        self._pools: "weakref.WeakSet[LeaseOwner]" = weakref.WeakSet()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._hello_gen = 0
        self._welcomed_gen = 0
        self._heartbeat = 1.0
        self.epoch: Optional[str] = None
        self.fence = ""  # the broker fences: tag connections with this + their lease id
        self._suspect = False
        self.confirmed = threading.Event()  # set while not suspect
        self.confirmed.set()
        self._held: List[tuple] = []  # grants held back while suspect
        self._check_rid = 0  # the heartbeat whose answer confirms us
        self._check_at = 0.0  # when it was sent (it is sent again if no answer comes)
        self._hello_at = 0.0  # when the last hello was sent (the same)
        self._seen = 0  # the highest grant seq received from this broker run
        self.last_reply: Optional[float] = None  # monotonic time of the last broker message
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
        return self._heartbeat

    def in_this_process(self) -> bool:
        """False in a forked child: the client belongs to the parent."""
        return self._pid == os.getpid()

    def acquire(self, pool: str, timeout: float, callback: Callback) -> LeaseRequest:
        """Ask for a lease in ``pool``; ``callback(req, lease, error)`` runs on the
        I/O thread when the broker answers, unless :meth:`cancel` wins first."""
        timeout = min(timeout, p.MAX_TIMEOUT)  # the protocol's cap (a day)
        with self._lock:
            self._ensure_started()
            req = LeaseRequest(next(self._rids), pool, time.monotonic() + timeout, callback,
                               self._hello_gen)
            self._requests[req.rid] = req
            self._outbox.append(p.encode("acquire", rid=req.rid, pool=pool, timeout=timeout))
        self._wake()
        return req

    def cancel(self, req: LeaseRequest) -> bool:
        """Withdraw ``req``. True if it took effect (the callback will not run); a
        grant that is already on its way will be released on arrival."""
        with self._lock:
            if req.done:
                return False
            req.done = True
            self._requests.pop(req.rid, None)
            self._outbox.append(p.encode("cancel", rid=req.rid))
        self._wake()
        return True

    def release(self, lease: int) -> None:
        """Give ``lease`` back. Only call this once the server has seen the
        connection close (see :mod:`poolbroker_client.closing`).

        While nobody waits in its pool the release is not worth a wake-up of the
        I/O thread: it goes with the next message (a request, a heartbeat, or
        the answer to the broker telling us the pool became contended). Until
        then the broker counts the slot: late, never over the budget."""
        with self._lock:
            pool = self._leases.pop(lease, None)
            self._lost.discard(lease)
            self._connected.discard(lease)
            if pool is None:
                return  # lost or already released: the broker does not count it
            self._outbox.append(p.encode("release", lease=lease))
            urgent = self._contended.get(pool, False) or self._debt.get(pool, 0) > 0
        if urgent:
            self._wake()

    def release_unconfirmed(self, lease: int, fd: int) -> None:
        """Give ``lease`` back although the server was not seen to close its
        connection in time (``fd``, a duplicate of the socket, is still open). The
        broker keeps counting the slot (or fences it) until we confirm, which
        happens when the server is seen to close the socket, in the background."""
        with self._lock:
            pool = self._leases.pop(lease, None)
            self._lost.discard(lease)
            self._connected.discard(lease)
            if pool is not None:
                self._outbox.append(p.encode("release", lease=lease, unconfirmed=True))
        if pool is None:  # lost meanwhile: the broker does not count it
            os.close(fd)
            return
        self._wake()

        def done(seen: bool) -> None:
            if seen:
                self._send_soon(p.encode("release", lease=lease))

        closing.watch_until_eof(fd, done, UNCONFIRMED_WATCH)

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
            self._leases.pop(lease, None)
            self._lost.discard(lease)
            self._connected.discard(lease)

    def connected(self, lease: int, backend_pid: int, user: Optional[str] = None,
                  db: Optional[str] = None) -> None:
        """Tell the broker which backend serves ``lease``, as which role in which
        database (what fencing matches; sent with the next batch, nobody waits)."""
        fields: Dict[str, Any] = {"lease": lease, "backend_pid": backend_pid}
        if user and db and len(user) <= p.MAX_NAME_CHARS and len(db) <= p.MAX_NAME_CHARS:
            fields.update(user=user, db=db)
        with self._lock:
            self._connected.add(lease)
            self._outbox.append(p.encode("connected", **fields))
        if self.fence:  # the fencer matches on it: tell the broker now
            self._wake()

    def take_recall(self, pool: str) -> bool:
        """True (and one less owed) if the broker wants a lease of ``pool`` back."""
        if not self._debt.get(pool):  # the hot path: a dict read, no lock
            return False
        with self._lock:
            if self._debt.get(pool, 0) > 0:
                self._debt[pool] -= 1
                return True
            return False

    def contended(self, pool: str) -> bool:
        """True while the broker says requests wait in ``pool``: connections idle
        longer than a move costs should go back."""
        return self._contended.get(pool, False)

    def recall_owed(self, pool: str) -> int:
        return self._debt.get(pool, 0)

    def is_lost(self, lease: int) -> bool:
        return lease in self._lost

    def describe_broker(self) -> str:
        """A phrase for error messages: is the broker answering?"""
        now = time.monotonic()
        if self.last_reply is None:
            waited = now - self.started if self.started else 0.0
            return f"broker {self.url} has not answered at all ({waited:.1f}s since first contact)"
        return f"broker {self.url} last answered {now - self.last_reply:.1f}s ago"

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
        self._outbox.insert(0, self._hello())
        self._thread = threading.Thread(target=self._run, name=f"poolbroker-io-{self.url}",
                                        daemon=True)
        self._thread.start()
        lifecycle.on_first_start()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: the I/O thread is awake anyway

    def _hello(self) -> bytes:
        """Called with the lock held. Re-announces only leases with a live
        connection: that is what a restarted broker must count. A lease granted
        but not connected yet is forfeited (the broker may have expired it before
        a restart that made it forget), and so are grants held across a stall:
        their connects fail and their requests are asked again."""
        self._hello_gen += 1
        self._hello_at = time.monotonic()
        leases = [[lease, pool] for lease, pool in self._leases.items()
                  if lease in self._connected]
        for lease in [lz for lz in self._leases if lz not in self._connected]:
            del self._leases[lease]
            self._lost.add(lease)
        return p.encode("hello", pid=os.getpid(), host=socket.gethostname(),
                        name=_process_name(), leases=leases)

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
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        next_beat = time.monotonic() + self._heartbeat
        backlog = False
        last = time.monotonic()
        try:
            while True:
                wait = max(0.0, next_beat - time.monotonic())
                if backlog:
                    wait = min(wait, 0.1)
                before = time.monotonic()
                events = dict(poller.poll(int(wait * 1000) + 1))
                after = time.monotonic()
                # frozen in poll, or between two polls: leases may have expired
                stalled = max(after - before - wait, before - last)
                last = after
                if stalled > self._heartbeat and self._welcomed_gen:
                    self.suspect(stalled)
                if self._wake_r.fileno() in events:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                if sock in events:
                    while True:
                        try:
                            frame = sock.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_frame(frame)
                # after reading: what the answers queued (and releases kept back
                # while the pool was not contended, if it now is) goes out now
                with self._lock:
                    outbox, self._outbox = self._outbox, []
                    stopping = self._stopping
                backlog = self._send_all(sock, outbox)
                if stopping:
                    break
                self._retry_unanswered()
                if time.monotonic() >= next_beat:
                    try:
                        sock.send(self._heartbeat_frame(), zmq.NOBLOCK)
                    except zmq.Again:
                        pass  # the queue to the broker is full: the next beat will do
                    next_beat = time.monotonic() + self._heartbeat
        except Exception as exc:
            log.exception("poolbroker client I/O thread for %s died; cutting this process's "
                          "connections and starting over under a new identity", self.url)
            self._died(exc)
        finally:
            sock.close()  # linger lets the bye go out
            ctx.term()

    def _died(self, exc: BaseException) -> None:
        """The I/O thread is dying: nobody heartbeats for our leases any more, so
        the broker will expire them. Cut every connection (they must not outlive
        their leases), fail every waiting request with the cause, and forget this
        identity: the next request starts a new thread that says hello afresh."""
        cause = PoolError(f"the link to broker {self.url} failed ({type(exc).__name__}: "
                          f"{exc}); this process's connections were cut, and the next "
                          "request starts over")
        with self._lock:
            requests = [req for req in self._requests.values() if not req.done]
            for req in requests:
                req.done = True
            self._requests.clear()
            lost = set(self._leases) | {lease for _, _, lease in self._held}
            self._lost |= lost
            self._leases.clear()
            self._connected.clear()
            self._held = []
            self._debt.clear()
            self._contended.clear()
            self._outbox = []
            self._suspect = False
            self.confirmed.set()
            self._hello_gen = self._welcomed_gen = 0
            self.epoch = None
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
                sock.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                with self._lock:
                    self._outbox[:0] = frames[i:]
                return True
        return False

    def _heartbeat_frame(self, rid: Optional[int] = None) -> bytes:
        idle: Dict[str, int] = {}
        for pool in list(self._pools):
            try:
                name, n = pool.pool, pool.idle_leases()
            except Exception:  # a hint for recalls only: never worth the thread
                log.exception("%s: counting idle connections failed", pool)
                continue
            idle[name] = idle.get(name, 0) + n
        fields: Dict[str, Any] = {"idle": idle}
        with self._lock:
            # every lease we hold, grants held back across a stall included: the
            # broker frees what a client that has seen its grant does not list
            fields["leases"] = list(self._leases) + [lease for _, _, lease in self._held]
            if self.epoch is not None:
                fields.update(epoch=self.epoch, seen=self._seen)
        if rid is not None:
            fields["rid"] = rid
        return p.encode("heartbeat", **fields)

    def _retry_unanswered(self) -> None:
        """I/O thread: say hello again if no welcome came, and check again after a
        stall if no answer came (a lost message must not wedge us)."""
        now = time.monotonic()
        retry = max(0.5, 2 * self._heartbeat)
        with self._lock:
            hello_again = self._hello_pending() and now - self._hello_at > retry
            if hello_again:
                self._outbox.append(self._hello())
            check_again = self._suspect and now - self._check_at > retry
            if check_again:
                self._check_rid = next(self._rids)
                self._check_at = now
        if hello_again:
            log.info("broker %s has not answered our hello: saying it again", self.url)
        if check_again:
            self._send_soon(self._heartbeat_frame(self._check_rid))

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
            self._dispatch(msg)
        except Exception:
            self.bad_frames += 1
            log.exception("error handling %s from broker %s; continuing", msg.get("op"),
                          self.url)

    def _dispatch(self, msg: Dict[str, Any]) -> None:
        self.last_reply = time.monotonic()
        op = msg["op"]
        if op == "grant":
            with self._lock:
                self._seen = max(self._seen, msg.get("seq", 0))
            self._on_grant(msg["rid"], msg["pool"], msg["lease"])
        elif op == "error":
            self._on_error(msg["rid"], msg["code"], msg["message"])
        elif op == "recall":
            self._on_recall(msg["pool"], msg["count"], msg.get("contended", False))
        elif op == "welcome":
            self._on_welcome(msg)
        elif op == "hb":
            self._on_lost(msg["unknown"])
            if self._suspect and msg.get("rid") == self._check_rid:
                # the answer to a beat sent after the stall: it still knows us, so
                # the grants it sent are good (unless it says otherwise)
                unknown = set(msg["unknown"])
                self._confirm({lz for _, _, lz in self._held if lz not in unknown})

    def suspect(self, stalled: float) -> None:
        """This process stalled (any thread may say so): confirm our leases with
        the broker before new ones are used."""
        with self._lock:
            if self._suspect:
                return
            self._suspect = True
            self.confirmed.clear()
        log.warning("process stalled for %.1fs: confirming leases with broker %s before "
                    "using new ones", stalled, self.url)
        with self._lock:
            self._check_rid = next(self._rids)
            self._check_at = time.monotonic()
        self._send_soon(self._heartbeat_frame(self._check_rid))

    def _send_soon(self, frame: bytes) -> None:
        with self._lock:
            self._outbox.append(frame)
        self._wake()

    def _confirm(self, trusted: set) -> None:
        """The broker answered while we were suspect: deliver the held grants it
        vouches for, drop (and give back) the others."""
        with self._lock:
            if not self._suspect:
                return
            held, self._held = self._held, []
            self._suspect = False
        for rid, pool, lease in held:
            if lease in trusted:
                self._deliver_grant(rid, pool, lease)
            else:
                # unconfirmed: give it back (a lease the broker expired is ignored there)
                log.warning("dropping grant of lease %d received across a stall", lease)
                self._send_soon(p.encode("release", lease=lease))
        self.confirmed.set()

    def _on_grant(self, rid: int, pool: str, lease: int) -> None:
        with self._lock:
            if self._suspect:
                self._held.append((rid, pool, lease))
                return
        self._deliver_grant(rid, pool, lease)

    def _deliver_grant(self, rid: int, pool: str, lease: int) -> None:
        with self._lock:
            req = self._requests.pop(rid, None)
            if req is None or req.done:
                # Nobody waits for it (timed out, cancelled) or a duplicate grant
                # of a retried request: give it straight back unless we use it.
                if lease not in self._leases:
                    self._outbox.append(p.encode("release", lease=lease))
                return
            req.done = True
            self._leases[lease] = pool
        _run_callback(req, lease, None)

    def _on_error(self, rid: Optional[int], code: str, message: str) -> None:
        if code == p.E_UNKNOWN_CLIENT:
            # The broker does not know us: it restarted, or it expired us. Say
            # hello again with what we hold; outstanding requests are re-sent
            # (same rid, so they stay idempotent) once it has welcomed us.
            with self._lock:
                if self._hello_pending():
                    return
                self._outbox.append(self._hello())
            self._wake()
            return
        if code == p.E_TOO_MANY_CLIENTS:
            # refused at hello: nothing we asked for can be granted. Callers hear
            # why now rather than at their deadline; the hello is retried.
            log.error("broker %s refused this process: %s", self.url, message)
            with self._lock:
                failed = [r for r in self._requests.values() if not r.done]
                for r in failed:
                    r.done = True
                    del self._requests[r.rid]
            for r in failed:
                _run_callback(r, None, BrokerError(code, message))
            return
        if rid is None:
            log.warning("broker %s: %s (%s)", self.url, message, code)
            return
        with self._lock:
            req = self._requests.pop(rid, None)
            if req is None or req.done:
                return
            req.done = True
        _run_callback(req, None, BrokerError(code, message))

    def _hello_pending(self) -> bool:
        return self._hello_gen > self._welcomed_gen

    def _on_welcome(self, msg: Dict[str, Any]) -> None:
        if self.epoch is not None and msg["epoch"] != self.epoch:
            log.warning("broker %s restarted (epoch %s -> %s); re-announced %d lease(s)",
                        self.url, self.epoch, msg["epoch"], len(self._leases))
        if msg["epoch"] != self.epoch:
            with self._lock:
                self._seen = 0  # grant numbers start again with every broker run
        self.epoch = msg["epoch"]
        fence = msg.get("fence")
        self.fence = fence if isinstance(fence, str) and len(fence) < 20 else ""
        self._heartbeat = max(0.05, float(msg["heartbeat"]))
        now = time.monotonic()
        with self._lock:
            self._welcomed_gen = self._hello_gen
            for req in self._requests.values():
                if not req.done and req.hello_gen < self._hello_gen:
                    left = req.deadline - now
                    if left > 0:
                        req.hello_gen = self._hello_gen
                        self._outbox.append(p.encode("acquire", rid=req.rid, pool=req.pool,
                                                     timeout=left))
        self._wake()
        if msg["rejected"]:
            self._on_lost(msg["rejected"])
        # a re-hello forfeits grants held across a stall (see _hello): none is trusted
        self._confirm(set())

    def _on_recall(self, pool: str, count: int, contended: bool) -> None:
        with self._lock:
            self._debt[pool] = count
            self._contended[pool] = contended
        if count or contended:
            for owner in list(self._pools):
                if owner.pool == pool:
                    try:
                        owner.on_recall()
                    except Exception:
                        log.exception("%s: acting on a recall failed", owner)

    def _on_lost(self, leases: List[int]) -> None:
        if not leases:
            return
        with self._lock:
            lost = [lease for lease in leases if lease in self._leases]
            for lease in lost:
                del self._leases[lease]
                self._lost.add(lease)
        if lost:
            log.warning("broker %s no longer knows %d lease(s) of ours: they expired (no "
                        "heartbeat for a TTL: was this process frozen?) or the broker lost "
                        "them; their connections are cut and will be replaced under new "
                        "leases", self.url, len(lost))
            self._tell_pools_lost(set(lost))

    def _tell_pools_lost(self, lost: set) -> None:
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


def _process_name() -> str:
    try:
        import multiprocessing

        name = multiprocessing.current_process().name
        return "" if name == "MainProcess" else name
    except Exception:
        return ""
