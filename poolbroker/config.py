"""The broker's configuration file (TOML), read at start and on SIGHUP.

    bind = "ipc:///run/myapp/poolbroker.sock"   # optional; --bind wins
    ttl = 4.0                                   # optional; read at start only
    max_clients = 1000                          # optional; read at start only
    max_waiting = 10000                         # optional; read at start only
    metrics = "127.0.0.1:9187"                  # optional; Prometheus /metrics
    [pools]
    default = 20
    reports = 4
    [quotas.default]                            # optional; see poolbroker.quotas
    "batch*" = { max = 5 }
    "web*" = { reserve = 4 }

On SIGHUP the broker re-reads the file and applies the pools and their quotas: a
changed max takes effect at once (shrinking recalls idle leases first, growing
serves waiters), a new pool appears, a pool no longer listed is drained. A file
that does not parse is logged and ignored: the broker keeps running with what it
had.
"""

from __future__ import annotations

import sys
from typing import Any, Dict

from .quotas import QuotaError
from .quotas import parse as parse_quotas

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - depends on the interpreter
    import tomli as tomllib


class ConfigError(ValueError):
    pass


def load(path: str) -> Dict[str, Any]:
    """Read and check the file; raise ConfigError naming the problem."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    pools = data.get("pools")
    if not isinstance(pools, dict) or not pools:
        raise ConfigError(f"{path}: a [pools] table with at least one NAME = MAX is needed")
    for name, size in pools.items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ConfigError(f"{path}: pool {name!r}: max must be an integer >= 0, "
                              f"not {size!r}")
    if "ttl" in data and not (isinstance(data["ttl"], (int, float)) and data["ttl"] > 0.3):
        raise ConfigError(f"{path}: ttl must be a number of seconds above 0.3")
    for key in ("bind", "metrics"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"{path}: {key} must be a string")
    for cap in ("max_clients", "max_waiting"):
        value = data.get(cap)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):
            raise ConfigError(f"{path}: {cap} must be an integer >= 1, not {value!r}")
    try:
        quotas = parse_quotas(data.get("quotas"), pools, path)
    except QuotaError as exc:
        raise ConfigError(str(exc)) from None
    return {"pools": dict(pools), "quotas": quotas, "ttl": data.get("ttl"),
            "bind": data.get("bind"),
            "max_clients": data.get("max_clients"), "max_waiting": data.get("max_waiting"),
            "metrics": data.get("metrics")}
