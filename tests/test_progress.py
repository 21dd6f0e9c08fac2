"""``meta.progress``: one number for the whole job (0-100) that never goes back, on both backends.

The reference suggests a progress bar that reads it; ``meta.step`` says which step runs. Each step name has
its band of the whole (``PROGRESS_BANDS``): a step that starts at its own 0 % no longer sends the bar back.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from imagen.generation.base import (
    PROGRESS_BANDS,
    STEP_DECODING,
    STEP_ENCODING_PROMPT,
    STEP_GENERATION,
    STEP_LOADING_LORAS,
    STEP_LOADING_MODEL,
    STEP_SAVING,
    JobProgress,
)
from tests.celery_support import shared_redis
from tests.conftest import submit, wait_for, wait_status
from tests.latches import Latches
from tests.test_events import read_events
from tests.test_job_contract import job_system

__all__ = ["job_system", "shared_redis"]  # fixtures (job_system runs a test on both backends)

TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}


def meta_when(client: TestClient, job_id: str, step: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        meta: dict[str, Any] = client.get(f"/status/{job_id}").json().get("meta") or {}
        return meta if meta.get("step") == step else None

    return wait_for(check, 30)


def test_progress_does_not_go_back_when_decoding_starts(
    job_system: Callable[..., TestClient], latches: Latches
) -> None:
    """Held while denoising, then held at the start of decoding (each report a percent of its own step, as
    the diffusers engine makes them): what /status shows at the second is not less than at the first."""
    client = job_system()
    job_id = submit(client, "phases denoise decode")
    latches.wait_started("denoise")
    denoising = meta_when(client, job_id, STEP_GENERATION)
    latches.release("denoise")
    latches.wait_started("decode")
    decoding = meta_when(client, job_id, STEP_DECODING)
    latches.release("decode")
    assert wait_status(client, job_id, TERMINAL)["status"] == "SUCCESS"
    assert denoising["progress"] <= decoding["progress"], (denoising, decoding)
    assert decoding["progress"] == PROGRESS_BANDS[STEP_DECODING][0]  # all of denoising is behind it


def test_every_progress_the_events_stream_shows_is_at_least_the_one_before(
    job_system: Callable[..., TestClient],
) -> None:
    client = job_system(engine="test-pattern", test_pattern_seconds=1.0)
    job_id = submit(client, "a lighthouse", steps=10)
    events = read_events(client, job_id)
    assert events[-1].data["status"] == "SUCCESS"
    metas = [event.data["meta"] for event in events if event.data.get("meta")]
    values = [meta["progress"] for meta in metas]
    assert len(values) >= 3, metas
    assert all(earlier <= later for earlier, later in itertools.pairwise(values)), metas
    assert {STEP_GENERATION} <= {meta["step"] for meta in metas}


def test_the_diffusers_engines_report_order_gives_a_rising_number() -> None:
    """The order the diffusers engine reports in (tests/test_engine_generation.py checks it), then saving."""
    reports = [(STEP_LOADING_MODEL, 0), (STEP_LOADING_MODEL, 100), (STEP_LOADING_LORAS, 0), (STEP_LOADING_LORAS, 100),
               (STEP_ENCODING_PROMPT, 0), (STEP_ENCODING_PROMPT, 100), (STEP_GENERATION, 0)]  # fmt: skip
    reports += [(STEP_GENERATION, int(100 * step / 30)) for step in range(1, 31)]
    reports += [(STEP_DECODING, 0), (STEP_DECODING, 100), (STEP_SAVING, 100)]
    whole = JobProgress()
    values = [whole(step, percent) for step, percent in reports]
    assert values[0] == 0 and values[-1] == 100
    assert all(earlier <= later for earlier, later in itertools.pairwise(values))
    for (step, percent), value in zip(reports, values, strict=True):
        low, high = PROGRESS_BANDS[step]
        assert low <= value <= high, (step, percent, value)
    assert whole("upscaling", 0) == 100  # a step name of an engine's own moves nothing
    assert JobProgress()("upscaling", 50) == 0


@pytest.mark.engine
def test_a_real_diffusers_job_reports_a_rising_number(tmp_path: Path) -> None:
    from imagen.generation.diffusers.engine import DiffusersEngine
    from imagen.generation.runner import run_task
    from tests.engine_fixtures import engine_settings, fixtures_registry, task

    engine = DiffusersEngine(fixtures_registry(), engine_settings(tmp_path))
    whole = JobProgress()
    seen: list[tuple[str, int]] = []
    run_task(engine, task(steps=4), "out.png", tmp_path, lambda step, pct: seen.append((step, whole(step, pct))))
    values = [value for _, value in seen]
    assert {STEP_GENERATION, STEP_DECODING, STEP_SAVING} <= {step for step, _ in seen}
    assert all(earlier <= later for earlier, later in itertools.pairwise(values)) and values[-1] == 100, seen
