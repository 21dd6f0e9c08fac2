"""Benchmark: a job through the service vs the same diffusers call made directly, and where the time goes.
Target: the service's median at most 1.05 times the direct call's.

1. The demo model (SDXL architecture, trained on shapes, native 1024x1024; the very pipeline the server
   builds), CFG 7.5, the server's dtype, two jobs (``--job``): ``full`` 1024x1024 at 30 steps and ``short``
   512x512 at 10 steps. Two paths, **interleaved** (direct, service, service, direct, ...: a background load
   or thermal drift hits both alike), one untimed warm-up run each, the same work on both:

   * direct: the plain diffusers pipeline call, ``pipe(prompt=..., negative_prompt=...)`` to a PIL image, in
     this process;
   * service: POST /generate -> SUCCESS, through a real ``imagen serve`` (embedded job system, worker child
     process) started by this script. Its client follows ``GET /events/{job_id}`` (``--client events``, the
     default: what ``imagen generate`` and the web page do; the server pushes SUCCESS as it is stored) or
     polls ``GET /status`` by the job's progress (``--client poll``, :func:`poll_delay`: rarely while it
     runs, every 20 ms near its end, so SUCCESS is seen up to 20 ms late).

   Same work: ``--guidance plain`` (default) serves the demo model from a registry file with plain
   classifier-free guidance to the end (``guidance_rescale: 0``, ``guidance_stop: 1``), as the plain call
   does; ``--guidance model`` keeps the built-in entry (rescale 0.7, guidance stopped after 60 % of the
   steps) and gives the direct call the same, as diffusers' documentation writes it (``guidance_rescale=``
   and a ``callback_on_step_end`` that drops the unconditional half). ``--threads N``: both processes on N
   CPU threads (default: torch's own choice, printed). ``--dtype``: both paths in that dtype (default: the
   server's choice, bfloat16 on CPUs with native bf16, float32 elsewhere).

   Printed, per job: each run, the median and the spread (min, max, IQR) of each path, the ratio of the
   medians (target <= 1.05) and the median of the per-round ratios; the CPU seconds per job of each path
   (Linux: the direct call's process; the service's worker, API process and client, each), which a loaded
   machine skews far less than wall-clock time; then the median time of each phase: direct = encode
   (``pipe.encode_prompt``), denoise (the rest of the call), decode (VAE decode and post-processing);
   service = queue (POST sent -> worker starts), load (model / LoRAs / IP-Adapter), encode, denoise,
   decode, PNG (encode + write), hand-back (worker done -> the client sees SUCCESS). The service's phases
   come from ``result.timings`` in /status (the worker times the engine's progress steps).
The model and LoRA switch times are ``bench/switch_times.py``'s.

    .venv/bin/python bench/service_vs_diffusers.py [--job both|full|short] [--runs 7] [--threads N]
        [--guidance plain|model] [--dtype auto|float32|bfloat16] [--client events|poll]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import TERMINAL, Headline, JsonClient, Server, Table, imagen_env, quiet_libraries, report, serve

PROMPT = "a large green star on the left on a beige background"
NEGATIVE = "low quality, blurry, distorted, ugly, bad anatomy"
GUIDANCE = 7.5
JOBS = {"full": (1024, 30), "short": (512, 10)}  # (side in pixels, steps)
MIN_POLL_S, MAX_POLL_S = 0.02, 0.5

# The service's progress steps, grouped into the phases printed for both paths.
SERVICE_PHASES = {
    "loading_model": "load",
    "loading_loras": "load",
    "encoding_prompt": "encode",
    "generation_gpu": "denoise",
    "decoding": "decode",
    "saving": "PNG",
}
PHASE_ORDER = ["queue", "load", "encode", "denoise", "decode", "PNG", "hand-back"]


@dataclass
class Run:
    total: float
    phases: dict[str, float] = field(default_factory=dict)
    messages: int = 0  # /status answers or status events the client read
    cpu: float | None = None  # CPU seconds the run took, all processes of its path (None: no /proc)
    cpu_parts: dict[str, float] = field(default_factory=dict)  # service: worker, API, client


class DirectPath:
    """The demo pipeline in this process, called as a diffusers user would; phases timed by wrapping the
    pipeline's own ``encode_prompt``, ``vae.decode`` and ``image_processor.postprocess``."""

    def __init__(self, dtype_name: str, guidance: str) -> None:
        import torch

        from imagen.generation.diffusers.loading import load_pipeline
        from imagen.registry import builtin_registry

        spec = builtin_registry().model("demo")
        assert spec is not None
        self.torch = torch
        self.side, self.steps = JOBS["full"]
        self.pipe = load_pipeline(spec, getattr(torch, dtype_name))
        # --guidance model: the built-in entry's guidance, as a diffusers user would ask for it
        self.rescale = spec.guidance_rescale if guidance == "model" else 0.0
        self.stop = spec.guidance_stop if guidance == "model" else 1.0
        self._spent: dict[str, float] = {}
        self.pipe.encode_prompt = self._timed("encode", self.pipe.encode_prompt)
        self.pipe.vae.decode = self._timed("decode", self.pipe.vae.decode)
        self.pipe.image_processor.postprocess = self._timed("decode", self.pipe.image_processor.postprocess)

    def _timed(self, phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._spent[phase] = self._spent.get(phase, 0.0) + time.perf_counter() - start

        return timed

    def _stop_guidance(self, pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        """diffusers' "dynamic classifier-free guidance" recipe: after the cut, the prompt's half only."""
        if step + 1 == max(1, round(self.stop * self.steps)):
            for name in ("prompt_embeds", "add_text_embeds", "add_time_ids"):
                tensors[name] = tensors[name].chunk(2)[1]
            pipe._guidance_scale = 1.0
        return tensors

    def run(self, seed: int) -> Run:
        self._spent = {}
        guidance: dict[str, Any] = {}
        if self.rescale:
            guidance["guidance_rescale"] = self.rescale
        if self.stop < 1:
            guidance["callback_on_step_end"] = self._stop_guidance
            guidance["callback_on_step_end_tensor_inputs"] = ["latents", "prompt_embeds", "add_text_embeds",
                                                              "add_time_ids"]
        cpu_start = time.process_time()
        start = time.perf_counter()
        self.pipe(
            prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=self.steps, guidance_scale=GUIDANCE,
            width=self.side, height=self.side, generator=self.torch.Generator("cpu").manual_seed(seed), **guidance,
        ).images[0]
        total = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
        phases = dict(self._spent)
        phases["denoise"] = total - sum(phases.values())
        return Run(total, phases, cpu=cpu)


class ServicePath:
    """A real ``imagen serve`` on a free port, and a client that submits, then follows the job as a user
    would: ``GET /events/{job_id}`` (``--client events``, what ``imagen generate`` and the web page do: the
    server pushes SUCCESS the moment it is stored) or ``GET /status`` polls (``--client poll``)."""

    def __init__(self, server: Server, client: str = "events") -> None:
        self.side, self.steps = JOBS["full"]
        self.client = client
        self.server_pid = server.pid  # the API process; with its worker child, what the CPU column adds up
        self.http = JsonClient(server.url)
        self.connection = self.http.connection

    def call(self, method: str, path: str) -> dict[str, Any]:
        return self.http.call(method, path)[1]

    def run(self, seed: int) -> Run:
        self.connection.close()  # uvicorn drops keep-alive connections idle for 5 s (while the direct path ran)
        cpu_start = self.cpu_seconds()
        sent_at = time.time()
        start = time.perf_counter()
        job_id = self.http.submit({"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": self.steps,
                                   "guidance_scale": GUIDANCE, "seed": seed, "width": self.side, "height": self.side})
        if self.client == "events":
            state, messages = self.follow(job_id)
        else:
            messages = 1
            while (state := self.call("GET", f"/status/{job_id}"))["status"] not in TERMINAL:
                time.sleep(poll_delay(state, time.perf_counter() - start))
                messages += 1
        total = time.perf_counter() - start
        seen_at = time.time()
        if self.client == "events":
            self.response.read()  # the rest of the stream (it ends after the terminal event): untimed
        cpu_end = self.cpu_seconds()
        parts = {} if cpu_start is None or cpu_end is None else {
            name: cpu_end[name] - cpu_start[name] for name in cpu_end
        }
        assert state["status"] == "SUCCESS", state
        timings = state["result"]["timings"]
        phases = {"queue": timings["started_at"] - sent_at}
        for step, seconds in timings["seconds"].items():
            phase = SERVICE_PHASES.get(step, step)
            phases[phase] = phases.get(phase, 0.0) + seconds
        phases["hand-back"] = seen_at - (timings["started_at"] + sum(timings["seconds"].values()))
        return Run(total, phases, messages, sum(parts.values()) if parts else None, parts)

    def cpu_seconds(self) -> dict[str, float] | None:
        """CPU seconds used so far by the worker (the API process's children), the API process and this
        client; None without ``/proc``."""
        if self.server_pid is None:
            return None
        api = process_cpu_seconds(self.server_pid)
        workers = [process_cpu_seconds(pid) for pid in children(self.server_pid)]
        if api is None or any(value is None for value in workers):
            return None
        return {"worker": sum(value for value in workers if value is not None), "API": api,
                "client": time.process_time()}

    def follow(self, job_id: str) -> tuple[dict[str, Any], int]:
        """The job's status events until the terminal one: (its data, how many status events came)."""
        self.connection.request("GET", f"/events/{job_id}")
        self.response = self.connection.getresponse()
        if self.response.status != 200:
            raise RuntimeError(f"GET /events answered {self.response.status}: {self.response.read()!r}")
        events, data = 0, None
        while line := self.response.readline():
            line = line.rstrip(b"\r\n")
            if line.startswith(b"data:"):
                data = json.loads(line[5:])
            elif not line and data is not None:  # the blank line that ends an event
                events += 1
                if data["status"] in TERMINAL:
                    return data, events
                data = None
        raise RuntimeError("the event stream ended before the job did")


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux ``/proc``; none elsewhere)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as handle:
                found += [int(child) for child in handle.read().split()]
        except OSError:
            continue  # the thread ended meanwhile
    return found


def process_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of every thread of ``pid``, to the nanosecond (``schedstat``), else to the tick; None
    without ``/proc``. Threads that ended are not counted: the server keeps its threads (pools)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0.0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as handle:
                total += int(handle.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            try:
                with open(f"/proc/{pid}/task/{task}/stat", encoding="ascii") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, ValueError, IndexError):
                continue  # the thread ended meanwhile
    return total


def poll_delay(state: dict[str, Any], elapsed: float) -> float:
    """Half the remaining time that the job's progress suggests, between 20 ms and 0.5 s.

    A client polling every 20 ms throughout (300 polls for a 6 s job) costs the 2-core machine ~0.5 s of CPU
    in the API and the client, which the generation would otherwise use; the reference's own examples poll
    every 5 s. This one polls rarely while the job runs and every 20 ms near its end, so it still sees
    SUCCESS within 20 ms.
    """
    meta = state.get("meta") or {}
    step, percent = meta.get("step"), float(meta.get("progress", 0))
    if step == "generation_gpu" and 0 < percent < 100:
        remaining = elapsed * (100 - percent) / percent
        return min(MAX_POLL_S, max(MIN_POLL_S, remaining / 2))
    if step in ("decoding", "saving") or (step == "generation_gpu" and percent >= 100):
        return MIN_POLL_S
    return 0.1  # queued, loading, encoding: short phases, but not worth 20 ms polls either


@contextmanager
def imagen_serve(workdir: Path, dtype_name: str, guidance: str, threads: int) -> Iterator[Server]:
    """The default install (demo model, every default setting) on the CPU, whatever this shell's IMAGEN_*;
    with ``guidance == "plain"``, the demo model from a registry file that guides it plainly to the end."""
    env = imagen_env(workdir, "serve", device="cpu", dtype=dtype_name)
    if guidance == "plain":
        registry = workdir / "registry.yaml"
        registry.write_text("models:\n  - {id: demo, name: demo, demo: true, guidance_rescale: 0, guidance_stop: 1}\n")
        env["IMAGEN_REGISTRY_PATH"] = str(registry)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with serve(env, workdir, timeout=300) as server:  # the untimed first job waits for the worker
        yield server


Comparison = dict[str, tuple[list[Run], list[Run]]]


def compare(jobs: list[str], runs: int, dtype_name: str, guidance: str, threads: int, client: str,
            workdir: Path) -> tuple[Comparison, str]:
    """Each job of ``jobs`` (keys of :data:`JOBS`) on both paths, one server for all."""
    direct = DirectPath(dtype_name, guidance)
    results: Comparison = {}
    with imagen_serve(workdir, dtype_name, guidance, threads) as server:
        service = ServicePath(server, client)
        for job in jobs:
            direct.side, direct.steps = service.side, service.steps = JOBS[job]
            direct.run(seed=0), service.run(seed=0)  # warm-up, untimed (first calls pick kernels, grow pools)
            direct_runs: list[Run] = []
            service_runs: list[Run] = []
            for index in range(runs):
                # ABBA order: neither path always runs right after the other one.
                pair: list[tuple[Callable[[int], Run], list[Run]]] = [
                    (direct.run, direct_runs), (service.run, service_runs)
                ]
                for run, out in pair if index % 2 == 0 else reversed(pair):
                    out.append(run(index + 1))
            results[job] = direct_runs, service_runs
        found = re.search(rb"(\d+) CPU threads", server.log.read_bytes())
        worker_threads = found.group(1).decode() if found else "?"
    return results, worker_threads


def spread(values: list[float]) -> list[str]:
    """Median, min, max and interquartile range, in seconds."""
    q1, _, q3 = statistics.quantiles(values, n=4)
    return [f"{value:.3f}" for value in (statistics.median(values), min(values), max(values), q3 - q1)]


def report_job(job: str, direct: list[Run], service: list[Run], args: argparse.Namespace, dtype: str,
               threads: str) -> None:
    side, steps = JOBS[job]
    d = [run.total for run in direct]
    s = [run.total for run in service]
    runs = Table(["path", "median s", "min", "max", "IQR", "runs (s)"], [
        ["diffusers pipeline call, direct", *spread(d), ", ".join(f"{t:.3f}" for t in d)],
        ["POST /generate -> SUCCESS through imagen", *spread(s), ", ".join(f"{t:.3f}" for t in s)],
    ])  # fmt: skip
    phases = Table(["phase (median s)", "direct", "service"], [
        [phase, *(f"{statistics.median(values):.3f}" if values else "-"
                  for values in ([run.phases[phase] for run in runs_ if phase in run.phases]
                                 for runs_ in (direct, service)))]
        for phase in PHASE_ORDER
    ])  # fmt: skip
    ratio = statistics.median(s) / statistics.median(d)
    paired = statistics.median(b / a for a, b in zip(d, s, strict=True))
    read = "status events (GET /events)" if args.client == "events" else "polls (GET /status)"
    notes = [f"client {read} per service job: median {statistics.median(run.messages for run in service):.0f}",
             f"ratio service / direct: {ratio:.3f} (medians), {paired:.3f} (median of per-round ratios)  "
             "(target <= 1.05)"]
    headlines = [Headline(f"{job} job: service / direct (medians)", f"{ratio:.3f}", "<= 1.05")]
    cpu_d = [run.cpu for run in direct if run.cpu is not None]
    cpu_s = [run.cpu for run in service if run.cpu is not None]
    if cpu_d and cpu_s:  # what a loaded machine skews least: CPU seconds, not wall-clock ones
        parts = " + ".join(f"{name} {statistics.median(run.cpu_parts[name] for run in service):.3f}"
                           for name in service[0].cpu_parts)
        cpu_ratio = statistics.median(cpu_s) / statistics.median(cpu_d)
        notes.append(f"CPU s per job (median): direct {statistics.median(cpu_d):.3f}, service "
                     f"{statistics.median(cpu_s):.3f} = {parts}; ratio {cpu_ratio:.3f}")
        headlines.append(Headline(f"{job} job: service / direct, CPU s per job", f"{cpu_ratio:.3f}"))
    report(f"Demo model, {job} job: {side}x{side}, {steps} steps, CFG {GUIDANCE} ({args.guidance} guidance), "
           f"{args.runs} runs per path (interleaved); CPU threads: {threads}",
           runs, phases, dtype=dtype, notes=notes, headlines=headlines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", choices=["both", *JOBS], default="both",
                        help="full: 1024x1024, 30 steps; short: 512x512, 10 steps; both (default): one after the other")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per path and job (at least 3)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of both paths (0: torch's default)")
    parser.add_argument("--guidance", choices=["plain", "model"], default="plain",
                        help="plain: CFG to the end on both paths; model: the demo entry's rescale and stop on both")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="both paths' dtype (auto: the server's choice, bfloat16 on CPUs with native bf16)")
    parser.add_argument("--client", choices=["events", "poll"], default="events",
                        help="how the service's client learns that its job ended: GET /events, or polling /status")
    args = parser.parse_args()
    if args.runs < 3:
        parser.error("--runs: at least 3 (the spread needs quartiles)")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch starts its thread pool

    import torch

    from imagen.generation.diffusers.loading import resolve_dtype

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = str(resolve_dtype(args.dtype, torch.device("cpu"))).removeprefix("torch.")
    jobs = list(JOBS) if args.job == "both" else [args.job]
    with tempfile.TemporaryDirectory(prefix="imagen-bench-") as tmp:
        results, worker_threads = compare(jobs, args.runs, dtype, args.guidance, args.threads, args.client, Path(tmp))
    for job, (direct, service) in results.items():
        report_job(job, direct, service, args, dtype, f"direct {torch.get_num_threads()}, worker {worker_threads}")


if __name__ == "__main__":
    main()
