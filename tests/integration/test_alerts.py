"""docs/alerts.yml: checked and unit-tested by promtool, its metric names held to what
GET /metrics exports, and its queue rule fired by the gauges of a real stopped worker.

promtool comes with Debian's ``prometheus`` package, which .ci/run installs; without it
these tests fail and say so (a rules file nobody checks drifts from the metrics)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from morag.api.main import create_app
from morag.core.config import Settings
from morag.tasks.system_tasks import probe
from tests.harness import ROOT, system_tool, wait_for

ALERTS = ROOT / "docs" / "alerts.yml"


def promtool() -> str:
    return system_tool(("promtool",), "prometheus")


def run_promtool(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def client(isolated: None) -> Iterator[TestClient]:
    with TestClient(create_app(Settings()), base_url="http://127.0.0.1") as test_client:
        yield test_client


def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    assert "SUCCESS: 6 rules found" in run_promtool("check", "rules", str(ALERTS), cwd=ROOT)
    assert "SUCCESS" in run_promtool("test", "rules", "alerts_test.yml", cwd=ALERTS.parent)


def test_every_metric_the_rules_use_is_exported(client: TestClient) -> None:
    rules = [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]
    assert {r["alert"] for r in rules} >= {
        "MoragQueueWithoutConsumer",
        "MoragQueueWaitHigh",
        "MoragJobFailureRatioHigh",
        "MoragWebhookBacklog",
        "MoragWorkerFlapping",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
    used = {name for r in rules for name in re.findall(r"\bmorag_[a-z_]+", r["expr"])}
    text = client.get("/metrics").text
    exported = {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }
    # A family is listed before its first sample (no job ended yet, no histogram bucket)
    suffix = {"counter": "_total", "histogram": "_bucket"}
    exported |= {f.name + suffix.get(f.type, "") for f in text_string_to_metric_families(text)}
    assert used and used <= exported, used - exported


def test_a_queue_whose_worker_stopped_fires_the_rule(
    client: TestClient, workers, tmp_path: Path
) -> None:
    worker = workers.start(queues="celery", concurrency=1)
    consumed = 'morag_queue_consumers{queue="celery"} 1.0'
    wait_for(lambda: consumed in client.get("/metrics").text, 10, "the worker in the gauges")
    worker.stop()

    def stopped() -> str | None:
        text = client.get("/metrics").text
        return text if 'morag_queue_consumers{queue="celery"} 0.0' in text else None

    wait_for(stopped, 30, "the stopped worker to leave the gauges")
    for _ in range(2):
        probe.delay()  # nobody will take them
    text = stopped()
    assert text and 'morag_queue_pending{queue="celery"} 2.0' in text
    series = []
    for family in text_string_to_metric_families(text):
        if family.name not in ("morag_queue_pending", "morag_queue_consumers"):
            continue
        for sample in family.samples:
            labels = ", ".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            series.append(
                {
                    "series": f'{sample.name}{{job="morag", instance="api", {labels}}}',
                    "values": f"{sample.value:g}x10",
                }
            )
    test_file = tmp_path / "stopped_worker_test.yml"
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(ALERTS)],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": series,
                        "alert_rule_test": [
                            {
                                "eval_time": "5m",
                                "alertname": "MoragQueueWithoutConsumer",
                                "exp_alerts": [
                                    {
                                        "exp_labels": {
                                            "severity": "critical",
                                            "job": "morag",
                                            "queue": "celery",
                                        },
                                        "exp_annotations": {
                                            "summary": "Queue celery has 2 jobs waiting and "
                                            "no worker",
                                            "description": "No live worker consumes celery. "
                                            "Start one (`morag worker --queues celery`) or "
                                            "check why the workers for it stopped (their logs; "
                                            "`GET /api/v1/status/stats/queues`).",
                                        },
                                    }
                                ],
                            }
                        ],
                    }
                ],
            }
        )
    )
    assert "SUCCESS" in run_promtool("test", "rules", str(test_file), cwd=tmp_path)
