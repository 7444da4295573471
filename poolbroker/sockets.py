"""Waiting on ZeroMQ sockets with ``select.poll`` (broker loop and lease client).

A socket's ``ZMQ_FD`` is edge-triggered: it signals that something *happened* to
the socket since its last use, not that a message is waiting, and any use of the
socket (a send too) may consume that signal. So whoever uses a socket reads it
until :func:`readable` is false before waiting on its descriptor again; then the
next arrival signals the descriptor. (``zmq.Poller`` does this for you, at a cost
the broker's and the client's hot loops do not want to pay on every turn.)
"""

from __future__ import annotations

from typing import List, cast

import zmq
from zmq.backend import Socket as _BackendSocket

# (pyzmq converts a plain int option to its enum: passing the enum is faster)
_EVENTS, _POLLIN, _FD, _RCVMORE = zmq.EVENTS, int(zmq.POLLIN), zmq.FD, zmq.RCVMORE
NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
#: ``send(sock, frame, flags)``: pyzmq's own send without its Python wrapper, which
#: only adds DRAFT options (routing_id, group); same errors, :class:`zmq.Again` too.
send = _BackendSocket.send


def readable(sock: zmq.Socket) -> bool:
    """True if a message waits on ``sock`` (updates the socket's state)."""
    # (no typing.cast: a Python call, and this runs several times per message)
    return bool(sock.getsockopt(_EVENTS) & _POLLIN)  # type: ignore[operator]


def descriptor(sock: zmq.Socket) -> int:
    """The descriptor to poll for ``sock`` (edge-triggered: see above)."""
    return cast(int, sock.getsockopt(_FD))


def receive(sock: zmq.Socket) -> List[bytes]:
    """The frames of the message waiting on the ROUTER ``sock`` (call it when
    :func:`readable`): the sender's identity first, then what it sent (one frame
    from our peers; whatever a stranger sent, all of it)."""
    # a message arrives whole and a ROUTER prefixes every one with the identity:
    # only past the second frame is there anything to ask
    frames: List[bytes] = [sock.recv(NOBLOCK), sock.recv(NOBLOCK)]
    while sock.getsockopt(_RCVMORE):
        frames.append(sock.recv(NOBLOCK))
    return frames


def send_to(sock: zmq.Socket, peer: bytes, frame: bytes) -> None:
    """Send ``frame`` to ``peer`` on the ROUTER ``sock`` without blocking
    (:class:`zmq.Again` if its queue is full)."""
    send(sock, peer, _MORE_NOBLOCK)
    send(sock, frame, NOBLOCK)
