"""Every Celery state maps to a TaskStatus on purpose; none falls into FAILURE by accident."""

from __future__ import annotations

import pytest
from celery import states

from morag.services.jobs import FINAL_STATES, TaskStatus
from morag.services.task_manager import status_from_celery_state


@pytest.mark.parametrize(
    ("celery_state", "expected"),
    [
        (states.PENDING, TaskStatus.PENDING),
        (states.RECEIVED, TaskStatus.PENDING),
        (states.STARTED, TaskStatus.STARTED),
        (states.RETRY, TaskStatus.RETRY),
        (states.SUCCESS, TaskStatus.SUCCESS),
        (states.FAILURE, TaskStatus.FAILURE),
        (states.REVOKED, TaskStatus.REVOKED),
        (states.REJECTED, TaskStatus.FAILURE),
        (states.IGNORED, TaskStatus.REVOKED),
        ("PROGRESS", TaskStatus.PROGRESS),
        ("UPLOADING", TaskStatus.PROGRESS),  # a task's custom state: it is running
        ("success", TaskStatus.SUCCESS),
    ],
)
def test_celery_state_mapping(celery_state: str, expected: TaskStatus) -> None:
    assert status_from_celery_state(celery_state) is expected


def test_every_builtin_celery_state_is_mapped_explicitly() -> None:
    from morag.services import task_manager

    assert states.ALL_STATES | {states.RECEIVED, states.REJECTED, states.IGNORED} <= set(
        task_manager._CELERY_STATES
    )


def test_final_states() -> None:
    assert {TaskStatus.SUCCESS, TaskStatus.FAILURE, TaskStatus.REVOKED} == FINAL_STATES
    assert not TaskStatus.RETRY.is_final and TaskStatus.REVOKED.is_final
