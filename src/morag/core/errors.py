"""morag's exception tree.

One base class, a short list of kinds. The API maps each kind to an HTTP status
(``http_status``); the task edge maps each kind to retry or fail (``retryable``)::

    MoragError                      500  internal_error
    ├── InvalidInputError           422  invalid_input        bad request or bad file
    │   ├── UnsupportedFormatError  415  unsupported_format   type we cannot process
    │   ├── LimitExceededError      413  limit_exceeded       size, pages, duration, time
    │   └── ForbiddenTargetError    422  forbidden_target     SSRF guard, path outside roots
    ├── AuthenticationError         401  unauthorized
    ├── NotFoundError               404  not_found
    ├── ConflictError               409  conflict
    ├── InputGoneError              410  input_gone           a job's input was deleted
    ├── TooManyRequestsError        429  too_many_requests    a per-client limit, Retry-After
    ├── ConfigurationError          500  configuration_error  e.g. missing speech model
    ├── TransientError              503  transient_error      retried with backoff
    │   └── OverloadedError         503  unavailable          a process limit, Retry-After
    └── JobCancelledError           409  cancelled            raised inside a job on cancel

An error with ``retry_after`` (seconds) is answered with a ``Retry-After`` header.
"""

from __future__ import annotations

from typing import Any


class MoragError(Exception):
    """Base of every error morag raises on purpose."""

    code = "internal_error"
    http_status = 500
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.retry_after = retry_after

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class InvalidInputError(MoragError):
    code = "invalid_input"
    http_status = 422


class UnsupportedFormatError(InvalidInputError):
    code = "unsupported_format"
    http_status = 415


class LimitExceededError(InvalidInputError):
    code = "limit_exceeded"
    http_status = 413


class ForbiddenTargetError(InvalidInputError):
    code = "forbidden_target"
    http_status = 422


class AuthenticationError(MoragError):
    code = "unauthorized"
    http_status = 401


class NotFoundError(MoragError):
    code = "not_found"
    http_status = 404


class ConflictError(MoragError):
    code = "conflict"
    http_status = 409


class InputGoneError(MoragError):
    """A job's stored input was deleted (inputs live as long as their job is active)."""

    code = "input_gone"
    http_status = 410


class TooManyRequestsError(MoragError):
    """The caller holds as much of something as one client may (e.g. event streams)."""

    code = "too_many_requests"
    http_status = 429


class ConfigurationError(MoragError):
    code = "configuration_error"
    http_status = 500


class TransientError(MoragError):
    """A failure that may pass on its own (network timeout, 5xx): retried with backoff."""

    code = "transient_error"
    http_status = 503
    retryable = True


class OverloadedError(TransientError):
    """The process holds as much of something as it takes; another try may find room."""

    code = "unavailable"


class JobCancelledError(MoragError):
    """Raised inside a running job when its cancellation was requested."""

    code = "cancelled"
    http_status = 409
