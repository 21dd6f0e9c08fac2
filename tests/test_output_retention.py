"""Outputs retention (off by default): PNGs older than IMAGEN_OUTPUTS_MAX_AGE_S, or the oldest past
IMAGEN_OUTPUTS_MAX_BYTES, are deleted by a sweep off the event loop, and their routes answer 404 as for any
missing image. On both backends (distributed: the API replica's own outputs folder, where images are kept).
Ages are set on the files (``os.utime``), never waited for."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from imagen.config import Settings
from imagen.outputs.retention import RetentionPolicy, RetentionSweeper, sweep
from tests.conftest import submit, wait_for, wait_status
from tests.test_job_contract import job_system, shared_redis

__all__ = ["job_system", "shared_redis"]  # fixtures
IMAGE_NOT_FOUND = {"detail": "Image non trouvée"}
HOUR = 3600.0


def write(folder: Path, name: str, size: int, age_s: float) -> Path:
    path = folder / name
    path.write_bytes(b"\0" * size)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def names(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()}


# -- the sweep ----------------------------------------------------------------------------------------------
def test_max_age_deletes_only_older_servable_pngs(tmp_path: Path) -> None:
    write(tmp_path, "old.png", 10, 2 * HOUR)
    write(tmp_path, "new.png", 10, 60)
    write(tmp_path, ".partial-abc.png", 10, 2 * HOUR)  # a file being written (or left by a crash)
    write(tmp_path, "notes.txt", 10, 2 * HOUR)  # not an image the service made
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "deep.png", 10, 2 * HOUR)
    elsewhere = write(tmp_path.parent, f"{tmp_path.name}-target.png", 10, 2 * HOUR)
    (tmp_path / "link.png").symlink_to(elsewhere)
    os.utime(tmp_path / "link.png", (time.time() - 2 * HOUR,) * 2, follow_symlinks=False)
    result = sweep(tmp_path, RetentionPolicy(max_age_s=HOUR))
    assert result.deleted == ("old.png",)
    assert names(tmp_path) == {"new.png", ".partial-abc.png", "notes.txt", "sub", "link.png"}
    assert elsewhere.exists() and (tmp_path / "sub" / "deep.png").exists()


def test_max_bytes_deletes_the_oldest_until_the_rest_fit(tmp_path: Path) -> None:
    for age, (name, size) in enumerate([("d.png", 400), ("c.png", 300), ("b.png", 200), ("a.png", 100)]):
        write(tmp_path, name, size, age_s=60 * (age + 1))  # a.png oldest, d.png newest
    result = sweep(tmp_path, RetentionPolicy(max_bytes=750))
    assert result.deleted == ("a.png", "b.png")  # 1000 -> 900 -> 700 bytes
    assert (result.freed_bytes, result.kept, result.kept_bytes) == (300, 2, 700)
    assert names(tmp_path) == {"c.png", "d.png"}


def test_the_newest_output_is_always_kept(tmp_path: Path) -> None:
    write(tmp_path, "older.png", 100, 120)
    write(tmp_path, "newest.png", 500, 60)
    sweep(tmp_path, RetentionPolicy(max_bytes=10))
    assert names(tmp_path) == {"newest.png"}


def test_both_bounds_together(tmp_path: Path) -> None:
    write(tmp_path, "ancient.png", 10, 3 * HOUR)
    write(tmp_path, "old.png", 300, 30 * 60)
    write(tmp_path, "new.png", 300, 60)
    assert sweep(tmp_path, RetentionPolicy(max_age_s=HOUR, max_bytes=500)).deleted == ("ancient.png", "old.png")


def test_retention_is_off_by_default(make_settings: Callable[..., Settings]) -> None:
    assert RetentionSweeper.from_settings(make_settings()) is None
    sweeper = RetentionSweeper.from_settings(make_settings(outputs_max_bytes=10**9))
    assert sweeper is not None and sweeper.policy == RetentionPolicy(max_bytes=10**9)


@pytest.mark.parametrize("setting", ["outputs_max_age_s", "outputs_max_bytes", "outputs_sweep_s"])
def test_a_bound_of_zero_is_refused(make_settings: Callable[..., Settings], setting: str) -> None:
    with pytest.raises(ValueError, match=setting):
        make_settings(**{setting: 0})


# -- through the API, both backends -------------------------------------------------------------------
def finished(client: TestClient, prompt: str) -> dict[str, Any]:
    """A job run to SUCCESS whose PNG is in this API's outputs folder, and nowhere else it could come back
    from (distributed: Redis released its copy once this replica had one)."""
    job_id = submit(client, prompt)
    done = wait_status(client, job_id, {"SUCCESS", "FAILURE", "REVOKED"})
    assert done["status"] == "SUCCESS", done
    assert client.get(f"/image/{job_id}").status_code == 200
    if client.app.state.settings.broker_url:  # type: ignore[attr-defined]
        store = client.app.state.backend.store  # type: ignore[attr-defined]
        wait_for(lambda: store.pngs.get(done["result"]["filename"]) is None)
    return done


def make_old(outputs: Path, job: dict[str, Any], age_s: float) -> None:
    stamp = time.time() - age_s
    os.utime(outputs / job["result"]["filename"], (stamp, stamp))


def assert_gone(client: TestClient, job: dict[str, Any]) -> None:
    filename = job["result"]["filename"]
    for path in (f"/image/{job['job_id']}", f"/outputs/{filename}", f"/download/{filename}"):
        answer = client.get(path)
        assert (answer.status_code, answer.json()) == (404, IMAGE_NOT_FOUND), path


def test_max_age_deletes_old_outputs_and_their_routes_answer_404(
    job_system: Callable[..., TestClient], tmp_path: Path
) -> None:
    outputs = tmp_path / "outputs"
    client = job_system(engine="test-pattern", outputs_max_age_s=HOUR, outputs_sweep_s=0.05)
    old, new = finished(client, "old"), finished(client, "new")
    make_old(outputs, old, 2 * HOUR)
    wait_for(lambda: not (outputs / old["result"]["filename"]).exists())  # the periodic sweep
    assert_gone(client, old)
    assert client.get(f"/image/{new['job_id']}").status_code == 200
    assert client.get(f"/outputs/{new['result']['filename']}").status_code == 200


def test_max_bytes_deletes_the_oldest_outputs_and_their_routes_answer_404(
    job_system: Callable[..., TestClient], tmp_path: Path
) -> None:
    outputs = tmp_path / "outputs"
    client = job_system(engine="test-pattern", outputs_max_bytes=1, outputs_sweep_s=0.05)
    first = finished(client, "first")  # alone: the newest, kept whatever its size
    make_old(outputs, first, 60)
    second = finished(client, "second")
    wait_for(lambda: not (outputs / first["result"]["filename"]).exists())
    assert_gone(client, first)
    assert client.get(f"/image/{second['job_id']}").status_code == 200
    assert names(outputs) == {second["result"]["filename"]}
