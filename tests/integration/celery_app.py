"""A Celery app for the test, as the README's example: a prefork worker whose child
processes each open a pool (worker_process_init) and close it when they stop
(worker_process_shutdown). Messages and results go through directories (kombu's
filesystem transport), so the test needs no Redis or RabbitMQ."""

import os

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown

from poolbroker_client import ConnectionPool

folder = os.environ["PB_CELERY_DIR"]
app = Celery("pbtest", broker="filesystem://", backend=f"file://{folder}/results")
app.conf.broker_transport_options = {"data_folder_in": f"{folder}/queue",
                                     "data_folder_out": f"{folder}/queue",
                                     "processed_folder": f"{folder}/done",
                                     # else a ./control directory in the working tree
                                     "control_folder": f"{folder}/control"}
app.conf.worker_hijack_root_logger = False

pool = None


@worker_process_init.connect
def open_pool(**_):
    global pool
    pool = ConnectionPool(os.environ["PB_DSN"])  # POOLBROKER_URL from the environment


@worker_process_shutdown.connect
def close_pool(**_):
    if pool is not None:
        pool.close()  # the leases go back now, not after the TTL


@app.task
def backend_pid(sleep):
    with pool.connection() as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid(), pg_sleep(%s)", (sleep,))
            return [os.getpid(), cur.fetchone()[0]]
