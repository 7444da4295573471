import psycopg2
from psycopg2.pool import ThreadedConnectionPool, PoolError
import contextlib
import logging

# Configure logging
logging.basicConfig(level=logging.INFO)
logger = logging.getLogger(__name__)

class ManagedConnectionPool:
    """Wrapper for enhanced pool management."""

    def __init__(self, minconn, maxconn, **db_params):
        self.pool = ThreadedConnectionPool(minconn, maxconn, **db_params)
        self.logger = logger

    @contextlib.contextmanager
    def get_connection(self):
        """Context manager for automatic connection handling."""
        conn = None
        try:
            conn = self.pool.getconn()
            self.logger.info("Connection acquired from pool")
            yield conn
        except PoolError as e:
            self.logger.error(f"Pool error: {e}")
            raise
        except Exception as e:
            if conn:
                conn.rollback()
            self.logger.error(f"Database error: {e}")
            raise
        finally:
            if conn:
                self.pool.putconn(conn)
                self.logger.info("Connection returned to pool")

    def execute_query(self, query, params=None):
        """Execute query with automatic connection management."""
        with self.get_connection() as conn:
            with conn.cursor() as cur:
                cur.execute(query, params)
                if cur.description:  # SELECT query
                    return cur.fetchall()
                else:  # INSERT/UPDATE/DELETE
                    conn.commit()
                    return cur.rowcount

    def close(self):
        """Close all pool connections."""
        self.pool.closeall()
        self.logger.info("Pool closed")

# Usage
managed_pool = ManagedConnectionPool(
    minconn=2,
    maxconn=8,
    host="localhost",
    database="mydb",
    user="myuser",
    password="mypass"
)

try:
    # Simple query execution
    users = managed_pool.execute_query("SELECT id, name FROM users LIMIT 5")
    for user in users:
        print(f"User: {user[1]}")

    # Insert with parameters
    rows_affected = managed_pool.execute_query(
        "INSERT INTO logs (message, level) VALUES (%s, %s)",
        ("Application started", "INFO")
    )
    print(f"Inserted {rows_affected} rows")

    # Using context manager directly
    with managed_pool.get_connection() as conn:
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("INSERT INTO users (name) VALUES (%s)", ("Alice",))
            cur.execute("INSERT INTO profiles (user_id, bio) VALUES (currval('users_id_seq'), %s)", ("Bio",))
            conn.commit()

finally:
    managed_pool.close()
