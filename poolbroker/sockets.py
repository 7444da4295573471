"""Waiting on ZeroMQ sockets with ``select.poll`` (broker loop and lease client).

A socket's ``ZMQ_FD`` is edge-triggered: it signals that something *happened* to
the socket since its last use, not that a message is waiting, and any use of the
socket (a send too) may consume that signal. So whoever uses a socket reads it
until :func:`readable` is false before waiting on its descriptor again; then the
next arrival signals the descriptor. (``zmq.Poller`` does this for you, at a cost
the broker's and the client's hot loops do not want to pay on every turn.)
"""

from __future__ import annotations

from typing import cast

import zmq

# (pyzmq converts a plain int option to its enum: passing the enum is faster)
_EVENTS, _POLLIN, _FD = zmq.EVENTS, int(zmq.POLLIN), zmq.FD
NOBLOCK = int(zmq.NOBLOCK)


def readable(sock: zmq.Socket) -> bool:
    """True if a message waits on ``sock`` (updates the socket's state)."""
    return bool(cast(int, sock.getsockopt(_EVENTS)) & _POLLIN)


def descriptor(sock: zmq.Socket) -> int:
    """The descriptor to poll for ``sock`` (edge-triggered: see above)."""
    return cast(int, sock.getsockopt(_FD))
