"""What one API key can store through ``POST /uploads``: its uploads are kept as sent (not re-encoded), a
quota bounds how many and how many bytes it keeps at once (429, or 413 for one image over it), per key
(with per-key overrides) and for the anonymous owner without keys, and expired uploads give their space
back (SQLite ``incremental_vacuum``, Redis expiries). On both job backends."""

from __future__ import annotations

import io
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from imagen.access.keys import key_digest, new_key
from imagen.errors import UploadQuotaError
from imagen.jobs.embedded.store import SqliteJobStore
from imagen.jobs.lifecycle import AttemptPolicy
from imagen.jobs.types import Upload, UploadQuota
from tests.celery_support import RedisServer, shared_redis
from tests.conftest import submit, wait_for, wait_status
from tests.test_store_contract import Clock

__all__ = ["shared_redis"]  # a fixture
QUOTA_DETAIL = "Quota d'images envoyées atteint"


def noise_jpeg(size: int = 512, seed: int = 0) -> bytes:
    """The worst case for a re-encoding: noise, as a JPEG (a PNG of it is ~4x larger)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def post_upload(client: TestClient, data: bytes, key: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.post("/uploads", files={"file": ("noise.jpg", data, "image/jpeg")}, headers=headers)


@pytest.fixture(params=["embedded", "distributed"])
def api(request: pytest.FixtureRequest, make_client: Callable[..., TestClient]) -> Callable[..., TestClient]:
    """An API on either backend (distributed: a real Redis; no worker is needed to keep uploads)."""
    if request.param == "embedded":
        return lambda **settings: make_client(engine="test-pattern", **settings)
    server: RedisServer = request.getfixturevalue("shared_redis")
    server.client().flushall()
    return lambda **settings: make_client(engine="test-pattern", broker_url=server.url, **settings)


def stored_uploads(client: TestClient) -> int:
    """How many uploads the backend holds (live or not yet swept)."""
    store = client.app.state.backend.store  # type: ignore[attr-defined]
    if client.app.state.settings.broker_url:  # type: ignore[attr-defined]
        return len(list(store.client.scan_iter(match="imagen:upload:*")))
    return int(store.file.connection().execute("SELECT COUNT(*) FROM uploads").fetchone()[0])


def stored_bytes(client: TestClient, upload_id: str) -> int:
    """The bytes one upload takes where it is kept: its pages in the SQLite file, or its key in Redis."""
    store = client.app.state.backend.store  # type: ignore[attr-defined]
    if client.app.state.settings.broker_url:  # type: ignore[attr-defined]
        return int(store.client.memory_usage(f"imagen:upload:{upload_id}", samples=0))
    with sqlite3.connect(client.app.state.settings.database_path) as db:  # type: ignore[attr-defined]
        return int(db.execute("SELECT SUM(pgsize) FROM dbstat WHERE name = 'uploads'").fetchone()[0])


# -- kept as sent ---------------------------------------------------------------------------------------
def test_an_upload_is_kept_as_sent_not_re_encoded(api: Callable[..., TestClient]) -> None:
    client = api()
    photo = noise_jpeg(1024)
    answer = post_upload(client, photo)
    assert answer.status_code == 201, answer.text
    upload_id = answer.json()["upload_id"]
    kept = client.app.state.backend.load_upload(upload_id)  # type: ignore[attr-defined]
    assert kept is not None and kept.data == photo  # the bytes sent, not a PNG made from them
    # Where it is kept, it takes about what was sent (a PNG of this noise would take ~4x).
    assert stored_bytes(client, upload_id) < 1.25 * len(photo), (stored_bytes(client, upload_id), len(photo))


def test_an_upload_kept_as_sent_still_feeds_a_job(make_client: Callable[..., TestClient]) -> None:
    """EXIF orientation and alpha still apply: the file is checked and decoded again when a job names it."""
    client = make_client(engine="test-pattern")
    image = Image.new("RGB", (640, 512), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° to display: 512×640 upright
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    upload_id = post_upload(client, buffer.getvalue()).json()["upload_id"]
    job_id = submit(client, "img2img", init_image=f"upload:{upload_id}")
    done = wait_status(client, job_id, {"SUCCESS", "FAILURE", "REVOKED"})
    assert done["status"] == "SUCCESS", done
    assert (done["result"]["metadata"]["width"], done["result"]["metadata"]["height"]) == (512, 640)


# -- quotas -----------------------------------------------------------------------------------------------
def test_the_count_quota_applies_without_keys(api: Callable[..., TestClient]) -> None:
    client = api(key_max_uploads=2, upload_ttl_s=600)
    photo = noise_jpeg(64)
    assert [post_upload(client, photo).status_code for _ in range(2)] == [201, 201]
    refused = post_upload(client, photo)
    assert refused.status_code == 429, refused.text
    assert refused.json()["detail"].startswith(QUOTA_DETAIL)
    assert "2 conservées" in refused.json()["detail"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 600  # when the oldest one expires
    assert stored_uploads(client) == 2  # nothing stored for the refused one


def test_the_byte_quota_counts_bytes_as_sent(api: Callable[..., TestClient]) -> None:
    photos = [noise_jpeg(256, seed) for seed in range(3)]
    quota = len(photos[0]) + len(photos[1]) + len(photos[2]) // 2  # two fit, not three
    client = api(key_max_upload_bytes=quota, key_max_uploads=100)
    assert [post_upload(client, photo).status_code for photo in photos[:2]] == [201, 201]
    refused = post_upload(client, photos[2])
    assert refused.status_code == 429, refused.text
    assert f"{quota} octets conservés" in refused.json()["detail"]
    assert stored_uploads(client) == 2


def test_one_image_larger_than_the_byte_quota_is_a_413(api: Callable[..., TestClient]) -> None:
    photo = noise_jpeg(256)
    client = api(key_max_upload_bytes=len(photo) - 1)
    refused = post_upload(client, photo)
    assert refused.status_code == 413, refused.text
    limit = len(photo) - 1
    assert refused.json()["detail"] == f"Image plus grande que le quota d'images envoyées ({limit} octets au plus)"
    assert "Retry-After" not in refused.headers  # waiting would not help
    assert stored_uploads(client) == 0


def test_quotas_are_per_key_with_overrides_from_the_keys_file(api: Callable[..., TestClient], tmp_path: Path) -> None:
    plain, generous = new_key(), new_key()
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(
        "keys:\n"
        f"  - name: plain\n    sha256: {key_digest(plain)}\n"
        f"  - name: generous\n    sha256: {key_digest(generous)}\n    max_uploads: 3\n"
    )
    client = api(api_keys_file=keys_file, key_max_uploads=1)
    photo = noise_jpeg(64)
    assert post_upload(client, photo, plain).status_code == 201
    assert post_upload(client, photo, plain).status_code == 429  # its own quota is full...
    # ...not the other key's, whose own quota is 3
    assert [post_upload(client, photo, generous).status_code for _ in range(4)] == [201, 201, 201, 429]


def test_the_keys_file_refuses_a_bad_quota(tmp_path: Path) -> None:
    from imagen.access.keys import KeyFile

    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - name: a\n    sha256: {key_digest('x')}\n    max_uploads: 0\n")
    with pytest.raises(ValueError, match="max_uploads"):
        KeyFile.read(path)


def test_uploads_racing_for_the_last_places_never_pass_the_quota(api: Callable[..., TestClient]) -> None:
    """Eight uploads at once for three places: exactly three are kept (the check and the write are atomic)."""
    client = api()
    backend = client.app.state.backend  # type: ignore[attr-defined]
    quota = UploadQuota(max_uploads=3, max_bytes=1 << 30)
    start = threading.Barrier(8)
    outcomes: list[str] = []

    def one(index: int) -> None:
        upload = Upload(f"race{index}", "racer", b"x" * 1000, 1, 1, time.time() + 600)
        start.wait()
        try:
            backend.save_upload(upload, quota)
            outcomes.append("kept")
        except UploadQuotaError:
            outcomes.append("refused")

    threads = [threading.Thread(target=one, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == ["kept"] * 3 + ["refused"] * 5


# -- space given back on expiry ------------------------------------------------------------------------
@pytest.fixture
def clocked_store(tmp_path: Path) -> Iterator[tuple[SqliteJobStore, Clock]]:
    clock = Clock()
    store = SqliteJobStore(
        tmp_path / "jobs.sqlite3", policy=AttemptPolicy(max_attempts=3, timeout_s=600), result_ttl_s=60, clock=clock
    )
    yield store, clock
    store.close()


def on_disk(path: Path) -> int:
    """The database's bytes on disk: the file and its write-ahead log."""
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def test_expired_uploads_give_their_space_back_to_the_file_system(
    clocked_store: tuple[SqliteJobStore, Clock],
) -> None:
    store, clock = clocked_store
    empty = on_disk(store.path)
    for index in range(4):
        store.save_upload(Upload(f"u{index}", "k", np.random.default_rng(index).bytes(1 << 20), 1, 1, clock.now + 10))
    assert on_disk(store.path) > empty + (4 << 20)
    clock.now += 11  # expired, by the store's own clock
    store.purge_expired()  # the reaper's pass
    assert store.load_upload("u0") is None
    assert on_disk(store.path) < empty + (256 << 10), (on_disk(store.path), empty)


def test_an_older_database_is_converted_once_and_keeps_its_uploads(tmp_path: Path) -> None:
    """A database made before: no auto-vacuum, uploads re-encoded as PNG in a ``png`` column."""
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE uploads (upload_id TEXT PRIMARY KEY, key_name TEXT NOT NULL, png BLOB NOT NULL, "
            "width INTEGER NOT NULL, height INTEGER NOT NULL, expires_at REAL NOT NULL)"
        )
        db.execute("INSERT INTO uploads VALUES ('old', 'k', ?, 1, 1, ?)", (b"\x89PNG old bytes", time.time() + 600))
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    store = SqliteJobStore(path, policy=AttemptPolicy(max_attempts=3, timeout_s=600), result_ttl_s=60)
    try:
        assert store.file.connection().execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
        old = store.load_upload("old")
        assert old is not None and old.data == b"\x89PNG old bytes"
        with pytest.raises(UploadQuotaError):  # its bytes count against its owner's quota
            store.save_upload(Upload("new", "k", b"12345", 1, 1, time.time() + 600), UploadQuota(100, 16))
    finally:
        store.close()


def test_redis_forgets_an_expired_upload_and_its_place_in_the_quota(
    make_client: Callable[..., TestClient], shared_redis: RedisServer
) -> None:
    redis_client = shared_redis.client()
    redis_client.flushall()
    client = make_client(engine="test-pattern", broker_url=shared_redis.url, upload_ttl_s=0.5, key_max_uploads=1)
    first = post_upload(client, noise_jpeg(64)).json()["upload_id"]
    assert 0 < redis_client.pttl(f"imagen:upload:{first}") <= 500
    assert all(redis_client.pttl(key) > 0 for key in redis_client.scan_iter(match="imagen:upload*"))  # the index too
    wait_for(lambda: not redis_client.exists(f"imagen:upload:{first}"), timeout=10)  # Redis expired it
    second = post_upload(client, noise_jpeg(64, seed=1))  # its place in the quota is free again
    assert second.status_code == 201, second.text
    assert redis_client.zscore("imagen:uploads_of:", first) is None  # and the index forgot it
    wait_for(lambda: not list(redis_client.scan_iter(match="imagen:upload*")), timeout=10)  # nothing left behind
