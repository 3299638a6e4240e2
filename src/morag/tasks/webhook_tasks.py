"""Webhook delivery, on the default ``celery`` queue (services/webhooks.py has the logic).

One attempt per run, bounded by ``webhook_timeout_seconds``; a failed attempt is retried
by countdown, so a slow receiver never holds a worker between attempts.
"""

from __future__ import annotations

from morag.core.celery_app import celery_app
from morag.core.config import settings
from morag.services.jobs import get_job_store
from morag.services.webhooks import DELIVERY_TASK, LEASE_MARGIN_SECONDS, WebhookSender, retry_delay

# the POST ends at its own deadline; the limits only catch a wedged process
_SOFT_LIMIT = int(settings.webhook_timeout_seconds + LEASE_MARGIN_SECONDS / 2)


@celery_app.task(
    bind=True,
    name=DELIVERY_TASK,
    max_retries=None,
    soft_time_limit=_SOFT_LIMIT,
    time_limit=_SOFT_LIMIT + 10,
)
def deliver_webhook(self, task_id: str, state: str, nonce: str) -> str:  # type: ignore[no-untyped-def]
    """Make one attempt at the webhook owed by job ``task_id`` for reaching ``state``."""
    attempt = self.request.retries + 1
    try:
        result = WebhookSender(get_job_store(), settings).deliver(task_id, state, attempt, nonce)
    except Exception as exc:
        # Redis or something unforeseen, not the receiver: try again later rather than
        # let the ack drop the webhook
        if attempt >= settings.webhook_max_attempts:
            raise
        delay = retry_delay(attempt, settings.webhook_backoff_seconds)
        raise self.retry(exc=exc, countdown=delay) from exc
    if result.retry_in is not None:
        raise self.retry(countdown=result.retry_in)
    return result.outcome
