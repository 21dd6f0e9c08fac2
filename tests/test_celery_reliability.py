"""The distributed backend under failures, with real processes: redis-server, `imagen worker`s, the API.

The contract suite (test_job_contract.py) already runs against this backend; these tests cover what only a
cluster has: several workers, a broker that redelivers, goes down or restarts, hosts without shared disk.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

from fastapi.testclient import TestClient

from imagen.api.app import BROKER_DOWN
from tests.celery_support import CeleryCluster, RedisServer, celery_cluster, celery_tool, live_workers, own_redis
from tests.conftest import REPO, ServerProcess, submit, wait_for, wait_status
from tests.latches import Latches

TERMINAL = {"SUCCESS", "FAILURE"}
__all__ = ["celery_cluster", "own_redis"]  # fixtures


def executions(log: Path, prompt: str) -> int:
    return log.read_text().splitlines().count(prompt) if log.exists() else 0


def owner_pid(cluster: CeleryCluster, job_id: str) -> int:
    owner = cast(bytes | None, cluster.redis.client().hget(f"imagen:job:{job_id}", "owner"))
    assert owner is not None
    return int(owner.decode().split("|")[1])


def test_worker_host_killed_mid_job_completes_on_another_worker_once(
    celery_cluster: CeleryCluster, tmp_path: Path, execution_log: Path, latches: Latches
) -> None:
    cluster = celery_cluster
    cluster.settings = {"broker_visibility_timeout_s": 2.0}
    workers = [cluster.start_worker(), cluster.start_worker()]
    client = cluster.api()
    job_id = submit(client, "hold job", steps=30)
    wait_status(client, job_id, {"PROGRESS"})
    running_child = owner_pid(cluster, job_id)
    (victim,) = [w for w in workers if running_child in w.children()]
    victim.kill()  # the whole worker (main process and pool child), as a host that dies
    latches.release("job")  # the killed attempt made nothing; the next one ends at once
    done = wait_status(client, job_id, TERMINAL, timeout=30)
    assert done["status"] == "SUCCESS"
    assert [p.name for p in (tmp_path / "outputs").glob("*.png")] == [done["result"]["filename"]]
    assert executions(execution_log, "hold job") == 2


def test_job_longer_than_the_visibility_timeout_runs_once(
    celery_cluster: CeleryCluster, execution_log: Path, latches: Latches
) -> None:
    cluster = celery_cluster
    cluster.settings = {"broker_visibility_timeout_s": 0.5}
    workers = [cluster.start_worker(), cluster.start_worker()]
    client = cluster.api()
    job_id = submit(client, "hold long", steps=30)
    latches.wait_started("long")
    # Held past the visibility timeout: Redis hands the message to the idle worker, whose lock check drops it.
    wait_for(lambda: any("not run here (busy)" in worker.log() for worker in workers), timeout=60)
    latches.release("long")
    assert wait_status(client, job_id, TERMINAL, timeout=30)["status"] == "SUCCESS"
    assert executions(execution_log, "hold long") == 1
    after = submit(client, "after the long job")
    assert wait_status(client, after, TERMINAL)["status"] == "SUCCESS"


def test_job_that_always_fails_stops_after_max_attempts_and_the_queue_drains(
    celery_cluster: CeleryCluster, execution_log: Path
) -> None:
    cluster = celery_cluster
    cluster.settings = {"max_attempts": 3}
    cluster.start_worker()
    cluster.start_worker()
    client = cluster.api()
    failing = submit(client, "oom")
    fatal = submit(client, "fatal")
    others = [submit(client, f"fine {i}") for i in range(4)]
    done = wait_status(client, failing, TERMINAL, timeout=30)
    assert done["status"] == "FAILURE" and "out of memory" in done["error"] and "3 attempts" in done["error"]
    assert wait_status(client, fatal, TERMINAL)["status"] == "FAILURE"
    assert all(wait_status(client, job, TERMINAL)["status"] == "SUCCESS" for job in others)
    assert executions(execution_log, "oom") == 3
    assert executions(execution_log, "fatal") == 1
    assert cluster.redis.client().llen("imagen") == 0  # nothing left requeueing itself


def test_time_limit_fails_the_job_and_the_worker_takes_the_next(celery_cluster: CeleryCluster) -> None:
    cluster = celery_cluster
    cluster.settings = {"job_timeout_s": 1.0}
    cluster.start_worker()
    client = cluster.api()
    stuck = submit(client, "hang")
    following = submit(client, "after the hang")
    done = wait_status(client, stuck, TERMINAL)
    assert done["status"] == "FAILURE" and done["error"].startswith("Timeout: ")
    assert wait_status(client, following, TERMINAL)["status"] == "SUCCESS"


def test_hard_time_limit_kills_a_stuck_child_and_the_job_fails_with_a_timeout(
    celery_cluster: CeleryCluster,
) -> None:
    cluster = celery_cluster
    cluster.settings = {"job_timeout_s": 1.0, "engine": "tests.celery_support:StubbornEngine"}
    cluster.start_worker()
    client = cluster.api()
    stuck = submit(client, "stuck")
    following = submit(client, "after the stuck one")
    done = wait_status(client, stuck, TERMINAL)
    assert done["status"] == "FAILURE" and done["error"].startswith("Timeout: ")
    after = wait_status(client, following, TERMINAL)
    assert after["status"] == "SUCCESS", (after, cluster.workers[0].log())


def test_imagen_serve_with_a_broker_url_end_to_end(
    celery_cluster: CeleryCluster, make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    cluster = celery_cluster
    worker = cluster.start_worker()
    server = make_server(broker_url=cluster.redis.url, job_lock_ttl_s="1.5")
    server.start()
    with server.client() as http:
        (child,) = worker.children()
        assert http.get("/health").json() == {
            "status": "ok",
            "gpu_available": False,
            "queue_broker": "connected",
            "reasons": [],
            "workers": [
                {"host": socket.gethostname(), "pid": child, "ready": True, "device": "cpu", "gpu_available": False,
                 "models": {}}  # no job yet: no model held
            ],
        }
        job_id = http.post("/generate", json={"prompt": "through a real server"}).json()["job_id"]
        done = wait_status(http, job_id, TERMINAL)
        assert done["status"] == "SUCCESS"
        image = http.get(f"/image/{job_id}")
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert (tmp_path / "outputs" / done["result"]["filename"]).is_file()


def test_redis_restart_loses_no_queued_job(celery_cluster: CeleryCluster) -> None:
    cluster = celery_cluster
    cluster.start_worker()
    client = cluster.api()
    blocker = submit(client, "sleep 1")
    wait_status(client, blocker, {"STARTED", "PROGRESS"})
    queued = [submit(client, f"queued {i}") for i in range(5)]
    cluster.redis.restart()  # same port, data from the append-only file
    for job in [blocker, *queued]:
        assert wait_status(client, job, TERMINAL, timeout=60)["status"] == "SUCCESS"


def test_broker_down_health_says_disconnected_and_generate_answers_503(celery_cluster: CeleryCluster) -> None:
    cluster = celery_cluster
    client = cluster.api()
    assert client.get("/health").json()["queue_broker"] == "connected"
    cluster.redis.kill()
    started = time.monotonic()
    health = client.get("/health")
    assert health.status_code == 503  # a load balancer sends work elsewhere
    assert health.json() == {
        "status": "unavailable", "gpu_available": False, "queue_broker": "disconnected",
        "reasons": ["job broker (Redis) unreachable: ConnectionError"], "workers": [],
    }
    response = client.post("/generate", json={"prompt": "while the broker is down"})
    assert response.status_code == 503
    assert response.json() == {"detail": BROKER_DOWN}
    assert time.monotonic() - started < 5  # short timeouts: an answer, never a hang
    cluster.redis.start()
    wait_for(lambda: client.get("/health").json()["queue_broker"] == "connected", timeout=10)
    cluster.start_worker()
    job = submit(client, "after the outage")
    assert wait_status(client, job, TERMINAL)["status"] == "SUCCESS"


def test_broker_that_never_answers_does_not_hang(make_client: Callable[..., TestClient]) -> None:
    # A loopback socket that accepts connections and never replies: without short timeouts every call
    # would wait for the OS.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        client = make_client(broker_url=f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
        started = time.monotonic()
        assert client.get("/health").json()["queue_broker"] == "disconnected"
        assert client.post("/generate", json={"prompt": "x"}).status_code == 503
        assert time.monotonic() - started < 10


def test_images_reach_every_api_replica_without_a_shared_disk(celery_cluster: CeleryCluster, tmp_path: Path) -> None:
    cluster = celery_cluster
    cluster.start_worker()
    client = cluster.api()
    replica = cluster.api(outputs_dir=tmp_path / "replica-outputs")
    # A third replica, alive but slow to copy: Redis keeps the PNG for it (it drops it once all have a copy).
    cluster.redis.client().zadd("imagen:replicas", {"slow replica": (time.time() + 60) * 1000})
    job_id = submit(client, "shared nothing")
    done = wait_status(client, job_id, TERMINAL)
    filename = done["result"]["filename"]
    assert done["result"]["path"] == str(tmp_path / "outputs" / filename)
    assert not list((tmp_path / "worker-outputs").glob("*.png"))  # the worker keeps no copy
    # the other replica got it in the background, without being asked
    wait_for(lambda: (tmp_path / "replica-outputs" / filename).is_file(), timeout=10)
    # a replica that lost its file fetches it again on demand, from any route that serves it
    (tmp_path / "outputs" / filename).unlink()
    assert client.get(f"/download/{filename}").status_code == 200
    (tmp_path / "outputs" / filename).unlink()
    image = client.get(f"/image/{job_id}")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == (tmp_path / "replica-outputs" / filename).read_bytes()
    assert client.get(f"/download/{filename}").status_code == 200
    assert replica.get(f"/outputs/{filename}").status_code == 200


def test_queue_limit_and_positions_are_cluster_wide(celery_cluster: CeleryCluster, tmp_path: Path) -> None:
    cluster = celery_cluster
    first = cluster.api(max_queue=3)
    second = cluster.api(max_queue=3, outputs_dir=tmp_path / "second")
    messages = [
        api.post("/generate", json={"prompt": f"job {i}"}).json()["message"]
        for i, api in enumerate([first, second, first])
    ]
    assert messages == [f"Tâche en file d'attente. Position estimée: {n}" for n in (1, 2, 3)]
    full = second.post("/generate", json={"prompt": "one too many"})
    assert full.status_code == 503
    assert full.json() == {"detail": "Queue pleine, réessayez plus tard"}


def test_gpu_flag_health_and_celery_inspect(celery_cluster: CeleryCluster) -> None:
    cluster = celery_cluster
    client = cluster.api()
    assert client.get("/health").json()["gpu_available"] is False  # no worker yet
    worker = cluster.start_worker(gpu="3", engine="tests.celery_support:FakeGpuEngine")
    assert client.get("/health").json() == {
        "status": "ok",
        "gpu_available": True,
        "queue_broker": "connected",
        "reasons": [],
        "workers": [
            {
                "host": socket.gethostname(), "pid": worker.children()[0], "ready": True, "device": "cuda:3",
                "gpu_available": True, "models": {},
            }
        ],
    }
    # the engine saw CUDA_VISIBLE_DEVICES=3 (set by --gpu before it was built)
    assert [w["device"] for w in live_workers(cluster.redis.client())] == ["cuda:3"]
    ping = celery_tool(cluster.redis.url, "inspect", "ping", "--timeout", "2")
    assert "imagen-gpu3@" in ping.stdout and "pong" in ping.stdout, ping.stdout + ping.stderr


def test_the_api_process_imports_no_torch_and_routes_no_celery(own_redis: RedisServer) -> None:
    code = (
        "import sys\n"
        "import imagen.api.routes\n"
        "assert 'celery' not in sys.modules, 'routes import celery'\n"
        "from imagen.api.app import create_app\n"
        "from imagen.config import Settings\n"
        f"app = create_app(Settings(broker_url='{own_redis.url}', engine='test-pattern'))\n"
        "assert 'celery' in sys.modules\n"
        "assert 'torch' not in sys.modules, 'the API imported torch'\n"
        "assert 'diffusers' not in sys.modules, 'the API imported diffusers'\n"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_worker_sigterm_is_a_clean_stop(celery_cluster: CeleryCluster) -> None:
    cluster = celery_cluster
    worker = cluster.start_worker()
    assert worker.process is not None
    os.killpg(worker.pid, signal.SIGTERM)
    assert worker.process.wait(timeout=30) == 0
    wait_for(lambda: not live_workers(cluster.redis.client()), timeout=10)
