"""The command-line client against a real `imagen serve` process: generate (progress from /events, images
written), status, cancel, models, loras, Ctrl-C (the job ends REVOKED), a server that is down, usage errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from imagen.access.keys import add_key
from tests.celery_support import shared_redis
from tests.conftest import REPO, ServerProcess, free_port, wait_for
from tests.http_thread import http_server
from tests.test_job_contract import job_system

__all__ = ["job_system", "shared_redis"]  # fixtures (job_system runs a test on both backends)


@pytest.fixture
def server(make_server: Callable[..., ServerProcess], tmp_path: Path) -> Iterator[tuple[ServerProcess, str]]:
    key = add_key(tmp_path / "keys.yaml", "cli")
    server = make_server(api_keys_file=str(tmp_path / "keys.yaml"))
    server.start()
    yield server, key
    server.stop()


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def imagen(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagen", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def _wait_until_following(running: subprocess.Popen[str]) -> str:
    """The client's job id, once the client itself says it follows the running job (its own output, not the
    server's state: a Ctrl-C before that line could land before the client is ready to cancel)."""
    assert running.stderr is not None
    first = running.stderr.readline()
    assert first.startswith("job "), first
    for _ in range(1000):  # one line per status change; the held job reports PROGRESS and stays there
        line = running.stderr.readline()
        assert line, "the client ended before following the job"
        if line.startswith("PROGRESS"):
            return first.split()[1]
    raise AssertionError("the client never reported the job running")


# `python -m imagen` with Python's own Ctrl-C handler, as in a terminal: a test suite started in the background
# (`make test &`) inherits SIGINT ignored, and Python leaves an ignored SIGINT ignored, so the client would
# never see the Ctrl-C the test sends.
CLI_WITH_CTRL_C = [
    sys.executable, "-c",
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'imagen'; runpy.run_module('imagen', run_name='__main__', alter_sys=True)",
]  # fmt: skip


def _exit_status_after_ctrl_c(running: subprocess.Popen[str]) -> int:
    """The client's exit status after its Ctrl-C; if it does not end, what it printed, to say why."""
    try:
        return running.wait(timeout=30)
    except subprocess.TimeoutExpired:
        running.kill()
        _, stderr = running.communicate(timeout=30)
        raise AssertionError(f"the client did not end after Ctrl-C; it printed: {stderr[-2000:]!r}") from None


def test_cli_generates_lists_cancels_and_fails_cleanly(server: tuple[ServerProcess, str], tmp_path: Path) -> None:
    process, key = server
    env = _env(IMAGEN_URL=process.url, IMAGEN_API_KEY=key)

    done = imagen("generate", "sleep 0.5", "--model", "pony-xl-v6", "--lora", "anime-style:0.5", "--steps", "10",
                  "--seed", "7", "--size", "512x512", "-n", "2", "-o", "out/fox.png", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["out/fox-0.png  seed=7", "out/fox-1.png  seed=8"]
    with Image.open(tmp_path / "out" / "fox-1.png") as written:
        assert written.size == (512, 512)
    assert "generation_gpu" in done.stderr  # the progress bar followed the job's steps
    job_id = done.stderr.split("job ", 1)[1].split()[0]

    status = imagen("status", job_id, cwd=tmp_path, env=env)
    assert status.returncode == 0 and f"{job_id}  SUCCESS" in status.stdout and "seed=7" in status.stdout
    models = imagen("models", "--url", process.url, "--key", key, cwd=tmp_path, env=_env())
    assert [line.split("\t")[0] for line in models.stdout.splitlines()] == ["sdxl-base", "pony-xl-v6"]
    loras = imagen("loras", cwd=tmp_path, env=env)
    assert "anime-style" in loras.stdout and "triggers: anime style, detailed" in loras.stdout
    controlnets = imagen("controlnets", cwd=tmp_path, env=env).stdout.splitlines()
    assert controlnets[1].endswith("fits: sdxl-base, pony-xl-v6\ttypes: canny, depth")
    assert controlnets[-1] == "preprocessors: none, canny"

    Image.new("RGB", (64, 64), "white").save(tmp_path / "edges:map.png")  # a colon in a file's name is kept
    guided = imagen("generate", "guided", "--control", "canny-sdxl:edges:map.png:0.6", "--steps", "10", cwd=tmp_path,
                    env=env)  # fmt: skip
    assert guided.returncode == 0, guided.stderr
    guided_job = guided.stderr.split("job ", 1)[1].split()[0]
    status_of_guided = httpx.get(f"{process.url}/status/{guided_job}", headers={"Authorization": f"Bearer {key}"})
    assert [(u["model"], u["scale"]) for u in status_of_guided.json()["result"]["metadata"]["controlnets"]] == [
        ("canny-sdxl", 0.6)
    ]
    assert imagen("generate", "x", "--control", "canny-sdxl:missing.png", cwd=tmp_path, env=env).returncode == 2
    upscalers = imagen("upscalers", cwd=tmp_path, env=env).stdout.splitlines()
    assert upscalers == ["latent\tLatent\tlatent", "lanczos\tLanczos\tpixel"]
    finished = imagen("generate", "finished", "--hires", "1.5:lanczos:0.4", "--refiner", "none", "--steps", "10",
                      cwd=tmp_path, env=env)  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    finished_job = finished.stderr.split("job ", 1)[1].split()[0]
    hires = httpx.get(f"{process.url}/status/{finished_job}", headers={"Authorization": f"Bearer {key}"}).json()
    assert {k: hires["result"]["metadata"]["hires"][k] for k in ("upscaler", "denoise", "scale")} == {
        "upscaler": "lanczos", "denoise": 0.4, "scale": 1.5}
    no_refiner = imagen("generate", "x", "--refiner", "sdxl-refiner", cwd=tmp_path, env=env)
    assert no_refiner.returncode == 1 and "'sdxl-refiner' is unknown" in no_refiner.stderr
    assert imagen("generate", "x", "--hires", "big", cwd=tmp_path, env=env).returncode == 2

    # errors: one line, exit 1; usage: exit 2
    for args in (("generate", "fatal", "--steps", "10"), ("status", "no-such-job"), ("cancel", job_id),
                 ("generate", "x", "--model", "nope")):
        failed = imagen(*args, cwd=tmp_path, env=env)
        assert failed.returncode == 1, (args, failed.stderr)
        assert len(failed.stderr.strip().splitlines()[-1:]) == 1 and "Traceback" not in failed.stderr
    assert "weight file missing" in imagen("generate", "fatal", cwd=tmp_path, env=env).stderr
    assert imagen("generate", "x", "--size", "big", cwd=tmp_path, env=env).returncode == 2
    assert imagen("generate", cwd=tmp_path, env=env).returncode == 2
    wrong_key = imagen("models", cwd=tmp_path, env=_env(IMAGEN_URL=process.url, IMAGEN_API_KEY="imk_wrong"))
    assert wrong_key.returncode == 1 and "401" in wrong_key.stderr

    # Ctrl-C while the job runs: the job is cancelled on the server, exit 130
    with subprocess.Popen(
        [*CLI_WITH_CTRL_C, "generate", "hold cli", "--steps", "100"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as running:
        job = _wait_until_following(running)
        running.send_signal(signal.SIGINT)
        assert _exit_status_after_ctrl_c(running) == 130
        assert running.stderr is not None and f"job {job} cancelled" in running.stderr.read()
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{process.url}/status/{job}", headers=headers).json()["status"] == "REVOKED"


def test_cli_with_the_server_down_says_so_in_one_line(tmp_path: Path) -> None:
    down = imagen("generate", "a fox", "--url", f"http://127.0.0.1:{free_port()}", cwd=tmp_path, env=_env())
    assert down.returncode == 1
    assert down.stderr.count("\n") == 1 and "cannot reach the server" in down.stderr
    assert not down.stdout


def test_cli_polls_status_on_a_server_without_events(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server without /events (an older imagen, a proxy that buffers streams): the client polls /status."""
    from rich.console import Console

    from imagen.client import ImagenClient, generate

    statuses = iter([
        {"job_id": "j", "status": "PENDING", "result": None},
        {"job_id": "j", "status": "PROGRESS", "result": None, "meta": {"step": "generation_gpu", "progress": 50}},
        {"job_id": "j", "status": "SUCCESS", "result": {"filename": "a.png", "metadata": {"seed": 3},
                                                        "images": [{"filename": "a.png", "seed": 3}]}},
    ])
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        if request.url.path == "/generate":
            return httpx.Response(201, json={"job_id": "j", "status": "queued", "message": "ok"})
        if request.url.path.startswith("/status/"):
            return httpx.Response(200, json=next(statuses))
        if request.url.path.startswith("/image/"):
            return httpx.Response(200, content=b"png bytes")
        return httpx.Response(404, json={"detail": "Not Found"})

    client = ImagenClient("http://imagen.test", None)
    client.http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(handle))
    monkeypatch.setattr("imagen.client.POLL_S", 0.0)
    assert generate(client, {"prompt": "x"}, str(tmp_path / "x.png"), Console(stderr=True)) == 0
    assert seen == ["POST /generate", "GET /events/j", "GET /status/j", "GET /status/j", "GET /status/j",
                    "GET /image/j"]
    assert (tmp_path / "x.png").read_bytes() == b"png bytes"
    assert "PROGRESS generation_gpu 50%" in capsys.readouterr().err


def test_cli_generates_and_cancels_on_both_backends(job_system: Callable[..., Any], tmp_path: Path) -> None:
    api = job_system()
    with http_server(api) as url:
        env = _env(IMAGEN_URL=url)
        done = imagen("generate", "sleep 0.3", "--steps", "10", "--seed", "5", "-n", "2", "-o", "two.png",
                      cwd=tmp_path, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["two-0.png  seed=5", "two-1.png  seed=6"]
        assert (tmp_path / "two-1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with subprocess.Popen(
            [*CLI_WITH_CTRL_C, "generate", "hold cli", "--steps", "100"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ) as running:  # fmt: skip
            job = _wait_until_following(running)
            running.send_signal(signal.SIGINT)
            assert _exit_status_after_ctrl_c(running) == 130
        assert wait_for(lambda: httpx.get(f"{url}/status/{job}").json()["status"] == "REVOKED")
