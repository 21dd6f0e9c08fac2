"""The keys file while the server runs: a removed key stops working, however it was removed.

Deleted file, an edit that does not parse, an edit that keeps the size and the modification time (`cp -p`,
`rsync -t`): each must revoke the keys it no longer names (``KeyRing``'s rules), and say so in the log.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imagen.access.keys import KeyRing, add_key, key_digest, new_key
from tests.conftest import wait_for


def ring_of(path: Path) -> KeyRing:
    return KeyRing(path, default_max_waiting=5, default_requests_per_minute=60)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_deleting_the_file_refuses_every_key_until_it_is_back(make_server: Callable[..., Any], tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "first")
    server = make_server(api_keys_file=str(path))
    server.start()
    with server.client() as http:
        assert http.get("/models", headers=bearer(key)).status_code == 200
        saved = path.read_bytes()
        path.unlink()
        wait_for(lambda: http.get("/models", headers=bearer(key)).status_code == 401, 10)
        assert http.get("/health").status_code == 200
        path.write_bytes(saved)
        wait_for(lambda: http.get("/models", headers=bearer(key)).status_code == 200, 10)
    assert "is gone or unreadable" in server.log_path.read_text()


def test_a_running_server_notices_revoking_edits_that_keep_mtime_or_do_not_parse(
    make_server: Callable[..., Any], tmp_path: Path
) -> None:
    path = tmp_path / "keys.yaml"
    leaked, removed, kept = add_key(path, "leaked"), add_key(path, "removed"), add_key(path, "kept")
    server = make_server(api_keys_file=str(path))
    server.start()
    with server.client() as http:
        assert all(http.get("/models", headers=bearer(key)).status_code == 200 for key in (leaked, removed, kept))
        # `cp -p` of a file where the leaked key's digest was replaced: same size, same mtime
        before = path.stat()
        path.write_text(path.read_text().replace(key_digest(leaked), key_digest(new_key())))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        wait_for(lambda: http.get("/models", headers=bearer(leaked)).status_code == 401, 10)
        # an edit that removes a key and breaks the YAML
        path.write_text(f"keys:\n  - name: kept\n\tsha256: {key_digest(kept)}\n")
        wait_for(lambda: http.get("/models", headers=bearer(removed)).status_code == 401, 10)
        assert http.get("/models", headers=bearer(kept)).status_code == 200
    assert "does not parse" in server.log_path.read_text()


def test_a_deleted_file_is_logged_at_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "first")
    ring = ring_of(path)
    path.unlink()
    with caplog.at_level(logging.ERROR, logger="imagen.access"):
        ring.refresh()
        ring.refresh()  # still gone: said once, not once a second
    assert ring.identify(key) is None and len(ring) == 0
    complaints = [record for record in caplog.records if "is gone or unreadable" in record.getMessage()]
    assert len(complaints) == 1 and complaints[0].levelno == logging.ERROR


def test_a_revoking_edit_that_keeps_size_and_mtime_is_noticed(tmp_path: Path) -> None:
    """As `cp -p` or `rsync -t` leave it: same length (another digest in place of the revoked one), same
    modification time."""
    path = tmp_path / "keys.yaml"
    revoked = add_key(path, "leaked")
    kept = add_key(path, "kept")
    ring = ring_of(path)
    assert ring.identify(revoked) is not None
    before = path.stat()
    text = path.read_text()
    replacement = new_key()
    path.write_text(text.replace(key_digest(revoked), key_digest(replacement)))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    ring.refresh()
    assert ring.identify(revoked) is None
    caller = ring.identify(replacement)
    assert caller is not None and caller.name == "leaked"
    assert ring.identify(kept) is not None


def test_an_edit_that_does_not_parse_revokes_the_keys_it_no_longer_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.yaml"
    removed = add_key(path, "removed")
    commented = add_key(path, "commented")
    kept = add_key(path, "kept")
    ring = ring_of(path)
    kept_caller = ring.identify(kept)
    added = new_key()
    # One entry deleted, one commented out, a new one added, an admin flag given, and a typo (a tab):
    broken = (
        "keys:\n"
        f"  # - name: commented\n  #   sha256: {key_digest(commented)}\n"
        f"  - name: kept\n    sha256: {key_digest(kept)}\n    admin: true\n"
        f"  - name: added\n\tsha256: {key_digest(added)}\n"
    )
    path.write_text(broken)
    with caplog.at_level(logging.ERROR, logger="imagen.access"):
        ring.refresh()
    assert ring.identify(removed) is None
    assert ring.identify(commented) is None
    assert ring.identify(kept) == kept_caller and kept_caller is not None and not kept_caller.admin  # as last read
    assert ring.identify(added) is None  # a file that does not parse grants nothing new
    [complaint] = [record for record in caplog.records if "does not parse" in record.getMessage()]
    assert "refused now: commented, removed" in complaint.getMessage()
    # once it parses again, it says exactly who may call
    path.write_text(broken.replace("\t", "    "))
    ring.refresh()
    assert ring.identify(added) is not None
    again = ring.identify(kept)
    assert again is not None and again.admin
    assert ring.identify(removed) is None and ring.identify(commented) is None


def test_a_file_that_is_not_text_revokes_every_key_it_cannot_show(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "first")
    ring = ring_of(path)
    path.write_bytes(b"\xff\xfe" + b"\x00" * 40)
    ring.refresh()
    assert ring.identify(key) is None


def test_identify_reads_no_file(tmp_path: Path) -> None:
    """The middleware calls ``identify`` on the event loop for every request: it works from memory; only
    ``refresh`` (run in a thread, once a second) reads the file."""
    path = tmp_path / "keys.yaml"
    key = add_key(path, "first")
    ring = ring_of(path)
    path.unlink()
    assert ring.identify(key) is not None
    assert ring.refresh_due() is False  # just read at start
