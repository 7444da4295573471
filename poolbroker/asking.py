"""One request to a broker and its answer (the CLI's status and administration,
a gunicorn master's exit reports)."""

from __future__ import annotations

import os
import time
import uuid

import zmq

from . import protocol as p
from .security import apply_client_curve


def request(url: str, op: str, timeout: float = 3.0, **fields: object) -> dict:
    """Send one request to the broker at ``url`` and return its answer. Raises
    TimeoutError if it does not answer, RuntimeError if it refuses. CURVE keys come
    from the environment (see :mod:`poolbroker.security`) for non-loopback tcp."""
    ctx: zmq.Context = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, f"{op}-{os.getpid()}-{uuid.uuid4().hex}".encode())
    try:
        if url.startswith("tcp://"):
            apply_client_curve(sock)
        sock.connect(url)
        rid = 1
        sock.send(p.encode(op, rid=rid, **fields))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1):
                raise TimeoutError(f"broker at {url} did not answer within {timeout:g}s")
            msg = p.decode(sock.recv(), p.BROKER_OPS, max_bytes=p.MAX_STATUS_BYTES)
            if msg["op"] == "error":
                raise RuntimeError(f"broker at {url} answered: {msg['message']}")
            if msg.get("rid") == rid:
                return msg
    finally:
        sock.close(0)
