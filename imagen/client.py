"""The command-line client: ``imagen generate|status|cancel|models|loras|controlnets|upscalers`` against a running
server.

It speaks the server's own API (``POST /generate``, ``/events`` or ``/status``, ``/image``, ``/cancel``),
follows a job with a live progress bar (the server's progress events when it has ``/events``, else polling
``/status``), and writes the images. Ctrl-C cancels the job on the server. Exit codes: 0 done, 1 failure
(one line on stderr, no traceback), 2 usage (argparse), 130 interrupted.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

DEFAULT_URL = "http://localhost:8009"
POLL_S = 0.5
CANCEL_TIMEOUT_S = 10.0  # a Ctrl-C should not leave the user waiting long for the cancel
TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}
EXIT_INTERRUPTED = 130


class ClientError(Exception):
    """A failure to report as one line (exit 1)."""


class ImagenClient:
    def __init__(self, url: str | None, key: str | None) -> None:
        self.url = (url or os.environ.get("IMAGEN_URL") or DEFAULT_URL).rstrip("/")
        key = key or os.environ.get("IMAGEN_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(30.0, read=120.0))

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ClientError(f"cannot reach the server at {self.url} ({type(exc).__name__}: {exc})") from exc

    def json(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        if response.status_code not in ok:
            raise ClientError(f"{method} {path}: HTTP {response.status_code}: {_detail(response)}")
        return response.json()

    def submit(self, body: dict[str, Any]) -> str:
        answer = self.json("POST", "/generate", ok=(201,), json=body)
        return str(answer["job_id"])

    def statuses(self, job_id: str) -> Iterator[dict[str, Any]]:
        """The job's /status bodies as they change, until a terminal one: from /events when the server has
        it, else by polling /status."""
        try:
            with self.http.stream("GET", f"/events/{job_id}") as response:
                if response.status_code == 200:
                    yield from _sse_statuses(response.iter_lines())
                    return
        except httpx.TransportError as exc:
            raise ClientError(f"cannot reach the server at {self.url} ({type(exc).__name__}: {exc})") from exc
        while True:  # no /events: poll
            status = self.json("GET", f"/status/{job_id}")
            yield status
            if status["status"] in TERMINAL:
                return
            time.sleep(POLL_S)

    def cancel(self, job_id: str) -> httpx.Response:
        """On a connection of its own: after a Ctrl-C that interrupted the job's stream mid-read, the pool
        that stream used may still hold the interrupted connection's lock, and a cancel queued behind it
        would never be sent."""
        try:
            with httpx.Client(base_url=self.url, headers=self.http.headers, timeout=CANCEL_TIMEOUT_S) as fresh:
                return fresh.post(f"/cancel/{job_id}")
        except httpx.TransportError as exc:
            raise ClientError(f"cannot reach the server at {self.url} ({type(exc).__name__}: {exc})") from exc


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # a 422: each field's message
        return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', [])[1:])}: {e.get('msg')}" for e in detail)
    if isinstance(detail, dict):
        return str(detail.get("message") or detail.get("error") or detail)
    return str(detail)


def _sse_statuses(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    event, data = "", []
    for line in lines:
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            if event == "status":
                status = json.loads("\n".join(data))
                yield status
                if status["status"] in TERMINAL:
                    return
            event, data = "", []


def _output_paths(output: str | None, filenames: list[str]) -> list[Path]:
    if output is None:
        return [Path(Path(name).name) for name in filenames]  # in the current folder
    path = Path(output)
    if len(filenames) == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{index}{path.suffix or '.png'}") for index in range(len(filenames))]


def generate(client: ImagenClient, body: dict[str, Any], output: str | None, console: Console) -> int:
    job_id = client.submit(body)
    console.print(f"job {job_id} queued", highlight=False)
    try:
        final = _follow(client, job_id, console)
    except KeyboardInterrupt:
        try:
            response = client.cancel(job_id)
            outcome = "cancelled" if response.status_code == 200 else f"could not cancel ({_detail(response)})"
        except ClientError as exc:
            outcome = f"could not cancel ({exc})"
        print(f"imagen generate: interrupted; job {job_id} {outcome}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if final["status"] == "FAILURE":
        raise ClientError(f"job {job_id} failed: {final.get('error')}")
    if final["status"] == "REVOKED":
        raise ClientError(f"job {job_id} was cancelled")
    result = final["result"]
    images = result.get("images") or [{"filename": result["filename"], "seed": result["metadata"].get("seed")}]
    paths = _output_paths(output, [image["filename"] for image in images])
    for index, (image, path) in enumerate(zip(images, paths, strict=True)):
        response = client.request("GET", f"/image/{job_id}", params={"index": index})
        if response.status_code != 200:
            raise ClientError(f"image {index} of job {job_id}: HTTP {response.status_code}: {_detail(response)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(response.content)
        print(f"{path}  seed={image.get('seed')}")
    return 0


def _follow(client: ImagenClient, job_id: str, console: Console) -> dict[str, Any]:
    if not console.is_terminal:  # a log or a pipe: one line per change, no bar
        final: dict[str, Any] = {}
        for status in client.statuses(job_id):
            print(f"{status['status']} {_step(status)} {_percent(status)}%", file=sys.stderr, flush=True)
            final = status
        return final
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("queued", total=100)
        last: dict[str, Any] = {}
        for status in client.statuses(job_id):
            progress.update(task, completed=_percent(status), description=_step(status))
            last = status
        return last


def _step(status: dict[str, Any]) -> str:
    meta = status.get("meta") or {}
    step = str(meta.get("step") or status["status"].lower())
    if meta.get("current_step") is not None:
        step = f"{step} {meta['current_step']}/{meta.get('total_steps')}"
    return step


def _percent(status: dict[str, Any]) -> int:
    return 100 if status["status"] == "SUCCESS" else int((status.get("meta") or {}).get("progress", 0))


def show_status(client: ImagenClient, job_id: str) -> int:
    status = client.json("GET", f"/status/{job_id}")
    line = f"{status['job_id']}  {status['status']}"
    if status.get("meta"):
        line += f"  {status['meta'].get('step')} {status['meta'].get('progress')}%"
    if status.get("error"):
        line += f"  error: {status['error']}"
    if status.get("result"):
        line += f"  {status['result']['filename']}  seed={status['result']['metadata'].get('seed')}"
    print(line)
    return 0


def cancel(client: ImagenClient, job_id: str) -> int:
    response = client.cancel(job_id)
    if response.status_code != 200:
        raise ClientError(f"cannot cancel job {job_id}: HTTP {response.status_code}: {_detail(response)}")
    print(f"{job_id}  REVOKED")
    return 0


def list_models(client: ImagenClient) -> int:
    for model in client.json("GET", "/models")["models"]:
        line = f"{model['id']}\t{model['name']}\t{model['description']}"
        if model.get("refiner"):
            line += "\t(a refiner: --refiner)"
        elif model.get("refiners"):
            line += f"\trefiners: {', '.join(model['refiners'])}"
        print(line)
    return 0


def list_upscalers(client: ImagenClient) -> int:
    for upscaler in client.json("GET", "/upscalers")["upscalers"]:
        print(f"{upscaler['id']}\t{upscaler['name']}\t{upscaler['kind']}")
    return 0


def list_loras(client: ImagenClient) -> int:
    for lora in client.json("GET", "/loras")["loras"]:
        words = ", ".join(lora.get("trigger_words") or [])
        line = f"{lora['id']}\t{lora['name']}\tweight {lora['default_weight']}"
        print(line + (f"\ttriggers: {words}" if words else ""))
    return 0


def list_controlnets(client: ImagenClient) -> int:
    listed = client.json("GET", "/controlnets")
    for controlnet in listed["controlnets"]:
        types = controlnet["control_types"]
        fits = ", ".join(controlnet["models"]) or "no model here"
        line = f"{controlnet['id']}\t{controlnet['name']}\tfits: {fits}"
        print(line + (f"\ttypes: {', '.join(types)}" if types else ""))
    print("preprocessors: " + ", ".join(p["name"] for p in listed["preprocessors"]))
    return 0


def run(command: str, url: str | None, key: str | None, **options: Any) -> int:
    """One client command; errors are one line on stderr and exit 1."""
    client = ImagenClient(url, key)
    console = Console(stderr=True)
    try:
        if command == "generate":
            return generate(client, options["body"], options.get("output"), console)
        if command == "status":
            return show_status(client, options["job_id"])
        if command == "cancel":
            return cancel(client, options["job_id"])
        if command == "models":
            return list_models(client)
        if command == "controlnets":
            return list_controlnets(client)
        if command == "upscalers":
            return list_upscalers(client)
        return list_loras(client)
    except ClientError as exc:
        print(f"imagen {command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        client.close()
