import psycopg2
from psycopg2.pool import SimpleConnectionPool

# Create connection pool
pool = SimpleConnectionPool(
    minconn=1,
    maxconn=5,
    host="localhost",
    database="mydb",
    user="myuser",
    password="mypass"
)

# Get connection from pool
conn = pool.getconn()
try:
    with conn.cursor() as cur:
        cur.execute("SELECT * FROM users")
        users = cur.fetchall()

    # Connection is still open, can be reused
    with conn.cursor() as cur:
        cur.execute("INSERT INTO logs (message) VALUES (%s)", ("User query",))
        conn.commit()
finally:
    # Return connection to pool (don't close it)
    pool.putconn(conn)

# Get another connection (might be the same one)
conn2 = pool.getconn()
with conn2.cursor() as cur:
    cur.execute("SELECT COUNT(*) FROM users")
    count = cur.fetchone()[0]
    print(f"Total users: {count}")

pool.putconn(conn2)

# Clean up - close all connections
pool.closeall()
