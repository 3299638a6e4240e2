"""Settings: derivation, validation, and environment parsing (no I/O)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from morag.core.config import ALL_QUEUES, Settings, redis_url_to_celery


def test_celery_urls_follow_redis_url() -> None:
    cfg = Settings(_env_file=None, redis_url="redis://example:6380/2")
    assert cfg.celery_broker_url == "redis://example:6380/2"
    assert cfg.celery_result_backend == "redis://example:6380/2"


def test_unix_socket_urls_become_celery_socket_urls() -> None:
    assert redis_url_to_celery("unix:///run/r.sock") == "redis+socket:///run/r.sock"
    cfg = Settings(_env_file=None, redis_url="unix:///run/r.sock")
    assert cfg.celery_broker_url == "redis+socket:///run/r.sock"


def test_visibility_timeout_exceeds_every_hard_limit() -> None:
    cfg = Settings(_env_file=None)
    longest = max(cfg.hard_time_limit(q) for q in ALL_QUEUES)
    assert cfg.visibility_timeout > longest
    assert cfg.hard_time_limit("audio_processing") > cfg.soft_time_limit("audio_processing")


def test_a_visibility_timeout_below_a_hard_limit_is_refused() -> None:
    with pytest.raises(ValidationError, match="visibility_timeout"):
        Settings(_env_file=None, visibility_timeout=60)


def test_lists_from_environment_accept_commas_and_json(monkeypatch) -> None:
    monkeypatch.setenv("MORAG_WORKER_QUEUES", "celery, web_processing")
    monkeypatch.setenv("MORAG_API_KEYS", '["a:key-one-1", "b:key-two-2"]')
    cfg = Settings(_env_file=None)
    assert cfg.worker_queues == ["celery", "web_processing"]
    assert cfg.api_keys == ["a:key-one-1", "b:key-two-2"]


def test_unknown_queue_is_refused() -> None:
    with pytest.raises(ValidationError, match="unknown queue"):
        Settings(_env_file=None, worker_queues=["nope"])


def test_redis_explicitly_set(monkeypatch) -> None:
    monkeypatch.delenv("MORAG_REDIS_URL", raising=False)
    assert Settings(_env_file=None).redis_explicitly_set is False
    monkeypatch.setenv("MORAG_REDIS_URL", "redis://h:1/0")
    assert Settings(_env_file=None).redis_explicitly_set is True


def test_upload_and_artifact_dirs_default_inside_data_dir(tmp_path) -> None:
    cfg = Settings(_env_file=None, data_dir=tmp_path)
    assert cfg.upload_dir == tmp_path / "uploads"
    assert cfg.artifact_dir == tmp_path / "artifacts"
    assert cfg.input_roots[0] == (tmp_path / "uploads").resolve()
