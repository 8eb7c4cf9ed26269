"""Celery tasks: thin wrappers over domain functions, idempotent, acknowledged late."""
