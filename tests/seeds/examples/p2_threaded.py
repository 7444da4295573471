import psycopg2
import threading
import time
from psycopg2.pool import ThreadedConnectionPool

# Create thread-safe pool
pool = ThreadedConnectionPool(
    minconn=2,
    maxconn=10,
    host="localhost",
    database="mydb",
    user="myuser",
    password="mypass"
)

def worker_function(worker_id):
    """Worker function for multi-threading."""
    try:
        # Get connection (thread-safe)
        conn = pool.getconn()
        print(f"Worker {worker_id} got connection")

        with conn.cursor() as cur:
            # Simulate work
            cur.execute("SELECT pg_sleep(1)")
            cur.execute("SELECT %s as worker_id", (worker_id,))
            result = cur.fetchone()
            print(f"Worker {worker_id} completed: {result[0]}")

    except Exception as e:
        print(f"Worker {worker_id} error: {e}")
    finally:
        # Always return connection to pool
        pool.putconn(conn)
        print(f"Worker {worker_id} returned connection")

# Create multiple threads
threads = []
for i in range(5):
    thread = threading.Thread(target=worker_function, args=(i,))
    threads.append(thread)
    thread.start()

# Wait for all threads to complete
for thread in threads:
    thread.join()

print("All workers completed")
pool.closeall()
