"""Celery tasks: thin adapters from a message to a processor and the job record."""
