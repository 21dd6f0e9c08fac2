"""Real processes for the distributed-backend tests: a private ``redis-server`` and ``imagen worker``s.

Never the system Redis: each server runs on a free port in a temp folder, with ``appendonly yes`` so a
test can restart it and find its queue again. Every process started here is killed (its whole process
group) by the fixture that started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from imagen.generation.base import (
    NO_INPUTS,
    DeviceInfo,
    GeneratedImage,
    GenerationTask,
    InputImages,
    ProgressCallback,
)
from imagen.generation.test_pattern import TestPatternEngine
from tests.conftest import REPO, SCRIPTED_ENGINE, free_port, wait_for
from tests.engines import ScriptedEngine

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
# Short enough that a dead worker's job comes back within a couple of seconds in tests.
TEST_LOCK_TTL_S = "1.5"


def _kill_group(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


class RedisServer:
    """A ``redis-server`` of our own, restartable with its data (AOF)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--protected-mode",
                "no",
                "--enable-debug-command",  # DEBUG SLEEP: a stalled Redis, for the outage tests
                "local",
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(self._ready, timeout=10, interval=0.02)

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"redis-server exited: {(self.directory / 'redis.log').read_text()[-2000:]}")
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=2)

    def stop(self) -> None:
        """Clean shutdown (SIGTERM: Redis flushes its AOF first)."""
        if self.process is not None:
            _kill_group(self.process, signal.SIGTERM)
            self.process = None

    def kill(self) -> None:
        if self.process is not None:
            _kill_group(self.process)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


class WorkerProcess:
    """``imagen worker`` in its own process group, as an operator runs it."""

    def __init__(self, env: dict[str, str], log_path: Path, gpu: str | None = None) -> None:
        self.env = env
        self.log_path = log_path
        self.gpu = gpu
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        command = [sys.executable, "-m", "imagen", "worker"]
        if self.gpu is not None:
            command += ["--gpu", self.gpu]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                env=self.env,
                cwd=str(REPO),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def children(self) -> list[int]:
        """Pool children (the processes that run jobs)."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            return [int(pid) for pid in path.read_text().split()]
        except OSError:
            return []

    def kill(self) -> None:
        if self.process is not None:
            _kill_group(self.process)
            self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def live_workers(client: redis.Redis) -> list[dict[str, Any]]:
    keys = list(client.scan_iter(match="imagen:worker:*"))
    values = client.mget(keys) if keys else []
    return [json.loads(value) for value in values if value]


# What operators point Celery's tools at (docs/distributed.md, "Celery tools").
CELERY_APP = "imagen.jobs.distributed.app:celery_app"


def celery_tool(broker_url: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """``celery -A <our app> <arguments>``, as docs/distributed.md shows it."""
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", CELERY_APP, *arguments],
        env={**os.environ, "PYTHONPATH": str(REPO), "IMAGEN_BROKER_URL": broker_url},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def worker_env(tmp_path: Path, broker_url: str, registry: Path, **settings: Any) -> dict[str, str]:
    """The environment of a worker on 'another host': its own data and outputs folders."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "IMAGEN_BROKER_URL": broker_url,
        "IMAGEN_DATA_DIR": str(tmp_path / "worker-data"),
        "IMAGEN_OUTPUTS_DIR": str(tmp_path / "worker-outputs"),
        "IMAGEN_REGISTRY_PATH": str(registry),
        "IMAGEN_ENGINE": SCRIPTED_ENGINE,
        "IMAGEN_JOB_LOCK_TTL_S": TEST_LOCK_TTL_S,
    }
    env.update({f"IMAGEN_{key.upper()}": str(value) for key, value in settings.items()})
    return env


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for the contract suite (flushed before each test)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server for one test only (tests that stop or restart it)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


class CeleryCluster:
    """An API (in-process TestClient, CeleryBackend) plus worker processes, all on one Redis."""

    def __init__(
        self,
        redis_server: RedisServer,
        tmp_path: Path,
        registry: Path,
        make_client: Callable[..., TestClient],
    ) -> None:
        self.redis = redis_server
        self.tmp_path = tmp_path
        self.registry = registry
        self.make_client = make_client
        self.workers: list[WorkerProcess] = []
        self.settings: dict[str, Any] = {}

    def start_worker(self, wait: bool = True, gpu: str | None = None, **settings: Any) -> WorkerProcess:
        env = worker_env(self.tmp_path, self.redis.url, self.registry, **{**self.settings, **settings})
        worker = WorkerProcess(env, self.tmp_path / f"worker-{len(self.workers)}.log", gpu).start()
        self.workers.append(worker)
        if wait:
            self.wait_ready(worker)
        return worker

    def wait_ready(self, worker: WorkerProcess, timeout: float = 60) -> None:
        def ready() -> bool:
            assert worker.process is not None
            if worker.process.poll() is not None:
                raise AssertionError(f"worker exited: {worker.log()}")
            children = set(worker.children())
            return any(w["pid"] in children and w["ready"] for w in live_workers(self.redis.client()))

        wait_for(ready, timeout=timeout, interval=0.05)

    def api(self, **settings: Any) -> TestClient:
        values = {
            "broker_url": self.redis.url,
            "job_lock_ttl_s": float(TEST_LOCK_TTL_S),
            **self.settings,
            **settings,
        }
        return self.make_client(**values)

    def stop(self) -> None:
        for worker in self.workers:
            worker.kill()


@pytest.fixture
def celery_cluster(
    tmp_path: Path, reference_registry: Path, make_client: Callable[..., TestClient], own_redis: RedisServer
) -> Iterator[CeleryCluster]:
    cluster = CeleryCluster(own_redis, tmp_path, reference_registry, make_client)
    yield cluster
    cluster.stop()


def start_celery_system(
    shared: RedisServer,
    tmp_path: Path,
    registry: Path,
    make_client: Callable[..., TestClient],
    request: pytest.FixtureRequest,
) -> Callable[..., TestClient]:
    """The contract suite's ``job_system`` for the Celery backend: one API and one worker, or as many as the
    ``workers`` setting says (the embedded backend's number of slots)."""
    shared.client().flushall()
    cluster = CeleryCluster(shared, tmp_path, registry, make_client)
    request.addfinalizer(cluster.stop)

    def build(**settings: Any) -> TestClient:
        cluster.settings = settings
        workers = [cluster.start_worker(wait=False) for _ in range(int(settings.get("workers", 1)))]
        client = cluster.api()
        for worker in workers:
            cluster.wait_ready(worker)
        return client

    return build


class FakeGpuEngine(TestPatternEngine):
    """Reports a CUDA device (the one CUDA_VISIBLE_DEVICES names), for /health's gpu_available."""

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(
            gpu_available=True, device=f"cuda:{os.environ.get('CUDA_VISIBLE_DEVICES', '?')}", dtype="float16"
        )


class StubbornEngine(TestPatternEngine):
    """Never returns and ignores the soft time limit, like a generation stuck in native code."""

    def generate(
        self, task: GenerationTask, progress: ProgressCallback, inputs: InputImages = NO_INPUTS
    ) -> list[GeneratedImage]:
        from celery.exceptions import SoftTimeLimitExceeded

        if task.prompt != "stuck":
            return super().generate(task, progress, inputs)
        progress("generation_gpu", 1)
        while True:
            try:
                time.sleep(1)
            except SoftTimeLimitExceeded:
                continue


class ClaimFailsOnceEngine(TestPatternEngine):
    """Fault injection for the worker it runs in: the first claim after the file named by
    ``$IMAGEN_TEST_CLAIM_FAILURE`` appears fails (the file is consumed). The file says how: ``connection``
    raises a Redis connection error (the task body's own retries handle it); ``acked`` raises an error the
    task body does not expect, so Celery acknowledges the message of a job that never started."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from imagen.jobs.distributed.attempts import Attempts

        marker = Path(os.environ["IMAGEN_TEST_CLAIM_FAILURE"])
        claim = Attempts.claim

        def failing_claim(attempts: Attempts, job_id: str, token: str, **options: Any) -> Any:
            try:
                how = marker.read_text()
                marker.unlink()
            except FileNotFoundError:
                return claim(attempts, job_id, token, **options)
            if how == "acked":
                raise RuntimeError("injected: claim failed, message acknowledged")
            raise redis.ConnectionError("injected: connection lost during the claim")

        Attempts.claim = failing_claim  # type: ignore[method-assign,assignment]


class ClaimsFailEngine(ScriptedEngine):
    """Fault injection for the worker it runs in: its first ``$IMAGEN_TEST_FAIL_CLAIMS`` claims fail on a
    broken Redis connection (more than the task body's own retries absorb, so the message must go back to
    the broker)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from imagen.jobs.distributed.attempts import Attempts

        failures_left = [int(os.environ["IMAGEN_TEST_FAIL_CLAIMS"])]
        claim = Attempts.claim

        def failing_claim(attempts: Attempts, job_id: str, token: str, **options: Any) -> Any:
            if failures_left[0] > 0:
                failures_left[0] -= 1
                raise redis.ConnectionError("injected: connection lost during the claim")
            return claim(attempts, job_id, token, **options)

        Attempts.claim = failing_claim  # type: ignore[method-assign,assignment]
