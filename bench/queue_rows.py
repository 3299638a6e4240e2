"""Rows 1 and 4: morag's task layer against bare Celery.

Row 1, throughput of no-op jobs with two worker processes (prefork, concurrency 2 on
both sides). morag's job is ``probe(steps=1)``: the job record is written before the
message is published, the worker claims it (start script), writes one progress step
and finishes it (history and pub/sub events on every transition). The baseline is an
empty Celery task on the same pool settings, results on (the primary baseline: the
way a bare-Celery client learns outcomes, which morag's record replaces) and results
off (the stricter one).

- drain: N messages are published to a queue nobody consumes, then moved in one atomic
  RENAME onto the consumed queue; timed until the queue and the unacked hash are empty
  (seen twice) and every job is verified final (morag: records; bare: result keys).
- one producer: the workers run while this process publishes N messages in a loop;
  timed from the first publish until all are done, as above.

Row 4, submit-to-start latency with idle workers: one job at a time; morag's figure is
``started_at - created_at`` from the job record (created before publishing), and its
client round trip to the final event; the baseline is the round trip of an empty bare
task (``apply_async().get()``, results on).

CPU per job by role (producer, worker main process, pool children, Redis) is recorded
with each drain, to explain the ratio.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from datetime import datetime
from typing import Any

import psutil

from bench.infra import Bench, Service
from bench.report import Row, paired_ratios
from bench.stats import percentile, summary

HOLD = "bench_hold"


class CpuMeter:
    """CPU seconds used by a worker (main process, pool children incl. reaped) and Redis."""

    def __init__(self, worker: Service, redis_pid: int) -> None:
        self.worker = worker
        self.redis_pid = redis_pid

    @staticmethod
    def _cpu(pid: int) -> float:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            return 0.0
        return t.user + t.system

    def snapshot(self) -> dict[str, float]:
        main = psutil.Process(self.worker.pid).cpu_times()
        children = main.children_user + main.children_system
        children += sum(self._cpu(pid) for pid in self.worker.children())
        me = psutil.Process().cpu_times()
        return {
            "producer": me.user + me.system,
            "worker_main": main.user + main.system,
            "pool_children": children,
            "redis": self._cpu(self.redis_pid),
        }

    @staticmethod
    def per_job(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
        return {k: round((after[k] - before[k]) / n * 1e6) for k in before}


class Side:
    """One side of the comparison: how to publish, where its queue is, how to verify."""

    queue = "celery"  # the queue its worker consumes

    def __init__(self, name: str, bench: Bench, namespace: str, worker: Service) -> None:
        self.name = name
        self.bench = bench
        self.ns = namespace
        self.worker = worker
        self.client = bench.client()

    def publish(self, n: int, queue: str | None = None) -> list[str]:
        raise NotImplementedError

    def verify(self, ids: list[str]) -> bool:
        raise NotImplementedError

    def queue_busy(self) -> tuple[int, int]:
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(f"{self.ns}{self.queue}")
        pipe.hlen(f"{self.ns}unacked")
        waiting, unacked = pipe.execute()
        return int(waiting), int(unacked)

    def wait_done(self, ids: list[str], timeout: float) -> float:
        """perf_counter time at which all ``ids`` were done (queue and unacked empty)."""
        deadline = time.monotonic() + timeout
        empty_since: float | None = None
        while True:
            now = time.perf_counter()
            if self.queue_busy() == (0, 0):
                if empty_since is None:
                    empty_since = now
                elif self.verify(ids):
                    return empty_since
            else:
                empty_since = None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {len(ids)} jobs not done in {timeout} s")
            time.sleep(0.004)

    def flush(self) -> None:
        raise NotImplementedError


class MoragSide(Side):
    def __init__(self, bench: Bench, worker: Service, steps: int = 1) -> None:
        super().__init__("morag", bench, f"{bench.morag_ns}:", worker)
        from morag.tasks.system_tasks import probe

        self.task = probe
        self.steps = steps

    def publish(self, n: int, queue: str | None = None) -> list[str]:
        options = {"queue": queue} if queue else {}
        return [self.task.apply_async(kwargs={"steps": self.steps}, **options).id for _ in range(n)]

    def verify(self, ids: list[str]) -> bool:
        pipe = self.client.pipeline(transaction=False)
        for task_id in ids:
            pipe.hget(f"{self.bench.morag_ns}:job:{task_id}", "state")
        return all(state == b"success" for state in pipe.execute())

    def flush(self) -> None:
        self.bench.flush_morag()


class BareSide(Side):
    def __init__(self, bench: Bench, worker: Service, results: bool) -> None:
        name = f"bare-results-{'on' if results else 'off'}"
        super().__init__(name, bench, bench.bare_ns(results), worker)
        self.results = results
        self.app = bench.bare_app(results)
        self.task = self.app.tasks["bench.noop"]

    def publish(self, n: int, queue: str | None = None) -> list[str]:
        options = {"queue": queue} if queue else {}
        return [self.task.apply_async(**options).id for _ in range(n)]

    def verify(self, ids: list[str]) -> bool:
        if not self.results:
            return True  # nothing to look at: the empty queue and unacked hash are the proof
        pipe = self.client.pipeline(transaction=False)
        for task_id in ids:
            pipe.exists(f"{self.ns}celery-task-meta-{task_id}")
        return all(pipe.execute())

    def flush(self) -> None:
        self.bench._flush(self.ns)


def drain_once(side: Side, n: int, redis_pid: int) -> tuple[float, dict[str, float]]:
    """Jobs/s draining ``n`` queued jobs, and the CPU per job of each role."""
    side.flush()
    ids = side.publish(n, queue=HOLD)
    if side.queue_busy() != (0, 0):
        raise RuntimeError(f"{side.name}: queue not idle before the drain")
    meter = CpuMeter(side.worker, redis_pid)
    side.client.config_resetstat()
    before = meter.snapshot()
    started = time.perf_counter()
    side.client.rename(f"{side.ns}{HOLD}", f"{side.ns}{side.queue}")
    done = side.wait_done(ids, timeout=max(60.0, n / 20))
    after = meter.snapshot()
    cpu = CpuMeter.per_job(before, after, n)
    cpu.pop("producer")  # the producer published before the clock started
    cpu["redis_commands"] = redis_commands_per_job(side.client, n)  # type: ignore[assignment]
    return n / (done - started), cpu


def redis_commands_per_job(client: Any, n: int) -> dict[str, float]:
    """Redis commands per job since the last CONFIG RESETSTAT (the bench's polling, a
    pipelined LLEN + HLEN every 4 ms, and the final verification excluded)."""
    stats = client.info("commandstats")
    per_job = {}
    for name, stat in stats.items():
        command = name.removeprefix("cmdstat_")
        if command in ("llen", "hlen", "config", "info", "hget", "exists", "rename"):
            continue  # the benchmark's own polling and verification
        calls = stat["calls"] / n
        if calls >= 0.05:
            per_job[command] = round(calls, 2)
    return per_job


def end_to_end_once(side: Side, n: int, redis_pid: int) -> tuple[float, dict[str, float]]:
    """Jobs/s with one producer publishing while the workers consume."""
    side.flush()
    meter = CpuMeter(side.worker, redis_pid)
    before = meter.snapshot()
    started = time.perf_counter()
    ids = side.publish(n)
    done = side.wait_done(ids, timeout=max(60.0, n / 20))
    after = meter.snapshot()
    return n / (done - started), CpuMeter.per_job(before, after, n)


def _median_dict(dicts: list[dict[str, Any]]) -> dict[str, float]:
    import statistics

    if not dicts:
        return {}
    return {
        k: round(statistics.median(d[k] for d in dicts))
        for k in dicts[0]
        if not isinstance(dicts[0][k], dict)
    }


def _cpu_total(cpu: dict[str, float]) -> float:
    return float(sum(v for k, v in cpu.items() if k != "producer"))


def run_throughput(bench: Bench, cfg: dict[str, Any]) -> list[Row]:
    """Row 1 (drain and one-producer), morag vs bare results on and off."""
    n, reps, conc = cfg["noop_jobs"], cfg["throughput_reps"], cfg["worker_concurrency"]
    redis_pid = bench.redis_server.process.pid
    morag_worker = bench.start_morag_worker(conc, queues="celery")
    bare_on_worker = bench.start_bare_worker(conc, results=True)
    bare_off_worker = bench.start_bare_worker(conc, results=False)
    sides: list[Side] = [
        MoragSide(bench, morag_worker, steps=1),
        BareSide(bench, bare_on_worker, results=True),
        BareSide(bench, bare_off_worker, results=False),
    ]
    # Warm-up: first jobs load scripts, fill pools, fork nothing new.
    for side in sides:
        drain_once(side, 200, redis_pid)
    results: dict[str, dict[str, list[Any]]] = {
        s.name: {"drain": [], "drain_cpu": [], "e2e": [], "e2e_cpu": []} for s in sides
    }
    for rep in range(reps):
        order = sides[rep % len(sides) :] + sides[: rep % len(sides)]  # rotate the order
        for side in order:
            rate, cpu = drain_once(side, n, redis_pid)
            results[side.name]["drain"].append(rate)
            results[side.name]["drain_cpu"].append(cpu)
        for side in order:
            if side.name == "bare-results-off":
                continue  # one producer: compared with results on only (time budget)
            rate, cpu = end_to_end_once(side, n, redis_pid)
            results[side.name]["e2e"].append(rate)
            results[side.name]["e2e_cpu"].append(cpu)
    for side in sides:
        side.flush()
    bench.shared["throughput_workers"] = {
        "morag": morag_worker,
        "bare_on": bare_on_worker,
        "bare_off": bare_off_worker,
    }

    m, on, off = (results[s.name] for s in sides)
    m_name, on_name = sides[0].name, sides[1].name
    settings = (
        f"prefork concurrency {conc} both sides; {n} jobs per repetition; {reps} repetitions "
        "interleaved; morag job = probe(steps=1): record + start + 1 progress + finish"
    )
    rows = []
    for mode, label in (("drain", "drained"), ("e2e", "one producer, end to end")):
        cpu_key = f"{mode}_cpu"
        measured = [name for name in results if results[name][mode]]
        cpu_med = {name: _median_dict(results[name][cpu_key]) for name in measured}
        cpu_note = "; ".join(
            f"{name} {cpu_med[name]} = {_cpu_total(cpu_med[name]):.0f} µs" for name in measured
        )
        cost_ratio = round(_cpu_total(cpu_med[on_name]) / _cpu_total(cpu_med[m_name]), 2)
        commands = ""
        if mode == "drain":
            commands = " Redis commands per job (drain): " + "; ".join(
                f"{name} {results[name][cpu_key][-1].get('redis_commands')}" for name in measured
            )
        rows.append(
            Row(
                key=f"1{'a' if mode == 'drain' else 'b'}",
                figure=f"no-op jobs/s {label}, 2 worker processes",
                unit="jobs/s",
                value=summary(m[mode], 1),
                baseline_name="bare Celery, results on",
                baseline=summary(on[mode], 1),
                ratio=paired_ratios(m[mode], on[mode]),
                target="ratio ≥ 0.8",
                met=None,
                notes="",
                details={
                    "settings": settings,
                    "bare_results_off": summary(off[mode], 1),
                    "ratio_vs_bare_results_off": paired_ratios(m[mode], off[mode]),
                    "cpu_us_per_job_median": cpu_med,
                    "cpu_cost_ratio_vs_bare_results_on": cost_ratio,
                    "redis_commands_per_job": {
                        name: results[name][cpu_key][-1].get("redis_commands") for name in measured
                    },
                },
            )
        )
        row = rows[-1]
        row.met = row.ratio["median"] is not None and row.ratio["median"] >= 0.8
        off_note = ""
        if off[mode]:
            off_note = (
                f"vs bare Celery with results off: {summary(off[mode], 1)['median']} jobs/s, "
                f"ratio {row.details['ratio_vs_bare_results_off']['median']}. "
            )
        row.notes = (
            f"{off_note}CPU µs per job by process (median): {cpu_note}; CPU cost ratio (bare "
            f"results on ÷ morag), which noise from other processes on the machine hardly "
            f"moves: {cost_ratio}.{commands}"
        )
    return rows


def start_latency_workers(bench: Bench, cfg: dict[str, Any]) -> None:
    """Row 4 alone (``--only latency``): the idle workers row 1 would have left."""
    conc = cfg["worker_concurrency"]
    bench.shared["throughput_workers"] = {
        "morag": bench.start_morag_worker(conc, queues="celery"),
        "bare_on": bench.start_bare_worker(conc, results=True),
    }


def _ts(value: bytes | None) -> float:
    return datetime.fromisoformat(value.decode()).timestamp() if value else float("nan")


def run_latency(bench: Bench, cfg: dict[str, Any]) -> list[Row]:
    """Row 4: submit-to-start with idle workers vs bare Celery's round trip."""
    from morag.tasks.system_tasks import probe

    workers = bench.shared["throughput_workers"]
    n, reps = cfg["latency_samples"], cfg["reps"]
    client = bench.client()
    bare_app = bench.bare_app(results=True)
    noop = bare_app.tasks["bench.noop"]
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(f"{bench.morag_ns}:events:*")
    time.sleep(0.2)
    final = (b'"success"', b'"failure"', b'"revoked"')

    def morag_sample() -> tuple[float, float]:
        task_id = str(uuid.uuid4())
        channel = f"{bench.morag_ns}:events:{task_id}".encode()
        t0 = time.perf_counter()
        probe.apply_async(kwargs={"steps": 0}, task_id=task_id)
        while True:
            message = pubsub.get_message(timeout=10)
            if message is None:
                continue
            if message["channel"] == channel and any(s in message["data"] for s in final):
                break
        round_trip = time.perf_counter() - t0
        created, started = client.hmget(
            f"{bench.morag_ns}:job:{task_id}", "created_at", "started_at"
        )
        return _ts(started) - _ts(created), round_trip

    def bare_sample() -> float:
        t0 = time.perf_counter()
        noop.apply_async().get(timeout=10)
        return time.perf_counter() - t0

    for _ in range(20):  # warm-up
        morag_sample()
        bare_sample()
    start_p50, start_p99, rt_p50, rt_p99, base_p50, base_p99 = [], [], [], [], [], []
    for _ in range(reps):
        starts, trips, bases = [], [], []
        for _ in range(n):
            s, r = morag_sample()
            starts.append(s * 1000)
            trips.append(r * 1000)
            bases.append(bare_sample() * 1000)
        start_p50.append(percentile(starts, 50))
        start_p99.append(percentile(starts, 99))
        rt_p50.append(percentile(trips, 50))
        rt_p99.append(percentile(trips, 99))
        base_p50.append(percentile(bases, 50))
        base_p99.append(percentile(bases, 99))
    pubsub.close()
    bench.flush_morag()
    bench.flush_bare()
    for worker in workers.values():
        bench.stop(worker)
    ratio50 = paired_ratios(start_p50, base_p50)
    common = f"{n} sequential jobs per repetition, idle prefork-2 workers; morag = probe(steps=0). "
    return [
        Row(
            key="4a",
            figure="submit-to-start latency p50 (record started_at − created_at)",
            unit="ms",
            value=summary(start_p50, 2),
            baseline_name="bare Celery round trip p50",
            baseline=summary(base_p50, 2),
            ratio=ratio50,
            target="≤ 3× baseline",
            met=ratio50["median"] is not None and ratio50["median"] <= 3.0,
            notes=common + f"morag's own client round trip (submit → final event): p50 "
            f"{summary(rt_p50, 2)['median']} ms, p99 {summary(rt_p99, 2)['median']} ms.",
            details={"round_trip_p50_ms": summary(rt_p50, 2)},
        ),
        Row(
            key="4b",
            figure="submit-to-start latency p99",
            unit="ms",
            value=summary(start_p99, 2),
            baseline_name="bare Celery round trip p99",
            baseline=summary(base_p99, 2),
            ratio=paired_ratios(start_p99, base_p99),
            target="reported",
            met=None,
            details={"round_trip_p99_ms": summary(rt_p99, 2)},
        ),
    ]


def run_scraped_throughput(bench: Bench, cfg: dict[str, Any]) -> list[Row]:
    """Row 1 (morag's side) with and without a scraper hitting ``/metrics`` every second.

    One morag worker as in row 1 and one ``morag api`` on the same namespace, running in
    both halves (idle in one, scraped in the other); the repetitions alternate which half
    goes first. Met when the median with the scraper is not below the spread (the slowest)
    of the repetitions without it: scraping must not slow the jobs.
    """
    from bench.metrics_scrape import Scraper

    n, reps, conc = cfg["noop_jobs"], cfg["throughput_reps"], cfg["worker_concurrency"]
    redis_pid = bench.redis_server.process.pid
    worker = bench.start_morag_worker(conc, queues="celery")
    api, base = bench.start_api()
    side = MoragSide(bench, worker, steps=1)
    drain_once(side, 200, redis_pid)  # warm-up, as row 1
    rates: dict[str, dict[str, list[float]]] = {
        half: {"drain": [], "e2e": []} for half in ("quiet", "scraped")
    }
    scrapes: list[float] = []
    failures = 0
    for rep in range(reps):
        for half in ("quiet", "scraped") if rep % 2 == 0 else ("scraped", "quiet"):
            scraper = Scraper(base, interval=1.0) if half == "scraped" else None
            with scraper or contextlib.nullcontext():
                rates[half]["drain"].append(drain_once(side, n, redis_pid)[0])
                rates[half]["e2e"].append(end_to_end_once(side, n, redis_pid)[0])
            if scraper:
                scrapes += scraper.times
                failures += scraper.failures
    side.flush()
    bench.stop(worker)
    bench.stop(api)
    rows = []
    for mode, key, label in (("drain", "1a+s", "drained"), ("e2e", "1b+s", "one producer")):
        quiet, scraped = rates["quiet"][mode], rates["scraped"][mode]
        value = summary(scraped, 1)
        rows.append(
            Row(
                key=key,
                figure=f"no-op jobs/s {label}, 2 worker processes, /metrics scraped every 1 s",
                unit="jobs/s",
                value=value,
                baseline_name="the same, not scraped",
                baseline=summary(quiet, 1),
                ratio=paired_ratios(scraped, quiet),
                target="not below the spread not scraped",
                met=failures == 0 and value["median"] >= min(quiet),
                notes=(
                    f"morag's side of row 1 ({n} probe(steps=1) jobs per repetition, {reps} "
                    "repetitions, the halves' order alternating), with one morag api on the "
                    "same namespace in both halves, scraped every second in one: "
                    f"{len(scrapes)} scrapes, p50 {percentile(scrapes, 50):.1f} ms, p99 "
                    f"{percentile(scrapes, 99):.1f} ms while the jobs ran; failed "
                    f"scrapes: {failures}."
                    if mode == "drain" and scrapes
                    else ""
                ),
            )
        )
    return rows
