"""Keys, their names and owners (core/principals.py), and the edge's pure helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from morag.api.edge import check_bind, host_name, is_loopback
from morag.core.config import Settings
from morag.core.errors import ConfigurationError
from morag.core.principals import ANONYMOUS, KeyTable, Principal


def test_keys_resolve_to_their_names() -> None:
    table = KeyTable.build(["alpha:alpha-secret-1", "bare-key-without-name"], ["ops:ops-secret-1"])
    assert table.keyed
    assert table.lookup("alpha-secret-1") == Principal("alpha")
    assert table.lookup("ops-secret-1") == Principal("ops", admin=True)
    bare = table.lookup("bare-key-without-name")
    assert bare is not None and bare.name.startswith("key-") and len(bare.name) == 16
    assert table.lookup("alpha:alpha-secret-1") is None and table.lookup("alpha") is None
    assert not KeyTable.build([]).keyed


def test_a_keys_file_adds_entries(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nteam-b:bravo-secret-1\n\n  team-c:charlie-secret  \n")
    table = KeyTable.build(["team-a:alpha-secret-1"], keys_file=keys)
    assert table.names == ["team-a", "team-b", "team-c"]
    assert table.lookup("charlie-secret") == Principal("team-c")


@pytest.mark.parametrize(
    ("entries", "admins", "message"),
    [
        (["a:short"], [], "at least 8"),
        (["a:has space in it"], [], "at least 8"),
        (["bad name:long-enough-key"], [], "a key's name"),
        ([":long-enough-key"], [], "a key's name"),
        (["a:long-enough-key", "a:another-long-key"], [], "used by another key"),
        (["a:long-enough-key", "b:long-enough-key"], [], "configured twice"),
        (["anonymous:long-enough-key"], [], "reserved"),
        ([], ["a:short"], "MORAG_ADMIN_KEYS entry 1"),
    ],
)
def test_malformed_keys_are_refused_by_position(
    entries: list[str], admins: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message) as refused:
        KeyTable.build(entries, admins)
    for entry in entries + admins:
        assert entry.partition(":")[2] not in str(refused.value)  # never the key itself


def test_settings_refuse_malformed_keys_at_start_up() -> None:
    with pytest.raises(ValidationError, match="MORAG_API_KEYS entry 2"):
        Settings(_env_file=None, api_keys=["a:long-enough-key", "b:x"])


def test_who_may_see_a_job() -> None:
    assert Principal("alpha").may_see("alpha") and not Principal("alpha").may_see("bravo")
    assert Principal("ops", admin=True).may_see("bravo")
    assert ANONYMOUS.may_see("anonymous") and ANONYMOUS.may_see("alpha")  # local mode


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost:8000", "localhost"),
        ("LOCALHOST", "localhost"),
        ("localhost.", "localhost"),
        ("[::1]:8000", "::1"),
        ("[::1]", "::1"),
        ("::1", ""),  # unbracketed IPv6 is malformed in a Host header
        ("[::1", ""),
        ("127.0.0.1:1", "127.0.0.1"),
    ],
)
def test_host_names_are_read_as_a_server_compares_them(header: str, name: str) -> None:
    assert host_name(header) == name


def test_only_loopback_binds_are_allowed_without_keys() -> None:
    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"):
        assert is_loopback(host)
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.com"):
        assert not is_loopback(host)
        with pytest.raises(ConfigurationError, match="MORAG_ALLOW_PUBLIC_WITHOUT_KEYS"):
            check_bind(Settings(_env_file=None), host)
        check_bind(Settings(_env_file=None, api_keys=["a:long-enough-key"]), host)
        check_bind(Settings(_env_file=None, allow_public_without_keys=True), host)


def test_allowed_hosts_default_to_loopback_and_the_bind_address() -> None:
    local = Settings(_env_file=None, api_host="127.0.0.1").api_allowed_hosts()
    assert local == ["localhost", "127.0.0.1", "::1"]
    named = Settings(_env_file=None, api_host="10.0.0.5").api_allowed_hosts()
    assert named[-1] == "10.0.0.5"
    assert "0.0.0.0" not in Settings(_env_file=None, api_host="0.0.0.0").api_allowed_hosts()
    chosen = Settings(_env_file=None, allowed_hosts="a.example,*").api_allowed_hosts()
    assert chosen == ["a.example", "*"]
