"""Hostile peers and unlucky timing, against a real broker and real PostgreSQL."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import msgpack
import psycopg2
import pytest
import zmq

from devtools.pgcluster import free_port
from poolbroker import protocol as p
from poolbroker_client import ConnectionPool, PoolError, PoolTimeout
from poolbroker_client.leases import LeaseClient

from helpers import Sampler, Worker, count_backends, new_tag, short_ipc, tagged

pytestmark = pytest.mark.integration


def _dealer(url: str, identity: bytes) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.connect(url)
    return sock


def _replies(sock: zmq.Socket, count: int, timeout: float = 3.0) -> list:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < count and sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
        out.append(p.decode(sock.recv(), p.BROKER_OPS, max_bytes=p.MAX_STATUS_BYTES))
    return out


def test_one_deeply_nested_frame_does_not_stop_the_broker(pg, broker):
    """Item 1: ~1,000 nested arrays in a field used to raise RecursionError out of
    the loop and end the broker."""
    junk = _dealer(broker.url, b"nester")
    deep = b"\x91" * 1000 + b"\xc0"
    for field in ("v", "op", "rid"):
        body = {"v": msgpack.packb(1), "op": msgpack.packb("acquire")}
        body[field] = deep
        junk.send(b"\x82" + b"".join(msgpack.packb(k) + v for k, v in body.items())[:])
    replies = _replies(junk, 3)
    assert [r["op"] for r in replies] == ["error"] * 3, replies
    with ConnectionPool(pg.dsn, broker=broker.url, timeout=5) as pool:
        with pool.connection() as conn:
            conn.cursor().execute("SELECT 1")
    assert broker.status()["bad_frames"] >= 3
    junk.close()


def test_a_frozen_broker_expires_nobody_when_it_wakes(pg, broker_factory):
    """Item 3: a broker stopped for longer than the TTL used to run its expiry
    before reading the heartbeats queued meanwhile (with fencing: every backend
    terminated mid-transaction)."""
    ttl = 2.0
    broker = broker_factory({"default": 2}, ttl=ttl, extra=("--fence-dsn", pg.dsn))
    tag = new_tag()
    holder = Worker(dict(mode="hold", n=1, dsn=tagged(pg.dsn, tag), broker=broker.url))
    holder.wait_line("HOLDING")
    os.kill(broker.pid, signal.SIGSTOP)
    time.sleep(2.5 * ttl)  # the fault itself: the broker does not run for 5 s
    os.kill(broker.pid, signal.SIGCONT)
    deadline = time.monotonic() + 2 * ttl + 1
    while time.monotonic() < deadline:  # long enough for a wrong expiry and its fencing
        assert broker.leased() == 1, broker.log_text()[-2000:]
        assert count_backends(pg.dsn, tag) == 1
        time.sleep(0.1)
    holder.finish()
    result = holder.result()
    assert result["use_after"] == ["ok"], result
    text = broker.log_text()
    assert "did not run for" in text
    assert "silent for" not in text and "fenced" not in text  # nobody expired


def _forged_hello(url: str, ids: list) -> dict:
    forger = _dealer(url, b"forger")
    forger.send(p.encode("hello", pid=1, host="x", name="forger",
                         leases=[[i, "default"] for i in ids]))
    [welcome] = _replies(forger, 1)
    forger.close()
    return welcome


def test_forged_lease_ids_are_never_adopted_and_honest_clients_are_served(pg, broker_factory):
    """Item 2: any peer could list ids it was never granted (adopted even above max,
    so grants stopped for everyone), or 2**63-1 (which moved the id counter past
    what clients accept)."""
    broker = broker_factory({"default": 2})
    forged = [2**63 - 1] + list(range(1, 3000))
    welcome = _forged_hello(broker.url, forged)
    assert welcome["op"] == "welcome" and len(welcome["rejected"]) == len(forged)
    with ConnectionPool(pg.dsn, broker=broker.url, timeout=3) as pool:
        conns = [pool.getconn(), pool.getconn()]  # the whole budget, for an honest client
        for conn in conns:
            pool.putconn(conn)
    assert "announced outside a grace period" in broker.log_text()


def test_during_a_grace_period_only_ids_this_broker_issued_are_taken_back(pg, broker_factory):
    """After a restart, re-announced leases are adopted only if the broker's key
    issued them (kept in its state file) and no more than the pool holds."""
    url = short_ipc()
    first = broker_factory({"default": 2}, url=url, grace=0)
    tag = new_tag()
    holder = Worker(dict(mode="hold", n=1, dsn=tagged(pg.dsn, tag), broker=url))
    holder.wait_line("HOLDING")
    first.stop()  # a clean exit, but with a lease outstanding: the next start holds grace
    second = broker_factory({"default": 2}, url=url, grace=3.0)
    assert second.status()["grace_s"] > 0
    welcome = _forged_hello(url, list(range(1, 3000)))
    assert len(welcome["rejected"]) == 2999, "a forged id was adopted"
    assert second.wait_leased(1, 5) == 1  # the holder's real lease was taken back
    with ConnectionPool(tagged(pg.dsn, tag), broker=url, timeout=10) as pool:
        with pool.connection() as conn:  # served once the grace is over: 2 of 2
            conn.cursor().execute("SELECT 1")
    holder.finish()
    assert holder.result()["use_after"] == ["ok"]


def test_a_start_without_a_state_file_holds_the_grace_period(pg, broker_factory, tmp_path):
    """Item 7: a missing state file (a tmp cleaner, a new container, a changed
    --state-dir) used to mean a start that grants at once."""
    os.chmod(tmp_path, 0o755)
    broker = broker_factory({"default": 2}, url=short_ipc(), grace=None,
                            extra=("--state-dir", str(tmp_path / "new")))
    status = broker.status()
    assert status["grace_s"] > 0
    assert "no state file to prove" in broker.log_text()
    state = tmp_path / "new" / os.listdir(tmp_path / "new")[0]
    assert oct(state.stat().st_mode & 0o777) == "0o600"  # it holds the lease id key


def test_status_of_a_broker_with_hundreds_of_clients_and_long_names(broker_factory):
    """Item 10: a status reply over 64 KiB (a few hundred clients) broke the CLI;
    names from peers are escaped in the broker's log."""
    broker = broker_factory({"default": 2})
    peers = [_dealer(broker.url, f"peer-{i}".encode()) for i in range(300)]
    for i, peer in enumerate(peers):
        peer.send(p.encode("hello", pid=i, host="h" * 700, name=f"\x1b[31m{i}" + "n" * 190,
                           leases=[]))
    assert broker.wait_for(lambda s: len(s["clients"]) == 300, 10)["clients"]
    out = subprocess.run([sys.executable, "-m", "poolbroker", "status", "--json", "--broker",
                          broker.url], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout) > p.MAX_MESSAGE_BYTES
    assert len(json.loads(out.stdout)["clients"]) == 300
    assert all(not c["id"].startswith("peer-") for c in json.loads(out.stdout)["clients"])
    assert "\x1b" not in broker.log_text()  # escaped, never raw into the log
    for peer in peers:
        peer.close()


def _roles(pg) -> tuple:
    """A fencing role that may signal backends (not a superuser) and an app role."""
    conn = psycopg2.connect(pg.dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("""DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pbfencer') THEN
                CREATE ROLE pbfencer LOGIN; GRANT pg_signal_backend TO pbfencer; END IF;
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pbapp') THEN
                CREATE ROLE pbapp LOGIN; END IF; END $$""")
    conn.close()
    return pg.dsn.replace("user=postgres", "user=pbfencer"), pg.dsn.replace("user=postgres",
                                                                            "user=pbapp")


def test_the_fencer_survives_hostile_session_names_and_leaves_impostors_alone(
        pg, broker_factory):
    """Item 5: a session named '.../pb<id>:²' killed the fencer thread (int('²')), and
    a tagged backend it may not terminate made it retry forever; either way expired
    leases stayed counted and waiters timed out."""
    fence_dsn, app_dsn = _roles(pg)
    broker = broker_factory({"default": 1}, ttl=2.0, extra=("--fence-dsn", fence_dsn))
    tag = new_tag()
    holder = Worker(dict(mode="hold", n=1, dsn=tagged(app_dsn, tag), broker=broker.url))
    holder_pid = int(holder.wait_line("HOLDING").split()[1])
    with psycopg2.connect(pg.dsn) as admin, admin.cursor() as cur:
        cur.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s",
                    (holder_pid,))
        name = cur.fetchone()[0]
    admin.close()
    lease_tag = name[name.index("/pb"):]
    prefix = lease_tag[:lease_tag.index(":") + 1]
    # a superuser session wearing the holder's tag, and one whose "lease id" is '²'
    impostor = psycopg2.connect(pg.dsn, application_name="evil" + lease_tag)
    weird = psycopg2.connect(pg.dsn, application_name="odd" + prefix + "²")
    holder.proc.send_signal(signal.SIGSTOP)  # expires; its backend must be fenced
    try:
        with ConnectionPool(app_dsn, broker=broker.url, timeout=20) as pool:
            with pool.connection() as conn:  # the slot, once the holder is fenced
                conn.cursor().execute("SELECT 1")
        for survivor in (impostor, weird):  # neither was touched
            with survivor.cursor() as cur:
                cur.execute("SELECT 1")
    finally:
        holder.proc.send_signal(signal.SIGCONT)
    holder.finish()
    assert holder.result()["use_after"] != ["ok"]  # the holder's session was ended
    status = broker.status()
    assert status["fence_terminated"] >= 1 and status["fence_errors"] == 0, status
    assert "left alone" in broker.log_text()
    impostor.close()
    weird.close()


@pytest.mark.parametrize("who,expect", [("nosuchrole", "does not exist"),
                                        ("pbapp", "may not terminate")])
def test_a_wrong_fence_dsn_stops_the_broker_at_start(pg, who, expect):
    """Item 5: a wrong fence DSN used to be found only on first use."""
    _roles(pg)
    dsn = pg.dsn.replace("user=postgres", f"user={who}")
    out = subprocess.run([sys.executable, "-m", "poolbroker", "serve", "--bind", short_ipc(),
                          "--pool", "default=1", "--fence-dsn", dsn, "--grace", "0"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out.stderr
    assert expect in out.stderr and "not starting" in out.stderr


def test_sockets_are_owner_only_and_administration_needs_the_admin_endpoint(pg, broker):
    """Item 4: the ipc socket's mode followed the umask, and anyone who could reach
    it could resize, drain or pause a pool."""
    path = broker.url[len("ipc://"):]
    for private in (path, path + ".admin", path + ".lock"):
        assert os.stat(private).st_mode & 0o777 == 0o600, private
    assert "every user can write" in broker.log_text()  # /tmp, as the tests use
    stranger = _dealer(broker.url, b"stranger")
    for op in ("resize", "drain", "pause", "resume"):
        fields = {"max": 0} if op == "resize" else {}
        stranger.send(p.encode(op, rid=1, pool="default", **fields))
        [reply] = _replies(stranger, 1)
        assert reply["op"] == "error" and reply["code"] == p.E_FORBIDDEN, reply
        assert "admin endpoint" in reply["message"]
    stranger.close()
    assert broker.status()["pools"]["default"]["max"] == 6  # nothing changed
    out = subprocess.run([sys.executable, "-m", "poolbroker", "resize", "--broker", broker.url,
                          "--pool", "default=5"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "max 6 -> 5" in out.stdout, out.stderr


def test_tcp_beyond_loopback_is_refused_without_curve():
    out = subprocess.run([sys.executable, "-m", "poolbroker", "serve", "--bind",
                          f"tcp://0.0.0.0:{free_port()}", "--pool", "default=1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "without authentication" in out.stderr, out.stderr


def test_with_curve_only_allowed_client_keys_get_in(pg, broker_factory, tmp_path,
                                                    monkeypatch):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    for name in ("broker", "web", "stranger"):
        subprocess.run([sys.executable, "-m", "poolbroker", "keygen", name, "--dir",
                        str(keys)], check=True, capture_output=True)
    assert (keys / "web.key_secret").stat().st_mode & 0o777 == 0o600
    allowed.mkdir()
    (allowed / "web.key").write_text((keys / "web.key").read_text())
    url = f"tcp://0.0.0.0:{free_port()}"  # all interfaces: fine, with CURVE
    broker = broker_factory({"default": 2}, url=url, grace=0,
                            extra=("--curve-secret", str(keys / "broker.key_secret"),
                                   "--curve-clients", str(allowed),
                                   "--admin-bind", short_ipc("pba")))

    def status_as(client):
        env = {**os.environ, "POOLBROKER_SERVER_KEY": str(keys / "broker.key")}
        if client:
            env["POOLBROKER_CLIENT_KEY"] = str(keys / f"{client}.key_secret")
        return subprocess.run([sys.executable, "-m", "poolbroker", "status", "--json",
                               "--timeout", "2", "--broker", url.replace("0.0.0.0", "127.0.0.1")],
                              capture_output=True, text=True, env=env, timeout=30)

    assert status_as("web").returncode == 0
    denied = status_as("stranger")
    assert denied.returncode == 1 and "did not answer" in denied.stderr
    half = status_as(None)
    assert half.returncode == 1 and "needs both" in half.stderr
    monkeypatch.setenv("POOLBROKER_SERVER_KEY", str(keys / "broker.key"))
    monkeypatch.setenv("POOLBROKER_CLIENT_KEY", str(keys / "web.key_secret"))
    with ConnectionPool(pg.dsn, broker=url.replace("0.0.0.0", "127.0.0.1"), timeout=5) as pool:
        with pool.connection() as conn:
            conn.cursor().execute("SELECT 1")
    assert "CURVE: only allowed client keys" in broker.log_text()


def test_if_the_client_io_thread_dies_callers_get_a_pool_error_and_it_starts_over(
        pg, broker_factory):
    """Item 9: a dead I/O thread sent no heartbeats and no errors: callers hung
    until their timeout, and nothing ever worked again in that process."""
    broker = broker_factory({"default": 1}, ttl=2.0)
    tag = new_tag()
    with ConnectionPool(tagged(pg.dsn, tag), broker=broker.url, timeout=15) as pool:
        held = pool.getconn()
        client = LeaseClient.for_url(broker.url)
        errors: list = []

        def wait() -> None:
            try:
                pool.putconn(pool.getconn())
            except Exception as exc:  # what the caller sees
                errors.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        deadline = time.monotonic() + 5
        while pool.get_stats()["requests_waiting"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        real = client._heartbeat_frame

        def fault(*args, **kwargs):  # one injected bug in the I/O thread
            client._heartbeat_frame = real
            raise RuntimeError("injected fault")

        client._heartbeat_frame = fault
        t0 = time.monotonic()
        waiter.join(10)
        assert errors and type(errors[0]) is PoolError, errors
        assert "injected fault" in str(errors[0]) and time.monotonic() - t0 < 5
        with pytest.raises(psycopg2.Error):  # cut: it must not outlive its lease
            held.cursor().execute("SELECT 1")
        pool.putconn(held)
        with pool.connection() as conn:  # a new thread, a new identity, a new lease
            conn.cursor().execute("SELECT 1")
        assert client.deaths == 1


class ScriptedBroker:
    """A ROUTER that plays the broker by hand, to lose chosen messages."""

    def __init__(self) -> None:
        self.url = short_ipc("pbs")
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.url)

    def next(self, op: str, timeout: float = 5.0) -> tuple:
        """The next message with ``op`` (others are read and ignored): (peer, msg)."""
        deadline = time.monotonic() + timeout
        while self.sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            peer, frame = self.sock.recv_multipart()
            msg = p.decode(frame)
            if msg["op"] == op:
                return peer, msg
        raise AssertionError(f"no {op} within {timeout}s")

    def send(self, peer: bytes, op: str, **fields) -> None:
        self.sock.send_multipart([peer, p.encode(op, **fields)])

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.url[len("ipc://"):])


def test_a_lost_welcome_or_stall_check_answer_does_not_wedge_the_client():
    """Item 8: a lost welcome left the client waiting forever (no hello again), and
    a lost answer to its stall check left it 'suspect', holding grants forever."""
    broker = ScriptedBroker()
    client = LeaseClient(broker.url)
    got: list = []
    try:
        client.acquire("default", 20.0, lambda req, lease, err: got.append((lease, err)))
        broker.next("hello")  # lost: never answered
        peer, _ = broker.next("hello")  # said again
        broker.send(peer, "welcome", epoch="e1", ttl=3.0, heartbeat=0.5, rejected=[])
        _, acquire = broker.next("acquire")  # re-sent after the welcome
        broker.send(peer, "grant", rid=acquire["rid"], pool="default", lease=77, seq=1)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == [(77, None)]
        client.suspect(5.0)  # as after a freeze: confirm before using new grants
        _, first = broker.next("heartbeat")
        while "rid" not in first:
            _, first = broker.next("heartbeat")
        _, again = broker.next("heartbeat")  # the first check got no answer
        while "rid" not in again:
            _, again = broker.next("heartbeat")
        assert again["rid"] != first["rid"] and again["leases"] == [77]
        assert again["epoch"] == "e1" and again["seen"] == 1  # for the broker's reconciling
        broker.send(peer, "hb", epoch="e1", unknown=[], rid=again["rid"])
        assert client.confirmed.wait(5)
    finally:
        client.close(timeout=1)
        broker.close()


def test_a_close_the_server_was_not_seen_to_finish_keeps_its_slot_counted(pg, broker_factory):
    """Item 6: after close_timeout the lease went back while the backend lived on
    (a partition: the server notices only by TCP keepalive, hours later). Here the
    backend is frozen, so it cannot act on the close; when it thaws, it exits, the
    client sees it go, and only then is the slot free."""
    broker = broker_factory({"default": 1})
    tag = new_tag()
    with Sampler(pg.dsn, [tag]) as sampler, \
            ConnectionPool(tagged(pg.dsn, tag), broker=broker.url, timeout=10,
                           close_timeout=1.0) as pool:
        conn = pool.getconn()
        backend = conn.get_backend_pid()
        os.kill(backend, signal.SIGSTOP)
        try:
            conn.close()
            pool.putconn(conn)  # a closed connection: discarded, its lease given back
            status = broker.wait_for(
                lambda s: s["pools"]["default"].get("unconfirmed") == 1, 5)
            assert status["pools"]["default"]["leased"] == 1, status
            with pytest.raises(PoolTimeout):  # the slot is still the frozen backend's
                pool.getconn(timeout=2)
            assert count_backends(pg.dsn, tag) == 1
        finally:
            os.kill(backend, signal.SIGCONT)
        with pool.connection(timeout=10) as again:  # confirmed gone: free again
            again.cursor().execute("SELECT 1")
    assert sampler.max[tag] <= 1, f"server saw {sampler.max[tag]} connections, budget 1"
    assert "is gone after all" in broker.log_text()
