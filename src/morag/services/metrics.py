"""Metrics of the whole deployment, computed from Redis at scrape time.

Why from Redis and not prometheus-client's multiprocess mode: the events are counted by
workers on any number of hosts (multiprocess mode shares files between processes of one
host only), Celery recycles its pool processes (dead processes' files pile up), and the job
record's transitions are already atomic Lua scripts: a counter bumped in the same script
(``HINCRBY`` on ``<prefix>:metrics``, services/jobs.py) is exact whatever process made the
transition, and lost by no crash. Gauges (queue depths, workers, webhook backlog) are read
where they live. So every API process answers the same figures: scrape any one of them.

A scrape costs three round trips whatever the number of job records: the counters, the
queues, the broker's unacked messages, the webhook backlog and the worker index in one
pipeline; the live workers' entries; the state of each in-flight job (at most the workers'
prefetch). Histograms are stored as per-bucket counts (``h|<name>|<bound>``) and a sum
in whole microseconds (``u|<name>``; ``s|<name>`` in seconds, as first written, is read
too); they are made cumulative here.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from morag.core.config import ALL_QUEUES
from morag.core.keys import RedisKeys
from morag.services.jobs import JOB_SECONDS_BUCKETS, RUNNING_STATES
from morag.services.workers import INDEX_SLACK_SECONDS, WorkerInfo

#: Upper bounds (seconds) of the HTTP request duration histogram.
HTTP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

#: Stage names kept per kind; more (a task reporting free-form stages) are summed as "other",
#: so the series stay bounded whatever a task reports.
MAX_STAGES_PER_KIND = 30

# kombu's Redis transport keeps priorities 3, 6 and 9 in lists beside the queue's own.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
_RUNNING = {s.value.encode() for s in RUNNING_STATES}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def bound_label(bound: float) -> str:
    """A bucket bound as Lua's ``tostring`` writes it into the field name (1, 0.5, +Inf)."""
    if math.isinf(bound):
        return "+Inf"
    return str(int(bound)) if float(bound).is_integer() else repr(float(bound))


class Histograms:
    """Histograms read from ``h|<name>|<bound>`` and ``u|<name>`` (µs) or ``s|<name>`` fields."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = [*bounds, math.inf]
        self.labels = [bound_label(b) for b in self.bounds]
        self.buckets: dict[tuple[str, ...], dict[str, float]] = defaultdict(dict)
        self.sums: dict[tuple[str, ...], float] = defaultdict(float)

    def add_bucket(self, name: tuple[str, ...], le: str, count: float) -> None:
        self.buckets[name][le] = self.buckets[name].get(le, 0) + count

    def family(
        self,
        metric: str,
        doc: str,
        label_names: list[str],
        names: Iterable[tuple[str, ...]],
        strip: int = 0,
    ) -> HistogramMetricFamily:
        """One family of the histograms ``names``; label values are the names less their
        first ``strip`` parts."""
        family = HistogramMetricFamily(metric, doc, labels=label_names)
        for name in sorted(names):
            counts = self.buckets.get(name, {})
            cumulative, total = [], 0.0
            for label in self.labels:
                total += counts.get(label, 0)
                cumulative.append((label, total))
            family.add_metric(list(name[strip:]), cumulative, self.sums.get(name, 0.0))
        return family


def parse_job_metrics(raw: dict[bytes, bytes]) -> dict[str, Any]:
    """The ``<prefix>:metrics`` hash as counters and histograms by name."""
    counters: dict[tuple[str, ...], float] = defaultdict(float)
    hist = Histograms(JOB_SECONDS_BUCKETS)
    for key, value in raw.items():
        parts = _text(key).split("|")
        number = float(value)
        if parts[0] == "c" and len(parts) >= 2:
            counters[tuple(parts[1:])] += number
        elif parts[0] == "h" and len(parts) >= 4:
            hist.add_bucket(tuple(parts[1:-1]), parts[-1], number)
        elif parts[0] == "u" and len(parts) >= 3:
            hist.sums[tuple(parts[1:])] += number / 1e6
        elif parts[0] == "s" and len(parts) >= 3:  # seconds, as the hash was first written
            hist.sums[tuple(parts[1:])] += number
    return {"counters": counters, "histograms": hist}


def _fold_stages(hist: Histograms) -> set[tuple[str, ...]]:
    """Stage histogram names, at most ``MAX_STAGES_PER_KIND`` per kind (the rest as other)."""
    per_kind: dict[str, list[tuple[str, ...]]] = defaultdict(list)
    for name in list(hist.buckets):
        if name[0] == "stage" and len(name) >= 3:
            per_kind[name[1]].append(name)
    kept: set[tuple[str, ...]] = set()
    for kind, names in per_kind.items():
        names.sort(key=lambda n: -sum(hist.buckets[n].values()))
        for name in names[MAX_STAGES_PER_KIND:]:
            other = ("stage", kind, "other")
            for le, count in hist.buckets.pop(name).items():
                hist.add_bucket(other, le, count)
            hist.sums[other] += hist.sums.pop(name, 0.0)
        kept.update(names[:MAX_STAGES_PER_KIND])
        if len(names) > MAX_STAGES_PER_KIND:
            kept.add(("stage", kind, "other"))
    return kept


class DeploymentMetrics:
    """A prometheus-client collector of morag's metrics for one key prefix and broker."""

    def __init__(self, client: redis.Redis, prefix: str, broker_namespace: str) -> None:
        self.redis = client
        self.keys = RedisKeys(prefix)
        self.ns = broker_namespace

    def snapshot(self) -> dict[str, Any]:
        """Everything a scrape needs, in three round trips."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.metrics)
        pipe.hgetall(self.keys.http_metrics)
        for queue in ALL_QUEUES:
            pipe.llen(f"{self.ns}{queue}")
            for step in _PRIORITY_STEPS:
                pipe.llen(f"{self.ns}{queue}{_PRIORITY_SEP}{step}")
        pipe.hvals(f"{self.ns}unacked")
        pipe.llen(self.keys.webhook_outbox)
        pipe.zcard(self.keys.webhook_inflight)
        pipe.zcard(self.keys.webhook_scheduled)
        pipe.zrangebyscore(self.keys.worker_index, time.time() - INDEX_SLACK_SECONDS, "+inf")
        job_raw, http_raw, *rest = pipe.execute()
        per_queue = 1 + len(_PRIORITY_STEPS)
        lengths = rest[: len(ALL_QUEUES) * per_queue]
        unacked, outbox, inflight, scheduled, worker_names = rest[len(ALL_QUEUES) * per_queue :]
        pending = {
            queue: sum(lengths[i * per_queue : (i + 1) * per_queue])
            for i, queue in enumerate(ALL_QUEUES)
        }

        workers: list[WorkerInfo] = []
        if worker_names:
            raws = self.redis.mget([self.keys.worker(_text(n)) for n in worker_names])
            workers = [WorkerInfo(**json.loads(r)) for r in raws if r]

        in_flight: list[tuple[str, str]] = []  # (queue, task id) of delivered messages
        for raw in unacked:
            try:
                message, _exchange, routing_key = json.loads(raw)
                task_id = (message.get("headers") or {}).get("id") or ""
            except (ValueError, TypeError, AttributeError):
                continue
            queue = routing_key if routing_key in pending else "other"
            in_flight.append((queue, str(task_id)))
        states: list[Any] = []
        if in_flight:
            pipe = self.redis.pipeline(transaction=False)
            for _, task_id in in_flight:
                pipe.hget(self.keys.job(task_id), "state")
            states = pipe.execute()
        running: dict[str, int] = defaultdict(int)
        reserved: dict[str, int] = defaultdict(int)
        for (queue, _), state in zip(in_flight, states, strict=True):
            (running if state in _RUNNING else reserved)[queue] += 1
        return {
            "jobs": parse_job_metrics(job_raw),
            "http": http_raw,
            "pending": pending,
            "running": running,
            "reserved": reserved,
            "workers": workers,
            "webhook_backlog": {
                "waiting": int(outbox),
                "inflight": int(inflight),
                "scheduled": int(scheduled),
            },
        }

    def describe(self) -> list[Metric]:
        return []  # collected on each scrape; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        yield from self._jobs(snap["jobs"])
        yield from self._queues(snap)
        yield from _http_families(snap["http"])

    @staticmethod
    def _jobs(jobs: dict[str, Any]) -> Iterator[Metric]:
        counters: dict[tuple[str, ...], float] = jobs["counters"]
        hist: Histograms = jobs["histograms"]
        submitted = CounterMetricFamily(
            "morag_jobs_submitted",
            "Jobs submitted (records created), by kind and owner (the API key's name)",
            labels=["kind", "owner"],
        )
        finished = CounterMetricFamily(
            "morag_jobs_finished",
            "Jobs that reached a final state, by kind and state (success, failure, revoked)",
            labels=["kind", "state"],
        )
        webhooks = CounterMetricFamily(
            "morag_webhook_deliveries",
            "Webhook delivery attempts by outcome (delivered, retrying, failed, refused, gone, "
            "skipped)",
            labels=["outcome"],
        )
        recovery = CounterMetricFamily(
            "morag_recovery_actions",
            "Recovery actions: redelivered (a job whose process died ran again), requeued "
            "(a message the broker lost was sent again), lost (could not be), gave_up "
            "(failed after max attempts)",
            labels=["action"],
        )
        worker_starts = CounterMetricFamily(
            "morag_worker_starts", "Worker processes started (first announcement of each)"
        )
        for action in ("redelivered", "requeued", "lost", "gave_up"):
            recovery.add_metric([action], counters.get(("recovery", action), 0.0))
        worker_starts.add_metric([], counters.get(("worker", "started"), 0.0))
        for name, value in sorted(counters.items()):
            if name[0] == "submitted" and len(name) == 3:
                submitted.add_metric([name[1], name[2]], value)
            elif name[0] == "finished" and len(name) == 3:
                finished.add_metric([name[1], name[2]], value)
            elif name[0] == "webhook" and len(name) == 2:
                webhooks.add_metric([name[1]], value)
        yield from (submitted, finished, webhooks, recovery, worker_starts)
        stages = _fold_stages(hist)
        yield _named(
            hist,
            "wait",
            "morag_job_queue_wait_seconds",
            "Time from submission to a job's first start, by kind",
            ["kind"],
        )
        yield _named(
            hist,
            "run",
            "morag_job_duration_seconds",
            "Time from a job's first start to its end, by kind and final state",
            ["kind", "state"],
        )
        yield _named(
            hist,
            "stage",
            "morag_job_stage_duration_seconds",
            "Time a running job spent in each stage, by kind and stage",
            ["kind", "stage"],
            only=stages,
        )

    @staticmethod
    def _queues(snap: dict[str, Any]) -> Iterator[Metric]:
        pending = GaugeMetricFamily(
            "morag_queue_pending",
            "Messages waiting on each queue (priority sub-queues included)",
            labels=["queue"],
        )
        reserved = GaugeMetricFamily(
            "morag_queue_reserved",
            "Messages delivered to a worker whose job is not running (prefetched, or waiting "
            "for a retry's countdown)",
            labels=["queue"],
        )
        running = GaugeMetricFamily(
            "morag_queue_running", "Jobs running from each queue", labels=["queue"]
        )
        consumers = GaugeMetricFamily(
            "morag_queue_consumers", "Live workers consuming each queue", labels=["queue"]
        )
        slots = GaugeMetricFamily(
            "morag_queue_consumer_processes",
            "Pool processes of the live workers consuming each queue",
            labels=["queue"],
        )
        workers: list[WorkerInfo] = snap["workers"]
        queues = sorted(set(ALL_QUEUES) | set(snap["running"]) | set(snap["reserved"]))
        for queue in queues:
            pending.add_metric([queue], snap["pending"].get(queue, 0))
            reserved.add_metric([queue], snap["reserved"].get(queue, 0))
            running.add_metric([queue], snap["running"].get(queue, 0))
            serving = [w for w in workers if queue in w.queues]
            consumers.add_metric([queue], len(serving))
            slots.add_metric([queue], sum(w.concurrency for w in serving))
        live = GaugeMetricFamily("morag_workers", "Live workers (announced within their TTL)")
        live.add_metric([], len(workers))
        backlog = GaugeMetricFamily(
            "morag_webhook_backlog",
            "Webhook events owed: waiting for a sender, being attempted, waiting for a retry",
            labels=["state"],
        )
        for state, count in snap["webhook_backlog"].items():
            backlog.add_metric([state], count)
        yield from (pending, reserved, running, consumers, slots, live, backlog)


def _named(
    hist: Histograms,
    prefix: str,
    metric: str,
    doc: str,
    labels: list[str],
    only: set[tuple[str, ...]] | None = None,
) -> HistogramMetricFamily:
    names = [
        n
        for n in hist.buckets
        if n[0] == prefix and len(n) == len(labels) + 1 and (only is None or n in only)
    ]
    return hist.family(metric, doc, labels, names, strip=1)


def _http_families(raw: dict[bytes, bytes]) -> Iterator[Metric]:
    """HTTP request counters and latency from ``<prefix>:metrics:http``."""
    requests = CounterMetricFamily(
        "morag_http_requests",
        "HTTP requests by method, route template and status",
        labels=["method", "route", "status"],
    )
    hist = Histograms(HTTP_SECONDS_BUCKETS)
    for key, value in raw.items():
        parts = _text(key).split("|")
        if parts[0] == "c" and len(parts) == 4:
            requests.add_metric(parts[1:], float(value))
        elif parts[0] == "h" and len(parts) == 4:
            hist.add_bucket(tuple(parts[1:3]), parts[3], float(value))
        elif parts[0] == "s" and len(parts) == 3:
            hist.sums[tuple(parts[1:3])] += float(value)
    yield requests
    yield hist.family(
        "morag_http_request_duration_seconds",
        "HTTP request latency by method and route template",
        ["method", "route"],
        list(hist.buckets),
    )
