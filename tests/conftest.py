"""Shared helpers: settings in a temp folder, an in-process app, a real server process, waiting."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from fastapi.testclient import TestClient

from imagen.api.app import create_app
from imagen.config import Settings
from tests.latches import LATCH_DIR_ENV, Latches

T = TypeVar("T")
REDIS_FIXTURES = {"shared_redis", "own_redis", "celery_cluster"}


SIGNAL_CHANGES_LOG = Path(os.environ.get("TMPDIR", "/tmp")) / "imagen-test-signal-changes.log"


def _kernel_signal_masks() -> tuple[int, int]:
    """The test process's ignored and blocked signals as the kernel holds them (children inherit both):
    a library's C code can ignore a signal without Python's ``signal.getsignal`` knowing."""
    fields = dict(line.split(":\t", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":\t" in line)
    return int(fields["SigIgn"], 16), int(fields["SigBlk"], 16)


@pytest.fixture(autouse=True)
def signals_left_as_found(request: pytest.FixtureRequest) -> Iterator[None]:
    """Ctrl-C and SIGTERM as the test found them, after it: the processes later tests start inherit an
    ignored or blocked signal, and a Ctrl-C test then fails far away (the CLI's cancel on Ctrl-C did, on one
    test worker of a run). A Python-level change fails the test that made it; one the kernel shows but
    Python does not (a library's C code) is undone and written to ``SIGNAL_CHANGES_LOG`` with the test's
    name, to be traced."""
    watched = (signal.SIGINT, signal.SIGTERM)
    bits = sum(1 << (sig - 1) for sig in watched)
    before = {sig: signal.getsignal(sig) for sig in watched}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    kernel_before = _kernel_signal_masks()
    yield
    after = {sig: signal.getsignal(sig) for sig in watched}
    left_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    kernel_after = _kernel_signal_masks()
    for sig, handler in before.items():
        if handler is not None:
            signal.signal(sig, handler)  # sets the kernel's disposition again too
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if (kernel_before[0] ^ kernel_after[0]) & bits or (kernel_before[1] ^ kernel_after[1]) & bits:
        with SIGNAL_CHANGES_LOG.open("a") as log:
            log.write(f"{request.node.nodeid}: SigIgn {kernel_before[0]:x} -> {kernel_after[0]:x}, "
                      f"SigBlk {kernel_before[1]:x} -> {kernel_after[1]:x}\n")
    changed = [signal.Signals(sig).name for sig in watched if after[sig] != before[sig]]
    assert not changed and left_mask == mask, f"signal handlers left changed: {changed}, mask {left_mask}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark what each test needs: a Redis fixture, named or reached through a "celery" parameter (the
    ``job_system`` fixture runs a test on both backends), means a redis-server of the test's own."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_celery = callspec is not None and "celery" in (str(value) for value in callspec.params.values())
        if on_celery or REDIS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.redis)
REPO = Path(__file__).resolve().parent.parent
SCRIPTED_ENGINE = "tests.engines:ScriptedEngine"

REFERENCE_REGISTRY = """
models:
  - id: sdxl-base
    name: SDXL Base 1.0
    description: Stable Diffusion XL base model - polyvalent
    path: models/sd_xl_base_1.0.safetensors
    vae_path: madebyollin/sdxl-vae-fp16-fix
    default_negative: low quality, blurry, distorted, ugly, bad anatomy
    size: 64
  - id: pony-xl-v6
    name: Pony Diffusion XL V6
    description: SDXL fine-tune
    path: models/pony.safetensors
    prefix: pony_xl_v6
    size: 64
loras:
  - id: anime-style
    name: Anime Style Enhancer
    description: Améliore le style anime et les détails
    path: loras/anime.safetensors
    default_weight: 0.75
    trigger_words: [anime style, detailed]
  - id: character-detail
    name: Character Detail Enhancement
    description: Améliore les détails des personnages (visage, yeux, etc.)
    path: loras/detail.safetensors
    default_weight: 0.6
    trigger_words: null
controlnets:
  - id: canny-sdxl
    name: Canny SDXL
    description: edges
    path: controlnets/canny.safetensors
  - id: union-sdxl
    name: Union SDXL
    path: controlnets/union
    control_types: [canny, depth]
ip_adapter:
  path: ip/ip-adapter.safetensors
  image_encoder_path: ip/image_encoder
  reference_image: reference/electra_ref.png
"""


def wait_for(condition: Callable[[], T | None], timeout: float = 20.0, interval: float = 0.01) -> T:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def reference_registry(tmp_path: Path) -> Path:
    """A registry with the reference's ids (files are not read by the test engines)."""
    path = tmp_path / "registry.yaml"
    path.write_text(REFERENCE_REGISTRY)
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "electra_ref.png").write_bytes(b"not read by test engines")
    return path


@pytest.fixture
def make_settings(tmp_path: Path, reference_registry: Path) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "outputs_dir": tmp_path / "outputs",
            "registry_path": reference_registry,
            "engine": SCRIPTED_ENGINE,
        }
        values.update(overrides)
        return Settings(**values)

    return build


@pytest.fixture
def execution_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "executions.log"
    monkeypatch.setenv("IMAGEN_TEST_EXECUTION_LOG", str(path))
    return path


@pytest.fixture
def latches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Latches:
    """Latches for ``hold NAME`` jobs; the folder reaches worker processes through the environment."""
    found = Latches(tmp_path / "latches")
    monkeypatch.setenv(LATCH_DIR_ENV, str(found.folder))
    return found


@pytest.fixture
def make_client(
    make_settings: Callable[..., Settings], execution_log: Path, latches: Latches
) -> Iterator[Callable[..., TestClient]]:
    """An in-process API (with its real worker processes) built from setting overrides."""
    clients: list[TestClient] = []

    def build(**overrides: Any) -> TestClient:
        client = TestClient(create_app(make_settings(**overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in reversed(clients):
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def wait_status(
    client: TestClient | httpx.Client, job_id: str, states: set[str], timeout: float = 20.0
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/status/{job_id}").json()
        return body if body.get("status") in states else None

    return wait_for(check, timeout)


def submit(client: TestClient | httpx.Client, prompt: str, **fields: Any) -> str:
    """POST /generate; the new job's id (the 201 is asserted)."""
    response = client.post("/generate", json={"prompt": prompt, **fields})
    assert response.status_code == 201, response.text
    job_id: str = response.json()["job_id"]
    return job_id


class ServerProcess:
    """``imagen serve`` in its own process, as a user runs it."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path) -> None:
        self.env = env
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the file descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "imagen", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.env,
                cwd=self.env.get("IMAGEN_TEST_CWD", str(REPO)),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, as a service manager starts it
            )
        wait_for(self._ready, timeout=60, interval=0.05)

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"server exited: {self.log_path.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)
        self.process = None

    def stop_group(self, sig: int = signal.SIGTERM) -> None:
        """Signal the whole process group (the API and its generation workers), as systemd's default stop
        (``KillMode=control-group``) or ``kill -TERM -<pgid>`` does, and wait for the API to exit."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=60)
        self.process = None

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10)


@pytest.fixture
def make_server(
    tmp_path: Path, reference_registry: Path, execution_log: Path, latches: Latches
) -> Iterator[Callable[..., ServerProcess]]:
    servers: list[ServerProcess] = []

    def build(**settings: str) -> ServerProcess:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "IMAGEN_DATA_DIR": str(tmp_path / "data"),
            "IMAGEN_OUTPUTS_DIR": str(tmp_path / "outputs"),
            "IMAGEN_REGISTRY_PATH": str(reference_registry),
            "IMAGEN_ENGINE": SCRIPTED_ENGINE,
        }
        env.update({f"IMAGEN_{key.upper()}": value for key, value in settings.items()})
        server = ServerProcess(env, free_port(), tmp_path / f"server-{len(servers)}.log")
        servers.append(server)
        return server

    yield build
    for server in servers:
        server.stop(signal.SIGKILL)

