"""What the benchmarks share: free ports and waiting, the servers they start (``imagen serve``, ``imagen
worker``, a private redis-server), their clients, and the one report format they print.

Benchmarks run as scripts (``python bench/x.py``), so this folder is on ``sys.path`` and they ``import
harness``; importing it puts the repository first on ``sys.path`` too (``imagen``, ``training``).

The report: :func:`report` prints a markdown table headed by the machine (CPU model, cores, memory, GPU if
any, torch and its dtype where the benchmark names one), the date and the commit (short hash, ``dirty``
when tracked files differ from it). A benchmark gives it its headline figures too; ``bench/run_cpu_set.py``
(``make bench``) collects them, through the file named by ``BENCH_SUMMARY_FILE``, into one summary table.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imagen.config import Settings
    from imagen.jobs.backend import JobBackend
    from imagen.jobs.types import JobRecord, NewJob

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SUMMARY_FILE_VARIABLE = "BENCH_SUMMARY_FILE"
TERMINAL = ("SUCCESS", "FAILURE", "REVOKED")


# --- ports and waiting ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(interval)


# --- servers and workers ----------------------------------------------------------------------------------
def imagen_env(workdir: Path, role: str, **settings: object) -> dict[str, str]:
    """The environment of an ``imagen`` process: this shell's, without its ``IMAGEN_*`` (a benchmark prints
    the configuration it ran, so none may come from the shell), with data and outputs folders of its own
    (``<role>-data``, ``<role>-outputs`` in ``workdir``) and ``IMAGEN_<NAME>`` for each of ``settings``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMAGEN_")}
    env.update({
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "IMAGEN_DATA_DIR": str(workdir / f"{role}-data"),
        "IMAGEN_OUTPUTS_DIR": str(workdir / f"{role}-outputs"),
    })  # fmt: skip
    env.update({f"IMAGEN_{name.upper()}": str(value) for name, value in settings.items()})
    return env


def spawn(arguments: Sequence[str], env: dict[str, str], workdir: Path, log: str,
          cpu: int | None = None) -> subprocess.Popen[bytes]:
    """``python -m imagen <arguments>`` in its own session (Ctrl-C reaches the benchmark alone), its output
    in ``workdir/log``; pinned to core ``cpu`` when given (and ``taskset`` exists)."""
    command = [sys.executable, "-m", "imagen", *arguments]
    if cpu is not None and shutil.which("taskset"):
        command = ["taskset", "-c", str(cpu), *command]
    with (workdir / log).open("ab") as output:
        return subprocess.Popen(command, env=env, cwd=workdir, stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM to the process's session (a server's worker children too), SIGKILL if it outlives ``timeout``."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass(frozen=True)
class Server:
    url: str
    port: int
    pid: int
    log: Path


def health(url: str) -> dict[str, Any] | None:
    """``GET /health``'s body, whatever its status (503 included); None while nothing answers."""
    try:
        connection = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=5)
        connection.request("GET", "/health")
        body: dict[str, Any] = json.loads(connection.getresponse().read())
        connection.close()
        return body
    except (OSError, ValueError, http.client.HTTPException):
        return None


def worker_ready(url: str) -> bool:
    body = health(url)
    return body is not None and any(worker.get("ready") for worker in body.get("workers", []))


@contextlib.contextmanager
def serve(env: dict[str, str], workdir: Path, *, cpu: int | None = None, until_worker_ready: bool = False,
          timeout: float = 120) -> Iterator[Server]:
    """A real ``imagen serve`` on a free loopback port, once ``/health`` answers (and, with
    ``until_worker_ready``, a worker is ready); stopped on leaving."""
    port = free_port()
    log = f"serve-{port}.log"
    process = spawn(["serve", "--host", "127.0.0.1", "--port", str(port)], env, workdir, log, cpu)
    url = f"http://127.0.0.1:{port}"
    try:
        wait(lambda: process.poll() is not None or (worker_ready(url) if until_worker_ready else health(url)),
             timeout, "imagen serve", interval=0.1)
        if process.poll() is not None:
            raise SystemExit(f"imagen serve ended ({process.returncode}); see {workdir / log}")
        yield Server(url, port, process.pid, workdir / log)
    finally:
        stop(process)


@contextlib.contextmanager
def workers(count: int, env: dict[str, str], workdir: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` real ``imagen worker`` processes (one ``--gpu`` index each), stopped on leaving; the caller
    waits for them to be ready in whatever way its backend can see."""
    processes = [spawn(["worker", "--gpu", str(index)], env, workdir, f"worker-{index}.log") for index in range(count)]
    try:
        yield processes
    finally:
        for process in processes:
            stop(process)


@contextlib.contextmanager
def redis_server(workdir: Path, *, appendonly: bool = False) -> Iterator[str]:
    """A private redis-server on 127.0.0.1 (its own session), its data in ``workdir``; its URL."""
    import redis

    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
         "--appendonly", "yes" if appendonly else "no", "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    client = redis.Redis(port=port)

    def pings() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    try:
        wait(pings, 10, "redis-server")
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_pattern_cluster(url: str, workdir: Path, generation_s: float) -> tuple[dict[str, str], Settings]:
    """For a distributed run on the Redis at ``url`` with the test-pattern engine: the environment of
    ``imagen worker`` processes and the settings of an API side run in the benchmark's own process."""
    from imagen.config import Settings

    worker_env = imagen_env(workdir, "worker", broker_url=url, engine="test-pattern",
                            test_pattern_seconds=generation_s)
    api_settings = Settings(broker_url=url, engine="test-pattern", outputs_dir=workdir / "api-outputs",
                            data_dir=workdir / "api-data", max_queue=1000)
    return worker_env, api_settings


# --- clients ----------------------------------------------------------------------------------------------
class JsonClient:
    """One keep-alive HTTP connection to a server, as a real client holds one; JSON in and out."""

    def __init__(self, url: str, timeout: float = 60) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=timeout)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        payload = json.dumps(body).encode() if body is not None else None
        self.connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
        response = self.connection.getresponse()
        answer: dict[str, Any] = json.loads(response.read())
        return response.status, answer

    def submit(self, body: dict[str, Any]) -> str:
        status, answer = self.call("POST", "/generate", body)
        if status != 201:
            raise RuntimeError(f"POST /generate answered {status}: {answer}")
        return str(answer["job_id"])

    def close(self) -> None:
        self.connection.close()


def new_job(settings: Settings, prompt: str, key_name: str = "") -> NewJob:
    """A job as the API would queue it (``prepare_job``), for a backend run in the benchmark's process."""
    from imagen.api.schemas import GenerationRequest
    from imagen.api.submission import prepare_job
    from imagen.registry import load_registry

    return prepare_job(GenerationRequest(prompt=prompt, steps=10), load_registry(settings.registry_path), settings,
                       key_name=key_name)


def wait_finished(backend: JobBackend, job_ids: Sequence[str], timeout: float, interval: float = 0.01
                  ) -> list[JobRecord]:
    """The records of ``job_ids`` once every one has ended; each must have succeeded."""
    records: list[JobRecord] = []

    def done() -> bool:
        nonlocal records
        found = [backend.get(job_id) for job_id in job_ids]
        records = [record for record in found if record is not None and record.state.is_terminal()]
        return len(records) == len(job_ids)

    wait(done, timeout, f"{len(job_ids)} job(s)", interval)
    failed = [record.error for record in records if record.state.value != "SUCCESS"]
    if failed:
        raise SystemExit(f"jobs did not succeed: {failed}")
    return records


# --- memory and the libraries -----------------------------------------------------------------------------
def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The process's peak resident memory since the start or the last :func:`reset_peak_rss`."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs sets the peak (VmHWM) back to the current resident memory."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def quiet_libraries() -> None:
    """No progress bars, load reports or deprecation warnings from diffusers and transformers."""
    import warnings

    import diffusers
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


# --- the report -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Table:
    columns: Sequence[str]
    rows: Sequence[Sequence[object]]
    caption: str = ""  # a line printed above the table


@dataclass(frozen=True)
class Headline:
    """One figure for ``make bench``'s summary: what it is, its value as printed, its target if any."""

    what: str
    value: str
    target: str = ""


def _first_line(command: Sequence[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else ""


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _gpus() -> list[str]:
    torch = sys.modules.get("torch")  # never imported for this alone: a second or more on a small CPU
    if torch is not None and torch.cuda.is_available():
        return [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    if shutil.which("nvidia-smi"):
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=10, check=False).stdout.split("\n")
        return [name.strip() for name in names if name.strip()]
    return []


def machine(dtype: str | None = None) -> str:
    """CPU model and cores, memory, the GPU(s) if any, torch's version (when loaded) and ``dtype``."""
    cores = os.cpu_count() or 1  # the machine's, not this process's affinity (a benchmark may pin itself)
    parts = [f"{_cpu_model()} ({cores} core{'s' if cores > 1 else ''})"]
    with contextlib.suppress(OSError, ValueError, IndexError):
        total_kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        parts.append(f"{total_kib / 2**20:.0f} GiB RAM")
    gpus = _gpus()
    parts.append(", ".join(gpus) if gpus else "no GPU")
    torch = sys.modules.get("torch")
    if torch is not None or dtype:
        parts.append(" ".join(part for part in (f"torch {torch.__version__}" if torch else "", dtype or "") if part))
    return ", ".join(parts)


def commit() -> str:
    """The checkout's short commit hash, ``dirty`` when a tracked file differs from it."""
    short = _first_line(["git", "rev-parse", "--short", "HEAD"])
    if not short:
        return "unknown (not a git checkout)"
    changed = _first_line(["git", "status", "--porcelain", "--untracked-files=no"])
    return f"{short} dirty" if changed else short


def provenance(dtype: str | None = None) -> str:
    """The line that heads every report: machine, date, commit."""
    return f"machine: {machine(dtype)} · date: {datetime.date.today().isoformat()} · commit: {commit()}"


def markdown_table(table: Table) -> list[str]:
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = [table.caption] if table.caption else []
    lines.append("| " + " | ".join(cell(column) for column in table.columns) + " |")
    lines.append("|" + "---|" * len(table.columns))
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in table.rows]
    return lines


def report(title: str, *tables: Table, dtype: str | None = None, notes: Iterable[str] = (),
           headlines: Iterable[Headline] = ()) -> None:
    """Print a benchmark's results: its title, the machine/date/commit line, its tables, then notes.
    Headlines go to the summary file when ``make bench`` runs the benchmark (and are printed otherwise
    only as the tables show them)."""
    lines = [f"## {title}", "", provenance(dtype), ""]
    for table in tables:
        lines += [*markdown_table(table), ""]
    lines += list(notes)
    print("\n".join(lines).rstrip() + "\n", flush=True)
    summary = os.environ.get(SUMMARY_FILE_VARIABLE)
    if summary:
        with open(summary, "a", encoding="utf-8") as handle:
            for headline in headlines:
                handle.write(json.dumps({"benchmark": Path(sys.argv[0]).stem, "what": headline.what,
                                         "value": headline.value, "target": headline.target}) + "\n")
