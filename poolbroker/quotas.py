"""Quotas between kinds of clients in one pool (like PgBouncer's ``reserve_pool``
and per-user limits): a cap a group may hold at most, and a reserve only the
group may use. A client belongs to the first group whose pattern (a shell-style
glob, ``fnmatch``) matches its application name: ``$POOLBROKER_APPLICATION_NAME``,
else its program's name (``gunicorn``, ``celery``, ``worker.py``, with a
multiprocessing child's name after a slash).

In the TOML file::

    [pools]
    default = 20

    [quotas.default]
    "batch*" = { max = 5 }        # batch jobs together hold at most 5
    "web*" = { reserve = 4 }      # 4 slots nobody but web clients may take

Pure data and parsing; the ledger applies them.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Dict, List, Optional


class QuotaError(ValueError):
    """A quota that cannot be applied; the message names it."""


@dataclass(frozen=True)
class Quota:
    """One group of a pool: clients whose name matches ``pattern`` hold at most
    ``max`` leases together (None: no cap), and ``reserve`` slots are kept for
    them (others never take those)."""

    pattern: str
    max: Optional[int] = None
    reserve: int = 0

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)

    def describe(self) -> str:
        parts = [] if self.max is None else [f"max {self.max}"]
        parts += [f"reserve {self.reserve}"] if self.reserve else []
        return f"{self.pattern!r}: {', '.join(parts)}"


def group_of(quotas: List[Quota], name: str) -> Optional[int]:
    """The index of the first quota whose pattern matches ``name``, else None."""
    for index, quota in enumerate(quotas):
        if quota.matches(name):
            return index
    return None


def parse(table: Any, pools: Dict[str, int], where: str) -> Dict[str, List[Quota]]:
    """The ``[quotas]`` table: ``{pool: {pattern: {max, reserve}}}`` checked
    against the pools (their max bounds the reserves). Raises QuotaError."""
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise QuotaError(f"{where}: [quotas] must be a table of pools")
    result: Dict[str, List[Quota]] = {}
    for pool, groups in table.items():
        if pool not in pools:
            raise QuotaError(f"{where}: quotas for pool {pool!r}, which is not in [pools]")
        if not isinstance(groups, dict) or not groups:
            raise QuotaError(f"{where}: [quotas.{pool}] must map patterns to "
                             "{ max = N } and/or { reserve = N }")
        quotas = []
        for pattern, limits in groups.items():
            label = f"{where}: quota {pattern!r} of pool {pool!r}"
            if not isinstance(limits, dict) or not limits:
                raise QuotaError(f"{label}: expected {{ max = N, reserve = N }}")
            unknown = set(limits) - {"max", "reserve"}
            if unknown:
                raise QuotaError(f"{label}: unknown key(s) {', '.join(sorted(unknown))} "
                                 "(max, reserve)")
            for key in ("max", "reserve"):
                value = limits.get(key)
                if value is not None and (not isinstance(value, int)
                                          or isinstance(value, bool) or value < 0):
                    raise QuotaError(f"{label}: {key} must be an integer >= 0, "
                                     f"not {value!r}")
            quota = Quota(pattern, limits.get("max"), limits.get("reserve") or 0)
            if quota.max is not None and quota.reserve > quota.max:
                raise QuotaError(f"{label}: reserve {quota.reserve} is above its max "
                                 f"{quota.max}")
            quotas.append(quota)
        reserved = sum(q.reserve for q in quotas)
        if reserved > pools[pool]:
            raise QuotaError(f"{where}: pool {pool!r} reserves {reserved} slots, more than "
                             f"its max {pools[pool]}")
        result[pool] = quotas
    return result
