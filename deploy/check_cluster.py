"""``make test-deploy``: build the image from the Dockerfile and run compose.yaml's cluster for real, with Podman.

1. The base: a local Debian bookworm (``deploy/base-image.sh``, made once), given to the Dockerfile as
   ``BASE_IMAGE`` instead of the CUDA runtime; Redis on the same base (``podman/redis.Containerfile``).
2. The image, tagged ``imagen:latest`` as compose.yaml names it (Podman's layer cache keeps the unchanged
   layers: torch and the dependencies are built once). pip inside the build uses the host's pip configuration
   and CA bundle, mounted read-only for the build only (nothing of them stays in the image).
3. compose.yaml, copied byte for byte, with ``podman/compose.podman.yaml`` over it (host network, loopback ports),
   up with podman-compose: api, ``worker`` and ``worker-gpu1`` (two workers), redis; the registry is the built-in
   demo model (``demo: true``), on the CPU.
4. Checks: a job through the API runs on a worker container and its PNG comes back; a worker container killed
   (SIGKILL) in the middle of a job loses nothing: the job completes on the other worker, one image.
5. Everything it started is removed (containers, pod, volumes), pass or fail; the images stay, as a cache.

Prints the image size, the build and start times. Needs root, podman, podman-compose and debootstrap
(``.ci/run`` installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import redis

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "deploy" / "podman"
WORK = REPO / "build" / "deploy"  # the compose project's folder (its ./models); build/ is ignored by git
BASE_IMAGE = "localhost/imagen-base:bookworm"
IMAGE = "imagen:latest"  # compose.yaml's `image:`; Podman stores it as localhost/imagen:latest
REDIS_IMAGE = "localhost/imagen-deploy-redis:bookworm"  # compose.podman.yaml's redis `image:`
PROJECT = "imagen-deploy-test"
WORKERS = {"imagen-worker-gpu0": "worker", "imagen-worker-gpu1": "worker-gpu1"}  # hostname -> service
# podman-compose from the project's venv (a dev dependency) before the system's: Debian bookworm's 1.0.3 puts
# every container on the project's network as well as the host's, which Podman refuses ("cannot set multiple
# networks without bridge network mode"), and knows no profiles.
COMPOSE = shutil.which("podman-compose", path=str(Path(sys.executable).parent)) or "podman-compose"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_CA_PATH = "/run/imagen-build/ca-certificates.crt"  # not over the image's own bundle, which apt writes
# A job long enough on the CPU to be killed in its middle: the demo model's largest image at the most steps.
# The kill waits for the condition "denoising has begun on a worker"; the size only makes room for it.
LONG_JOB = {"prompt": "a red circle", "model": "demo", "steps": 100, "width": 2048, "height": 2048, "seed": 7}
SHORT_JOB = {"prompt": "a blue square", "model": "demo", "steps": 10, "width": 512, "height": 512, "seed": 1}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

T = TypeVar("T")


def env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(HERE / "containers.conf")}


def run(*args: str, capture: bool = False, check: bool = True, extra_env: dict[str, str] | None = None) -> str:
    print("+", " ".join(args), flush=True)
    done = subprocess.run(
        args,
        check=False,
        text=True,
        env={**env(), **(extra_env or {})},
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
    )
    if check and done.returncode != 0:
        if capture:
            print(done.stdout[-4000:])
        raise SystemExit(f"failed ({done.returncode}): {' '.join(args)}")
    return done.stdout or ""


def wait_for(what: str, condition: Callable[[], T | None], timeout: float, interval: float = 0.5) -> T:
    """Poll ``condition`` until it gives something truthy; the timeout is a bound, never the criterion."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mb(size: int) -> str:
    return f"{size / 1e6:,.0f} MB"


# --- building -------------------------------------------------------------------------------


def pip_build_mounts(scratch: Path) -> list[str]:
    """``-v`` options that give pip inside the build the host's configuration: its settings (``pip config
    list``: files and PIP_* variables alike) as one /etc/pip.conf, the CA bundle, and every local path they name
    (wheel folders, file:// indexes, a constraints file), all read-only."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], check=True, text=True, capture_output=True
    ).stdout
    settings: dict[str, str] = {}
    for line in listed.splitlines():
        name, _, value = line.partition("=")
        if value:
            settings[name.rpartition(".")[2]] = value.strip().strip("'\"")
    mounts: dict[str, str] = {}
    lines = ["[global]"]
    for key, value in sorted(settings.items()):
        if key == "cert":
            value = BUILD_CA_PATH
        for word in value.split():
            path = word.removeprefix("file://")
            if path.startswith("/") and Path(path).exists():
                # A local index (``…/simple``) links to its files beside it (``../files``): its whole folder.
                if word.startswith("file://") and Path(path).name == "simple":
                    path = str(Path(path).parent)
                mounts[path] = path
        lines.append(f"{key} = {value}")
    if HOST_CA_BUNDLE.exists():
        mounts[str(HOST_CA_BUNDLE)] = BUILD_CA_PATH
        if "cert" not in settings:
            lines.append(f"cert = {BUILD_CA_PATH}")
    config = scratch / "pip.conf"
    config.write_text("\n".join(lines) + "\n")
    mounts[str(config)] = "/etc/pip.conf"
    return [f"--volume={source}:{target}:ro" for source, target in mounts.items()]


def image_size(image: str) -> int:
    return int(run("podman", "image", "inspect", "--format", "{{.Size}}", image, capture=True).split()[-1])


def build(figures: dict[str, str]) -> None:
    started = time.monotonic()
    run(str(REPO / "deploy" / "base-image.sh"), BASE_IMAGE)
    figures["base image (debootstrap, cached after the first run)"] = f"{time.monotonic() - started:.0f} s"
    scratch = WORK / "build-config"
    scratch.mkdir(parents=True, exist_ok=True)
    common = [
        "podman", "build", "--network=host", "--format=docker",  # docker format: the HEALTHCHECK is kept
        "--ulimit=nofile=1024:1024", "--ulimit=nproc=4096:4096", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
    ]
    started = time.monotonic()
    run(*common, "--tag", REDIS_IMAGE, "--file", str(HERE / "redis.Containerfile"), str(HERE))
    figures["redis image build"] = f"{time.monotonic() - started:.0f} s"
    started = time.monotonic()
    run(
        *common,
        *pip_build_mounts(scratch),
        # download.pytorch.org is out of reach here: PyPI, where the host's pip configuration adds the CPU
        # wheel of the pinned torch on disk (a local version, 2.13.0+cpu, which pip prefers to PyPI's CUDA build).
        "--build-arg", "TORCH_INDEX_URL=https://pypi.org/simple",
        "--tag", IMAGE,
        "--file", str(REPO / "Dockerfile"),
        str(REPO),
    )
    figures["imagen image build (layers cached from earlier runs reused)"] = f"{time.monotonic() - started:.0f} s"
    figures["imagen image size"] = mb(image_size(IMAGE))
    figures["of which the Debian base"] = mb(image_size(BASE_IMAGE))


# --- the cluster ----------------------------------------------------------------------------


class Cluster:
    def __init__(self, api_port: int, redis_port: int) -> None:
        self.api = f"http://127.0.0.1:{api_port}"
        self.redis_port = redis_port
        self.compose_env = {
            "IMAGEN_DEPLOY_API_PORT": str(api_port),
            "IMAGEN_DEPLOY_REDIS_PORT": str(redis_port),
        }
        self.files = ["-f", str(WORK / "compose.yaml"), "-f", str(WORK / "compose.podman.yaml")]

    def compose(self, *args: str, check: bool = True) -> str:
        return run(
            COMPOSE, "--project-name", PROJECT, *self.files, *args, check=check,
            extra_env=self.compose_env,
        )

    def prepare(self) -> None:
        """The project folder: compose.yaml as shipped, the Podman overlay, and ./models with a registry of the
        built-in demo model (the default IMAGEN_REGISTRY_PATH, /models/registry.yaml, finds it there)."""
        WORK.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / "compose.yaml", WORK / "compose.yaml")
        assert (WORK / "compose.yaml").read_bytes() == (REPO / "compose.yaml").read_bytes()
        shutil.copyfile(HERE / "compose.podman.yaml", WORK / "compose.podman.yaml")
        models = WORK / "models"
        models.mkdir(exist_ok=True)
        (models / "registry.yaml").write_text(
            "default_model: demo\nmodels:\n  - {id: demo, name: Demo (shapes), demo: true}\n"
        )

    def up(self) -> None:
        # --profile gpu1: the second worker, as compose.yaml's comments say to start it. Debian bookworm's
        # podman-compose (1.0.3) knows no profiles: it starts every service, the second worker included.
        knows_profiles = "--profile" in run(COMPOSE, "--help", capture=True, check=False)
        self.compose(*(["--profile", "gpu1"] if knows_profiles else []), "up", "-d")

    def down(self) -> None:
        """Remove all it started, whatever state it is in (a failed start included)."""
        self.compose("down", "--volumes", check=False)
        label = f"label=io.podman.compose.project={PROJECT}"
        left = run("podman", "ps", "-a", "--filter", label, "--format", "{{.ID}}", capture=True, check=False).split()
        if left:
            run("podman", "rm", "-f", *left, check=False)
        volumes = run("podman", "volume", "ls", "--filter", label, "--format", "{{.Name}}", capture=True, check=False)
        if volumes.split():
            run("podman", "volume", "rm", "-f", *volumes.split(), check=False)
        pods = run("podman", "pod", "ls", "--filter", f"name={PROJECT}", "--format", "{{.ID}}",
                   capture=True, check=False)
        if pods.split():
            run("podman", "pod", "rm", "-f", *pods.split(), check=False)

    def container(self, service: str) -> str:
        """The container of a compose service (podman-compose names them PROJECT_SERVICE_1)."""
        found = run(
            "podman", "ps", "-a", "--filter", f"label=io.podman.compose.project={PROJECT}",
            "--filter", f"label=com.docker.compose.service={service}", "--format", "{{.Names}}", capture=True,
        ).split()
        assert len(found) == 1, f"{service}: containers {found}"
        return found[0]

    def running(self, service: str) -> bool:
        state = run("podman", "inspect", "--format", "{{.State.Running}}", self.container(service), capture=True)
        return state.strip().endswith("true")

    def logs(self) -> None:
        for service in ("api", "worker", "worker-gpu1", "redis"):
            print(f"--- logs of {service} (last 40 lines)")
            run("podman", "logs", "--tail", "40", f"{PROJECT}_{service}_1", check=False)

    def health(self, client: httpx.Client) -> dict[str, Any] | None:
        try:
            answer = client.get(f"{self.api}/health", timeout=5)
        except httpx.HTTPError:
            return None
        found: dict[str, Any] = answer.json()
        return found

    def ready_workers(self, client: httpx.Client) -> set[str]:
        health = self.health(client) or {}
        return {worker["host"] for worker in health.get("workers", []) if worker.get("ready")}

    def submit(self, client: httpx.Client, job: dict[str, Any]) -> str:
        answer = client.post(f"{self.api}/generate", json=job, timeout=10)
        assert answer.status_code == 201, answer.text
        job_id: str = answer.json()["job_id"]
        return job_id

    def status(self, client: httpx.Client, job_id: str) -> dict[str, Any]:
        answer = client.get(f"{self.api}/status/{job_id}", timeout=10)
        assert answer.status_code == 200, answer.text
        found: dict[str, Any] = answer.json()
        assert found["status"] != "FAILURE", found
        return found

    def png(self, client: httpx.Client, job_id: str) -> bytes:
        answer = client.get(f"{self.api}/image/{job_id}", timeout=30)
        assert answer.status_code == 200, (answer.status_code, answer.text[:300])
        assert answer.content.startswith(PNG_SIGNATURE), answer.content[:16]
        return answer.content

    def holder(self, job_id: str) -> str | None:
        """The host name of the worker running a job: its lock holds ``host|pid|nonce`` (imagen's
        jobs/distributed/keys.py)."""
        with redis.Redis(port=self.redis_port, socket_timeout=5) as client:
            token = client.get(f"imagen:lock:{job_id}")
        return token.decode().split("|")[0] if token else None


def check(cluster: Cluster, figures: dict[str, str]) -> None:
    with httpx.Client() as client:
        started = time.monotonic()
        cluster.up()
        wait_for("GET /health answers", lambda: cluster.health(client), timeout=300)
        figures["API answering after `up -d`"] = f"{time.monotonic() - started:.0f} s"
        ready: set[str] = wait_for(
            "both workers ready",
            lambda: found if (found := cluster.ready_workers(client)) >= set(WORKERS) else None,
            timeout=600,
        )
        figures["both workers ready after `up -d` (demo model loaded, warm-up run)"] = (
            f"{time.monotonic() - started:.0f} s"
        )
        print("ready workers:", sorted(ready))

        # 1. A job through the API, run by a worker container, its PNG back through the API.
        started = time.monotonic()
        job_id = cluster.submit(client, SHORT_JOB)
        done = wait_for(
            "the short job ends",
            lambda: s if (s := cluster.status(client, job_id))["status"] == "SUCCESS" else None,
            timeout=300,
        )
        png = cluster.png(client, job_id)
        figures["a 512² 10-step demo job, submit to SUCCESS"] = f"{time.monotonic() - started:.1f} s"
        print(f"job {job_id}: SUCCESS, {done['result']['filename']}, PNG of {len(png)} bytes")

        # 2. A worker container killed mid-job: the job goes back to the queue when its lock expires
        # (IMAGEN_JOB_LOCK_TTL_S) and completes on the other worker.
        job_id = cluster.submit(client, LONG_JOB)
        status = wait_for(
            "the long job is denoising",
            lambda: s if ((s := cluster.status(client, job_id)).get("meta") or {}).get("current_step") else None,
            timeout=300,
            interval=0.2,
        )
        first = wait_for("its worker is known", lambda: cluster.holder(job_id), timeout=30, interval=0.2)
        assert first in WORKERS, first
        victim = WORKERS[first]
        print(f"job {job_id} denoising on {first} (step {status['meta']['current_step']}/100): killing {victim}")
        run("podman", "kill", "--signal", "KILL", cluster.container(victim))
        killed_at = time.monotonic()
        after = cluster.status(client, job_id)
        assert after["status"] != "SUCCESS", "the job ended before the kill: make LONG_JOB longer"
        assert not cluster.running(victim)
        survivor = next(host for host in WORKERS if host != first)
        wait_for(
            "the job runs again, on the other worker",
            lambda: cluster.holder(job_id) == survivor or None,
            timeout=300,
            interval=0.2,
        )
        print(f"job {job_id} taken up by {survivor} after {time.monotonic() - killed_at:.0f} s")
        done = wait_for(
            "the long job ends",
            lambda: s if (s := cluster.status(client, job_id))["status"] == "SUCCESS" else None,
            timeout=900,
            interval=1.0,
        )
        png = cluster.png(client, job_id)
        assert done["result"]["images"] is None or len(done["result"]["images"]) == 1, done["result"]
        figures["killed worker's job: kill to SUCCESS on the other worker"] = f"{time.monotonic() - killed_at:.0f} s"
        print(f"job {job_id}: SUCCESS on {survivor}, {done['result']['filename']}, PNG of {len(png)} bytes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the cluster running (remove it with --down)")
    parser.add_argument("--down", action="store_true", help="only remove a cluster left by --keep")
    parser.add_argument("--skip-build", action="store_true", help="use the images already built")
    args = parser.parse_args()
    for tool in ("podman", COMPOSE, "runc", "debootstrap"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install podman runc debootstrap; make install", file=sys.stderr)
            return 2
    figures: dict[str, str] = {}
    cluster = Cluster(free_port(), free_port())
    if args.down:
        cluster.down()
        return 0
    if not args.skip_build:
        build(figures)
    cluster.prepare()
    cluster.down()  # what a run killed before its clean-up left
    try:
        check(cluster, figures)
    except BaseException:
        cluster.logs()
        raise
    finally:
        if not args.keep:
            cluster.down()
        print()
        print("| make test-deploy | |")
        print("|---|---|")
        for name, value in figures.items():
            print(f"| {name} | {value} |")
        print(json.dumps(figures))
    print("deploy check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
