"""The web page (``GET /``) in a real browser: Playwright drives Debian's chromium against real ``imagen serve``
processes (the scripted test engine, and diffusers with the tiny fixtures).

One browser and a few servers serve the whole module; each test opens a fresh browser context (its own
localStorage). Screenshots of the main states go to ``$IMAGEN_SCREENSHOTS_DIR`` (else a temporary folder,
printed at the end). Every wait is on a condition (Playwright's ``expect``), never a fixed sleep.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from imagen.access.keys import add_key
from tests.conftest import REFERENCE_REGISTRY, REPO, SCRIPTED_ENGINE, ServerProcess, free_port, wait_for
from tests.engine_fixtures import fixtures_registry_path
from training.judge import judge

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():  # .ci/run installs it; a bare machine says why the module did not run
    pytest.skip("Debian's chromium is not installed (/usr/bin/chromium): apt-get install chromium",
                allow_module_level=True)

from axe_playwright_python import sync_playwright as axe_package  # noqa: E402
from playwright.sync_api import Browser, BrowserContext, Page, Route, expect, sync_playwright  # noqa: E402

AXE_JS = Path(axe_package.__file__).resolve().parent / "axe.min.js"
TIMEOUT_MS = 30_000
expect.set_options(timeout=TIMEOUT_MS)


# -- servers, browser, screenshots -------------------------------------------------------------------
class Servers:
    """``imagen serve`` processes for this module, each in its own folder, all stopped at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[ServerProcess] = []

    def start(self, name: str, **settings: str) -> ServerProcess:
        home = self.root / name
        home.mkdir()
        (home / "reference").mkdir()
        (home / "reference" / "electra_ref.png").write_bytes(b"not read by test engines")
        registry = home / "registry.yaml"
        registry.write_text(REFERENCE_REGISTRY.replace("size: 64", "size: 512"))
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "IMAGEN_DATA_DIR": str(home / "data"),
            "IMAGEN_OUTPUTS_DIR": str(home / "outputs"),
            "IMAGEN_REGISTRY_PATH": str(registry),
            "IMAGEN_ENGINE": SCRIPTED_ENGINE,
            "IMAGEN_TEST_EXECUTION_LOG": str(home / "executions.log"),
        }
        env.update({f"IMAGEN_{key.upper()}": value for key, value in settings.items()})
        if not env["IMAGEN_REGISTRY_PATH"]:  # no registry: the built-in demo model
            del env["IMAGEN_REGISTRY_PATH"]
        server = ServerProcess(env, free_port(), home / "server.log")
        self.started.append(server)
        server.start()
        return server

    def stop_all(self) -> None:
        for server in self.started:
            server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    running = Servers(tmp_path_factory.mktemp("web-servers"))
    yield running
    running.stop_all()


@pytest.fixture(scope="module")
def scripted(servers: Servers) -> ServerProcess:
    """The scripted engine: the prompt says what the job does ("sleep 2", "fatal"; tests/engines.py)."""
    return servers.start("scripted")


@pytest.fixture(scope="module")
def diffusers(servers: Servers) -> ServerProcess:
    """Real diffusers pipelines on CPU with the tiny fixtures (64 px, a LoRA with trigger words)."""
    return servers.start(
        "diffusers", engine="diffusers", registry_path=str(fixtures_registry_path()), device="cpu", dtype="float32"
    )


@pytest.fixture(scope="module")
def demo(servers: Servers) -> ServerProcess:
    """A fresh install: no registry, the built-in demo model (SDXL's pipeline, trained on shapes, 1024 px)."""
    return servers.start("demo", engine="diffusers", registry_path="", device="cpu")


@pytest.fixture(scope="module", autouse=True)
def load_the_models_early(request: pytest.FixtureRequest) -> None:
    """Start the real-pipeline servers first when this run has tests for them: their workers load the models
    while the scripted tests (mostly waiting on the browser) run; those tests come last in the file."""
    wanted = {name for item in request.session.items if item.module is request.module
              for name in getattr(item, "fixturenames", ())}
    for name in ("diffusers", "demo"):
        if name in wanted:
            request.getfixturevalue(name)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = Path(os.environ.get("IMAGEN_SCREENSHOTS_DIR") or tmp_path_factory.mktemp("web-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    print(f"\nweb page screenshots: {folder}: {', '.join(sorted(p.name for p in folder.glob('*.png')))}")


@pytest.fixture
def make_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    """A page in a fresh context (own localStorage); uncaught script errors, and anything the page's
    Content-Security-Policy blocks, fail the test."""
    contexts: list[BrowserContext] = []
    errors: list[str] = []

    def build(
        server: ServerProcess, width: int = 1280, height: int = 800, locale: str = "en-US", dark: bool = False
    ) -> Page:
        context = browser.new_context(
            viewport={"width": width, "height": height}, locale=locale, color_scheme="dark" if dark else "light"
        )
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on(
            "console",
            lambda message: errors.append(message.text) if "Content Security Policy" in message.text else None,
        )
        page.goto(server.url + "/")
        return page

    yield build
    for context in contexts:
        context.close()
    assert not errors, f"script errors in the page: {errors}"


def ready(page: Page) -> Page:
    expect(page.locator("body[data-ready=true]")).to_be_attached()
    return page


def run_job(page: Page, prompt: str) -> None:
    page.locator("#prompt").fill(prompt)
    page.locator("#prompt").press("Control+Enter")


def generate_and_wait(page: Page, prompt: str) -> dict[str, Any]:
    """Generate, and wait until that job (not an earlier one) is done and shown; its gallery entry."""
    before = len(gallery(page))
    run_job(page, prompt)
    page.wait_for_function(
        "n => { const g = JSON.parse(localStorage.getItem('imagen.gallery') || '[]');"
        " return g.length > n && ['SUCCESS', 'FAILURE', 'REVOKED'].includes(g[0].status); }",
        arg=min(before, 23),
    )
    expect(page.locator("#generate")).to_be_enabled()
    entry = gallery(page)[0]
    assert entry["status"] == "SUCCESS", entry
    wait_image(page)
    return entry


def wait_image(page: Page) -> None:
    expect(page.locator("#image")).to_be_visible()
    expect(page.locator("#details")).to_be_visible()


def open_section(page: Page, name: str) -> None:
    """Unfold a section of settings (``details[data-section]``, folded by default) by its summary, as a person
    does."""
    section = page.locator(f'details[data-section="{name}"]')
    if section.get_attribute("open") is None:
        section.locator("summary").click()
    expect(section).to_have_attribute("open", "")


def param(page: Page, name: str) -> str:
    return page.locator(f'#params [data-param="{name}"] dd').inner_text()


def image_loaded(page: Page, selector: str) -> None:
    page.wait_for_function(
        "s => { const i = document.querySelector(s); return i && i.complete && i.naturalWidth > 0 }", arg=selector
    )


def gallery(page: Page) -> list[dict[str, Any]]:
    """The gallery a page keeps without a key (each key's own is stored under a tag of that key)."""
    entries: list[dict[str, Any]] = page.evaluate("JSON.parse(localStorage.getItem('imagen.gallery') || '[]')")
    return entries


def shown_gallery(page: Page) -> list[str]:
    """The job ids the gallery shows, newest first."""
    ids: list[str] = page.locator("#gallery li").evaluate_all("items => items.map((li) => li.dataset.id)")
    return ids


def give_key(page: Page, key: str, asked: bool = False) -> None:
    """Through the key box: opened by the server's 401 (``asked``), else by the "API key" button."""
    if not asked:
        page.locator("#key-button").click()
    expect(page.locator("#keybox")).to_be_visible()
    page.locator("#key-input").fill(key)
    page.locator("#key-save").click()
    expect(page.locator("#keybox")).to_be_hidden()


def shown_image_bytes(page: Page) -> bytes:
    """The bytes of the image on the stage, as the page holds them (its object URL)."""
    encoded = page.evaluate(
        """async () => {
            const blob = await (await fetch(document.getElementById('image').src)).blob();
            const bytes = new Uint8Array(await blob.arrayBuffer());
            let text = '';
            for (const b of bytes) text += String.fromCharCode(b);
            return btoa(text);
        }"""
    )
    return base64.b64decode(encoded)


def check_accessibility(page: Page, where: str) -> None:
    """axe-core (the copy axe-playwright-python ships) run in the page: no serious or critical violation.
    Evaluated, not added as a <script>: the page's Content-Security-Policy blocks inline scripts."""
    page.evaluate(AXE_JS.read_text(encoding="utf-8") + "\n;undefined")
    result = page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    bad = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[node['target'] for node in v['nodes']][:3]}"
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert not bad, f"{where}: {bad}"


def job_status(server: ServerProcess, job_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    with server.client() as http:
        body: dict[str, Any] = http.get(f"/status/{job_id}", headers=headers or {}).json()
        return body


# -- scenarios -----------------------------------------------------------------------------------------
def test_cancel_a_running_job(make_page: Callable[..., Page], scripted: ServerProcess, shots: Path) -> None:
    page = ready(make_page(scripted))
    open_section(page, "size")
    page.locator("#steps").fill("50")
    run_job(page, "sleep 60")
    expect(page.locator("#phase")).to_have_text("Drawing")  # step names from the job's progress
    expect(page.locator("#eta")).to_contain_text("of 50")
    expect(page.locator("#cancel")).to_be_visible()
    page.screenshot(path=shots / "04-progress.png")
    check_accessibility(page, "while a job runs")
    page.locator("#cancel").click()
    expect(page.locator("#notice")).to_have_text("Generation cancelled.")
    expect(page.locator("#cancel")).to_be_hidden()
    job_id = gallery(page)[0]["id"]
    assert job_status(scripted, job_id)["status"] == "REVOKED"
    expect(page.locator(f'#gallery li[data-id="{job_id}"]')).to_contain_text("Cancelled")


def test_a_422_is_shown_next_to_the_field(make_page: Callable[..., Page], scripted: ServerProcess, shots: Path) -> None:
    page = ready(make_page(scripted))
    open_section(page, "size")
    page.locator("#steps").fill("5")  # the reference: 10-100; the page lets the server say so
    run_job(page, "a boat")
    error = page.locator("#error-steps")
    expect(error).to_be_visible()
    expect(error).to_contain_text("10")  # the server's own message ("greater than or equal to 10")
    expect(page.locator("#steps")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#steps")).to_be_focused()
    expect(page.locator("#form-error")).to_have_text("Some settings are not accepted; see the field marked in red.")
    expect(page.locator("#error-guidance_scale")).to_be_hidden()
    page.screenshot(path=shots / "05-invalid-field.png")
    assert gallery(page) == []
    # corrected, it goes through and the mark goes away
    page.locator("#steps").fill("10")
    page.locator("#generate").click()
    wait_image(page)
    expect(page.locator("#error-steps")).to_be_hidden()
    expect(page.locator("#steps")).not_to_have_attribute("aria-invalid", "true")


def test_the_queue_position_then_the_queue_full_as_a_sentence(
    make_page: Callable[..., Page], servers: Servers, shots: Path
) -> None:
    server = servers.start("queue", max_queue="1")
    with server.client() as http:
        running = http.post("/generate", json={"prompt": "sleep 60", "steps": 10}).json()["job_id"]
        wait_for(lambda: job_status(server, running)["status"] == "PROGRESS", timeout=30)
    waiting_page = ready(make_page(server))
    open_section(waiting_page, "size")
    waiting_page.locator("#steps").fill("10")
    run_job(waiting_page, "sleep 60")
    expect(waiting_page.locator("#phase")).to_have_text("Waiting in the queue · position 1")
    waiting_page.screenshot(path=shots / "06a-queued.png")
    waiting = gallery(waiting_page)[0]["id"]

    page = ready(make_page(server))  # someone else, while the queue is full
    run_job(page, "one more")
    error = page.locator("#form-error")
    expect(error).to_contain_text("The queue is full right now; try again in a moment.")
    expect(error).to_contain_text("Queue pleine, réessayez plus tard")  # the API's message, as it came
    expect(page.locator("#generate")).to_be_enabled()
    page.screenshot(path=shots / "06b-queue-full.png")
    with server.client() as http:
        http.post(f"/cancel/{running}")
    expect(waiting_page.locator("#phase")).to_have_text("Drawing")  # its turn came
    waiting_page.locator("#cancel").click()
    expect(waiting_page.locator("#notice")).to_have_text("Generation cancelled.")
    assert job_status(server, waiting)["status"] == "REVOKED"
    run_job(page, "one more")  # room again
    wait_image(page)


def test_the_server_stopped_mid_job_then_back(
    make_page: Callable[..., Page], servers: Servers, shots: Path
) -> None:
    server = servers.start("restart")
    page = ready(make_page(server))
    open_section(page, "size")
    page.locator("#steps").fill("10")
    run_job(page, "sleep 3")
    expect(page.locator("#phase")).to_have_text("Drawing")
    server.stop()
    notice = page.locator("#notice")
    expect(notice).to_contain_text("The server stopped answering. Retrying")
    expect(page.locator("#health")).to_contain_text("Server unreachable")
    page.screenshot(path=shots / "07-server-down.png")
    server.start()  # same port, same data: the job runs again
    wait_image(page)
    expect(notice).to_be_hidden()
    assert gallery(page)[0]["status"] == "SUCCESS"
    # and a new job works at once
    run_job(page, "after the restart")
    wait_image(page)
    expect(page.locator("#params")).to_contain_text("after the restart")


def test_reload_keeps_the_gallery_and_shows_expired_jobs(
    make_page: Callable[..., Page], scripted: ServerProcess, shots: Path
) -> None:
    page = ready(make_page(scripted))
    expect(page.locator("#gallery-empty")).to_be_visible()
    for prompt in ("a red fox in the snow", "a blue whale"):
        generate_and_wait(page, prompt)
    kept = gallery(page)
    assert [entry["prompt"] for entry in kept] == ["a blue whale", "a red fox in the snow"]
    page.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
    page.screenshot(path=shots / "00-web-page.png")
    # a job the server no longer knows (finished more than an hour ago)
    gone = {"id": str(uuid.uuid4()), "prompt": "an old job", "status": "PENDING", "created": 0}
    page.evaluate("entry => localStorage.setItem('imagen.gallery', JSON.stringify([...JSON.parse("
                  "localStorage.getItem('imagen.gallery')), entry]))", gone)
    page.reload()
    ready(page)
    items = page.locator("#gallery li")
    expect(items).to_have_count(3)
    for entry in kept:
        image_loaded(page, f'#gallery li[data-id="{entry["id"]}"] img')
    expired = page.locator(f'#gallery li[data-id="{gone["id"]}"]')
    expect(expired).to_have_attribute("data-status", "expired")
    expect(expired).to_contain_text("Expired")
    expect(page.locator("#notice")).to_be_hidden()  # not an error
    page.locator(f'#gallery li[data-id="{kept[1]["id"]}"] button').click()
    wait_image(page)
    expect(page.locator("#params")).to_contain_text("a red fox in the snow")
    expired.locator("button").click()
    expect(page.locator("#notice")).to_contain_text("expired")
    page.locator("#gallery").scroll_into_view_if_needed()
    page.screenshot(path=shots / "08-gallery-after-reload.png")


def test_usable_at_360_px(make_page: Callable[..., Page], scripted: ServerProcess, shots: Path) -> None:
    page = ready(make_page(scripted, width=360, height=740))
    page.screenshot(path=shots / "09-phone-empty.png", full_page=True)
    run_job(page, "a small house by a lake")
    wait_image(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # nothing sticks out sideways
    open_section(page, "size")
    for selector in ("#prompt", "#generate", "#frame", "#download", "#steps", "#seed"):
        box = page.locator(selector).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 360, selector
    page.screenshot(path=shots / "10-phone-result.png", full_page=True)
    check_accessibility(page, "at 360 px")


def test_french_and_english(make_page: Callable[..., Page], scripted: ServerProcess, shots: Path) -> None:
    page = ready(make_page(scripted, locale="fr-FR", dark=True))  # follows the browser's language (and theme)
    expect(page.locator("html")).to_have_attribute("lang", "fr")
    expect(page.locator("#generate")).to_have_text("Générer")
    expect(page.locator('label[for="negative_prompt"]')).to_have_text("Prompt négatif")
    run_job(page, "fatal")
    notice = page.locator("#notice")
    expect(notice).to_have_text("La génération a échoué : weight file missing: /models/nowhere.safetensors")
    page.screenshot(path=shots / "11-french-failed-dark.png")
    check_accessibility(page, "in French, dark, after a failure")
    page.locator("#lang").select_option("en")  # the switch
    expect(page.locator("html")).to_have_attribute("lang", "en")
    expect(page.locator("#generate")).to_have_text("Generate")
    expect(page.locator('label[for="negative_prompt"]')).to_have_text("Negative prompt")
    expect(notice).to_have_text("The generation failed: weight file missing: /models/nowhere.safetensors")
    page.reload()  # the choice is kept
    ready(page)
    expect(page.locator("#generate")).to_have_text("Generate")
    expect(page.locator(".badge.failed")).to_have_text("Failed")


def test_an_api_key_required_then_given(
    make_page: Callable[..., Page], servers: Servers, tmp_path: Path, shots: Path
) -> None:
    keys = tmp_path / "keys.yaml"
    key = add_key(keys, "browser")
    server = servers.start("keys", api_keys_file=str(keys))
    assert httpx.get(server.url + "/ui/app.js").status_code == 200  # the page's files need no key
    page = make_page(server, locale="fr-FR")
    keybox = page.locator("#keybox")
    expect(keybox).to_be_visible()
    expect(page.locator("#key-input")).to_be_focused()
    page.screenshot(path=shots / "12-key-required.png")
    check_accessibility(page, "asking for a key")
    page.locator("#key-input").fill("imk_not-a-key")
    page.locator("#key-input").press("Enter")
    expect(page.locator("#key-error")).to_have_text("Le serveur refuse cette clé : Clé API invalide")
    expect(keybox).to_be_visible()
    page.locator("#key-input").fill(key)
    page.locator("#key-save").click()
    ready(page)
    expect(keybox).to_be_hidden()
    assert json.loads(page.evaluate("localStorage.getItem('imagen.apiKey')")) == key
    run_job(page, "a key-holder's image")
    wait_image(page)
    job_id = shown_gallery(page)[0]
    assert job_status(server, job_id, {"Authorization": f"Bearer {key}"})["status"] == "SUCCESS"
    page.reload()  # the key is kept: the gallery's image loads with it
    ready(page)
    expect(keybox).to_be_hidden()
    image_loaded(page, f'#gallery li[data-id="{job_id}"] img')


def test_a_refusal_of_the_keyless_request_that_comes_after_the_key_leaves_the_box_closed(
    make_page: Callable[..., Page], servers: Servers, tmp_path: Path
) -> None:
    """A request sent before the key was given can be refused after it (a loaded machine answers late):
    that refusal is of no key, not of the new one, so the box stays closed and Generate works."""
    keys = tmp_path / "keys.yaml"
    key = add_key(keys, "late")
    server = servers.start("late-refusal", api_keys_file=str(keys))
    page = make_page(server)
    held: list[Route] = []
    page.route("**/controlnets", lambda route: held.append(route) if not held else route.continue_())
    page.reload()
    expect(page.locator("#keybox")).to_be_visible()
    give_key(page, key, asked=True)
    ready(page)  # its /controlnets went through: the keyless one, before it, is held
    assert len(held) == 1 and "authorization" not in held[0].request.headers
    with page.expect_response(lambda r: r.url.endswith("/controlnets") and r.status == 401):
        held[0].continue_()
    run_job(page, "after a late refusal")
    wait_image(page)
    expect(page.locator("#keybox")).to_be_hidden()


def test_each_key_has_its_own_gallery_and_forgetting_a_key_forgets_it(
    make_page: Callable[..., Page], servers: Servers, tmp_path: Path, shots: Path
) -> None:
    keys = tmp_path / "keys.yaml"
    alice, bob = add_key(keys, "alice"), add_key(keys, "bob")
    server = servers.start("gallery-keys", api_keys_file=str(keys))
    page = make_page(server)
    give_key(page, alice, asked=True)
    ready(page)
    run_job(page, "alice's secret prompt")
    wait_image(page)
    expect(page.locator("#gallery li")).to_have_count(1)
    alices_job = shown_gallery(page)[0]
    # another key on the same browser: none of alice's jobs, prompts or images on the screen
    give_key(page, bob)
    expect(page.locator("#gallery li")).to_have_count(0)
    expect(page.locator("#image")).to_be_hidden()
    expect(page.locator("body")).not_to_contain_text("alice's secret prompt")
    expect(page.locator("#prompt")).to_have_value("")
    run_job(page, "bob's prompt")
    wait_image(page)
    expect(page.locator("#gallery li")).to_have_count(1)
    bobs_job = shown_gallery(page)[0]
    give_key(page, alice)  # each key finds its own gallery again
    expect(page.locator("#gallery li")).to_have_count(1)
    assert shown_gallery(page) == [alices_job]
    page.reload()
    ready(page)
    image_loaded(page, f'#gallery li[data-id="{alices_job}"] img')
    # "Forget it": nothing of alice's is left in this browser
    page.locator("#key-button").click()
    page.locator("#key-forget").click()
    expect(page.locator("#gallery li")).to_have_count(0)
    expect(page.locator("#image")).to_be_hidden()
    kept = page.evaluate("JSON.stringify(Object.entries(localStorage))")
    assert alice not in kept and alices_job not in kept and "alice's secret prompt" not in kept
    assert bobs_job in kept  # bob's gallery is bob's to forget
    page.screenshot(path=shots / "13-key-forgotten.png")
    give_key(page, bob, asked=True)  # the key box stays open after "Forget it"
    expect(page.locator("#gallery li")).to_have_count(1)
    assert shown_gallery(page) == [bobs_job]


def test_a_gallery_kept_without_a_key_is_dropped_by_a_server_that_needs_one(
    make_page: Callable[..., Page], servers: Servers, tmp_path: Path
) -> None:
    """What an older page kept for whichever key (one list for the whole browser) is nobody's to show."""
    keys = tmp_path / "keys.yaml"
    add_key(keys, "someone")
    server = servers.start("gallery-leftover", api_keys_file=str(keys))
    page = make_page(server)
    leftover = {"id": str(uuid.uuid4()), "prompt": "an earlier key's prompt", "status": "SUCCESS", "created": 0}
    page.evaluate("entry => localStorage.setItem('imagen.gallery', JSON.stringify([entry]))", leftover)
    page.reload()
    expect(page.locator("#keybox")).to_be_visible()
    expect(page.locator("#gallery li")).to_have_count(0)
    assert page.evaluate("localStorage.getItem('imagen.gallery')") is None


def test_live_previews_and_the_extra_fields_come_from_the_server(
    make_page: Callable[..., Page], servers: Servers
) -> None:
    server = servers.start("previews", engine="test-pattern", test_pattern_seconds="4")
    page = ready(make_page(server))
    # every field the server's document offers beyond the page's own gets a control, and only those
    document = httpx.get(server.url + "/openapi.json").json()
    offered = document["components"]["schemas"]["GenerationRequest"]["properties"]
    core = {"prompt", "negative_prompt", "model", "loras", "steps", "guidance_scale", "seed", "webhook",
            "webhook_events_filter", "controlnets",  # controlnets: a section of its own (its test below)
            "hires", "refiner"}  # hires, refiner (objects): the Finishing section (its tests below)
    expected = {name for name, spec in offered.items()
                if name not in core and not (name == "ip_strength" and spec.get("maximum") == 0)}
    assert set(page.locator("[data-extra] [name]").evaluate_all("els => els.map(e => e.name)")) == expected
    open_section(page, "size")
    open_section(page, "images")
    for name in expected:
        expect(page.locator(f'label[for="{name}"]')).to_be_visible()
    page.locator("#steps").fill("20")
    run_job(page, "a preview please")
    preview = page.locator("#preview")
    expect(preview).to_be_visible()  # streamed with ?preview=1 while the job runs
    assert (preview.get_attribute("src") or "").startswith("data:image/jpeg;base64,")
    expect(page.locator("#bar")).not_to_have_attribute("aria-valuenow", "0")
    wait_image(page)
    expect(preview).to_be_hidden()


def test_without_events_or_cancel_in_the_document_the_page_polls_and_shows_no_cancel(
    make_page: Callable[..., Page], scripted: ServerProcess
) -> None:
    """An older server (no /events, no /cancel): the page reads that from /openapi.json."""

    def older_document(route: Any) -> None:
        document = route.fetch().json()
        del document["paths"]["/events/{job_id}"], document["paths"]["/cancel/{job_id}"]
        route.fulfill(json=document)

    page = make_page(scripted)
    page.route("**/openapi.json", older_document)
    page.reload()
    ready(page)
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url.removeprefix(scripted.url)))
    open_section(page, "size")
    page.locator("#steps").fill("10")
    run_job(page, "sleep 1.5")
    expect(page.locator("#phase")).to_have_text("Drawing")
    expect(page.locator("#cancel")).to_be_hidden()
    wait_image(page)
    polls = [url for url in asked if url.startswith("/status/")]
    assert len(polls) >= 2 and not any(url.startswith("/events/") for url in asked), asked


def test_size_images_and_sampler_appear_when_the_document_offers_them(
    make_page: Callable[..., Page], scripted: ServerProcess, shots: Path
) -> None:
    """A server with the SDXL fields (width, height, num_images, scheduler + GET /schedulers): the page
    draws them from its document, sends them, and puts the server's 422 for one of them under it. (This
    server's own document lacks them, and the previews test checks that they are then absent.)"""
    integer = {"type": "integer"}
    extra_fields = {
        "width": {"anyOf": [{**integer, "minimum": 512, "maximum": 2048, "multipleOf": 8}, {"type": "null"}],
                  "default": None},
        "height": {"anyOf": [{**integer, "minimum": 512, "maximum": 2048, "multipleOf": 8}, {"type": "null"}],
                   "default": None},
        "num_images": {**integer, "minimum": 1, "maximum": 4, "default": 1},
        "scheduler": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
    }
    sent: list[dict[str, Any]] = []

    def richer_document(route: Any) -> None:
        document = route.fetch().json()
        document["components"]["schemas"]["GenerationRequest"]["properties"].update(extra_fields)
        document["paths"]["/schedulers"] = {"get": {"responses": {"200": {"description": "names"}}}}
        route.fulfill(json=document)

    def refuse_width(route: Any) -> None:
        sent.append(json.loads(route.request.post_data or "{}"))
        route.fulfill(status=422, json={"detail": [
            {"type": "multiple_of", "loc": ["body", "width"], "msg": "Input should be a multiple of 8", "input": 1001}
        ]})

    page = make_page(scripted)
    page.route("**/openapi.json", richer_document)
    page.route("**/schedulers", lambda route: route.fulfill(json={"schedulers": ["Euler a", "DPM++ 2M Karras"]}))
    page.route("**/generate", refuse_width)
    page.reload()
    ready(page)
    open_section(page, "size")
    for name, label in (("width", "Width"), ("height", "Height"), ("num_images", "Number of images"),
                        ("scheduler", "Sampler")):
        expect(page.locator(f'label[for="{name}"]')).to_contain_text(label)
    expect(page.locator('label[for="width"]')).to_contain_text("512–2048")
    expect(page.locator("#scheduler option")).to_have_count(3)  # the model's default, then GET /schedulers
    page.locator("#width").fill("1001")
    page.locator("#height").fill("1216")
    page.locator("#num_images").fill("2")
    page.locator("#scheduler").select_option("DPM++ 2M Karras")
    box = page.locator("#frame").bounding_box()
    assert box is not None and abs(box["width"] / box["height"] - 1001 / 1216) < 0.02  # reserved at that shape
    run_job(page, "a tall portrait")
    expect(page.locator("#error-width")).to_have_text("Input should be a multiple of 8")
    expect(page.locator("#width")).to_be_focused()
    expect(page.locator("#error-height")).to_be_hidden()
    assert sent[-1] | {"prompt": None} == {
        "prompt": None, "model": "sdxl-base", "loras": [], "steps": 30, "guidance_scale": 7.5, "ip_strength": 0,
        "width": 1001, "height": 1216, "num_images": 2, "scheduler": "DPM++ 2M Karras",
    }, sent
    page.screenshot(path=shots / "13-extra-fields.png")


SECTION_NAMES = ("size", "images", "controlnet", "finishing")


def shown_sections(page: Page) -> list[str]:
    names: list[str] = page.locator("details[data-section]:not([hidden])").evaluate_all(
        "els => els.map((d) => d.dataset.section)"
    )
    return names


def no_sideways_scroll(page: Page) -> None:
    overflow = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert overflow[0] <= overflow[1], overflow


@pytest.mark.parametrize(("width", "height"), [(1280, 800), (360, 740)], ids=["desktop", "360px"])
def test_the_settings_are_in_folded_sections_that_remember_being_open(
    make_page: Callable[..., Page], scripted: ServerProcess, shots: Path, width: int, height: int
) -> None:
    page = ready(make_page(scripted, width=width, height=height))
    # first, always visible: the prompt, Generate, the model, the LoRAs; the rest folded
    for selector in ("#prompt", "#generate", "#negative_prompt", "#model", "#loras-field"):
        expect(page.locator(selector)).to_be_visible()
    sections = shown_sections(page)
    assert sections[:2] == ["size", "images"], sections
    for name in sections:
        expect(page.locator(f'details[data-section="{name}"]')).not_to_have_attribute("open", "")
    for selector in ("#steps", "#guidance_scale", "#seed", "#init_image", "#strength"):
        expect(page.locator(selector)).to_be_hidden()
    expect(page.locator("#section-size summary")).to_have_text("Size and sampler")
    expect(page.locator("#section-images summary")).to_have_text("Image inputs")
    no_sideways_scroll(page)
    generate = page.locator("#generate").bounding_box()
    assert generate is not None and generate["y"] + generate["height"] <= height  # on the first screen
    page.screenshot(path=shots / f"14-sections-folded-{width}.png", full_page=True)

    # a summary opens with the keyboard (native <details>); its controls show, the other sections stay folded
    page.locator("#section-size summary").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#section-size")).to_have_attribute("open", "")
    for selector in ("#steps", "#guidance_scale", "#seed", "#seed-random"):
        expect(page.locator(selector)).to_be_visible()
    expect(page.locator("#init_image")).to_be_hidden()
    open_section(page, "images")  # by a click
    for selector in ("#init_image", "#mask_image", "#strength"):
        expect(page.locator(selector)).to_be_visible()
    for name in sections:
        open_section(page, name)
    no_sideways_scroll(page)
    for selector in ("#steps", "#seed", "#init_image", "#strength"):
        box = page.locator(selector).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, selector
    page.screenshot(path=shots / f"15-sections-open-{width}.png", full_page=True)
    check_accessibility(page, f"sections open at {width} px")

    # kept across a reload; closing one is kept too
    page.locator("#section-images summary").click()
    expect(page.locator("#section-images")).not_to_have_attribute("open", "")
    page.wait_for_function("() => JSON.parse(localStorage.getItem('imagen.sections') || '{}').images === false")
    page.reload()
    ready(page)
    expect(page.locator("#section-size")).to_have_attribute("open", "")
    expect(page.locator("#steps")).to_be_visible()
    expect(page.locator("#section-images")).not_to_have_attribute("open", "")
    expect(page.locator("#init_image")).to_be_hidden()


def test_a_job_submits_from_the_first_screen_and_a_refused_field_opens_its_section(
    make_page: Callable[..., Page], scripted: ServerProcess
) -> None:
    page = ready(make_page(scripted, width=360, height=740))
    sent: list[dict[str, Any]] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data or "{}")) if r.url.endswith("/generate") else None)
    page.locator("#prompt").fill("a lighthouse, the defaults")
    page.locator("#generate").click()  # nothing unfolded
    wait_image(page)
    assert param(page, "steps") == "30" and param(page, "guidance_scale") == "7.5"
    assert "controlnets" not in sent[-1] and sent[-1]["steps"] == 30, sent
    expect(page.locator("#section-size")).not_to_have_attribute("open", "")
    # a value the server refuses, in a section folded again since: the section opens on the field
    open_section(page, "size")
    page.locator("#steps").fill("5")
    page.locator("#section-size summary").click()
    expect(page.locator("#steps")).to_be_hidden()
    page.locator("#prompt").press("Control+Enter")
    expect(page.locator("#error-steps")).to_be_visible()
    expect(page.locator("#section-size")).to_have_attribute("open", "")
    expect(page.locator("#steps")).to_be_focused()


def control_png(size: int = 128) -> bytes:
    """A black square on white: its canny map is black with white edges."""
    image = Image.new("RGB", (size, size), "white")
    image.paste((0, 0, 0), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url_image(src: str) -> Image.Image:
    assert src.startswith("data:image/"), src[:40]
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def is_edge_map(image: Image.Image) -> bool:
    """Mostly black, with some white: an edge map (not the white control image itself)."""
    histogram = image.convert("L").histogram()
    white = sum(histogram[128:]) / sum(histogram)
    return 0.0 < white < 0.25


def test_the_controlnet_section_against_a_described_server(
    make_page: Callable[..., Page], scripted: ServerProcess, shots: Path
) -> None:
    """The section's own behaviour, the ControlNet routes answered by the test (the scripted engine draws no
    ControlNet): only the ControlNets that fit the model, a Union's control type, the canny thresholds only
    for canny, a detected preview, one unit sent with an image and none without, a unit's refused field."""
    unit_schema = {
        "type": "object", "required": ["model", "image"],
        "properties": {
            "model": {"type": "string"}, "image": {"type": "string"},
            "scale": {"type": "number", "minimum": 0, "maximum": 2, "default": 1.0},
            "start": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.0},
            "end": {"type": "number", "minimum": 0, "maximum": 1, "default": 1.0},
            "preprocessor": {"type": "string", "enum": ["none", "canny"], "default": "none"},
            "resize_mode": {"type": "string", "enum": ["crop", "fill", "stretch"], "default": "crop"},
            "control_type": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
            "low_threshold": {"type": "integer", "minimum": 1, "maximum": 255, "default": 100},
            "high_threshold": {"type": "integer", "minimum": 1, "maximum": 255, "default": 200},
            "processor_res": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None},
        },
    }  # fmt: skip
    listing = {
        "controlnets": [
            {"id": "canny-xl", "name": "Canny XL", "description": "Edges", "base": "sdxl", "control_types": None,
             "models": ["sdxl-base"]},
            {"id": "union-xl", "name": "Union XL", "description": "Many", "base": "sdxl",
             "control_types": ["canny", "depth"], "models": ["sdxl-base"]},
        ],
        "preprocessors": [{"name": "none", "description": "as is"}, {"name": "canny", "description": "edges"}],
    }  # fmt: skip
    detected: list[dict[str, Any]] = []
    sent: list[dict[str, Any]] = []

    def described(route: Any) -> None:
        document = route.fetch().json()
        document["components"]["schemas"]["ControlNetUnit"] = unit_schema
        document["components"]["schemas"]["GenerationRequest"]["properties"]["controlnets"] = {
            "type": "array", "items": {"$ref": "#/components/schemas/ControlNetUnit"}, "maxItems": 3, "default": [],
        }  # fmt: skip
        document["paths"]["/controlnets"] = {"get": {"responses": {"200": {"description": "the ControlNets"}}}}
        route.fulfill(json=document)

    def detect(route: Any) -> None:
        body = json.loads(route.request.post_data or "{}")
        detected.append(body)
        edges = Image.new("L", (64, 64), 0)
        edges.paste(255, (16, 16, 48, 17))
        buffer = io.BytesIO()
        edges.save(buffer, format="PNG")
        route.fulfill(json={"images": [base64.b64encode(buffer.getvalue()).decode()], "info": "Success"})

    def generate(route: Any) -> None:
        body = json.loads(route.request.post_data or "{}")
        sent.append(body)
        if "controlnets" in body:
            route.fulfill(status=422, json={"detail": [
                {"type": "less_than_equal", "loc": ["body", "controlnets", 0, "scale"],
                 "msg": "Input should be less than or equal to 2", "input": 3}
            ]})  # fmt: skip
        else:
            route.continue_()

    page = make_page(scripted)
    page.route("**/openapi.json", described)
    page.route("**/controlnets", lambda route: route.fulfill(json=listing))
    page.route("**/controlnet/detect", detect)
    page.route("**/generate", generate)
    page.reload()
    ready(page)
    section = page.locator("#section-controlnet")
    expect(section).to_be_visible()
    expect(section).not_to_have_attribute("open", "")
    open_section(page, "controlnet")
    expect(page.locator("#cn-model option")).to_have_text(["Canny XL", "Union XL"])
    expect(page.locator("#cn-scale")).to_have_value("1")
    expect(page.locator('label[for="cn-scale"]')).to_contain_text("0–2")
    expect(page.locator("#cn-preprocessor")).to_have_value("none")
    expect(page.locator("#cn-thresholds")).to_be_hidden()
    expect(page.locator("#cn-control_type-field")).to_be_hidden()
    page.locator("#cn-model").select_option("union-xl")
    expect(page.locator("#cn-control_type option")).to_have_text(["canny", "depth"])
    page.locator("#cn-model").select_option("canny-xl")
    expect(page.locator("#cn-control_type-field")).to_be_hidden()
    # another model, none fits: the section says so (and which models have one)
    page.locator("#model").select_option("pony-xl-v6")
    expect(page.locator("#cn-status")).to_have_text(
        "No ControlNet of this server fits Pony Diffusion XL V6. Models that have one: SDXL Base 1.0."
    )
    expect(page.locator("#cn-unit")).to_be_hidden()
    page.locator("#model").select_option("sdxl-base")
    expect(page.locator("#cn-unit")).to_be_visible()
    expect(page.locator("#cn-status")).to_be_hidden()
    expect(page.locator("#cn-model")).to_have_value("canny-xl")  # the choice kept

    # an image: "none" shows the image itself; canny asks the server for the map
    png = control_png()
    page.locator("#cn-image").set_input_files({"name": "square.png", "mimeType": "image/png", "buffer": png})
    preview = page.locator("#cn-preview")
    expect(preview).to_have_attribute("data-preprocessor", "none")
    assert (preview.get_attribute("src") or "") == "data:image/png;base64," + base64.b64encode(png).decode()
    assert detected == []
    page.locator("#cn-preprocessor").select_option("canny")
    expect(page.locator("#cn-thresholds")).to_be_visible()
    expect(page.locator("#cn-low_threshold")).to_have_value("100")
    expect(page.locator("#cn-high_threshold")).to_have_value("200")
    expect(preview).to_have_attribute("data-preprocessor", "canny")
    image_loaded(page, "#cn-preview")
    assert is_edge_map(data_url_image(preview.get_attribute("src") or ""))
    expect(page.locator("#cn-preview-status")).to_have_text("Detected map (canny).")
    assert detected[-1]["controlnet_module"] == "canny"
    assert detected[-1]["controlnet_threshold_a"] == 100 and detected[-1]["controlnet_threshold_b"] == 200
    assert detected[-1]["controlnet_input_images"][0].startswith("data:image/png;base64,")
    with page.expect_request("**/controlnet/detect") as again:  # a threshold changed: detected again with it
        page.locator("#cn-low_threshold").fill("50")
    assert json.loads(again.value.post_data or "{}")["controlnet_threshold_a"] == 50
    expect(page.locator("#cn-preview-box")).not_to_have_attribute("aria-busy", "true")
    expect(preview).to_have_attribute("data-preprocessor", "canny")
    no_sideways_scroll(page)
    page.screenshot(path=shots / "16-controlnet-section.png", full_page=True)
    check_accessibility(page, "the ControlNet section")
    page.set_viewport_size({"width": 360, "height": 740})  # on a phone too
    no_sideways_scroll(page)
    for selector in ("#cn-image", "#cn-model", "#cn-high_threshold", "#cn-scale", "#cn-end", "#cn-preview"):
        box = page.locator(selector).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 360, selector
    page.screenshot(path=shots / "16b-controlnet-section-360.png", full_page=True)
    page.set_viewport_size({"width": 1280, "height": 800})

    # sent as one unit; a unit's field the server refuses is marked in the section, opened again for it
    page.locator("#cn-scale").fill("1.5")
    expect(page.locator("#cn-scale-out")).to_have_text("1.50")
    page.locator("#section-controlnet summary").click()
    run_job(page, "a house along the edges")
    expect(page.locator("#error-cn-scale")).to_have_text("Input should be less than or equal to 2")
    expect(section).to_have_attribute("open", "")
    expect(page.locator("#cn-scale")).to_be_focused()
    unit = sent[-1]["controlnets"]
    assert len(unit) == 1 and unit[0] | {"image": None} == {
        "model": "canny-xl", "image": None, "preprocessor": "canny", "scale": 1.5, "start": 0, "end": 1,
        "low_threshold": 50, "high_threshold": 200,
    }, unit  # fmt: skip
    assert unit[0]["image"] == "data:image/png;base64," + base64.b64encode(png).decode()
    # without the image: no unit at all
    page.locator("#cn-clear").click()
    expect(page.locator("#cn-preview-box")).to_be_hidden()
    expect(page.locator("#cn-image")).to_be_focused()
    page.locator("#generate").click()
    wait_image(page)
    assert "controlnets" not in sent[-1], sent[-1]
    # in French
    page.locator("#lang").select_option("fr")
    expect(page.locator("#section-controlnet summary")).to_have_text("ControlNet")
    expect(page.locator("#section-size summary")).to_have_text("Taille et échantillonneur")
    expect(page.locator('label[for="cn-image"]')).to_have_text("Image de contrôle")
    expect(page.locator("#cn-preprocessor option:checked")).to_have_text("Canny (contours)")


def test_a_server_without_a_controlnet_says_so(make_page: Callable[..., Page], scripted: ServerProcess) -> None:
    """A document that offers ``controlnets``, a registry with none: the section says there is none."""

    def described(route: Any) -> None:
        document = route.fetch().json()
        document["components"]["schemas"]["GenerationRequest"]["properties"]["controlnets"] = {
            "type": "array", "items": {"type": "object"}, "maxItems": 0, "default": []
        }  # fmt: skip
        route.fulfill(json=document)

    page = make_page(scripted)
    page.route("**/openapi.json", described)
    page.route("**/controlnets", lambda route: route.fulfill(json={"controlnets": [], "preprocessors": []}))
    page.reload()
    ready(page)
    open_section(page, "controlnet")
    expect(page.locator("#cn-status")).to_have_text(
        "This server has no ControlNet (its operator adds them to the registry)."
    )
    expect(page.locator("#cn-unit")).to_be_hidden()


def test_the_finishing_section_against_a_described_server(
    make_page: Callable[..., Page], scripted: ServerProcess, shots: Path
) -> None:
    """The Finishing section's own behaviour, GET /models answered by the test (a model with a default refiner,
    a refiner model) and every POST /generate refused with the test's 422: the default refiner preselected and
    "None" sent as ``"refiner": null``, a refiner and the hires fix never sent together, the section disabled by
    a starting image, each refused field of ``refiner`` / ``hires`` under its control, no hires fix on a server
    without GET /upscalers."""
    sent: list[dict[str, Any]] = []
    refusal: dict[str, Any] = {}

    def described_models(route: Any) -> None:
        listing = route.fetch().json()
        for model in listing["models"]:
            model["refiners"] = ["xl-refiner"] if model["id"] == "sdxl-base" else []
            model["default_refiner"] = "xl-refiner" if model["id"] == "sdxl-base" else None
        listing["models"].append({**listing["models"][0], "id": "xl-refiner", "name": "XL Refiner", "refiner": True,
                                  "refiners": [], "default_refiner": None})  # fmt: skip
        route.fulfill(json=listing)

    def generate(route: Any) -> None:
        sent.append(json.loads(route.request.post_data or "{}"))
        route.fulfill(status=422, json={"detail": [{"type": "value_error", "input": None, **refusal}]})

    def refuse(loc: list[Any], msg: str) -> None:
        refusal.update(loc=["body", *loc], msg=msg)

    page = make_page(scripted)
    page.route("**/models", described_models)
    page.route("**/generate", generate)
    page.reload()
    ready(page)
    assert "xl-refiner" not in page.locator("#model option").evaluate_all("os => os.map((o) => o.value)")
    section = page.locator("#section-finishing")
    expect(section).to_be_visible()
    expect(section).not_to_have_attribute("open", "")
    expect(section.locator("summary")).to_have_text("Finishing")
    open_section(page, "finishing")
    refiner = page.locator("#refiner-model")
    expect(refiner).to_have_value("xl-refiner")  # the model's default refiner, preselected
    expect(page.locator("#refiner-model option")).to_have_text(["None", "XL Refiner"])
    expect(page.locator("#refiner-hint")).to_contain_text("finished by XL Refiner unless you choose “None”")
    expect(page.locator("#refiner-switch_at")).to_have_value("0.8")  # RefinerRequest's default and range
    expect(page.locator('label[for="refiner-switch_at"]')).to_contain_text("0.5–0.95")
    expect(page.locator("#hires-enabled")).not_to_be_checked()
    expect(page.locator("#hires-upscaler")).to_be_disabled()  # until the hires fix is ticked
    expect(page.locator("#hires-upscaler option")).to_have_text(["Latent", "Lanczos"])  # GET /upscalers
    expect(page.locator("#hires-scale")).to_have_value("2")  # HiresFix's defaults and ranges
    expect(page.locator('label[for="hires-scale"]')).to_contain_text("1–4")
    expect(page.locator("#hires-denoise")).to_have_value("0.5")
    expect(page.locator("#hires-steps")).to_have_value("")
    no_sideways_scroll(page)
    page.screenshot(path=shots / "18-finishing-section.png", full_page=True)
    check_accessibility(page, "the Finishing section")

    # the refiner sent; a refused field of it under its control, in the section opened again for it
    page.locator("#refiner-switch_at").fill("0.9")
    section.locator("summary").click()
    expect(section).not_to_have_attribute("open", "")
    refuse(["refiner", "switch_at"], "Input should be less than or equal to 0.95")
    run_job(page, "a finished lighthouse")
    expect(page.locator("#error-refiner-switch_at")).to_have_text("Input should be less than or equal to 0.95")
    expect(section).to_have_attribute("open", "")
    expect(page.locator("#refiner-switch_at")).to_be_focused()
    assert sent[-1]["refiner"] == {"model": "xl-refiner", "switch_at": 0.9} and "hires" not in sent[-1], sent[-1]

    # "None" turns the default refiner off; the hires fix sent; its fields' refusals under them
    refiner.select_option("")
    page.locator("#hires-enabled").check()
    expect(page.locator("#hires-upscaler")).to_be_enabled()
    page.locator("#hires-upscaler").select_option("lanczos")
    page.locator("#hires-denoise").fill("0.05")
    page.locator("#hires-steps").fill("10")
    refuse(["hires", "denoise"], "denoise 0.05 of 10 steps runs no step: at least 0.1")
    page.locator("#generate").click()
    expect(page.locator("#error-hires-denoise")).to_have_text("denoise 0.05 of 10 steps runs no step: at least 0.1")
    expect(page.locator("#hires-denoise")).to_be_focused()
    expect(page.locator("#hires-denoise")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#error-refiner-switch_at")).to_be_hidden()
    assert "refiner" in sent[-1] and sent[-1]["refiner"] is None, sent[-1]
    assert sent[-1]["hires"] == {"upscaler": "lanczos", "scale": 2, "denoise": 0.05, "steps": 10}, sent[-1]
    refuse(["hires"], "the hires fix is for text-to-image")  # the object as a whole: under its box
    page.locator("#generate").click()
    expect(page.locator("#error-hires")).to_have_text("the hires fix is for text-to-image")
    expect(page.locator("#hires-enabled")).to_be_focused()
    expect(page.locator("#error-hires-denoise")).to_be_hidden()

    # a refiner and the hires fix together: said at once, nothing sent
    refiner.select_option("xl-refiner")
    count = len(sent)
    page.locator("#generate").click()
    expect(page.locator("#error-refiner-model")).to_have_text(
        "The refiner and the hires fix do not run together: choose “None” here, or untick Hires fix."
    )
    expect(refiner).to_be_focused()
    assert len(sent) == count

    # a starting image: the section's controls disabled and said why; nothing of it sent but "refiner": null
    page.locator("#hires-enabled").uncheck()
    open_section(page, "images")
    page.locator("#init_image").set_input_files({"name": "start.png", "mimeType": "image/png", "buffer": control_png()})
    blocked = page.locator("#finishing-blocked")
    expect(blocked).to_have_text(
        "Finishing is for text-to-image without ControlNet: remove the starting image and the control image to use it."
    )
    for control in ("#refiner-model", "#refiner-switch_at", "#hires-enabled"):
        expect(page.locator(control)).to_be_disabled()
    refuse(["init_image"], "not this time")
    page.locator("#generate").click()
    expect(page.locator("#error-init_image")).to_have_text("not this time")
    assert "init_image" in sent[-1] and sent[-1]["refiner"] is None and "hires" not in sent[-1], sent[-1]
    page.locator("#init_image").set_input_files([])
    expect(blocked).to_be_hidden()
    expect(refiner).to_be_enabled()

    # a model without a refiner: no refiner part (the hires fix stays); back, its default is chosen again
    refiner.select_option("")
    page.locator("#model").select_option("pony-xl-v6")
    expect(page.locator("#refiner-part")).to_be_hidden()
    expect(page.locator("#hires-part")).to_be_visible()
    page.locator("#model").select_option("sdxl-base")
    expect(refiner).to_have_value("xl-refiner")

    # in French
    page.locator("#lang").select_option("fr")
    expect(section.locator("summary")).to_have_text("Finitions")
    expect(page.locator("#refiner-model option").first).to_have_text("Aucun")
    expect(page.locator('label[for="hires-denoise"]')).to_contain_text("Débruitage")
    page.locator("#lang").select_option("en")

    # a server without GET /upscalers: no hires fix (the refiner stays)
    def older_document(route: Any) -> None:
        document = route.fetch().json()
        del document["paths"]["/upscalers"]
        route.fulfill(json=document)

    page.route("**/openapi.json", older_document)
    page.reload()
    ready(page)
    expect(page.locator("#hires-part")).to_be_hidden()
    expect(page.locator("#refiner-part")).to_be_visible()


# -- real pipelines last: their servers load their models while the tests above run (load_the_models_early)
def test_generate_with_defaults_using_the_keyboard_only(
    make_page: Callable[..., Page], diffusers: ServerProcess, shots: Path
) -> None:
    page = ready(make_page(diffusers))
    # model picker from /models (its refiners are not models to draw with), the model's default negative prompt
    # as placeholder, the reference's ranges
    models = httpx.get(diffusers.url + "/models").json()["models"]
    expect(page.locator("#model option")).to_have_count(len([m for m in models if not m["refiner"]]))
    assert page.locator("#negative_prompt").get_attribute("placeholder")
    expect(page.locator("#steps")).to_have_value("30")
    expect(page.locator("#steps-range")).to_have_text("10–100")
    expect(page.locator("#guidance_scale-range")).to_have_text("1–30")
    page.screenshot(path=shots / "01-empty.png")

    page.keyboard.press("Tab")  # the skip link first
    expect(page.locator(".skip")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#prompt")).to_be_focused()
    page.keyboard.type("a lighthouse on a cliff at dusk")
    frame_before = page.locator("#frame").bounding_box()
    page.keyboard.press("Control+Enter")
    expect(page.locator("#overlay")).to_be_visible()  # progress shows (queue position, then steps)
    wait_image(page)
    # no layout shift: the box was reserved before the image came
    assert page.locator("#frame").bounding_box() == frame_before
    seed = param(page, "seed")
    assert seed.isdigit()
    assert param(page, "steps") == "30"
    assert param(page, "prompt") == "a lighthouse on a cliff at dusk"
    expect(page.locator("#download")).to_have_attribute("download", gallery(page)[0]["filename"])
    job_id = gallery(page)[0]["id"]
    assert shown_image_bytes(page) == httpx.get(f"{diffusers.url}/image/{job_id}").content
    page.screenshot(path=shots / "02-result.png")
    check_accessibility(page, "after a generation")

    # copy seed, reuse last seed, use these settings again
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.locator("#copy-seed").click()
    expect(page.locator("#copied")).to_contain_text(seed)
    assert page.evaluate("navigator.clipboard.readText()") == seed
    page.locator("#prompt").fill("")
    page.locator("#reuse").click()
    expect(page.locator("#prompt")).to_have_value("a lighthouse on a cliff at dusk")
    expect(page.locator("#seed")).to_have_value(seed)
    expect(page.locator("#seed-random")).not_to_be_checked()
    open_section(page, "size")
    page.locator("#seed-random").check()
    expect(page.locator("#seed")).to_be_disabled()
    page.locator("#seed-reuse").click()
    expect(page.locator("#seed")).to_have_value(seed)
    expect(page.locator("#seed")).to_be_enabled()


def test_the_demo_model_of_a_fresh_install(
    make_page: Callable[..., Page], demo: ServerProcess, shots: Path
) -> None:
    page = ready(make_page(demo))
    expect(page.locator("#model option")).to_have_count(1)
    expect(page.locator("#model")).to_have_value("demo")
    expect(page.locator('[data-lora="demo-blue"]')).to_contain_text("bluify")  # the demo LoRA, trigger word
    run_job(page, "a red circle on a white background")
    expect(page.locator("#image")).to_be_visible(timeout=120_000)
    assert param(page, "model") == "demo" and param(page, "size") == "1024 × 1024"
    assert page.locator("#image").evaluate("img => [img.naturalWidth, img.naturalHeight]") == [1024, 1024]
    verdict = judge(Image.open(io.BytesIO(page.locator("#image").screenshot())))  # the picture as shown
    assert (verdict.colour, verdict.background) == ("red", "white"), verdict  # its shapes are not reliable yet
    page.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
    page.screenshot(path=shots / "02b-demo-model.png")  # the manual's picture of the page (docs/web-page.png)


def test_a_lora_with_a_weight_is_shown_in_the_results_parameters(
    make_page: Callable[..., Page], diffusers: ServerProcess, shots: Path
) -> None:
    page = ready(make_page(diffusers))
    lora = page.locator('[data-lora="anime-style"]')
    expect(lora).to_contain_text("anime style")  # trigger words, said to be added automatically
    expect(lora).to_contain_text("automatically")
    expect(page.locator("#lora-weight-anime-style")).to_be_disabled()
    page.locator("#lora-anime-style").check()
    page.locator("#lora-weight-anime-style").fill("1.25")
    expect(lora.locator("output")).to_have_text("1.25")
    open_section(page, "size")
    page.locator("#steps").fill("10")
    run_job(page, "a cute character with big eyes")
    wait_image(page)
    assert param(page, "loras") == "anime-style × 1.25"
    assert "anime style" in param(page, "final_prompt")
    job_id = gallery(page)[0]["id"]
    metadata = job_status(diffusers, job_id)["result"]["metadata"]
    assert metadata["loras"] == [{"name": "anime-style", "weight": 1.25}]
    page.screenshot(path=shots / "03-lora.png")


def test_a_fixed_seed_twice_gives_the_same_image_bytes(
    make_page: Callable[..., Page], diffusers: ServerProcess
) -> None:
    page = ready(make_page(diffusers))
    open_section(page, "size")
    page.locator("#seed-random").uncheck()
    page.locator("#seed").fill("1234")
    page.locator("#steps").fill("10")
    images = []
    jobs = []
    for _ in range(2):
        jobs.append(generate_and_wait(page, "a castle on a hill")["id"])
        assert param(page, "seed") == "1234"
        images.append(shown_image_bytes(page))
    first, second = jobs
    assert first != second
    assert images[0] == images[1]
    with diffusers.client() as http:
        assert http.get(f"/image/{first}").content == http.get(f"/image/{second}").content == images[0]


def test_a_controlnet_job_with_a_detected_canny_map(
    make_page: Callable[..., Page], diffusers: ServerProcess, shots: Path
) -> None:
    """The tiny fixtures' ``tiny-canny``: listed for the model, a canny preview from POST /controlnet/detect
    (an edge map), one unit sent with the job, and the job done by the real pipeline."""
    listed = httpx.get(diffusers.url + "/controlnets").json()
    assert "tiny-canny" in [c["id"] for c in listed["controlnets"]], listed
    page = ready(make_page(diffusers))
    open_section(page, "controlnet")
    expect(page.locator("#cn-status")).to_be_hidden()
    expect(page.locator('#cn-model option[value="tiny-canny"]')).to_be_attached()
    page.locator("#cn-model").select_option("tiny-canny")
    page.locator("#cn-image").set_input_files({"name": "square.png", "mimeType": "image/png", "buffer": control_png()})
    preview = page.locator("#cn-preview")
    expect(preview).to_have_attribute("data-preprocessor", "none")  # the image itself
    page.locator("#cn-preprocessor").select_option("canny")
    expect(page.locator("#cn-thresholds")).to_be_visible()
    expect(preview).to_have_attribute("data-preprocessor", "canny")  # the server's map
    image_loaded(page, "#cn-preview")
    assert is_edge_map(data_url_image(preview.get_attribute("src") or ""))
    page.screenshot(path=shots / "17-controlnet-canny.png", full_page=True)
    open_section(page, "size")
    page.locator("#steps").fill("10")
    with page.expect_request("**/generate") as request:
        run_job(page, "a house along the edges")
    unit = json.loads(request.value.post_data or "{}")["controlnets"]
    assert [(u["model"], u["preprocessor"], u["low_threshold"], u["high_threshold"]) for u in unit] == [
        ("tiny-canny", "canny", 100, 200)
    ], unit
    wait_image(page)
    job_id = gallery(page)[0]["id"]
    assert job_status(diffusers, job_id)["status"] == "SUCCESS"
    assert param(page, "controlnets") == "tiny-canny (canny) × 1"
    # "Use these settings again" brings the unit's settings back (its image is chosen again)
    page.locator("#cn-scale").fill("0.5")
    page.locator("#cn-preprocessor").select_option("none")
    page.locator("#reuse").click()
    expect(page.locator("#cn-scale")).to_have_value("1")
    expect(page.locator("#cn-preprocessor")).to_have_value("canny")
    expect(page.locator("#cn-thresholds")).to_be_visible()


def test_finishing_with_the_hires_fix_then_a_refiner(
    make_page: Callable[..., Page], diffusers: ServerProcess, shots: Path
) -> None:
    """The tiny fixtures' upscaler ``tiny-esrgan`` and refiner ``sdxl-refiner``, run by the real pipelines from
    the Finishing section: the 64 px model's picture comes back at 128 px with the hires fix at scale 2, then a
    job finished by the refiner; each job's metadata says so, and "Use these settings again" brings them back."""
    models = httpx.get(diffusers.url + "/models").json()["models"]
    assert {"sdxl-refiner", "sdxl-refiner-single-file"} <= {m["id"] for m in models if m["refiner"]}, models
    page = ready(make_page(diffusers))
    # refiners finish other models' pictures: never offered as the model to draw with
    offered = page.locator("#model option").evaluate_all("os => os.map((o) => o.value)")
    assert offered == [m["id"] for m in models if not m["refiner"]], offered
    section = page.locator("#section-finishing")
    expect(section).to_be_visible()
    expect(section).not_to_have_attribute("open", "")  # folded the first time
    open_section(page, "finishing")
    expect(page.locator("#refiner-model")).to_have_value("")  # no default refiner in the fixtures
    expect(page.locator("#refiner-model option")).to_have_text(
        ["None", "SDXL Refiner (tiny fixture)", "SDXL Refiner single file (tiny fixture)"]
    )
    expect(page.locator("#hires-upscaler option")).to_have_text(["Latent", "Lanczos", "Tiny ESRGAN 4x"])

    # keyboard only: each control reached with Tab, the hires fix ticked with Space
    page.locator("#section-finishing summary").focus()
    for control in ("#refiner-model", "#refiner-switch_at", "#hires-enabled"):
        page.keyboard.press("Tab")
        expect(page.locator(control)).to_be_focused()
    page.keyboard.press("Space")
    expect(page.locator("#hires-enabled")).to_be_checked()
    for control in ("#hires-upscaler", "#hires-scale", "#hires-denoise", "#hires-steps"):
        page.keyboard.press("Tab")
        expect(page.locator(control)).to_be_focused()
    page.locator("#hires-upscaler").select_option("tiny-esrgan")
    expect(page.locator("#hires-upscaler-desc")).to_contain_text("RRDBNet")
    page.locator("#hires-scale").fill("2")
    no_sideways_scroll(page)
    check_accessibility(page, "the Finishing section, hires fix ticked")
    page.screenshot(path=shots / "19-finishing-hires.png", full_page=True)
    page.set_viewport_size({"width": 360, "height": 740})  # on a phone too
    no_sideways_scroll(page)
    for selector in ("#refiner-model", "#refiner-switch_at", "#hires-upscaler", "#hires-scale", "#hires-denoise",
                     "#hires-steps"):
        box = page.locator(selector).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 360, selector
    page.screenshot(path=shots / "19b-finishing-360.png", full_page=True)
    page.set_viewport_size({"width": 1280, "height": 800})

    # the hires fix: 64 px drawn, 128 px shown
    open_section(page, "size")
    page.locator("#steps").fill("10")
    with page.expect_request("**/generate") as request:
        hires_job = generate_and_wait(page, "a lighthouse, finished larger")
    body = json.loads(request.value.post_data or "{}")
    assert body["hires"] == {"upscaler": "tiny-esrgan", "scale": 2, "denoise": 0.5} and "refiner" not in body, body
    image_loaded(page, "#image")
    assert page.locator("#image").evaluate("img => [img.naturalWidth, img.naturalHeight]") == [128, 128]
    metadata = job_status(diffusers, hires_job["id"])["result"]["metadata"]
    assert metadata["hires"]["upscaler"] == "tiny-esrgan", metadata
    assert (metadata["hires"]["width"], metadata["hires"]["height"]) == (128, 128), metadata
    assert param(page, "hires") == "tiny-esrgan → 128 × 128, denoise 0.5"

    # the refiner, the hires fix unticked
    page.locator("#refiner-model").select_option("sdxl-refiner")
    page.locator("#hires-enabled").uncheck()
    expect(page.locator("#hires-upscaler")).to_be_disabled()
    with page.expect_request("**/generate") as request:
        refined_job = generate_and_wait(page, "a lighthouse, refined")
    body = json.loads(request.value.post_data or "{}")
    assert body["refiner"] == {"model": "sdxl-refiner", "switch_at": 0.8} and "hires" not in body, body
    metadata = job_status(diffusers, refined_job["id"])["result"]["metadata"]
    assert metadata["refiner"]["model"] == "sdxl-refiner" and "hires" not in metadata, metadata
    image_loaded(page, "#image")
    assert page.locator("#image").evaluate("img => [img.naturalWidth, img.naturalHeight]") == [64, 64]
    assert param(page, "refiner") == "sdxl-refiner · 0.8"
    page.screenshot(path=shots / "19c-finishing-refined.png")

    # "Use these settings again" on the hires job: its hires fix back, no refiner
    page.locator(f'#gallery li[data-id="{hires_job["id"]}"] button').click()
    expect(page.locator('#params [data-param="hires"]')).to_be_visible()
    page.locator("#reuse").click()
    expect(page.locator("#hires-enabled")).to_be_checked()
    expect(page.locator("#hires-upscaler")).to_have_value("tiny-esrgan")
    expect(page.locator("#hires-scale")).to_have_value("2")
    expect(page.locator("#refiner-model")).to_have_value("")
