"""The ``poolbroker`` command: ``serve`` runs a broker, ``status`` asks one."""

from __future__ import annotations

import argparse
import grp
import json
import logging
import os
import sys
from typing import Dict, List, Optional

import zmq

from . import protocol as p
from . import views
from .asking import request
from .config import ConfigError
from .config import load as load_config
from .fencing import FenceConfigError
from .metrics import MetricsError
from .metrics import parse_address as parse_metrics_address
from .security import InsecureEndpoint, default_admin_url, keygen
from .server import AddressInUse, Broker

log = logging.getLogger("poolbroker")

DEFAULT_TTL = 4.0
DEFAULT_MAX_CLIENTS = 1000
DEFAULT_MAX_WAITING = 10000


def _env_int(name: str) -> Optional[int]:
    """An integer from the environment, or None; ValueError names the variable."""
    text = os.environ.get(name, "")
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"${name} must be an integer, not {text!r}") from None


def _parse_pool(text: str) -> tuple:
    name, sep, size = text.partition("=")
    if not sep or not name or not size.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=MAX (e.g. default=10), got {text!r}")
    if len(name) > p.MAX_NAME_CHARS:
        raise argparse.ArgumentTypeError(f"pool name too long: {name[:40]}...")
    return name, int(size)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolbroker",
        description="One PostgreSQL connection budget shared by every process of an application.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the broker")
    serve.add_argument("--bind", default=os.environ.get("POOLBROKER_URL"),
                       help="ZeroMQ endpoint, ipc://PATH or tcp://HOST:PORT "
                            "(default: $POOLBROKER_URL)")
    serve.add_argument("--pool", action="append", type=_parse_pool, default=[],
                       metavar="NAME=MAX", help="a pool and its budget; repeat for more pools "
                       "(wins over the config file)")
    serve.add_argument("--config", default=None, metavar="FILE",
                       help="TOML file with [pools] (and optionally bind, ttl); "
                            "re-read on SIGHUP")
    serve.add_argument("--ttl", type=float, default=None,
                       help="seconds without a heartbeat after which a client's leases expire "
                            f"(default {DEFAULT_TTL})")
    serve.add_argument("--max-waiting-per-client", type=int, default=1000,
                       help="queued lease requests one client may have (default 1000)")
    serve.add_argument("--max-clients", type=int, default=None,
                       help="client processes the broker serves at once; more are refused "
                            f"(like PgBouncer's max_client_conn; default {DEFAULT_MAX_CLIENTS}, "
                            "$POOLBROKER_MAX_CLIENTS, max_clients in the config file)")
    serve.add_argument("--max-waiting", type=int, default=None,
                       help="lease requests queued in all pools; more are refused with "
                            f"too_many_requests (default {DEFAULT_MAX_WAITING}, "
                            "$POOLBROKER_MAX_WAITING, max_waiting in the config file)")
    serve.add_argument("--grace", type=float, default=None,
                       help="seconds to grant nothing after a start that may follow a crash, "
                            "while clients re-announce their leases (default: max(ttl, 3))")
    serve.add_argument("--state-dir", default=None,
                       help="where the state file lives (default: beside the ipc socket, "
                            "else the temp directory)")
    serve.add_argument("--fence-dsn", default=os.environ.get("POOLBROKER_FENCE_DSN"),
                       help="admin connection (a superuser or a pg_signal_backend member) used "
                            "to terminate the backends of expired leases before their slots "
                            "are granted again")
    serve.add_argument("--admin-bind", default=os.environ.get("POOLBROKER_ADMIN_URL"),
                       help="where resize/drain/pause/resume are accepted, ipc or loopback tcp "
                            "(default: ipc://PATH.admin beside an ipc --bind, owner-only; "
                            "$POOLBROKER_ADMIN_URL)")
    serve.add_argument("--socket-group", default=None, metavar="GROUP",
                       help="let this group use the ipc socket (mode 0660; default: owner "
                            "only, 0600)")
    serve.add_argument("--curve-secret", default=os.environ.get("POOLBROKER_CURVE_SECRET"),
                       metavar="FILE", help="the broker's secret key file (poolbroker keygen): "
                       "CURVE encryption and authentication, required for tcp beyond loopback")
    serve.add_argument("--curve-clients", default=os.environ.get("POOLBROKER_CURVE_CLIENTS"),
                       metavar="DIR", help="directory of the public key files of the clients "
                       "allowed in (with --curve-secret)")
    serve.add_argument("--unconfirmed-hold", type=float, default=8000.0, metavar="SECONDS",
                       help="how long a slot stays counted when a client could not see the "
                            "server close its connection (default 8000: the server's TCP "
                            "keepalive notices a vanished client after about 2 h 11 min)")
    serve.add_argument("--metrics", default=None, metavar="HOST:PORT",
                       help="serve Prometheus metrics on http://HOST:PORT/metrics (needs "
                            "poolbroker[metrics]; default: $POOLBROKER_METRICS, metrics in "
                            "the config file, else none)")
    serve.add_argument("--log-level", default=os.environ.get("POOLBROKER_LOG_LEVEL", "INFO"))

    keygen = sub.add_parser("keygen", help="make a CURVE key pair (NAME.key public, "
                            "NAME.key_secret private)")
    keygen.add_argument("name", help="whose keys: e.g. broker, or web")
    keygen.add_argument("--dir", default=".", help="where to write them (default: here)")

    status = sub.add_parser("status", help="show pools, leases and clients of a running broker")
    status.add_argument("--broker", default=os.environ.get("POOLBROKER_URL"),
                        help="broker endpoint (default: $POOLBROKER_URL)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--timeout", type=float, default=3.0,
                        help="seconds to wait for the broker's answer (default 3)")
    clients = sub.add_parser("clients", help="who holds what: every lease and queued request, "
                             "the longest checkouts first (like PgBouncer's SHOW CLIENTS)")
    top = sub.add_parser("top", help="a live view of pools and clients (needs poolbroker[top])")
    for view in (clients, top):
        view.add_argument("--broker", default=os.environ.get("POOLBROKER_URL"),
                          help="broker endpoint (default: $POOLBROKER_URL)")
        view.add_argument("--pool", default=None, metavar="NAME", help="only this pool")
        view.add_argument("--timeout", type=float, default=3.0,
                          help="seconds to wait for the broker's answer (default 3)")
    clients.add_argument("--json", action="store_true", help="print one JSON list")
    top.add_argument("--interval", type=float, default=1.0,
                     help="seconds between refreshes (default 1)")
    top.add_argument("--once", action="store_true", help="print one screen and exit")
    top.add_argument("--rows", type=int, default=20, help="client rows shown (default 20)")
    for name, helptext in (("resize", "change a pool's max at run time"),
                           ("drain", "refuse new leases and ask every lease back"),
                           ("pause", "grant nothing new; requests wait"),
                           ("resume", "undo pause or drain")):
        admin = sub.add_parser(name, help=helptext)
        admin.add_argument("--broker", default=os.environ.get("POOLBROKER_URL"),
                           help="broker endpoint (default: $POOLBROKER_URL)")
        admin.add_argument("--admin", default=os.environ.get("POOLBROKER_ADMIN_URL"),
                           help="the broker's admin endpoint (default: $POOLBROKER_ADMIN_URL, "
                                "else ipc://PATH.admin beside an ipc --broker)")
        if name == "resize":
            admin.add_argument("--pool", required=True, type=_parse_pool, metavar="NAME=MAX")
        else:
            admin.add_argument("--pool", required=True, metavar="NAME")
        admin.add_argument("--timeout", type=float, default=3.0)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "status":
        return _status(args)
    if args.command == "clients":
        return _clients(args)
    if args.command == "top":
        return _top(args)
    if args.command == "keygen":
        public, secret = keygen(args.dir, args.name)
        print(f"public key: {public}  (give it to whoever must trust {args.name})\n"
              f"secret key: {secret}  (mode 0600: keep it private)")
        return 0
    return _admin(args)


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    file_config: dict = {"pools": {}, "quotas": {}, "ttl": None, "bind": None,
                         "max_clients": None, "max_waiting": None, "metrics": None}
    if args.config:
        try:
            file_config = load_config(args.config)
        except ConfigError as exc:
            print(f"poolbroker serve: {exc}", file=sys.stderr)
            return 2
    args.bind = args.bind or file_config["bind"]
    if not args.bind:
        print("poolbroker serve: no address: pass --bind URL, set POOLBROKER_URL, or put "
              "bind in the config file", file=sys.stderr)
        return 2
    overrides: Dict[str, int] = {}
    for name, size in args.pool:
        if name in overrides:
            print(f"poolbroker serve: pool {name!r} given twice", file=sys.stderr)
            return 2
        overrides[name] = size
    pools = {**file_config["pools"], **overrides}
    if not pools:
        print("poolbroker serve: no pools: pass --pool NAME=MAX or --config FILE",
              file=sys.stderr)
        return 2
    if args.ttl is None:
        args.ttl = file_config["ttl"] or DEFAULT_TTL
    if args.ttl <= 0.3:
        print("poolbroker serve: --ttl must be more than 0.3 seconds", file=sys.stderr)
        return 2
    caps = {}
    for cap, default in (("max_clients", DEFAULT_MAX_CLIENTS),
                         ("max_waiting", DEFAULT_MAX_WAITING)):
        value = getattr(args, cap)
        try:
            if value is None:
                value = _env_int(f"POOLBROKER_{cap.upper()}")
        except ValueError as exc:
            print(f"poolbroker serve: {exc}", file=sys.stderr)
            return 2
        if value is None:
            value = file_config[cap] or default
        if value < 1:
            print(f"poolbroker serve: --{cap.replace('_', '-')} must be at least 1",
                  file=sys.stderr)
            return 2
        caps[cap] = value
    metrics = args.metrics or os.environ.get("POOLBROKER_METRICS") or file_config["metrics"]
    if metrics:
        try:
            parse_metrics_address(metrics)
        except ValueError as exc:
            print(f"poolbroker serve: {exc}", file=sys.stderr)
            return 2
    gid = None
    if args.socket_group:
        try:
            gid = grp.getgrnam(args.socket_group).gr_gid
        except KeyError:
            print(f"poolbroker serve: no group named {args.socket_group}", file=sys.stderr)
            return 2
    if bool(args.curve_secret) != bool(args.curve_clients):
        print("poolbroker serve: CURVE needs both --curve-secret and --curve-clients",
              file=sys.stderr)
        return 2
    try:
        Broker(args.bind, pools, ttl=args.ttl, grace=args.grace, state_dir=args.state_dir,
               max_waiting_per_client=args.max_waiting_per_client, **caps,
               config_path=args.config, pool_overrides=overrides,
               fence_dsn=args.fence_dsn, admin_bind=args.admin_bind, socket_group=gid,
               curve_secret=args.curve_secret, curve_clients=args.curve_clients,
               unconfirmed_hold=args.unconfirmed_hold, metrics_bind=metrics,
               quotas=file_config["quotas"]).run()
    except AddressInUse as exc:
        log.error("%s", exc)
        return 1
    except MetricsError as exc:
        log.error("%s; not starting", exc)
        return 2
    except (FenceConfigError, InsecureEndpoint) as exc:
        log.error("%s; not starting", exc)
        return 2
    except (ValueError, zmq.ZMQError) as exc:
        log.error("cannot serve on %s: %s", args.bind, exc)
        return 1
    return 0


def query_status(url: str, timeout: float = 3.0, leases: bool = False) -> dict:
    """The broker's status (see ``poolbroker status --json``); with ``leases``, also
    every lease and queued request under ``"leases"`` (``poolbroker clients``)."""
    fields = {"leases": True} if leases else {}
    return request(url, "status", timeout, **fields)["data"]


def _admin(args: argparse.Namespace) -> int:
    if not args.broker and not args.admin:
        print(f"poolbroker {args.command}: no address: pass --broker URL or set "
              "POOLBROKER_URL", file=sys.stderr)
        return 2
    fields: Dict[str, object] = {"pool": args.pool}
    if args.command == "resize":
        fields = {"pool": args.pool[0], "max": args.pool[1]}
    where = args.admin or (default_admin_url(args.broker) if args.broker else None)
    if not where:
        print(f"poolbroker {args.command}: administration goes to the broker's admin "
              "endpoint: pass --admin URL (the broker's --admin-bind)", file=sys.stderr)
        return 2
    try:
        answer = request(where, args.command, args.timeout, **fields)
    except _UNREACHABLE as exc:
        print(f"poolbroker {args.command}: {exc}", file=sys.stderr)
        return 1
    print(answer["message"])
    return 0


# what asking a broker can raise: it does not answer, refuses, or cannot be reached
_UNREACHABLE = (TimeoutError, RuntimeError, zmq.ZMQError, InsecureEndpoint)


def _has_broker(args: argparse.Namespace) -> bool:
    """True if ``--broker`` (or $POOLBROKER_URL) gave an address; else say so."""
    if not args.broker:
        print(f"poolbroker {args.command}: no address: pass --broker URL or set "
              "POOLBROKER_URL", file=sys.stderr)
    return bool(args.broker)


def _status(args: argparse.Namespace) -> int:
    if not _has_broker(args):
        return 2
    try:
        data = query_status(args.broker, args.timeout)
    except _UNREACHABLE as exc:
        print(f"poolbroker status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, sort_keys=True))
        return 0
    grace = f"  granting nothing for {data['grace_s']:.1f}s more" if data.get("grace_s") else ""
    print(f"broker {args.broker}  epoch {data['epoch']}  lease ttl {data['ttl']}s{grace}")
    print(f"{'pool':<20} {'max':>5} {'leased':>7} {'busy':>5} {'idle':>5} {'waiting':>8}")
    for name, pool in sorted(data["pools"].items()):
        state = "draining" if pool.get("draining") else "paused" if pool.get("paused") else ""
        print(f"{name:<20} {pool['max']:>5} {pool['leased']:>7} {pool['busy']:>5} "
              f"{pool['idle']:>5} {pool['waiting']:>8}  {state}")
    print(f"\n{len(data['clients'])} client(s)")
    for c in data["clients"]:
        leases = ", ".join(f"{k}={v}" for k, v in sorted(c["leases"].items())) or "-"
        print(f"  pid {c['pid']:<8} host {c['host']:<16} leases {leases:<20} "
              f"waiting {c['waiting']:<4} last heartbeat {c['last_heartbeat_s']:.1f}s ago"
              + (f"  ({c['name']})" if c["name"] else ""))
    return 0


def _clients(args: argparse.Namespace) -> int:
    if not _has_broker(args):
        return 2
    try:
        data = query_status(args.broker, args.timeout, leases=True)
    except _UNREACHABLE as exc:
        print(f"poolbroker clients: {exc}", file=sys.stderr)
        return 1
    if "leases" not in data:
        print(f"poolbroker clients: the broker at {args.broker} does not list leases (an "
              "older poolbroker: upgrade it)", file=sys.stderr)
        return 1
    rows = [r for r in data["leases"] if args.pool is None or r["pool"] == args.pool]
    if args.json:
        print(json.dumps(rows))
    else:
        print(views.clients_table(rows))
    return 0


def _top(args: argparse.Namespace) -> int:
    if not _has_broker(args):
        return 2
    try:
        from .top import run as run_top
    except ImportError:
        print("poolbroker top needs rich: pip install 'poolbroker[top]'", file=sys.stderr)
        return 2

    def fetch() -> dict:
        return query_status(args.broker, args.timeout, leases=True)

    try:
        return run_top(fetch, args.broker, interval=args.interval, once=args.once,
                       rows=args.rows, pool=args.pool)
    except _UNREACHABLE as exc:
        print(f"poolbroker top: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
