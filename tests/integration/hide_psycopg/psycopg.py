# On PYTHONPATH, hides psycopg 3 so that Django falls back to psycopg2.
raise ImportError("psycopg 3 is hidden for this test")
