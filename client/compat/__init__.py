"""Drop-in replacements for existing pools, with the broker's budget added:

* :mod:`poolbroker_client.compat.psycopg2` for ``psycopg2.pool``;
* :mod:`poolbroker_client.compat.psycopg2_pool` for psycopg2-pool (``psycopg2_pool``);
* :mod:`poolbroker_client.compat.psycopg_pool` for psycopg_pool (psycopg 3, sync and
  async; needs psycopg 3: ``poolbroker[psycopg]``).
"""
