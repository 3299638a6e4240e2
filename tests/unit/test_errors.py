"""The error tree: HTTP codes at the API edge, retry or fail at the task edge."""

from __future__ import annotations

from morag.core import errors


def test_http_codes_and_retryability() -> None:
    assert errors.NotFoundError("x").http_status == 404
    assert errors.ConflictError("x").http_status == 409
    assert errors.LimitExceededError("x").http_status == 413
    assert errors.UnsupportedFormatError("x").http_status == 415
    assert errors.InvalidInputError("x").http_status == 422
    assert errors.TransientError("x").retryable is True
    assert not any(
        cls("x").retryable
        for cls in (
            errors.InvalidInputError,
            errors.ForbiddenTargetError,
            errors.ConfigurationError,
        )
    )


def test_to_dict_is_the_api_error_body() -> None:
    exc = errors.LimitExceededError("too big", details={"limit": 10})
    assert exc.to_dict() == {
        "code": "limit_exceeded",
        "message": "too big",
        "details": {"limit": 10},
    }
