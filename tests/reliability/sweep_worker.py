"""``morag worker`` with kombu's own unacked-restore sweep running every second.

kombu restores a message whose delivery is older than the visibility timeout only on its
periodic sweep (``unacked_restore_interval`` x ``unacked_restore_throttle``, ~100 s by
default). Scenario 4 needs that sweep to fire while a long job runs, so this entry point
sets both to 1 before the worker starts; everything else is the production worker.

Run as ``python -m tests.reliability.sweep_worker worker --queues=celery``.
"""

from __future__ import annotations

from morag.cli import app
from morag.core.celery_app import celery_app

celery_app.conf.broker_transport_options = {
    **celery_app.conf.broker_transport_options,
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
}

if __name__ == "__main__":
    app()
