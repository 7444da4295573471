"""A Django database backend whose connections are leased from the broker.

::

    DATABASES = {
        "default": {
            "ENGINE": "poolbroker_client.django",
            "NAME": "app", "USER": "app", "HOST": "db",
            "OPTIONS": {"broker": "ipc:///run/app/pb.sock", "pool": "web"},
        }
    }

Everything else is Django's own PostgreSQL backend (psycopg2 or psycopg 3,
whichever Django picks). ``broker`` defaults to ``$POOLBROKER_URL`` and ``pool``
to ``$POOLBROKER_POOL``, then ``"default"``. A connection Django closes (at the
end of every request with the default ``CONN_MAX_AGE = 0``) goes back to this
process's pool, not to the server. Django is the optional extra
``poolbroker[django]``.
"""
