"""Drop-in replacements for existing pools, with the broker's budget added:

* :mod:`poolbroker_client.compat.psycopg2` for ``psycopg2.pool``;
* :mod:`poolbroker_client.compat.psycopg2_pool` for psycopg2-pool (``psycopg2_pool``);
* for psycopg_pool, :class:`poolbroker_client.ConnectionPool` itself.
"""
