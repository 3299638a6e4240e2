"""Which files the storage janitor may delete, and when (services/retention.py): pure
logic on paths in a temporary directory, no Redis."""

from __future__ import annotations

from pathlib import Path

import pytest

from morag.core.config import Settings
from morag.core.errors import InputGoneError
from morag.services.retention import (
    DueInputs,
    artifact_folder,
    input_delay,
    input_for_retry,
    owned_path,
)


def test_only_names_inside_the_upload_dir_are_deletable(tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    root.mkdir()
    (root / "sub").mkdir()
    assert owned_path(root / "a.pdf", root) == root.resolve() / "a.pdf"
    assert owned_path(root / "sub" / "b.wav", root) == root.resolve() / "sub" / "b.wav"
    assert owned_path(tmp_path / "elsewhere.pdf", root) is None
    assert owned_path(root / ".." / "escape.pdf", root) is None
    assert owned_path("relative.pdf", root) is None
    assert owned_path(root, root) is None
    assert owned_path(str(root) + "-sibling/x.pdf", root) is None


def test_a_symlinked_parent_pointing_out_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    root.mkdir()
    outside = tmp_path / "users"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    assert owned_path(root / "link" / "their.pdf", root) is None


def test_a_symlink_itself_is_the_name_removed_not_its_target(tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    root.mkdir()
    (root / "pointer.pdf").symlink_to(tmp_path / "target.pdf")
    assert owned_path(root / "pointer.pdf", root) == root.resolve() / "pointer.pdf"


def test_artifact_folders_are_named_by_job_ids_only(tmp_path: Path) -> None:
    assert artifact_folder("0b6c-4e_x", tmp_path) == tmp_path.resolve() / "0b6c-4e_x"
    for bad in ("", "..", "../x", "a/b", "a b", "x" * 129):
        assert artifact_folder(bad, tmp_path) is None


def test_due_entries_parse_or_are_dropped_unread() -> None:
    entry = DueInputs.parse(b'{"task_id": "t1", "files": ["/u/a.pdf"]}')
    assert (entry.task_id, entry.files) == ("t1", ["/u/a.pdf"])
    assert DueInputs.parse(b"not json").files == []
    assert DueInputs.parse(b"[1, 2]").files == []


def test_inputs_go_at_the_end_or_with_the_record() -> None:
    assert input_delay(False, 3600) == 0.0
    assert input_delay(True, 3600) == 3600.0
    cfg = Settings(_env_file=None)
    assert cfg.keep_inputs_until_expiry is False and cfg.index_prune_interval == 60.0


def test_a_retry_gets_its_own_name_for_the_file(tmp_path: Path) -> None:
    original = tmp_path / "a.pdf"
    original.write_bytes(b"%PDF")
    copy = input_for_retry(original, "b.pdf", task_id="t1")
    assert copy == tmp_path / "b.pdf" and copy.read_bytes() == b"%PDF"
    original.unlink()  # the failed job's name goes; the retry's stays
    assert copy.read_bytes() == b"%PDF"


def test_a_retry_of_a_deleted_input_says_why(tmp_path: Path) -> None:
    with pytest.raises(InputGoneError) as raised:
        input_for_retry(tmp_path / "gone.pdf", "new.pdf", task_id="t1")
    assert raised.value.http_status == 410
    assert "deleted when the job finished" in raised.value.message
    assert "MORAG_KEEP_INPUTS_UNTIL_EXPIRY" in raised.value.message
    assert not (tmp_path / "new.pdf").exists()
