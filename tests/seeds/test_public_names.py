"""Every public name of the originals exists in the drop-ins: module-level names,
and the methods and attributes (without a leading underscore) of their pools'
classes and instances."""

import inspect

import psycopg2.pool
import psycopg2_pool
import psycopg_pool
import pytest

from poolbroker_client.compat import psycopg2 as compat_p2
from poolbroker_client.compat import psycopg2_pool as compat_p2pool
from poolbroker_client.compat import psycopg_pool as compat_pp

pytestmark = pytest.mark.integration

# psycopg_pool's task queue (MaintenanceTask objects run by its worker threads):
# the drop-in has no such queue, and the drop-in's documentation says so.
ABSENT_ON_PURPOSE = {"run_task", "schedule_task", "worker"}


def public(obj):
    return {name for name in dir(obj) if not name.startswith("_")}


def module_names(mod):
    """The names a module defines itself (not those it imports)."""
    if hasattr(mod, "__all__"):
        return set(mod.__all__)
    return {name for name, value in vars(mod).items()
            if not name.startswith("_") and getattr(value, "__module__", None) == mod.__name__}


@pytest.mark.parametrize("original, dropin", [
    (psycopg2.pool, compat_p2), (psycopg2_pool, compat_p2pool), (psycopg_pool, compat_pp)])
def test_module_level_names(original, dropin):
    missing = module_names(original) - set(dir(dropin))
    assert not missing


def pairs(pg, broker):
    dsn = pg.dsn
    url = f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
    b = {"broker": broker.url}
    yield (psycopg2.pool.SimpleConnectionPool(1, 2, dsn),
           compat_p2.SimpleConnectionPool(1, 2, dsn, **b))
    yield (psycopg2.pool.ThreadedConnectionPool(1, 2, dsn),
           compat_p2.ThreadedConnectionPool(1, 2, dsn, **b))
    yield psycopg2_pool.ConnectionPool(dsn=dsn), compat_p2pool.ConnectionPool(dsn=dsn, **b)
    yield (psycopg2_pool.ThreadSafeConnectionPool(dsn=dsn),
           compat_p2pool.ThreadSafeConnectionPool(dsn=dsn, **b))
    for name in ("ConnectionPool", "NullConnectionPool", "AsyncConnectionPool",
                 "AsyncNullConnectionPool"):
        yield (getattr(psycopg_pool, name)(url, open=False),
               getattr(compat_pp, name)(url, open=False, **b))


def test_pool_names_and_kinds(pg, broker):
    for original, dropin in pairs(pg, broker):
        kind = type(original).__name__
        missing = public(original) - public(dropin) - ABSENT_ON_PURPOSE
        assert not missing, f"{kind}: {sorted(missing)}"
        for name in public(original) - ABSENT_ON_PURPOSE:
            a, b = getattr(original, name), getattr(dropin, name)
            # same kind of thing: a method stays a method (async stays async), a
            # value stays a value of the same type
            assert callable(a) == callable(b), f"{kind}.{name}"
            if callable(a):
                assert inspect.iscoroutinefunction(a) == inspect.iscoroutinefunction(b), \
                    f"{kind}.{name}"
            elif a is not None:
                assert isinstance(b, type(a)), f"{kind}.{name}: {a!r} vs {b!r}"
        for pool in (original, dropin):
            close = getattr(pool, "closeall", None) or getattr(pool, "clear", None)
            if close is not None and not getattr(pool, "closed", False):
                close()


def test_constructor_signatures_match(pg, broker):
    for name in ("ConnectionPool", "NullConnectionPool", "AsyncConnectionPool",
                 "AsyncNullConnectionPool"):
        ours = inspect.signature(getattr(compat_pp, name))
        theirs = inspect.signature(getattr(psycopg_pool, name))
        if name.startswith(("Null", "AsyncNull")):  # ours pass the rest through **kwargs
            assert ours.parameters["min_size"].default == theirs.parameters["min_size"].default
            continue
        for param in theirs.parameters.values():
            mine = ours.parameters.get(param.name)
            assert mine is not None, f"{name}({param.name}=...) missing"
            assert mine.kind == param.kind, f"{name}({param.name})"
            if param.name != "connection_class":
                assert mine.default == param.default, f"{name}({param.name})"
