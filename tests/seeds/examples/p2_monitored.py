import psycopg2
from psycopg2.pool import ThreadedConnectionPool
import threading
import time

class MonitoredPool:
    """Connection pool with monitoring capabilities."""

    def __init__(self, minconn, maxconn, **db_params):
        self.pool = ThreadedConnectionPool(minconn, maxconn, **db_params)
        self.stats = {
            'connections_created': 0,
            'connections_borrowed': 0,
            'connections_returned': 0,
            'active_connections': 0
        }
        self._lock = threading.Lock()

    def getconn(self, key=None):
        """Get connection with stats tracking."""
        with self._lock:
            self.stats['connections_borrowed'] += 1
            self.stats['active_connections'] += 1

        conn = self.pool.getconn(key)

        # Test connection health
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        except psycopg2.Error:
            # Connection is bad, close it and get a new one
            self.pool.putconn(conn, close=True)
            conn = self.pool.getconn(key)
            with self._lock:
                self.stats['connections_created'] += 1

        return conn

    def putconn(self, conn, key=None, close=False):
        """Return connection with stats tracking."""
        self.pool.putconn(conn, key, close)
        with self._lock:
            self.stats['connections_returned'] += 1
            self.stats['active_connections'] -= 1

    def get_stats(self):
        """Get pool statistics."""
        with self._lock:
            return self.stats.copy()

    def health_check(self):
        """Perform pool health check."""
        try:
            conn = self.pool.getconn()
            with conn.cursor() as cur:
                cur.execute("SELECT version()")
                version = cur.fetchone()[0]
            self.pool.putconn(conn)
            return True, f"Pool healthy - {version}"
        except Exception as e:
            return False, f"Pool unhealthy - {e}"

    def closeall(self):
        """Close all connections."""
        self.pool.closeall()

# Usage
monitored_pool = MonitoredPool(
    minconn=2,
    maxconn=6,
    host="localhost",
    database="mydb",
    user="myuser",
    password="mypass"
)

# Simulate usage
def simulate_work():
    conn = monitored_pool.getconn()
    time.sleep(0.1)  # Simulate work
    monitored_pool.putconn(conn)

# Run multiple workers
threads = [threading.Thread(target=simulate_work) for _ in range(10)]
for t in threads:
    t.start()
for t in threads:
    t.join()

# Check stats
stats = monitored_pool.get_stats()
print(f"Pool stats: {stats}")

# Health check
healthy, message = monitored_pool.health_check()
print(f"Health check: {message}")

monitored_pool.closeall()
