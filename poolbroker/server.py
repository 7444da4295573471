"""The broker process: a ZeroMQ ROUTER loop around the :class:`~poolbroker.ledger.Ledger`.

The loop receives frames, hands them to the ledger, sends what the ledger returns,
and ticks the ledger's timers (waiter deadlines, lease TTL). Nothing a peer sends
can crash it: undecodable frames get an ``error`` reply, exceptions in a handler are
logged and answered, and the socket drops frames above the size limit.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import select
import signal
import socket
import time
import uuid
from typing import Any, Callable, Dict, List, Optional

import zmq
from zmq.auth.thread import ThreadAuthenticator

from . import protocol as p
from .clock import LoopClock
from .config import ConfigError
from .config import load as load_config
from .fencing import Fencer, tag_prefix
from .fencing import check_dsn as check_fence_dsn
from .leaseids import LeaseIds
from .ledger import Ledger, Out
from .metrics import MetricsServer, SnapshotExchange
from .quotas import Quota
from .security import (
    InsecureEndpoint,
    bind_private,
    check_endpoint,
    default_admin_url,
    ipc_path,
    is_loopback,
    load_server_keys,
)
from .sockets import descriptor, readable, receive, send_to
from .state import StateFile, default_path

log = logging.getLogger("poolbroker")

# Drain at most this many frames before ticking timers, so that a flood from one
# peer cannot starve deadlines.
_BATCH = 2000


class AddressInUse(RuntimeError):
    """Another broker already serves this address."""


class AddressGuard:
    """Make sure we are the only broker on ``url``.

    A tcp bind fails by itself when the port is taken. An ipc bind does not: libzmq
    unlinks the existing socket file and binds a new one, silently stealing the path
    from the running broker. So for ipc we hold an exclusive ``flock`` on
    ``PATH.lock`` for as long as we serve, and also refuse if something answers on
    the path (a broker that does not use the lock).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.path: Optional[str] = url[len("ipc://"):] if url.startswith("ipc://") else None
        self._lock_fd: Optional[int] = None

    def acquire(self) -> None:
        if self.path is None:
            return
        if len(self.path.encode()) > 107:
            raise ValueError(f"ipc path too long ({len(self.path)} > 107 bytes): {self.path}")
        lock_path = self.path + ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise AddressInUse(
                    f"another broker is already serving {self.url} "
                    f"(it holds the lock {lock_path}); refusing to steal its address"
                ) from None
            raise
        if os.path.exists(self.path) and _unix_socket_answers(self.path):
            os.close(fd)
            raise AddressInUse(
                f"something is already listening on {self.url}; refusing to steal its address"
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is None:
            return
        try:
            if self.path and os.path.exists(self.path):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._lock_fd)  # the lock file stays: unlinking it would race a starter
        self._lock_fd = None


def _unix_socket_answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(path)
        return True
    except OSError:
        return False  # ECONNREFUSED: a stale file left by a dead broker
    finally:
        s.close()


class Broker:
    """Serve ``pools`` (name -> max connections) on ``bind`` until :meth:`stop`."""

    def __init__(
        self,
        bind: str,
        pools: Dict[str, int],
        *,
        ttl: float = 4.0,
        max_waiting_per_client: int = 1000,
        max_clients: int = 1000,
        max_waiting: int = 10000,
        grace: Optional[float] = None,
        state_dir: Optional[str] = None,
        config_path: Optional[str] = None,
        pool_overrides: Optional[Dict[str, int]] = None,
        fence_dsn: Optional[str] = None,
        admin_bind: Optional[str] = None,
        socket_group: Optional[int] = None,
        curve_secret: Optional[str] = None,
        curve_clients: Optional[str] = None,
        unconfirmed_hold: float = 8000.0,
        metrics_bind: Optional[str] = None,
        quotas: Optional[Dict[str, List[Quota]]] = None,
    ) -> None:
        """``metrics_bind``: HOST:PORT for Prometheus' ``/metrics`` (None: no
        metrics; see :mod:`poolbroker.metrics`). ``admin_bind``: where
        administration is accepted (None: ``ipc://PATH.admin`` beside an ipc
        ``bind``; "": nowhere). ``socket_group``: a gid that may use
        the ipc socket (0660). ``curve_secret``/``curve_clients``: the broker's
        secret certificate and a directory of allowed client public certificates
        (see :mod:`poolbroker.security`)."""
        self.bind = bind
        self.admin_bind = default_admin_url(bind) if admin_bind is None else admin_bind
        self.socket_group = socket_group
        self.curve_secret = curve_secret
        self.curve_clients = curve_clients
        self._sock: Optional[zmq.Socket] = None
        self._admin_sock: Optional[zmq.Socket] = None
        # The loop wakes at least this often; a longer gap is time the broker did
        # not run, which the clock does not count (see poolbroker.clock).
        self.tick_every = min(1.0, ttl / 4)
        self.clock = LoopClock(self.tick_every + min(0.5, ttl / 4))
        # at least one TTL (every live client heartbeats within it), and 3 s
        self.grace = max(ttl, 3.0) if grace is None else grace
        self.state = StateFile(default_path(bind, state_dir))
        self.epoch = uuid.uuid4().hex[:12]
        # stable across restarts of this broker, so a restarted one finds its tags
        self.broker_id = hashlib.sha1(f"{socket.gethostname()}|{bind}".encode()).hexdigest()[:6]
        self.ledger = Ledger(pools, ttl=ttl, epoch=self.epoch,
                             max_waiting_per_client=max_waiting_per_client,
                             max_clients=max_clients, max_waiting=max_waiting,
                             fence=fence_dsn is not None, fence_tag=tag_prefix(self.broker_id),
                             unconfirmed_hold=unconfirmed_hold)
        self.fence_dsn = fence_dsn
        self.fencer: Optional[Fencer] = None
        self._stop = False
        self._reload = False
        for name, pool_quotas in (quotas or {}).items():
            self.ledger.set_quotas(name, pool_quotas, 0.0)  # nobody to tell yet
        self.config_path = config_path
        self.pool_overrides = dict(pool_overrides or {})  # --pool wins over the file
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.frames_in = 0
        self.bad_frames = 0
        self._scopes_written = 0
        self.frame_errors = 0  # frames that hit a bug (logged): must stay 0
        self.loop_errors = 0
        self._last_bad_log = 0.0
        self.metrics_bind = metrics_bind
        self.metrics: Optional[MetricsServer] = None
        self._snapshots = SnapshotExchange(self._poke)
        # socket -> it said no message waits, and was not used since (see _has_news)
        self._quiet: Dict[Any, bool] = {}
        self._started = time.monotonic()

    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler or another thread)."""
        self._stop = True
        self._poke()

    def _install_signals(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            self.stop()

        def reload(signum: int, frame: Any) -> None:
            self._reload = True
            self._poke()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGHUP, reload)

    def _poke(self) -> None:
        """Wake the loop (safe from a signal handler or another thread)."""
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def reload_config(self, now: float) -> List[Out]:
        """Re-read the config file and apply its pools (see poolbroker.config)."""
        if not self.config_path:
            log.warning("SIGHUP: no --config file to reload")
            return []
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            log.error("SIGHUP: %s; keeping the current configuration", exc)
            return []
        pools, quotas = config["pools"], config["quotas"]
        pools.update(self.pool_overrides)
        log.info("SIGHUP: reloading %s", self.config_path)
        outs: List[Out] = []
        for name, size in pools.items():
            pool = self.ledger.pools.get(name)
            if pool is None or pool.max != size:
                outs += self.ledger.resize(name, size, now)  # drain/pause stay until resume
            if self.ledger.pools[name].quotas != quotas.get(name, []):
                outs += self.ledger.set_quotas(name, quotas.get(name, []), now)
        for name, pool in self.ledger.pools.items():
            if name not in pools and not pool.draining:
                log.warning("SIGHUP: pool %r is no longer configured: draining it", name)
                outs += self.ledger.drain(name, now)
        return outs

    def _start_grace(self) -> None:
        """Read the previous run's record: its lease id key, and whether leases may
        be outstanding (then grant nothing for the grace period)."""
        previous = self.state.read()
        key = StateFile.lease_key(previous)
        self.ledger.ids = LeaseIds(key)
        self.ledger.ids_verifiable = key is not None
        self.ledger.fence_scopes |= StateFile.fence_scopes(previous)
        if StateFile.needs_grace(previous):
            self.ledger.start_grace(self.clock.now() + self.grace)
            log.warning("leases may be outstanding (%s): granting nothing for %.1fs while "
                        "clients re-announce what they hold%s", StateFile.why_grace(previous),
                        self.grace, "" if key else "; without the previous run's key their "
                        "ids cannot be checked, so at most each pool's max is taken back")
        # from now until a clean exit, a crash must be assumed to leave leases behind
        self._write_state(outstanding=self.ledger.in_grace, clean_exit=False)

    def _write_state(self, *, outstanding: bool, clean_exit: bool) -> None:
        self._scopes_written = len(self.ledger.fence_scopes)
        self.state.write(outstanding=outstanding, clean_exit=clean_exit, epoch=self.epoch,
                         key=self.ledger.ids.key, scopes=self.ledger.fence_scopes)

    def _record_state(self) -> None:
        # Only new fence scopes need recording while running: whether a crash left
        # leases outstanding is settled by clean_exit=False, written at start.
        if len(self.ledger.fence_scopes) != self._scopes_written:
            self._write_state(outstanding=True, clean_exit=False)

    def run(self, on_ready: Optional[Callable[[], None]] = None, *, signals: bool = True) -> None:
        check_endpoint(self.bind, curve=self.curve_secret is not None)
        if self.admin_bind and not is_loopback(self.admin_bind):
            raise InsecureEndpoint(f"the admin endpoint {self.admin_bind} must be ipc or "
                                   "loopback tcp")
        guard = AddressGuard(self.bind)
        guard.acquire()
        ctx = zmq.Context()
        auth = None
        sock = self._sock = self._router(ctx)
        admin = None
        try:
            if self.curve_secret is not None:
                auth = ThreadAuthenticator(ctx, log=log)
                auth.start()
                auth.configure_curve(domain="*", location=self.curve_clients or ".")
                sock.curve_publickey, sock.curve_secretkey = load_server_keys(self.curve_secret)
                sock.curve_server = True
            self._bind(sock, self.bind, self.socket_group)
            if self.admin_bind:
                admin = self._admin_sock = self._router(ctx)
                self._bind(admin, self.admin_bind, None)  # owner-only, whatever the group
            if self.fence_dsn:
                check_fence_dsn(self.fence_dsn)  # a wrong DSN stops us now, not at first use
            self._start_grace()
            if self.fence_dsn:
                self.fencer = Fencer(self.fence_dsn, self.broker_id, self._poke)
            if self.metrics_bind:
                self.metrics = MetricsServer(self.metrics_bind, self._snapshots.ask)
            if signals:
                self._install_signals()
            # the sockets' ZMQ_FD are edge-triggered: _step reads each socket until
            # ZMQ_EVENTS says nothing is left, and the loop polls only then
            poller = select.poll()
            poller.register(descriptor(sock), select.POLLIN)
            if admin is not None:
                poller.register(descriptor(admin), select.POLLIN)
            poller.register(self._wake_r.fileno(), select.POLLIN)
            pools = ", ".join(f"{n}={pl.max}" for n, pl in self.ledger.pools.items())
            log.info("poolbroker ready on %s: pools %s, lease ttl %.1fs, epoch %s, pid %d, %s; "
                     "%s; administration on %s",
                     self.bind, pools, self.ledger.ttl, self.epoch, os.getpid(),
                     "fencing expired leases" if self.fencer else
                     "no fencing (a frozen process may exceed the budget until it resumes)",
                     "CURVE: only allowed client keys" if auth else "no CURVE",
                     self.admin_bind or "no endpoint (signals only)")
            if on_ready:
                on_ready()
            self._loop(poller)
        finally:
            leased = sum(len(pl.leases) for pl in self.ledger.pools.values())
            try:
                self._write_state(outstanding=leased > 0 or self.ledger.in_grace,
                                  clean_exit=True)
            except OSError as exc:
                log.error("could not record the state file %s: %s", self.state.path, exc)
            log.info("poolbroker stopped (%d lease(s) outstanding, %d frames, %d bad)",
                     leased, self.frames_in, self.bad_frames)
            sock.close(0)
            if admin is not None:
                admin.close(0)
                path = ipc_path(self.admin_bind or "")
                if path and os.path.exists(path):
                    os.unlink(path)
            if auth is not None:
                auth.stop()
            ctx.term()
            guard.release()
            if self.fencer is not None:
                self.fencer.stop()
            if self.metrics is not None:
                self.metrics.stop()

    @staticmethod
    def _router(ctx: zmq.Context) -> zmq.Socket:
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        return sock

    @staticmethod
    def _bind(sock: zmq.Socket, url: str, group: Optional[int]) -> None:
        try:
            bind_private(sock, url, group)
        except zmq.ZMQError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(f"{url} is already in use (another broker?): {exc}") from None
            raise

    def _loop(self, poller: "select.poll") -> None:
        settle = False
        sources = [(src, admin) for src, admin in ((self._sock, False), (self._admin_sock, True))
                   if src is not None]
        socks = [src for src, _ in sources]
        by_fd = {descriptor(src): src for src in socks}
        wake_fd = self._wake_r.fileno()
        self._quiet = {src: False for src, _ in sources}
        while not self._stop:
            now = self.clock.now()
            due = self.ledger.next_deadline()
            # wake at least every tick_every: the clock counts longer gaps as lost
            wait = self.tick_every if due is None else \
                min(self.tick_every, max(0.0, due - now))
            if settle:  # after a gap: let libzmq hand over what queued meanwhile
                wait = min(wait, 0.05)
            poked = False
            for src in socks:
                if self._has_news(src):
                    break
            else:  # nothing waits: wait
                for fd, _ in poller.poll(wait * 1000.0 + 0.5):
                    if fd == wake_fd:
                        poked = True
                    else:
                        self._quiet[by_fd[fd]] = False
            self.clock.now()  # notes a gap now (a freeze in poll), before anything expires
            try:
                settle = self._step(sources, due, poked)
            except Exception:  # a bug in a timer or the fencer hand-off: log, go on
                settle = False
                self.loop_errors += 1
                if self.loop_errors <= 10 or self.loop_errors % 1000 == 0:
                    log.exception("error in the broker loop (%d so far); continuing",
                                  self.loop_errors)

    def _has_news(self, sock: zmq.Socket) -> bool:
        """True if a message waits on ``sock``; asks the socket only if it was
        used since it last said no (asking costs a few microseconds)."""
        if self._quiet[sock]:
            return False
        news = readable(sock)
        self._quiet[sock] = not news
        return news

    def _step(self, sources: List[Any], due: Optional[float], poked: bool = True) -> bool:
        """One turn of the loop: read what came on each of ``sources`` (socket,
        is-admin), then expire what is ``due``. True if the broker did not run
        for a while: then nothing expires in this turn, so that the heartbeats
        queued meanwhile are read first. ``poked``: the wake pipe has bytes."""
        sock = self._sock
        assert sock is not None, "run() binds the socket before the loop"
        if poked:
            try:
                self._wake_r.recv(4096)
            except OSError:
                pass
        while self.fencer is not None and not self.fencer.done.empty():
            kind, leases = self.fencer.done.get()
            now = self.clock.now()
            outs = self.ledger.fenced(leases, now) if kind == "fenced" else \
                self.ledger.swept(now)
            self._send(sock, outs)
        if self._snapshots.wanted:
            self._snapshots.serve(lambda: self.status_data(self.clock.now()))
        if self._reload:
            self._reload = False
            self._send(sock, self.reload_config(self.clock.now()))
        for source, admin in sources:
            for _ in range(_BATCH):
                # asking first costs less than the exception of an empty recv
                if not self._has_news(source):
                    break
                frames = receive(source)
                outs = self._handle(frames, self.clock.now(), admin=admin)
                if admin:  # its own answer goes back there; grants, recalls to clients
                    self._send(source, [out for out in outs if out[0] == frames[0]])
                    outs = [out for out in outs if out[0] != frames[0]]
                self._send(sock, outs)
        gap = self.clock.take_gap()
        if gap:
            log.warning("the broker did not run for %.1fs (frozen, a paused VM, swapping?): "
                        "that time is not counted against clients, so their leases are "
                        "extended by it; reading queued heartbeats before expiring anyone",
                        gap)
            return True
        now = self.clock.now()
        if due is not None and now >= due:  # nothing else can be due (see next_deadline)
            self._send(sock, self.ledger.tick(now))
        self._record_state()
        return False

    def _send(self, sock: zmq.Socket, outs: List[Out]) -> None:
        if outs:  # sending may take the signal of an arrival: ask again
            self._quiet[sock] = False
        for cid, op, fields in outs:
            if op == "fence":  # for our fencer, not for a peer
                assert self.fencer is not None
                self.fencer.submit(fields["leases"])
                continue
            if op == "sweep":
                assert self.fencer is not None
                self.fencer.sweep(fields["known"], fields["scopes"])
                continue
            try:
                send_to(sock, cid, p.encode(op, **fields))
            except zmq.ZMQError as exc:  # peer gone or its queue full: the TTL cleans up
                log.debug("could not send %s to %s: %s", op, p.shown(cid, 40), exc)

    def _bad(self, cid: bytes, err: p.ProtocolError) -> List[Out]:
        self.bad_frames += 1
        now = time.monotonic()
        if now - self._last_bad_log > 5.0:  # junk must not flood the log either
            self._last_bad_log = now
            log.warning("bad frame from %s: %s (%d bad so far)", p.shown(cid, 40), err.message,
                        self.bad_frames)
        return [(cid, "error", p.error_fields(err.rid, err.code, err.message))]

    def _handle(self, frames: List[bytes], now: float, admin: bool = False) -> List[Out]:
        """One frame in, the replies out. Never raises: one bad frame (or a bug it
        finds) must not stop the broker, or resending it would keep the whole fleet
        in the grace period."""
        self.frames_in += 1
        cid = frames[0] if frames else b""
        try:
            if len(frames) != 2:
                return self._bad(cid, p.ProtocolError(
                    p.E_BAD_MESSAGE,
                    f"expected one frame per message, got {max(0, len(frames) - 1)}"))
            try:
                msg = p.decode(frames[1])
            except p.ProtocolError as err:
                return self._bad(cid, err)
            try:
                return self._dispatch(cid, msg, now, admin)
            except Exception:  # a bug must not take the budget down with it
                log.exception("error handling %s from %s", msg.get("op"), p.shown(cid, 40))
                return [(cid, "error", p.error_fields(
                    msg.get("rid"), "internal", "internal broker error, see broker log"))]
        except Exception:
            self.frame_errors += 1
            log.exception("frame from %s dropped (%d so far)", p.shown(cid, 40),
                          self.frame_errors)
            return []

    def _dispatch(self, cid: bytes, msg: Dict[str, Any], now: float,
                  admin: bool = False) -> List[Out]:
        op = msg["op"]
        ledger = self.ledger
        released = msg.get("released") if op in p.CARRY_RELEASES else None
        if released:  # releases that came along: first, as if sent before
            outs = ledger.release_all(cid, released, now)
            del msg["released"]
            return outs + self._dispatch(cid, msg, now, admin)
        if op == "acquire":
            return ledger.acquire(cid, rid=msg["rid"], pool=msg["pool"],
                                  timeout=float(msg["timeout"]), now=now,
                                  ahead=msg.get("ahead", False))
        if op == "release":
            return ledger.release(cid, lease=msg["lease"], now=now,
                                  unconfirmed=msg.get("unconfirmed", False))
        if op == "cancel":
            return ledger.cancel(cid, rid=msg["rid"], now=now)
        if op == "connected":
            return ledger.connected(cid, lease=msg["lease"], backend_pid=msg["backend_pid"],
                                    now=now, user=msg.get("user"), db=msg.get("db"))
        if op == "heartbeat":
            return ledger.heartbeat(cid, idle=msg["idle"], leases=msg["leases"], now=now,
                                    rid=msg.get("rid"), epoch=msg.get("epoch"),
                                    seen=msg.get("seen"), ack=msg.get("ack", True),
                                    busy=msg.get("busy"))
        if op == "hello":
            return ledger.hello(cid, pid=msg["pid"], host=msg["host"], name=msg["name"],
                                leases=[(lid, pool) for lid, pool in msg["leases"]], now=now,
                                ppid=msg.get("ppid", 0), gen=msg.get("gen"))
        if op == "exited":
            return ledger.exited(cid, rid=msg["rid"], pid=msg["pid"], host=msg["host"],
                                 parent=msg["parent"], now=now)
        if op == "bye":
            return ledger.bye(cid, now=now)
        if op in ("resize", "drain", "pause", "resume"):
            if not admin:
                where = self.admin_bind or "no admin endpoint is configured"
                return [(cid, "error", p.error_fields(
                    msg["rid"], p.E_FORBIDDEN, f"{op} is accepted only on the admin endpoint "
                    f"({where})"))]
            return self._admin(cid, msg, now)
        if op == "status":
            data = self.status_data(now)
            if msg.get("leases"):
                data["leases"] = ledger.holders(now)
            return [(cid, "status", {"rid": msg["rid"], "data": data})]
        raise AssertionError(f"op {op!r} validated but not dispatched")

    def status_data(self, now: float) -> Dict[str, Any]:
        """What ``poolbroker status`` and ``/metrics`` show (loop thread only)."""
        data = self.ledger.snapshot(now)
        data["bad_frames"] = self.bad_frames
        data["frame_errors"] = self.frame_errors
        data["loop_errors"] = self.loop_errors
        data["lost_s"] = round(self.clock.lost, 3)
        data["uptime_s"] = round(time.monotonic() - self._started, 3)
        if self.fencer is not None:
            data.update(self.fencer.stats())
        return data

    def _admin(self, cid: bytes, msg: Dict[str, Any], now: float) -> List[Out]:
        op, name, rid = msg["op"], msg["pool"], msg["rid"]
        if name not in self.ledger.pools:
            known = p.known_names(self.ledger.pools)
            message = f"unknown pool {p.shown(name)} (this broker has: {known})"
            return [(cid, "error", p.error_fields(rid, p.E_UNKNOWN_POOL, message))]
        pool = self.ledger.pools[name]
        if op == "resize":
            before = pool.max
            outs = self.ledger.resize(name, msg["max"], now)  # until the next SIGHUP reload
            text = f"pool {p.shown(name)}: max {before} -> {pool.max} ({len(pool.leases)} leased)"
        else:
            outs = getattr(self.ledger, op)(name, now)
            text = (f"pool {p.shown(name)}: {op} ({len(pool.leases)} leased, "
                    f"{len(pool.queue)} waiting)")
        return outs + [(cid, "done", {"rid": rid, "message": text})]
