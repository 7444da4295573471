"""Drop-in replacements for existing pools (psycopg2.pool, psycopg2-pool)."""
