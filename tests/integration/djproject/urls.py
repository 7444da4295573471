import os

from django.db import connection, transaction
from django.http import JsonResponse
from django.urls import path


def index(request):
    with connection.cursor() as cur:
        cur.execute("SELECT pg_backend_pid(), pg_sleep(0.005)")
        backend = cur.fetchone()[0]
    if request.GET.get("write"):
        with transaction.atomic(), connection.cursor() as cur:
            cur.execute(f"INSERT INTO {os.environ['PB_TABLE']} (worker) VALUES (%s)",
                        [os.getpid()])
    return JsonResponse({"worker": os.getpid(), "backend": backend,
                         "driver": connection.Database.__name__})


urlpatterns = [path("", index)]
