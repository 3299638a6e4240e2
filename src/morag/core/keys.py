"""Every Redis key morag writes, by name: the one place to look for what a prefix holds,
what expires and what is pruned. Celery's own keys (queues, ``unacked``, results) are
named by kombu and Celery under ``broker_namespace``.

    <prefix>:job:<id>                 hash: the job record            TTL: retention, once final
    <prefix>:job:<id>:history         list: every event               TTL: as the record
    <prefix>:job:<id>:result          string: the full result (JSON)  TTL: retention
    <prefix>:job:<id>:lease           string: the running process     TTL: lease_seconds
    <prefix>:events:<id>              pub/sub channel of the job's events
    <prefix>:jobs                     sorted set: ids by creation time (pruned with the records)
    <prefix>:owner:<name>:jobs        sorted set: one owner's ids, likewise
    <prefix>:owners                   set: every owner name that has jobs (for the prune)
    <prefix>:batch:<id>               string: a batch's owner and job ids  TTL: retention
    <prefix>:idem:<owner>:<hash>      string: an Idempotency-Key's answer  TTL: retention
    <prefix>:dedupe:<owner>:<hash>    string: the job doing that content   TTL: retention
    <prefix>:worker:<hostname>        string: a live worker           TTL: a few heartbeats
    <prefix>:recovery:lost-sweep      string: lock of the lost-message sweep
    <prefix>:webhooks:...             the webhook outbox and its bookkeeping
    <prefix>:cleanup:inputs           sorted set: owned input files of ended jobs, by end time
    <prefix>:cleanup:artifacts        sorted set: ended video jobs, by end time (keyframes)
    <prefix>:cleanup:index-pruned     string: lock of one index prune per period
    <prefix>:metrics                  hash: job, webhook and recovery counters and histograms
    <prefix>:metrics:http             hash: the API processes' request counters (flushed)
    <prefix>:workers                  sorted set: live workers' hostnames by expiry
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    """The key names under one prefix (``Settings.key_prefix``)."""

    prefix: str

    def job(self, task_id: str) -> str:
        return f"{self.prefix}:job:{task_id}"

    def history(self, task_id: str) -> str:
        return f"{self.prefix}:job:{task_id}:history"

    def result(self, task_id: str) -> str:
        return f"{self.prefix}:job:{task_id}:result"

    def lease(self, task_id: str) -> str:
        return f"{self.prefix}:job:{task_id}:lease"

    def channel(self, task_id: str) -> str:
        return f"{self.prefix}:events:{task_id}"

    @property
    def job_index(self) -> str:
        return f"{self.prefix}:jobs"

    def owner_jobs(self, owner: str) -> str:
        """One owner's job index (owner names are checked: core/principals.py)."""
        return f"{self.prefix}:owner:{owner}:jobs"

    @property
    def owners(self) -> str:
        return f"{self.prefix}:owners"

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}:batch:{batch_id}"

    def idempotency(self, owner: str, key: str) -> str:
        """The client's key is hashed: any header value makes a bounded, safe key name."""
        return f"{self.prefix}:idem:{owner}:{hashlib.sha256(key.encode()).hexdigest()}"

    def dedupe(self, owner: str, fingerprint: str) -> str:
        """Per owner: identical content of two owners is two jobs (no oracle of what
        another owner is processing)."""
        return f"{self.prefix}:dedupe:{owner}:{fingerprint}"

    def worker(self, hostname: str) -> str:
        return f"{self.prefix}:worker:{hostname}"

    @property
    def lost_sweep_lock(self) -> str:
        return f"{self.prefix}:recovery:lost-sweep"

    @property
    def webhook_outbox(self) -> str:
        """Webhooks owed by final transitions, oldest first (services/webhooks.py)."""
        return f"{self.prefix}:webhooks:outbox"

    @property
    def webhook_inflight(self) -> str:
        return f"{self.prefix}:webhooks:inflight"

    @property
    def webhook_scheduled(self) -> str:
        return f"{self.prefix}:webhooks:scheduled"

    @property
    def webhook_claims(self) -> str:
        return f"{self.prefix}:webhooks:claims"

    def webhook_done(self, task_id: str) -> str:
        return f"{self.prefix}:webhooks:done:{task_id}"

    @property
    def inputs_due(self) -> str:
        """Owned input files of ended jobs, by end time (services/retention.py)."""
        return f"{self.prefix}:cleanup:inputs"

    @property
    def artifacts_due(self) -> str:
        """Ids of ended video jobs whose keyframes go with their record (services/retention.py)."""
        return f"{self.prefix}:cleanup:artifacts"

    @property
    def index_prune_lock(self) -> str:
        return f"{self.prefix}:cleanup:index-pruned"

    @property
    def metrics(self) -> str:
        """Counters and histograms the job scripts count (services/metrics.py)."""
        return f"{self.prefix}:metrics"

    @property
    def http_metrics(self) -> str:
        """HTTP request counters and histograms, flushed by every API process."""
        return f"{self.prefix}:metrics:http"

    @property
    def worker_index(self) -> str:
        """Hostnames of announced workers by the expiry of their announcement."""
        return f"{self.prefix}:workers"
