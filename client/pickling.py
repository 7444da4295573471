"""Pools pickle as their configuration, for multiprocessing's spawn and forkserver
start methods (and a pool passed as a task's argument).

A pool's connections, leases and threads belong to its process; what can travel
is how it was made. So a pickled pool is the class and the arguments it was
created with, and unpickling it where it does not exist creates it again from
them, once per process: every later unpickle of the same pool in that process
returns that one (a pool passed with each of a thousand tasks is one pool per
worker, not a thousand). Unpickled in the process that made it (or in a forked
child, which has it too), it is the original object.
"""

from __future__ import annotations

import threading
import uuid
import weakref
from typing import Any, Dict, Tuple, Type

# pool token -> the pool of this process made with that configuration
_pools: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()
_lock = threading.Lock()  # held while a pool is made, so two unpickles make one


class Configured:
    """Mixin for pool classes (listed first among the bases): the instance keeps
    the arguments it was created with, and pickles as them."""

    _configuration: Tuple[str, Tuple[Any, ...], Dict[str, Any]]

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        self = super().__new__(cls)
        token = uuid.uuid4().hex
        self._configuration = (token, args, kwargs)
        _pools[token] = self
        return self

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        token, args, kwargs = self._configuration
        return (_rebuild, (type(self), token, args, kwargs))


def _rebuild(cls: Type[Any], token: str, args: Tuple[Any, ...],
             kwargs: Dict[str, Any]) -> Any:
    with _lock:
        pool = _pools.get(token)
        if pool is None:
            pool = cls(*args, **kwargs)
            _pools[token] = pool  # the next unpickle of the original finds this one
        return pool
