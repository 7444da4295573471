"""The wire protocol between lease clients and the broker.

Every message is one ZeroMQ frame holding a msgpack map with at least ``v`` (the
protocol version) and ``op`` (what the message is). Client requests that expect a
reply carry ``rid``, a request id chosen by the client: a retried request with the
same ``rid`` is idempotent (the broker answers it again, it never grants twice).

Client -> broker ops and their fields:

==========  ==================================================================
hello       ``pid`` int, ``host`` str, ``name`` str, ``leases`` list of
            ``[lease_id, pool]`` the client already holds (re-announce),
            optional ``ppid`` int, optional ``gen`` int (which of this client's
            hellos it is: echoed in the ``welcome``)
acquire     ``rid`` int, ``pool`` str, ``timeout`` float seconds (0: grant now
            or answer a timeout at once, never queued); optional ``ahead`` true:
            asked ahead of need, granted only from room to spare (another slot
            free besides, no request waited there lately), else a timeout at
            once, whatever ``timeout`` says
cancel      ``rid`` int: nobody waits for that request any more
release     ``lease`` int: the connection is closed and the server saw it go;
            optional ``unconfirmed`` true: closed, but the server was not seen to
            close it (the broker keeps counting the slot until a plain release)
released    (a field, not an op) optional on ``acquire``, ``heartbeat`` and
            ``release``: list of lease ids given back as by as many plain
            releases, handled before the message itself (a release costs no
            message of its own)
connected   ``lease`` int, ``backend_pid`` int, optional ``user`` and ``db`` (the
            session's role and database): for audit and fencing
heartbeat   ``idle`` map pool -> int, ``leases`` list of int (every lease the
            client holds, grants held back included), optional ``rid`` (echoed in
            ``hb``: a client checking its leases after a stall), optional
            ``epoch`` and ``seen``: the highest grant ``seq`` received from that
            broker run (the broker reconciles lost grants and releases with it)
bye         (nothing): the process is leaving, release everything it holds
status      ``rid`` int
resize      ``rid`` int, ``pool`` str, ``max`` int (administration)
drain       ``rid`` int, ``pool`` str (administration; also pause, resume)
==========  ==================================================================

Broker -> client ops:

==========  ==================================================================
welcome     ``epoch`` str, ``ttl`` float, ``heartbeat`` float, ``rejected``
            list of lease ids from hello that the broker did not take back,
            ``gen`` (when the hello had one) the hello it answers
grant       ``rid`` int, ``pool`` str, ``lease`` int, ``seq`` int (this broker
            run's grant counter: a client echoes the highest it has seen)
error       ``rid`` int or nil, ``code`` str, ``message`` str
recall      ``pool`` str, ``count`` int: how many leases the broker wants back
            from this client in that pool (a target, not an increment);
            ``contended`` bool (optional): requests wait in that pool, so
            connections idle longer than a move costs should go back
hb          ``epoch`` str, ``unknown`` list of lease ids the broker does not
            know (expired or lost): the client must stop using them
status      ``rid`` int, ``data`` map (see :mod:`poolbroker.ledger` snapshot)
done        ``rid`` int, ``message`` str: an administration request took effect
==========  ==================================================================

:func:`decode` validates everything it returns; whatever is malformed raises
:class:`ProtocolError`, which the broker turns into an ``error`` reply or drops.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import msgpack

PROTOCOL_VERSION = 1

#: Largest frame either side accepts. Also set as ZMQ_MAXMSGSIZE on the broker's
#: socket so that a huge frame is dropped by libzmq before it is even buffered.
MAX_MESSAGE_BYTES = 64 * 1024
MAX_NAME_CHARS = 200
MAX_LIST_ITEMS = 4096
MAX_TIMEOUT = 24 * 3600.0
_UINT_LIMIT = 2**63  # ids and counts are unsigned 63-bit
MAX_TEXT_CHARS = 4 * MAX_NAME_CHARS
#: What ``poolbroker status`` accepts: a status lists every client, and a broker
#: with a few hundred clients answers with more than MAX_MESSAGE_BYTES.
MAX_STATUS_BYTES = 64 * MAX_MESSAGE_BYTES

# Error codes the broker sends. Clients switch on these, never on the message text.
E_BAD_MESSAGE = "bad_message"
E_BAD_VERSION = "bad_version"
E_UNKNOWN_OP = "unknown_op"
E_UNKNOWN_POOL = "unknown_pool"
E_UNKNOWN_CLIENT = "unknown_client"
E_TIMEOUT = "timeout"
E_TOO_MANY_REQUESTS = "too_many_requests"
E_TOO_MANY_CLIENTS = "too_many_clients"
E_DRAINING = "draining"
E_FORBIDDEN = "forbidden"


class ProtocolError(ValueError):
    """A frame that is not a valid message. ``code`` is one of the ``E_*`` codes;
    ``rid`` is the request id if one could be read, so the reply can name it."""

    def __init__(self, code: str, message: str, rid: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.rid = rid


def shown(value: Any, limit: int = 60) -> str:
    """Render a value that came from a peer for a log line or an error text.

    Strings and bytes are clipped and escaped to ASCII (no control characters or
    terminal escapes reach a log); small integers, booleans and None are shown as
    they are; anything else is named by its type only. Never ``repr()`` an untrusted
    value: a list nested a thousand deep exhausts the stack.
    """
    if value is None or isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value) if -(10**20) < value < 10**20 else "a huge int"
    if isinstance(value, (str, bytes)):
        text = ascii(value[:limit])
        return text + "..." if len(value) > limit else text
    return f"a {type(value).__name__}"


def _uint(v: Any) -> bool:
    # (``type(v) is int``: msgpack makes exact ints, and it rules out bool in one
    # test; this runs for every id of every heartbeat)
    return type(v) is int and 0 <= v < _UINT_LIMIT


def _num(v: Any) -> bool:
    # (NaN fails every comparison, infinity the upper bound)
    return (type(v) is float or type(v) is int) and 0 <= v <= MAX_TIMEOUT


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _name(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= MAX_NAME_CHARS


def _text(v: Any) -> bool:
    return isinstance(v, str) and len(v) <= MAX_TEXT_CHARS


def _uint_list(v: Any) -> bool:
    if type(v) is not list or len(v) > MAX_LIST_ITEMS:
        return False
    for x in v:  # (_uint inline: this runs for every id of every heartbeat)
        if type(x) is not int or not 0 <= x < _UINT_LIMIT:
            return False
    return True


def _busy_pairs(v: Any) -> bool:
    """[[lease id, seconds checked out], ...]"""
    if type(v) is not list or len(v) > MAX_LIST_ITEMS:
        return False
    # (the checks inline, no call per item: half the cost of an idle fleet's beats)
    for x in v:
        if type(x) is not list or len(x) != 2:
            return False
        lease, secs = x
        if type(lease) is not int or not 0 <= lease < _UINT_LIMIT:
            return False
        kind = type(secs)  # seconds: finite, not negative (NaN fails both)
        if (kind is not float and kind is not int) or not 0 <= secs < math.inf:
            return False
    return True


def _lease_pairs(v: Any) -> bool:
    return (
        isinstance(v, list)
        and len(v) <= MAX_LIST_ITEMS
        and all(
            isinstance(p, list) and len(p) == 2 and _uint(p[0]) and _name(p[1]) for p in v
        )
    )


def _idle_map(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and len(v) <= MAX_LIST_ITEMS
        and all(_name(k) and _uint(n) for k, n in v.items())
    )


def _any_map(v: Any) -> bool:
    return isinstance(v, dict)


def _optional_uint(v: Any) -> bool:
    return v is None or _uint(v)


# op -> {field: validator}. Every listed field is required; unknown fields are
# ignored so that a newer peer can add optional ones without a version bump.
CLIENT_OPS: dict[str, dict[str, Any]] = {
    "hello": {"pid": _uint, "host": _text, "name": _text, "leases": _lease_pairs},
    "acquire": {"rid": _uint, "pool": _name, "timeout": _num},
    "cancel": {"rid": _uint},
    "release": {"lease": _uint},
    "connected": {"lease": _uint, "backend_pid": _uint},
    "heartbeat": {"idle": _idle_map, "leases": _uint_list},
    "bye": {},
    "status": {"rid": _uint},
    # a parent (a gunicorn master) reports that its child ``pid`` on ``host`` has
    # exited: its leases are fenced at once instead of after the TTL
    "exited": {"rid": _uint, "pid": _uint, "host": _text, "parent": _uint},
    # administration (poolbroker resize / drain / pause / resume)
    "resize": {"rid": _uint, "pool": _name, "max": _uint},
    "drain": {"rid": _uint, "pool": _name},
    "pause": {"rid": _uint, "pool": _name},
    "resume": {"rid": _uint, "pool": _name},
}

# op -> {field: validator} for optional fields: checked when present.
OPTIONAL_FIELDS: dict[str, dict[str, Any]] = {
    "connected": {"user": _name, "db": _name},
    # ppid: its parent's pid (who may report it exited); gen: which of the
    # client's hellos this is, echoed in the welcome
    "hello": {"ppid": _uint, "gen": _uint},
    "welcome": {"gen": _uint},  # broker -> client
    # ack: False when the client needs no answer unless something is wrong (a
    # client that does not say gets one every time, as before)
    # busy: the leases whose connections are checked out, and for how long
    "heartbeat": {"rid": _uint, "epoch": _text, "seen": _uint, "ack": _bool,
                  "busy": _busy_pairs, "released": _uint_list},
    # ahead: asked ahead of need, granted only from room to spare (never queued)
    "acquire": {"released": _uint_list, "ahead": _bool},
    # leases: also list every lease and waiter (poolbroker clients)
    "status": {"leases": _bool},
    "release": {"unconfirmed": _bool, "released": _uint_list},
    "grant": {"seq": _uint},  # broker -> client
    "recall": {"contended": _bool},  # broker -> client
}

#: The ops whose ``released`` field is honoured (validated in OPTIONAL_FIELDS).
CARRY_RELEASES = frozenset({"acquire", "heartbeat", "release"})
#: At most this many lease ids in one ``released`` field (within MAX_LIST_ITEMS).
MAX_RELEASED = 1000

BROKER_OPS: dict[str, dict[str, Any]] = {
    "welcome": {"epoch": _text, "ttl": _num, "heartbeat": _num, "rejected": _uint_list},
    "grant": {"rid": _uint, "pool": _name, "lease": _uint},
    "error": {"rid": _optional_uint, "code": _text, "message": _text},
    "recall": {"pool": _name, "count": _uint},
    "hb": {"epoch": _text, "unknown": _uint_list},
    "status": {"rid": _uint, "data": _any_map},
    "done": {"rid": _uint, "message": _text},
}


def error_fields(rid: int | None, code: str, message: str) -> dict[str, Any]:
    """The fields of an ``error`` reply, the message clipped so the peer can
    always decode it (an unreadable error would leave its caller waiting)."""
    if len(message) > MAX_TEXT_CHARS:
        message = message[: MAX_TEXT_CHARS - 3] + "..."
    return {"rid": rid, "code": code, "message": message}


def known_names(names: Any, limit: int = 10) -> str:
    """``a, b, c`` for an error text, at most ``limit`` names (and how many more)."""
    names = sorted(names)
    text = ", ".join(names[:limit])
    return text + f" and {len(names) - limit} more" if len(names) > limit else text


class _Packers(threading.local):
    """One msgpack Packer per thread: ``msgpack.packb`` builds a new one for
    every message, which cost as much as the packing itself. (A Packer keeps a
    buffer and msgpack does not make it thread-safe; under the GIL one
    ``pack`` call runs whole, but a free-threaded build makes no such promise.)"""

    def __init__(self) -> None:
        self.packer = msgpack.Packer(use_bin_type=True)


_packers = _Packers()


def encode(op: str, **fields: Any) -> bytes:
    """Pack one message. Fields are not validated here: we trust our own code,
    and the tests check that everything we send decodes on the other side."""
    fields["v"] = PROTOCOL_VERSION
    fields["op"] = op
    frame: bytes = _packers.packer.pack(fields)  # msgpack is untyped
    return frame


def decode(
    frame: bytes, ops: dict[str, dict[str, Any]] = CLIENT_OPS, *,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> dict[str, Any]:
    """Unpack and validate one frame against ``ops`` (the set of ops the receiver
    accepts). Returns the message map; raises :class:`ProtocolError` otherwise, and
    nothing else, whatever the frame holds. ``max_bytes`` raises the size limit
    for a reader that expects large answers (``poolbroker status``)."""
    try:
        return _decode(frame, ops, max_bytes)
    except ProtocolError:
        raise
    except Exception as exc:  # RecursionError, MemoryError from hostile nesting, ...
        raise ProtocolError(E_BAD_MESSAGE, f"undecodable message ({type(exc).__name__})") \
            from None


def _decode(frame: bytes, ops: dict[str, dict[str, Any]], max_bytes: int) -> dict[str, Any]:
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError(E_BAD_MESSAGE, "frame is not bytes")
    if len(frame) > max_bytes:
        raise ProtocolError(E_BAD_MESSAGE, f"frame of {len(frame)} bytes exceeds the limit")
    # a larger frame may hold longer lists (a status with many clients)
    max_items = MAX_LIST_ITEMS * max(1, max_bytes // MAX_MESSAGE_BYTES)
    try:
        msg = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=max_items,
            max_map_len=max_items,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise ProtocolError(E_BAD_MESSAGE, f"not msgpack: {type(exc).__name__}") from None
    if type(msg) is not dict:  # (msgpack makes exact dicts)
        raise ProtocolError(E_BAD_MESSAGE, "message is not a map")
    if msg.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            E_BAD_VERSION,
            f"protocol version {shown(msg.get('v'))} not supported (want {PROTOCOL_VERSION})",
            _rid(msg),
        )
    op: Any = msg.get("op")
    required = ops.get(op) if type(op) is str else None
    if required is None:
        raise ProtocolError(E_UNKNOWN_OP, f"unknown op {shown(op, 40)}", _rid(msg))
    for field, valid in required.items():
        if field not in msg or not valid(msg[field]):
            raise ProtocolError(E_BAD_MESSAGE, f"{op}: field {field!r} missing or invalid",
                                _rid(msg))
    optional = OPTIONAL_FIELDS.get(op)
    if optional:
        for field, valid in optional.items():
            if field in msg and not valid(msg[field]):
                raise ProtocolError(E_BAD_MESSAGE, f"{op}: field {field!r} invalid", _rid(msg))
    return msg


def _rid(msg: dict[str, Any]) -> int | None:
    """The request id an error about ``msg`` answers (None if it has no valid one)."""
    rid = msg.get("rid")
    return rid if _uint(rid) else None
