"""A small HTTP client for the morag API (used by ``morag ingest`` and friends).

    from morag.client import MoragClient

    with MoragClient("http://127.0.0.1:8000", api_key="...") as api:
        job = api.ingest_url("https://example.com/article")
        final = api.wait(job["task_id"], on_event=print)  # follows the SSE stream
        print(final["status"], final["result"])

Every failure is a ``MoragApiError`` carrying the API's error shape
(``{error: {code, message, details}}``) or, when the API cannot be reached, the code
``unreachable``. The module imports neither Celery nor the server's settings.
"""

from __future__ import annotations

import json
import mimetypes
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypedDict

import httpx
from httpx_sse import SSEError, connect_sse

__all__ = ["FINAL_STATES", "JobStatus", "MoragApiError", "MoragClient", "Submission"]

DEFAULT_API_URL = "http://127.0.0.1:8000"
FINAL_STATES = frozenset({"success", "failure", "revoked"})
API = "/api/v1"


class Submission(TypedDict):
    task_id: str
    status: str
    message: str


class JobStatus(TypedDict, total=False):
    task_id: str
    status: str
    kind: str
    progress: float
    stage: str
    message: str
    attempts: int
    error: dict[str, Any] | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    result: dict[str, Any] | None
    metadata: dict[str, Any]


class MoragApiError(Exception):
    """An error answer from the API (or no answer: ``status`` 0, code ``unreachable``)."""

    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}

    def __str__(self) -> str:
        where = f"HTTP {self.status} " if self.status else ""
        return f"{self.message} ({where}{self.code})"

    @classmethod
    def from_response(cls, response: httpx.Response) -> MoragApiError:
        """Read the API's error shape; anything else (a proxy's page) is reported as is."""
        try:
            error = response.json()["error"]
            return cls(
                response.status_code,
                str(error.get("code") or "error"),
                str(error.get("message") or response.reason_phrase),
                error.get("details") or {},
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            text = response.text.strip()[:200] or response.reason_phrase
            return cls(response.status_code, "http_error", f"unexpected answer: {text}")


def is_final(status: str) -> bool:
    return status in FINAL_STATES


class MoragClient:
    """Typed calls to the morag API; one ``httpx.Client`` (connection pool) per instance."""

    def __init__(
        self,
        base_url: str = DEFAULT_API_URL,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> MoragClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing -------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise MoragApiError(
                0,
                "timeout",
                f"the API at {self.base_url} did not answer in time ({type(exc).__name__})",
            ) from None
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            raise MoragApiError.from_response(response)
        return response.json()

    def _unreachable(self, exc: Exception) -> MoragApiError:
        return MoragApiError(
            0, "unreachable", f"cannot reach the morag API at {self.base_url}: {exc}"
        )

    # -- submission -----------------------------------------------------------------------
    def ingest_file(
        self,
        path: str | Path,
        *,
        source_type: str | None = None,
        metadata: dict[str, Any] | None = None,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> Submission:
        """Upload a document, audio or video file (type detected by the API if not given)."""
        path = Path(path)
        form: dict[str, str] = {}
        if source_type:
            form["source_type"] = source_type
        if metadata is not None:
            form["metadata"] = json.dumps(metadata)
        if webhook_url:
            form["webhook_url"] = webhook_url
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        with path.open("rb") as stream:  # httpx streams the file; it is never read whole
            submission: Submission = self._request(
                "POST",
                f"{API}/ingest/file",
                data=form,
                files={"file": (path.name, stream, media_type)},
                headers=headers,
            )
        return submission

    def ingest_url(
        self,
        url: str,
        *,
        source_type: str | None = None,
        metadata: dict[str, Any] | None = None,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> Submission:
        """Submit a web page (or an audio/video URL) for ingestion."""
        body: dict[str, Any] = {"url": url}
        if source_type:
            body["source_type"] = source_type
        if metadata is not None:
            body["metadata"] = metadata
        if webhook_url:
            body["webhook_url"] = webhook_url
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        submission: Submission = self._request(
            "POST", f"{API}/ingest/url", json=body, headers=headers
        )
        return submission

    # -- jobs -----------------------------------------------------------------------------
    def status(self, task_id: str) -> JobStatus:
        job: JobStatus = self._request("GET", f"{API}/status/{task_id}")
        return job

    def result(self, task_id: str, *, offset: int = 0, limit: int | None = None) -> Any:
        """The Markdown, chunks and metadata of a finished job (one page of chunks)."""
        params: dict[str, Any] = {"offset": offset}
        if limit is not None:
            params["limit"] = limit
        return self._request("GET", f"{API}/status/{task_id}/result", params=params)

    def history(self, task_id: str) -> Any:
        return self._request("GET", f"{API}/status/{task_id}/history")

    def cancel(self, task_id: str) -> Any:
        """Cancel a queued or running job (404 unknown, 409 already finished)."""
        return self._request("DELETE", f"{API}/ingest/{task_id}")

    def retry(self, task_id: str) -> Submission:
        submission: Submission = self._request("POST", f"{API}/ingest/{task_id}/retry")
        return submission

    def jobs(
        self,
        *,
        state: str | None = None,
        kind: str | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> Any:
        """Jobs, newest first: ``{items, offset, limit, next_offset}``."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if state:
            params["state"] = state
        if kind:
            params["kind"] = kind
        return self._request("GET", f"{API}/status/", params=params)

    # -- search and documents ---------------------------------------------------------------
    def search(
        self,
        query: str,
        *,
        k: int = 10,
        mode: str = "hybrid",
        filters: dict[str, Any] | None = None,
    ) -> Any:
        """``{query, mode, k, hits, took_ms}``; each hit has text, score, document_id,
        source, kind and location."""
        body: dict[str, Any] = {"query": query, "k": k, "mode": mode}
        if filters:
            body["filters"] = filters
        return self._request("POST", f"{API}/search", json=body)

    def documents(self, *, limit: int = 50, offset: int = 0, kind: str | None = None) -> Any:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if kind:
            params["kind"] = kind
        return self._request("GET", f"{API}/documents", params=params)

    def delete_document(self, document_id: str) -> None:
        self._request("DELETE", f"{API}/documents/{document_id}")

    # -- following a job ------------------------------------------------------------------
    def events(
        self, task_id: str, *, read_timeout: float = 60.0, last_event_id: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """The job's events (state changes and progress) from the SSE stream, until the
        stream ends. Each is a dict like a history entry (ts, state, progress, stage…);
        ``last_event_id`` (an event's ``ts``) skips the events up to it."""
        timeout = httpx.Timeout(self._http.timeout.connect, read=read_timeout)
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        try:
            with connect_sse(
                self._http,
                "GET",
                f"{API}/status/{task_id}/events",
                timeout=timeout,
                headers=headers,
            ) as source:
                if source.response.status_code >= 400:
                    source.response.read()
                    raise MoragApiError.from_response(source.response)
                for sse in source.iter_sse():
                    if not sse.data:
                        continue  # a keep-alive
                    try:
                        event = json.loads(sse.data)
                    except ValueError:
                        continue  # not ours to interpret
                    if isinstance(event, dict):
                        if sse.event and sse.event != "message":
                            event.setdefault("event", sse.event)
                        yield event
        except SSEError as exc:
            raise MoragApiError(0, "bad_stream", f"the event stream is not SSE: {exc}") from None
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None

    def wait(
        self,
        task_id: str,
        *,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = None,
    ) -> JobStatus:
        """Follow the job until it is final; returns its final status.

        Events go to ``on_event`` as they come. A dropped stream (or one the server
        closed at its time limit, or refused for now: 429, 503) is re-opened from the last
        event seen, the status read first, so a job that ended meanwhile is not waited
        for. ``timeout`` (seconds, None: no limit) raises ``MoragApiError`` with code
        ``timeout``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.status(task_id)
        pause, last_seen = 0.2, None
        while not is_final(job.get("status", "")):
            if deadline is not None and time.monotonic() > deadline:
                raise MoragApiError(
                    0,
                    "timeout",
                    f"job {task_id} did not finish within "
                    f"{timeout:g} s (it is {job.get('status')})",
                )
            read_timeout = 60.0 if deadline is None else max(deadline - time.monotonic(), 0.1)
            ended = False
            try:
                for event in self.events(
                    task_id, read_timeout=read_timeout, last_event_id=last_seen
                ):
                    last_seen = str(event.get("ts") or "") or last_seen
                    if on_event is not None:
                        on_event(event)
                    if is_final(str(event.get("state", ""))):
                        ended = True
                        break
            except MoragApiError as exc:
                # 429/503: the server holds as many streams as it takes for now
                retried = exc.code in ("unreachable", "bad_stream") or exc.status in (429, 503)
                if exc.status == 404 or not retried:
                    raise
            if not ended:  # the stream dropped: look again, a little later each time
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
            job = self.status(task_id)
        return job
