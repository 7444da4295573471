import psycopg2
from psycopg2.pool import ThreadedConnectionPool, PoolError
import time
import logging

logger = logging.getLogger(__name__)

class ResilientPool:
    """Connection pool with error recovery."""

    def __init__(self, minconn, maxconn, **db_params):
        self.minconn = minconn
        self.maxconn = maxconn
        self.db_params = db_params
        self.pool = None
        self._create_pool()

    def _create_pool(self):
        """Create or recreate pool."""
        try:
            if self.pool:
                self.pool.closeall()

            self.pool = ThreadedConnectionPool(
                self.minconn, self.maxconn, **self.db_params
            )
            logger.info("Pool created successfully")
        except Exception as e:
            logger.error(f"Failed to create pool: {e}")
            raise

    def get_connection(self, retry_count=3):
        """Get connection with retry logic."""
        for attempt in range(retry_count):
            try:
                if not self.pool:
                    self._create_pool()

                conn = self.pool.getconn()

                # Test connection
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")

                return conn

            except PoolError as e:
                logger.warning(f"Pool exhausted (attempt {attempt + 1}): {e}")
                if attempt < retry_count - 1:
                    time.sleep(0.1 * (attempt + 1))  # Exponential backoff
                else:
                    raise

            except psycopg2.OperationalError as e:
                logger.error(f"Database connection error (attempt {attempt + 1}): {e}")
                if attempt < retry_count - 1:
                    # Try to recreate pool
                    self._create_pool()
                    time.sleep(0.5 * (attempt + 1))
                else:
                    raise

    def return_connection(self, conn, close_on_error=True):
        """Return connection with error handling."""
        try:
            if conn.closed:
                logger.warning("Returning closed connection")
                return

            # Check if connection is in a transaction
            if conn.status != 1:  # STATUS_READY
                conn.rollback()
                logger.info("Rolled back transaction before returning connection")

            self.pool.putconn(conn)

        except Exception as e:
            logger.error(f"Error returning connection: {e}")
            if close_on_error:
                try:
                    self.pool.putconn(conn, close=True)
                except:
                    pass

    def close(self):
        """Close pool."""
        if self.pool:
            self.pool.closeall()
            self.pool = None

# Usage
resilient_pool = ResilientPool(
    minconn=1,
    maxconn=5,
    host="localhost",
    database="mydb",
    user="myuser",
    password="mypass"
)

try:
    conn = resilient_pool.get_connection()
    with conn.cursor() as cur:
        cur.execute("SELECT * FROM users LIMIT 1")
        result = cur.fetchone()
        print(f"Query result: {result}")
    resilient_pool.return_connection(conn)
except Exception as e:
    print(f"Error: {e}")
finally:
    resilient_pool.close()
