"""The Docker deployment files, checked without a Docker daemon against the project they ship.

compose.yaml and the Dockerfile must only run commands ``imagen`` accepts and set ``IMAGEN_*`` variables that
``Settings`` knows and accepts; every folder those settings name must be on a volume; the image installs
the project as pyproject.toml says (same torch pin, a Python that ``requires-python`` allows). No compose JSON
schema ships with an installed package, so the compose file's shape is checked here field by field.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from imagen.cli import build_parser
from imagen.config import Settings
from tests.conftest import REPO

IMAGEN_SERVICES = ("api", "worker", "worker-gpu1")
WORKERS = ("worker", "worker-gpu1")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\").strip() if current else stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, arguments = current.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return instructions


def dockerfile(keyword: str) -> list[str]:
    return [arguments for name, arguments in dockerfile_instructions() if name == keyword]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for arguments in dockerfile("ENV"):
        for pair in shlex.split(arguments):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def pyproject() -> dict[str, Any]:
    with (REPO / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load((REPO / "compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = compose["services"][name]
    return found


def service_env(compose: dict[str, Any], name: str) -> dict[str, str]:
    """The environment a service's process sees: the image's ENV, then the service's."""
    environment = service(compose, name).get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {**dockerfile_env(), **{key: str(value) for key, value in environment.items()}}


def service_settings(compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in service_env(compose, name).items():
        if key.startswith("IMAGEN_"):
            monkeypatch.setenv(key, value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


def mounts(compose: dict[str, Any], name: str) -> dict[PurePosixPath, tuple[str, bool]]:
    """Container path -> (source, read-only) of a service's volumes (short syntax)."""
    found: dict[PurePosixPath, tuple[str, bool]] = {}
    for volume in service(compose, name).get("volumes", []):
        source, target, *mode = volume.split(":")
        found[PurePosixPath(target)] = (source, mode == ["ro"])
    return found


def on_a_mount(path: Path, mounted: dict[PurePosixPath, tuple[str, bool]]) -> bool:
    posix = PurePosixPath(path)
    return any(posix == target or target in posix.parents for target in mounted)


def command(compose: dict[str, Any], name: str) -> list[str]:
    run = service(compose, name)["command"]
    assert isinstance(run, list), f"{name}: command in exec form (a list), as the Dockerfile's CMD"
    return [str(part) for part in run]


def gpu_devices(compose: dict[str, Any], name: str) -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = (
        service(compose, name).get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    )
    return devices


# --- compose.yaml ---------------------------------------------------------------------------


def test_the_services_the_reference_names(compose: dict[str, Any]) -> None:
    # the reference's troubleshooting: `docker-compose ps`, `logs api`, `logs worker`
    assert {"api", "worker", "redis"} <= set(compose["services"])
    assert command(compose, "api")[:2] == ["imagen", "serve"]
    for name in WORKERS:
        assert command(compose, name)[:2] == ["imagen", "worker"]
    assert compose["services"]["worker-gpu1"]["profiles"] == ["gpu1"]  # only when asked for


@pytest.mark.parametrize("name", IMAGEN_SERVICES)
def test_every_command_is_one_imagen_accepts(compose: dict[str, Any], name: str) -> None:
    run = command(compose, name)
    assert run[0] == "imagen"
    args = build_parser().parse_args(run[1:])
    assert callable(args.handler)


def test_the_image_default_command_is_one_imagen_accepts() -> None:
    (cmd,) = dockerfile("CMD")
    run = yaml.safe_load(cmd)  # exec form: a JSON list
    assert run[0] == "imagen"
    assert isinstance(build_parser().parse_args(run[1:]), argparse.Namespace)


def test_an_unknown_command_would_be_caught() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--workers", "2"])


@pytest.mark.parametrize("name", IMAGEN_SERVICES)
def test_every_imagen_variable_is_a_setting_with_a_valid_value(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = service_env(compose, name)
    imagen_vars = {key for key in env if key.startswith("IMAGEN_")}
    assert imagen_vars, name
    unknown = {key for key in imagen_vars if key.removeprefix("IMAGEN_").lower() not in Settings.model_fields}
    assert not unknown, f"{name}: not settings: {sorted(unknown)}"
    settings = service_settings(compose, name, monkeypatch)  # raises on a value Settings refuses
    assert settings.broker_url == "redis://redis:6379/0"


@pytest.mark.parametrize("name", IMAGEN_SERVICES)
def test_every_folder_the_settings_name_is_on_a_volume(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = service_settings(compose, name, monkeypatch)
    mounted = mounts(compose, name)
    assert settings.registry_path is not None
    assert mounted[PurePosixPath("/models")][1], "models are mounted read-only"
    assert PurePosixPath("/models") in PurePosixPath(settings.registry_path).parents
    assert on_a_mount(settings.data_dir, mounted)
    if name == "api":
        assert on_a_mount(settings.outputs_dir, mounted)  # the images the API serves outlive the container
    else:
        assert settings.compile_cache_dir is not None and on_a_mount(settings.compile_cache_dir, mounted)
    named = {source for source, _ in mounted.values() if not source.startswith((".", "/"))}
    assert named <= set(compose["volumes"]), "named volumes are declared"


def test_the_workers_share_the_api_registry_and_models(compose: dict[str, Any]) -> None:
    api = service_env(compose, "api")
    api_models = mounts(compose, "api")[PurePosixPath("/models")]
    for name in WORKERS:
        env = service_env(compose, name)
        assert env["IMAGEN_REGISTRY_PATH"] == api["IMAGEN_REGISTRY_PATH"]
        assert env["IMAGEN_BROKER_URL"] == api["IMAGEN_BROKER_URL"]
        assert mounts(compose, name)[PurePosixPath("/models")] == api_models
    caches = [service_env(compose, name)["IMAGEN_COMPILE_CACHE_DIR"] for name in WORKERS]
    assert len(set(caches)) == len(caches), "each worker writes its own compile cache"


def test_one_gpu_per_worker_through_the_nvidia_runtime(compose: dict[str, Any]) -> None:
    reserved: list[str] = []
    for name in WORKERS:
        (device,) = gpu_devices(compose, name)
        assert device["driver"] == "nvidia"
        assert "gpu" in device["capabilities"]
        (device_id,) = device["device_ids"]
        reserved.append(str(device_id))
        # The container sees that one GPU as CUDA device 0: an index from the host would name no device.
        assert "IMAGEN_WORKER_GPU" not in service_env(compose, name)
        assert "--gpu" not in command(compose, name)
        assert service(compose, name)["healthcheck"] == {"disable": True}  # the image's check is the API's
    assert reserved == ["0", "1"]
    assert gpu_devices(compose, "api") == [], "the API loads no model"


def test_redis_is_append_only_on_a_volume_and_awaited(compose: dict[str, Any]) -> None:
    redis = service(compose, "redis")
    run = [str(part) for part in redis["command"]]
    assert run[run.index("--appendonly") + 1] == "yes"
    source, read_only = mounts(compose, "redis")[PurePosixPath("/data")]
    assert source in compose["volumes"] and not read_only
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]
    assert "ports" not in redis, "Redis has no password: not published on the host"
    for name in IMAGEN_SERVICES:
        assert service(compose, name)["depends_on"]["redis"]["condition"] == "service_healthy"


def test_the_api_port_and_its_health_check(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    port = service_settings(compose, "api", monkeypatch).port
    assert port == 8009  # the reference's base URL
    assert f"8009:{port}" in service(compose, "api")["ports"]
    assert "healthcheck" not in service(compose, "api"), "the image's HEALTHCHECK applies"
    (check,) = dockerfile("HEALTHCHECK")
    assert f"http://127.0.0.1:{port}/health" in check
    assert check.split(" CMD ", 1)[1].startswith('["python", "-c"'), "no curl in the image: Python asks"


# --- Dockerfile -----------------------------------------------------------------------------


def test_the_image_installs_the_project_as_pyproject_says() -> None:
    project = pyproject()["project"]
    torch = next(Requirement(dep) for dep in project["dependencies"] if Requirement(dep).name == "torch")
    runs = " ".join(dockerfile("RUN"))
    assert re.search(rf"\btorch{re.escape(str(torch.specifier))}(\s|$)", runs), f"torch pinned as {torch}"
    assert re.search(r"--index-url \"?\$\{TORCH_INDEX_URL\}\"? torch==", runs), "torch from the CUDA index"
    assert re.search(r"\bpip install \.(\s|$)", runs), "`pip install .` of the project"
    (index_arg,) = [arg for arg in dockerfile("ARG") if arg.startswith("TORCH_INDEX_URL=")]
    assert re.fullmatch(r"TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu12\d", index_arg)


def test_the_image_python_is_one_pyproject_allows() -> None:
    allowed = SpecifierSet(pyproject()["project"]["requires-python"])
    versions = set(re.findall(r"python(3\.\d+)", " ".join(dockerfile("RUN"))))
    assert versions == {"3.11"}, versions
    assert all(version in allowed for version in versions)


def test_the_default_base_image_is_cuda_with_cudnn() -> None:
    (base_arg,) = [arg for arg in dockerfile("ARG") if arg.startswith("BASE_IMAGE=")]
    image = base_arg.removeprefix("BASE_IMAGE=")
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu22\.04", image)
    cuda_minor = re.search(r"cuda:12\.(\d+)", image)
    assert cuda_minor is not None
    assert any(arg.endswith(f"/cu12{cuda_minor.group(1)}") for arg in dockerfile("ARG")), "torch for that CUDA"
    assert dockerfile("FROM") == ["${BASE_IMAGE}"], "the base is a build argument (a Debian one in make test-deploy)"


def test_the_image_runs_as_a_user_with_volumes_for_models_data_outputs() -> None:
    (user,) = dockerfile("USER")
    assert user not in {"root", "0"} and not user.startswith(("root:", "0:"))
    (volumes,) = dockerfile("VOLUME")
    assert set(yaml.safe_load(volumes)) == {"/models", "/data", "/outputs"}
    env = dockerfile_env()
    assert env["IMAGEN_DATA_DIR"] == "/data" and env["IMAGEN_OUTPUTS_DIR"] == "/outputs"
    assert env["HF_HOME"].startswith("/data/"), "downloads land on a volume"
    names = [name for name, _ in dockerfile_instructions()]
    assert names.index("USER") > max(i for i, name in enumerate(names) if name == "RUN"), "nothing runs as root after"


def docker_ignores(path: str, pattern: str) -> bool:
    """Whether a .dockerignore ``pattern`` leaves out ``path`` (root-relative; ``*`` stays within a segment,
    ``**`` spans any; a left-out folder leaves out all it holds)."""

    def match(parts: list[str], patterns: list[str]) -> bool:
        if not patterns:
            return not parts
        if patterns[0] == "**":
            return any(match(parts[index:], patterns[1:]) for index in range(len(parts) + 1))
        return bool(parts) and fnmatch.fnmatchcase(parts[0], patterns[0]) and match(parts[1:], patterns[1:])

    parts = path.split("/")
    return any(match(parts[:length], pattern.strip("/").split("/")) for length in range(1, len(parts) + 1))


def test_docker_ignore_matching_as_docker_does() -> None:
    assert docker_ignores("models/x/w.safetensors", "models")
    assert not docker_ignores("imagen/data/vae/config.json", "data")
    assert docker_ignores("imagen/api/__pycache__/app.pyc", "**/__pycache__")
    assert not docker_ignores("imagen/x.bin", "*.bin") and docker_ignores("x.bin", "*.bin")


def test_what_pip_install_needs_is_copied_and_not_docker_ignored() -> None:
    copied = {part for arguments in dockerfile("COPY") for part in arguments.split()[:-1]}
    readme = pyproject()["project"]["readme"]
    assert {"pyproject.toml", readme, "imagen"} <= copied
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not [line for line in patterns if line.startswith("!")], "no exceptions: the helper does not read them"
    package = [
        file.relative_to(REPO).as_posix()
        for file in (REPO / "imagen").rglob("*")
        if file.is_file() and "__pycache__" not in file.parts
    ]
    assert "imagen/jobs/distributed/lua/claim.lua" in package
    for needed in ["pyproject.toml", readme, *package]:
        assert not any(docker_ignores(needed, pattern) for pattern in patterns), needed
    for kept_out in ("models/sdxl.safetensors", ".venv/bin/python", ".git/HEAD", ".env", "outputs/a.png", "data/x"):
        assert any(docker_ignores(kept_out, pattern) for pattern in patterns), kept_out
