"""A minimal Django project on poolbroker's backend (the broker and the database
from the environment the test sets)."""

import os

SECRET_KEY = "poolbroker-test"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "djproject.urls"
INSTALLED_APPS: list = []
MIDDLEWARE: list = []
USE_TZ = True
DATABASES = {
    "default": {
        "ENGINE": "poolbroker_client.django",
        "NAME": "postgres",
        "USER": "postgres",
        "HOST": "127.0.0.1",
        "PORT": os.environ["PB_PG_PORT"],
        "OPTIONS": {"broker": os.environ["PB_BROKER"], "pool": "default",
                    "application_name": os.environ["PB_TAG"]},
    }
}
