"""API keys: who may call which route, and who sees which job and file.

The route table below has one row per route of the app: a route added without a row fails
``test_every_route_has_a_row``, so nothing new slips out from behind the keys.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import WebSocket
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Mount, Route
from starlette.websockets import WebSocketDisconnect

from imagen.access.keys import KeyFile, add_key, key_digest
from imagen.api.access import KEY_INVALID, KEY_MISSING, METRICS_ADMIN_ONLY, METRICS_TOKEN_REQUIRED
from imagen.api.app import create_app
from imagen.api.routes import MODELS_ADMIN_ONLY
from tests.celery_support import shared_redis
from tests.conftest import REPO, submit, wait_for, wait_status
from tests.test_job_contract import job_system

__all__ = ["job_system", "shared_redis"]  # fixtures (job_system runs a test on both backends)

HELD = "hold never-released"  # a job that runs until cancelled (tests/latches.py)
JOB_NOT_FOUND = "Job ID non trouvé"
PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde"
    b"\x00\x00\x00\x0cIDATx\x9cc\xf8\xcf\xc0\x00\x00\x03\x01\x01\x00\xc9\xfe\x92\xef\x00\x00\x00\x00IEND"
    b"\xaeB`\x82"
)  # 1×1
IMAGE_NOT_FOUND = "Image non trouvée"
A1111_CHECKPOINTS_REFUSAL = {"error": "HTTPException", "detail": MODELS_ADMIN_ONLY, "body": "", "errors": ""}
TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}


@dataclass
class Keys:
    path: Path
    owner: str
    other: str
    admin: str

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {getattr(self, who)}"}


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    path = tmp_path / "keys.yaml"
    return Keys(
        path=path,
        owner=add_key(path, "owner"),
        other=add_key(path, "other"),
        admin=add_key(path, "ops", admin=True),
    )


# -- the route table -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """How a route answers once the key is accepted. ``owned``: it reads one job's or file's data, so
    another (non-admin) key gets ``not_found`` exactly as for a missing one."""

    path: str  # concrete, with {job_id} and {filename} of a finished job of the key "owner"
    owner_status: int
    owned: bool = False
    not_found: str | None = None
    public: bool = False  # no key needed
    admin_only: bool = False  # every key but an admin one gets ``owner_status`` (403) and ``refusal``
    admin_status: int = 200  # what an admin key gets, with ``admin_only``
    refusal: dict[str, Any] | None = None  # the 403's body; None: /metrics' {"detail": METRICS_ADMIN_ONLY}
    body: dict[str, Any] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    data: dict[str, str] | None = None  # form fields, with files


ROUTES: dict[tuple[str, str], Row] = {
    ("POST", "/generate"): Row("/generate", 201, body={"prompt": "table"}),
    ("GET", "/status/{job_id}"): Row("/status/{job_id}", 200, owned=True, not_found=JOB_NOT_FOUND),
    ("GET", "/events/{job_id}"): Row("/events/{job_id}", 200, owned=True, not_found=JOB_NOT_FOUND),
    ("GET", "/image/{job_id}"): Row("/image/{job_id}", 200, owned=True, not_found=JOB_NOT_FOUND),
    # a finished job: the owner's cancel is refused with 409, another key's is a 404 that changes nothing
    ("POST", "/cancel/{job_id}"): Row("/cancel/{job_id}", 409, owned=True, not_found=JOB_NOT_FOUND),
    ("GET", "/download/{filename:path}"): Row("/download/{filename}", 200, owned=True, not_found=IMAGE_NOT_FOUND),
    ("GET", "/outputs/{filename:path}"): Row("/outputs/{filename}", 200, owned=True, not_found=IMAGE_NOT_FOUND),
    ("GET", "/models"): Row("/models", 200),
    # an operator's orders to the workers: admin keys only (202: sent to every ready worker)
    ("POST", "/models/{model_id}/load"): Row(
        "/models/sdxl-base/load", 403, admin_only=True, admin_status=202, refusal={"detail": MODELS_ADMIN_ONLY}
    ),
    ("POST", "/models/{model_id}/unload"): Row(
        "/models/sdxl-base/unload", 403, admin_only=True, admin_status=202, refusal={"detail": MODELS_ADMIN_ONLY}
    ),
    ("GET", "/loras"): Row("/loras", 200),
    ("GET", "/controlnets"): Row("/controlnets", 200),
    ("GET", "/upscalers"): Row("/upscalers", 200),
    ("GET", "/embeddings"): Row("/embeddings", 200),
    ("POST", "/upscale"): Row(
        "/upscale", 201, body={"image": "data:image/png;base64," + base64.b64encode(PNG).decode()}
    ),
    ("GET", "/schedulers"): Row("/schedulers", 200),
    ("POST", "/uploads"): Row("/uploads", 201, files={"file": ("a.png", PNG, "image/png")}),
    ("GET", "/health"): Row("/health", 200, public=True),
    # OpenAI's Images API (openai_compat): a job of the caller's, waited for
    ("POST", "/v1/images/generations"): Row("/v1/images/generations", 200, body={"prompt": "table"}),
    ("POST", "/v1/images/edits"): Row(
        "/v1/images/edits", 200, files={"image": ("a.png", PNG, "image/png")}, data={"prompt": "table"}
    ),
    ("GET", "/v1/models"): Row("/v1/models", 200),
    # AUTOMATIC1111's /sdapi/v1 (a1111_compat): jobs of the caller's, per-key options, progress, interrupt
    ("POST", "/sdapi/v1/txt2img"): Row("/sdapi/v1/txt2img", 200, body={"prompt": "table", "width": 512, "height": 512}),
    ("POST", "/sdapi/v1/img2img"): Row(
        "/sdapi/v1/img2img", 200, body={"prompt": "table", "init_images": [base64.b64encode(PNG).decode()]}
    ),
    ("GET", "/sdapi/v1/sd-models"): Row("/sdapi/v1/sd-models", 200),
    ("GET", "/sdapi/v1/loras"): Row("/sdapi/v1/loras", 200),
    ("GET", "/sdapi/v1/samplers"): Row("/sdapi/v1/samplers", 200),
    ("GET", "/sdapi/v1/schedulers"): Row("/sdapi/v1/schedulers", 200),
    ("GET", "/sdapi/v1/upscalers"): Row("/sdapi/v1/upscalers", 200),
    ("GET", "/sdapi/v1/embeddings"): Row("/sdapi/v1/embeddings", 200),
    ("POST", "/sdapi/v1/extra-single-image"): Row(
        "/sdapi/v1/extra-single-image", 200, body={"image": base64.b64encode(PNG).decode()}
    ),
    ("GET", "/sdapi/v1/latent-upscale-modes"): Row("/sdapi/v1/latent-upscale-modes", 200),
    ("GET", "/sdapi/v1/sd-vae"): Row("/sdapi/v1/sd-vae", 200),
    ("GET", "/sdapi/v1/options"): Row("/sdapi/v1/options", 200),
    ("POST", "/sdapi/v1/options"): Row("/sdapi/v1/options", 200, body={"sd_model_checkpoint": "sdxl-base"}),
    ("GET", "/sdapi/v1/progress"): Row("/sdapi/v1/progress", 200),
    ("POST", "/sdapi/v1/interrupt"): Row("/sdapi/v1/interrupt", 200),
    ("POST", "/sdapi/v1/unload-checkpoint"): Row(
        "/sdapi/v1/unload-checkpoint", 403, admin_only=True, refusal=A1111_CHECKPOINTS_REFUSAL
    ),
    ("POST", "/sdapi/v1/reload-checkpoint"): Row(
        "/sdapi/v1/reload-checkpoint", 403, admin_only=True, refusal=A1111_CHECKPOINTS_REFUSAL
    ),
    # AUTOMATIC1111's ControlNet extension (a1111_controlnet): the registry's lists, a map made of an image
    ("GET", "/controlnet/model_list"): Row("/controlnet/model_list", 200),
    ("GET", "/controlnet/module_list"): Row("/controlnet/module_list", 200),
    ("POST", "/controlnet/detect"): Row(
        "/controlnet/detect", 200,
        body={"controlnet_module": "canny", "controlnet_input_images": [base64.b64encode(PNG).decode()]},
    ),
    # reads the registry file again, as the server does on its own within a second: any key
    ("POST", "/sdapi/v1/refresh-checkpoints"): Row("/sdapi/v1/refresh-checkpoints", 200),
    ("GET", "/openapi.json"): Row("/openapi.json", 200),
    ("GET", "/docs"): Row("/docs", 200),
    ("GET", "/docs/oauth2-redirect"): Row("/docs/oauth2-redirect", 200),
    ("GET", "/redoc"): Row("/redoc", 200),
    ("GET", "/metrics"): Row("/metrics", 403, admin_only=True),  # every key's activity: admin keys only
    # the web page and its files hold no data: the page asks for a key and sends it with its API calls
    ("GET", "/"): Row("/", 200, public=True),
    ("GET", "/ui"): Row("/ui/app.js", 200, public=True),  # the StaticFiles mount: any file under /ui/
}


def app_routes(routes: list[Any], prefix: str = "") -> set[tuple[str, str]]:
    """(method, path) of every route, through included routers (FastAPI keeps those as one entry)."""
    found = set()
    for route in routes:
        if isinstance(route, APIRoute | Route):
            found |= {(method, prefix + route.path) for method in route.methods or () if method != "HEAD"}
        elif isinstance(route, Mount):  # static files (the web page's /ui): read-only, GET
            found.add(("GET", prefix + route.path))
        elif hasattr(route, "original_router"):
            found |= app_routes(route.original_router.routes, prefix + route.include_context.prefix)
        else:
            raise AssertionError(f"a route of an unknown kind: {route!r}")
    return found


@pytest.fixture
def keyed_client(make_client: Callable[..., TestClient], keys: Keys) -> TestClient:
    return make_client(api_keys_file=keys.path, engine="test-pattern")


@pytest.fixture
def owners_job(keyed_client: TestClient, keys: Keys) -> dict[str, Any]:
    response = keyed_client.post("/generate", json={"prompt": "mine"}, headers=keys.headers("owner"))
    assert response.status_code == 201, response.text
    done = wait_status_as(keyed_client, response.json()["job_id"], keys.headers("owner"))
    assert done["status"] == "SUCCESS", done
    return done


def wait_status_as(client: TestClient | httpx.Client, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/status/{job_id}", headers=headers).json()
        return body if body.get("status") in TERMINAL else None

    return wait_for(check, 30)


def call(client: TestClient, method: str, row: Row, job: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
    path = row.path.format(job_id=job["job_id"], filename=job["result"]["filename"])
    return client.request(method, path, json=row.body, files=row.files, data=row.data, headers=headers)


def test_every_route_has_a_row(keyed_client: TestClient) -> None:
    found = app_routes(keyed_client.app.routes)  # type: ignore[attr-defined]
    assert found == set(ROUTES), "a route without a row in ROUTES (or a row without a route)"


@pytest.mark.parametrize(("method", "template"), sorted(ROUTES))
def test_route_with_no_key_a_wrong_key_another_key_and_an_admin_key(
    keyed_client: TestClient, keys: Keys, owners_job: dict[str, Any], method: str, template: str
) -> None:
    row = ROUTES[(method, template)]
    missing = call(keyed_client, method, row, owners_job, {})
    wrong = call(keyed_client, method, row, owners_job, {"Authorization": "Bearer imk_not-a-key"})
    if row.public:
        assert missing.status_code == wrong.status_code == row.owner_status
        return
    for response, detail in ((missing, KEY_MISSING), (wrong, KEY_INVALID)):
        assert response.status_code == 401, (template, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.headers["x-request-id"]  # refused at the door, still traceable
        assert response.json() == {"detail": detail}

    owner = call(keyed_client, method, row, owners_job, keys.headers("owner"))
    assert owner.status_code == row.owner_status, (template, owner.text[:300])
    other = call(keyed_client, method, row, owners_job, keys.headers("other"))
    if row.owned:
        assert other.status_code == 404, (template, other.text[:300])
        assert other.json() == {"detail": row.not_found}
    else:
        assert other.status_code == row.owner_status
    if row.admin_only:
        assert owner.json() == other.json() == (row.refusal or {"detail": METRICS_ADMIN_ONLY})
    admin = call(keyed_client, method, row, owners_job, keys.headers("admin"))
    assert admin.status_code == (row.admin_status if row.admin_only else row.owner_status), (template, admin.text[:300])
    # the other key's attempt changed nothing (its cancel in particular)
    assert keyed_client.get(f"/status/{owners_job['job_id']}", headers=keys.headers("owner")).json()["status"] == (
        "SUCCESS"
    )


def test_x_api_key_header_works_like_bearer(keyed_client: TestClient, keys: Keys) -> None:
    assert keyed_client.get("/models", headers={"X-API-Key": keys.other}).status_code == 200
    assert keyed_client.get("/models", headers={"X-API-Key": "imk_wrong"}).status_code == 401


def test_without_keys_everything_is_open_as_the_reference_says(client: TestClient) -> None:
    job_id = submit(client, "open")
    done = wait_status(client, job_id, TERMINAL)
    assert client.get(f"/download/{done['result']['filename']}").status_code == 200
    assert client.get("/openapi.json").status_code == 200


# -- /metrics: every key's activity, so admin keys and the scraper's token only ---------------------------
METRICS_TOKEN = "scraper-" + "t" * 24


def test_the_metrics_token_opens_metrics_and_nothing_else(make_client: Callable[..., TestClient], keys: Keys) -> None:
    client = make_client(api_keys_file=keys.path, engine="test-pattern", metrics_token=METRICS_TOKEN)
    scraper = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    scraped = client.get("/metrics", headers=scraper)
    assert scraped.status_code == 200 and "imagen_jobs_waiting" in scraped.text
    assert client.get("/metrics", headers=keys.headers("admin")).status_code == 200
    refused = client.get("/metrics", headers=keys.headers("owner"))
    assert refused.status_code == 403 and refused.json() == {"detail": METRICS_ADMIN_ONLY}
    assert refused.headers["x-ratelimit-limit"]  # counted like any other answer to a key
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong-token"}).status_code == 401
    other_route = client.get("/models", headers=scraper)  # the token is not an API key
    assert other_route.status_code == 401 and other_route.json() == {"detail": KEY_INVALID}


def test_without_keys_metrics_stays_open(client: TestClient) -> None:
    assert client.get("/metrics").status_code == 200


def test_without_keys_a_metrics_token_still_closes_metrics(make_client: Callable[..., TestClient]) -> None:
    client = make_client(engine="test-pattern", metrics_token=METRICS_TOKEN)
    missing = client.get("/metrics")
    assert missing.status_code == 401 and missing.json() == {"detail": METRICS_TOKEN_REQUIRED}
    assert missing.headers["www-authenticate"] == "Bearer"
    assert client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).status_code == 200
    assert client.get("/models").status_code == 200  # nothing else needs it


# -- isolation and limits on both backends -----------------------------------------------------------
def test_each_key_sees_only_its_own_jobs_and_files(
    job_system: Callable[..., TestClient],
    keys: Keys,
) -> None:
    client = job_system(api_keys_file=str(keys.path))
    job_id = client.post("/generate", json={"prompt": "mine"}, headers=keys.headers("owner")).json()["job_id"]
    done = wait_status_as(client, job_id, keys.headers("owner"))
    filename = done["result"]["filename"]
    for who, visible in (("owner", True), ("other", False), ("admin", True)):
        headers = keys.headers(who)
        status = client.get(f"/status/{job_id}", headers=headers)
        image = client.get(f"/image/{job_id}", headers=headers)
        download = client.get(f"/download/{filename}", headers=headers)
        if visible:
            assert (status.status_code, image.status_code, download.status_code) == (200, 200, 200), who
        else:
            assert status.json() == image.json() == {"detail": JOB_NOT_FOUND}
            assert download.json() == {"detail": IMAGE_NOT_FOUND}
    # a job id that does not exist answers the same as another key's
    unknown = client.get("/status/00000000-0000-4000-8000-000000000000", headers=keys.headers("other"))
    assert unknown.status_code == 404 and unknown.json() == {"detail": JOB_NOT_FOUND}


def test_another_key_cannot_cancel_a_waiting_job(
    job_system: Callable[..., TestClient],
    keys: Keys,
) -> None:
    client = job_system(api_keys_file=str(keys.path))
    blocker = client.post("/generate", json={"prompt": HELD}, headers=keys.headers("owner")).json()["job_id"]
    waiting = client.post("/generate", json={"prompt": "after"}, headers=keys.headers("owner")).json()["job_id"]
    refused = client.post(f"/cancel/{waiting}", headers=keys.headers("other"))
    assert refused.status_code == 404 and refused.json() == {"detail": JOB_NOT_FOUND}
    assert client.post(f"/cancel/{blocker}", headers=keys.headers("admin")).json()["status"] == "REVOKED"
    assert wait_status_as(client, waiting, keys.headers("owner"))["status"] == "SUCCESS"


def test_a_key_past_its_waiting_limit_gets_429_while_others_still_submit(
    job_system: Callable[..., TestClient],
    keys: Keys,
) -> None:
    client = job_system(api_keys_file=str(keys.path), key_max_waiting=2)
    blocker = client.post("/generate", json={"prompt": HELD}, headers=keys.headers("owner")).json()["job_id"]
    wait_for(lambda: client.get(f"/status/{blocker}", headers=keys.headers("owner")).json()["status"] != "PENDING")
    for _ in range(2):
        assert client.post("/generate", json={"prompt": "w"}, headers=keys.headers("owner")).status_code == 201
    refused = client.post("/generate", json={"prompt": "w"}, headers=keys.headers("owner"))
    assert refused.status_code == 429
    assert refused.json() == {"detail": "Trop de tâches en attente pour cette clé API (max 2), réessayez plus tard"}
    assert int(refused.headers["retry-after"]) > 0
    assert client.post("/generate", json={"prompt": "w"}, headers=keys.headers("other")).status_code == 201
    client.post(f"/cancel/{blocker}", headers=keys.headers("owner"))


def test_requests_per_minute_per_key(
    job_system: Callable[..., TestClient],
    keys: Keys,
) -> None:
    document = yaml.safe_load(keys.path.read_text())
    document["keys"][0]["requests_per_minute"] = 3  # "owner"
    keys.path.write_text(yaml.safe_dump(document))
    client = job_system(api_keys_file=str(keys.path), key_requests_per_minute=100)
    answers = [client.get("/models", headers=keys.headers("owner")) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["x-ratelimit-remaining"] for a in answers] == ["2", "1", "0", "0"]
    assert {a.headers["x-ratelimit-limit"] for a in answers} == {"3"}
    refused = answers[-1]
    assert 0 < int(refused.headers["retry-after"]) <= 60
    assert int(refused.headers["x-ratelimit-reset"]) >= int(answers[0].headers["x-ratelimit-reset"])
    assert refused.json()["detail"].startswith("Trop de requêtes pour cette clé API (max 3 par minute)")
    # another key has its own count (the default)
    other = client.get("/models", headers=keys.headers("other"))
    assert other.status_code == 200 and other.headers["x-ratelimit-limit"] == "100"
    # /health is never limited nor keyed
    assert all(client.get("/health").status_code == 200 for _ in range(5))


# -- CORS -----------------------------------------------------------------------------------------------
def test_cors_is_off_by_default(keyed_client: TestClient, keys: Keys) -> None:
    answer = keyed_client.get("/models", headers={**keys.headers("owner"), "Origin": "https://app.example.com"})
    assert "access-control-allow-origin" not in answer.headers


def test_cors_origins_let_a_browser_app_in(make_client: Callable[..., TestClient], keys: Keys) -> None:
    client = make_client(api_keys_file=keys.path, engine="test-pattern", cors_origins="https://app.example.com")
    origin = {"Origin": "https://app.example.com"}
    preflight = client.options(
        "/generate",
        headers={**origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"},
    )  # fmt: skip
    assert preflight.status_code == 200  # a preflight carries no key
    assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    answer = client.get("/models", headers={**origin, **keys.headers("owner")})
    assert answer.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "x-ratelimit-remaining" in answer.headers["access-control-expose-headers"].lower()
    elsewhere = client.get("/models", headers={"Origin": "https://evil.example", **keys.headers("owner")})
    assert "access-control-allow-origin" not in elsewhere.headers


# -- the keys file and the command ------------------------------------------------------------------
def test_imagen_keys_add_prints_the_key_once_and_stores_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    env = {**os.environ, "PYTHONPATH": str(REPO), "IMAGEN_API_KEYS_FILE": str(path)}
    run = subprocess.run(
        [sys.executable, "-m", "imagen", "keys", "add", "discord-bot"], env=env, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    key = run.stdout.strip().splitlines()[-1]
    assert key.startswith("imk_") and len(key) > 40
    stored = KeyFile.read(path).keys
    assert [(e.name, e.sha256, e.admin) for e in stored] == [("discord-bot", key_digest(key), False)]
    assert key not in path.read_text()
    assert path.stat().st_mode & 0o077 == 0  # not readable by others
    admin = subprocess.run(
        [sys.executable, "-m", "imagen", "keys", "add", "ops", "--admin"], env=env, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    assert KeyFile.read(path).keys[1].admin
    assert admin.stdout.strip().splitlines()[-1] != key
    again = subprocess.run(
        [sys.executable, "-m", "imagen", "keys", "add", "ops"], env=env, capture_output=True, text=True
    )
    assert again.returncode == 1 and "exists already" in again.stderr


def test_a_key_added_while_the_server_runs_works_without_a_restart(
    make_server: Callable[..., Any], tmp_path: Path
) -> None:
    path = tmp_path / "keys.yaml"
    first = add_key(path, "first")
    server = make_server(api_keys_file=str(path))
    server.start()
    with server.client() as http:
        assert http.get("/models", headers={"Authorization": f"Bearer {first}"}).status_code == 200
        second = add_key(path, "second")
        wait_for(lambda: http.get("/models", headers={"Authorization": f"Bearer {second}"}).status_code == 200, 10)
        assert http.get("/models").status_code == 401
        assert http.get("/health").status_code == 200


def test_a_missing_keys_file_stops_the_start(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="imagen keys add"):
        make_client(api_keys_file=tmp_path / "nowhere.yaml")


def test_the_openapi_document_says_which_routes_need_a_key(keyed_client: TestClient, keys: Keys) -> None:
    document = keyed_client.get("/openapi.json", headers=keys.headers("owner")).json()
    assert set(document["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert document["paths"]["/health"]["get"]["security"] == []
    assert "401" in document["paths"]["/generate"]["post"]["responses"]


def test_a_websocket_route_added_later_is_behind_the_keys_too(
    make_settings: Callable[..., Any], keys: Keys
) -> None:
    app = create_app(make_settings(api_keys_file=keys.path, engine="test-pattern"))

    @app.websocket("/probe")
    async def probe(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("in")
        await websocket.close()

    with TestClient(app) as client:
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/probe"):
            pass
        assert refused.value.code == 1008
        with client.websocket_connect("/probe", headers=keys.headers("owner")) as socket:
            assert socket.receive_text() == "in"
