"""The embedded Redis ``morag up`` runs: its settings as the job scripts need them."""

from __future__ import annotations

from pathlib import Path

import redis

from morag.core.embedded_redis import EmbeddedRedis


def test_large_hashes_are_hash_tables_and_job_records_stay_compact(tmp_path: Path) -> None:
    """Each job's scripts add to the metrics hash (hundreds of fields): compact, each
    HINCRBY would scan it. A job record (about 25 fields) keeps the compact encoding."""
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    try:
        client = redis.Redis(unix_socket_path=str(server.socket_path))
        client.hset("metrics", mapping={f"h|stage|document|s{i}": i for i in range(200)})
        client.hset("job", mapping={f"field{i}": i for i in range(30)})
        assert client.object("encoding", "metrics") == b"hashtable"
        assert client.object("encoding", "job") in (b"ziplist", b"listpack")
    finally:
        server.stop()
