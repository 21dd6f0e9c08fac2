"""``GET /metrics``: Prometheus text for the whole service.

- HTTP requests, by route template (``/status/{job_id}``, never a job id), method and status class:
  prometheus-fastapi-instrumentator's middleware, ``imagen_http_*``.
- The job system (``JobCollector``), read through ``JobBackend`` at each scrape: the queue now (waiting,
  running), the durable outcome totals of ``jobs/stats.py`` (counted by whichever process ended each job,
  on any host) as counters and histograms, and the workers as ``/health`` sees them (embedded: the slots'
  children; distributed: the heartbeats), each labelled ``worker="host:pid"``.

Each app has its own registry: nothing here is process-global, so several apps (tests) never collide.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_fastapi_instrumentator import Instrumentator

from imagen.errors import BrokerUnavailableError
from imagen.jobs import stats
from imagen.jobs.backend import JobBackend
from imagen.jobs.types import JobMetrics, WorkerHealth

log = logging.getLogger("imagen.api")

router = APIRouter()
FINAL_STATES = ("SUCCESS", "FAILURE", "REVOKED")


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def install_metrics(app: FastAPI, backend: JobBackend) -> None:
    """Add ``/metrics`` and the HTTP instrumentation to ``app``."""
    registry = CollectorRegistry()
    registry.register(JobCollector(backend))
    Instrumentator(registry=registry).instrument(app, metric_namespace="imagen")
    app.state.metrics_registry = registry
    app.include_router(router)


class JobCollector(Collector):
    def __init__(self, backend: JobBackend) -> None:
        self.backend = backend

    def collect(self) -> Iterable[Metric]:
        try:
            numbers: JobMetrics | None = self.backend.job_metrics()
        except BrokerUnavailableError as exc:
            log.warning("/metrics: job numbers unavailable: %s", exc)
            numbers = None
        except Exception:  # the HTTP numbers are still worth a scrape
            log.exception("/metrics: job numbers unavailable")
            numbers = None
        yield GaugeMetricFamily(
            "imagen_job_store_up", "1 when the job system's storage (SQLite, or Redis) answered this scrape.",
            value=0 if numbers is None else 1,
        )
        if numbers is not None:
            yield from _queue(numbers)
            yield from _totals(numbers.totals)
        health = self.backend.health()
        yield from _workers(health.workers, "embedded" if health.queue_broker == "embedded" else "distributed")


def _queue(numbers: JobMetrics) -> Iterator[Metric]:
    for name, help_text, value in (
        ("imagen_jobs_waiting", "Jobs waiting in the queue now.", numbers.waiting),
        ("imagen_jobs_running", "Jobs running now.", numbers.running),
    ):
        family = GaugeMetricFamily(name, help_text, labels=["backend"])
        family.add_metric([numbers.backend], value)
        yield family
    yield GaugeMetricFamily(
        "imagen_outputs_disk_full",
        "1 while this process's outputs disk is full: finished images wait to be written (new jobs get 503).",
        value=1 if numbers.outputs_disk_full else 0,
    )
    if numbers.png_backlog_bytes is not None:
        yield GaugeMetricFamily(
            "imagen_png_backlog_bytes",
            "Bytes of finished PNGs in Redis that no API replica has copied yet (new jobs get 503 past "
            "IMAGEN_PNG_REDIS_MAX_BYTES).",
            value=numbers.png_backlog_bytes,
        )


def _totals(totals: dict[str, float]) -> Iterator[Metric]:
    for name, help_text in stats.COUNTERS.items():
        if name in stats.LABELLED_COUNTERS:
            counter = CounterMetricFamily(name, help_text, labels=["state"])
            for state in FINAL_STATES:
                counter.add_metric([state], totals.get(stats.field(name, state), 0.0))
        else:
            counter = CounterMetricFamily(name, help_text, value=totals.get(stats.field(name), 0.0))
        yield counter
    for histogram in stats.HISTOGRAMS:
        family = HistogramMetricFamily(histogram.name, histogram.help, labels=["state"])
        states = sorted(
            parsed[1]
            for parsed in map(stats.parse_field, totals)
            if parsed is not None and parsed[0] == histogram.name and parsed[2] == "count"
        )
        for state in states:
            count = totals[stats.field(histogram.name, state, "count")]
            buckets = [
                (stats.bound(upper), totals.get(stats.field(histogram.name, state, stats.bound(upper)), 0.0))
                for upper in histogram.buckets
            ]
            family.add_metric(
                [state],
                buckets=[*buckets, ("+Inf", count)],
                sum_value=totals.get(stats.field(histogram.name, state, "sum"), 0.0),
            )
        yield family


def _workers(workers: Iterable[WorkerHealth], backend: str) -> Iterator[Metric]:
    up = GaugeMetricFamily(
        "imagen_worker_up", "1 when the worker's engine is loaded and it takes jobs.", labels=["backend", "worker"]
    )
    load = GaugeMetricFamily(
        "imagen_worker_model_load_seconds", "Seconds the worker's engine took to load.", labels=["worker"]
    )
    used = GaugeMetricFamily(
        "imagen_worker_gpu_memory_used_bytes", "GPU memory held by the worker's tensors.", labels=["worker"]
    )
    total = GaugeMetricFamily("imagen_worker_gpu_memory_total_bytes", "The worker's GPU memory.", labels=["worker"])
    loads = CounterMetricFamily(
        "imagen_worker_model_loads", "Models the worker's engine read from disk since it started.", labels=["worker"]
    )
    for worker in workers:
        if not worker.pid:
            continue  # an embedded slot between two children: nothing runs there
        up.add_metric([backend, worker.name], 1 if worker.ready else 0)
        if worker.model_load_seconds is not None:
            load.add_metric([worker.name], worker.model_load_seconds)
        if worker.gpu_memory_used_bytes is not None:
            used.add_metric([worker.name], worker.gpu_memory_used_bytes)
        if worker.gpu_memory_total_bytes is not None:
            total.add_metric([worker.name], worker.gpu_memory_total_bytes)
        if worker.model_loads is not None:
            loads.add_metric([worker.name], worker.model_loads)
    yield from (up, load, used, total, loads)
