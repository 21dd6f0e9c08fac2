"""Images from workers to API replicas through Redis (real redis-server, real workers): a copy that fails
stalls nothing and is retried; Redis lets a PNG go once every live replica has it, ``png_ttl_s`` after a
first replica copied it, or when ``png_redis_max_bytes`` is reached (oldest copied first); a PNG no replica
has copied never goes (tests/test_full_disk.py: an outputs disk that cannot be written for long)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from imagen.jobs.distributed.keys import PNG_BYTES, REPLICAS
from imagen.jobs.distributed.outcomes import ClaimOutcome
from imagen.jobs.distributed.pngs import PngLimits
from imagen.jobs.distributed.store import RedisJobStore, connect
from tests.celery_support import CeleryCluster, RedisServer, celery_cluster, own_redis
from tests.conftest import submit, wait_for, wait_status
from tests.latches import Latches
from tests.test_distributed_reconciler import new_job

__all__ = ["celery_cluster", "own_redis"]  # fixtures
TERMINAL = {"SUCCESS", "FAILURE"}


def output_name(server: RedisServer, job_id: str) -> str:
    name = server.client().hget(f"imagen:job:{job_id}", "output_name")
    assert name is not None
    return name.decode()


def pngs_in_redis(server: RedisServer) -> list[bytes]:
    return list(server.client().scan_iter(match="imagen:png:*"))


def slow_replica(server: RedisServer) -> None:
    """An API replica that is alive but never copies: Redis keeps PNGs for it."""
    server.client().zadd(REPLICAS, {"slow replica": (time.time() + 600) * 1000})


def test_an_image_that_cannot_be_written_stalls_nothing_and_is_copied_later(
    celery_cluster: CeleryCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture, latches: Latches
) -> None:
    cluster = celery_cluster
    cluster.start_worker()
    client = cluster.api(reconcile_after_s=1.0)
    outputs = tmp_path / "outputs"
    blocked_job = submit(client, "hold blocked")
    latches.wait_started("blocked")
    blocked_name = output_name(cluster.redis, blocked_job)
    (outputs / blocked_name).mkdir()  # where its file should go: writing it fails
    latches.release("blocked")
    assert wait_status(client, blocked_job, TERMINAL)["status"] == "SUCCESS"
    others = [submit(client, f"after the blocked one {i}") for i in range(3)]
    for job_id in others:
        name = wait_status(client, job_id, TERMINAL)["result"]["filename"]
        wait_for(lambda name=name: (outputs / name).is_file(), timeout=10)
    # Housekeeping goes on too: a job whose message was lost is still published again.
    store = RedisJobStore(connect(cluster.redis.url), result_ttl_s=60)
    lost = new_job("message lost")
    store.jobs.submit(lost, max_queue=100)
    store.jobs.confirm(lost.job_id)
    assert wait_status(client, lost.job_id, TERMINAL, timeout=20)["status"] == "SUCCESS"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and blocked_name in r.getMessage()]
    assert warnings and "will retry" in warnings[0].getMessage()
    (outputs / blocked_name).rmdir()  # the disk is fixed: the next try copies it
    wait_for(lambda: (outputs / blocked_name).is_file(), timeout=15, interval=0.1)
    assert client.get(f"/image/{blocked_job}").content.startswith(b"\x89PNG")


def test_a_png_leaves_redis_once_every_replica_has_a_copy(celery_cluster: CeleryCluster, tmp_path: Path) -> None:
    cluster = celery_cluster
    cluster.start_worker()
    first = cluster.api()
    cluster.api(outputs_dir=tmp_path / "second-outputs")
    name = wait_status(first, submit(first, "to every replica"), TERMINAL)["result"]["filename"]
    for folder in (tmp_path / "outputs", tmp_path / "second-outputs"):
        wait_for(lambda folder=folder: (folder / name).is_file(), timeout=10)
    wait_for(lambda: pngs_in_redis(cluster.redis) == [], timeout=10)
    assert int(cluster.redis.client().get(PNG_BYTES) or 0) == 0


def test_a_png_a_replica_never_copies_expires_after_png_ttl(celery_cluster: CeleryCluster) -> None:
    cluster = celery_cluster
    cluster.settings = {"png_ttl_s": 1.0}
    cluster.start_worker()
    client = cluster.api()
    slow_replica(cluster.redis)
    wait_status(client, submit(client, "a slow replica"), TERMINAL)
    assert pngs_in_redis(cluster.redis) != []  # kept for the slow replica...
    wait_for(lambda: pngs_in_redis(cluster.redis) == [], timeout=10)  # ...until its TTL
    # the index follows (swept by the replicas)
    wait_for(lambda: int(cluster.redis.client().get(PNG_BYTES) or 0) == 0, timeout=10)


def finish(store: RedisJobStore, name: str, size: int) -> None:
    job = new_job(name)
    store.jobs.submit(job, max_queue=100)
    claim = store.attempts.claim(job.job_id, "w", max_attempts=3, lock_ttl_s=60, timeout_s=600)
    assert claim.outcome is ClaimOutcome.CLAIMED
    assert store.attempts.complete(job.job_id, "w", {"filename": name}, bytes(size))


def test_past_the_byte_bound_copied_pngs_go_oldest_first_and_uncopied_ones_stay(own_redis: RedisServer) -> None:
    store = RedisJobStore(connect(own_redis.url), result_ttl_s=60, png_limits=PngLimits(ttl_s=600, max_bytes=250))
    slow_replica(own_redis)  # alive, never copies: nothing is dropped for having reached every replica
    names = [f"image_{i}.png" for i in range(3)]
    for name in names:
        finish(store, name, 100)
    # No replica has any: all stay, past the bound, and the backlog is full (no new work until copies).
    assert store.pngs.kept() == names and store.pngs.total_bytes() == 300
    assert store.pngs.backlog_bytes() == 300 and store.pngs.backlog_full()
    for name in names[:2]:
        assert not store.pngs.release(name, "another replica")  # copied there; the slow one still lacks it
    assert store.pngs.uncopied() == names[2:]
    assert store.pngs.backlog_bytes() == 100 and not store.pngs.backlog_full()
    finish(store, "image_3.png", 100)
    # Room for it: the oldest copied ones went first; the uncopied one stayed.
    assert store.pngs.kept() == ["image_2.png", "image_3.png"] and store.pngs.total_bytes() == 200
    assert [store.pngs.get(name) is not None for name in names] == [False, False, True]
    # One PNG larger than the bound, with nothing copied to make room for it: kept, like every uncopied one.
    finish(store, "huge.png", 1000)
    assert store.pngs.uncopied() == ["image_2.png", "image_3.png", "huge.png"]
    assert store.pngs.total_bytes() == store.pngs.backlog_bytes() == 1200
