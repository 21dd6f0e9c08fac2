"""The data folder holds every key's prompts and uploads: 0700, and its database files 0600."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import submit, wait_status
from tests.test_access import PNG

TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The umask most hosts have (files 0644, folders 0755 unless the server says otherwise)."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def use_the_database(client: TestClient) -> None:
    """An upload and a finished job: the database, its -wal and -shm files all exist now."""
    assert client.post("/uploads", files={"file": ("a.png", PNG, "image/png")}).status_code == 201
    assert wait_status(client, submit(client, "secret prompt"), TERMINAL)["status"] == "SUCCESS"


def test_a_new_data_folder_is_0700_and_its_database_files_0600(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    data = tmp_path / "new" / "data"
    client = make_client(data_dir=data)
    use_the_database(client)
    assert mode(data) == 0o700
    database = data / "jobs.sqlite3"
    files = [database, data / "jobs.sqlite3-wal", data / "jobs.sqlite3-shm"]
    assert all(file.exists() for file in files)
    assert {file.name: mode(file) for file in files} == {file.name: 0o600 for file in files}


def test_database_files_made_readable_by_others_are_tightened_at_start(
    make_client: Callable[..., TestClient], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A database from before (0644 in a 0755 folder): its files become 0600; the folder, which may be shared
    on purpose, keeps its mode and the log says so."""
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    database = data / "jobs.sqlite3"
    with closing(sqlite3.connect(database)) as db:  # a database made with the umask's 0644
        db.execute("CREATE TABLE older (x)")
        db.commit()
    assert mode(database) == 0o644
    with caplog.at_level(logging.WARNING, logger="imagen.files"):
        client = make_client(data_dir=data)
    use_the_database(client)
    assert mode(database) == mode(data / "jobs.sqlite3-wal") == 0o600
    assert mode(data) == 0o755
    assert any("open to other users" in record.getMessage() for record in caplog.records)
