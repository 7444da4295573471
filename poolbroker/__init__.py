"""poolbroker: the broker that owns a PostgreSQL connection budget and leases slots
of it to worker processes over ZeroMQ. Applications import :mod:`poolbroker_client`."""

from .protocol import PROTOCOL_VERSION

__version__ = "0.1.0"
__all__ = ["PROTOCOL_VERSION", "__version__"]
