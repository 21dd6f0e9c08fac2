"""The messages between a worker slot (API process) and its child process, over a ``multiprocessing`` pipe.

Small frozen dataclasses, pickled by the pipe. Each side dispatches with ``match`` on the class (and
checks field types there), so anything else that arrives, a tuple from an older child or bytes that do
not unpickle, is an error of the protocol, never a guess.

    slot -> child:  RunJob | Cancel | ChangeModels | Stop
    child -> slot:  WorkerReport then Ready | StartupFailed   (once, after loading the engine)
                    (Progress | Preview | NoSpace)* then WorkerReport then Done | Failed | Cancelled
                                                                                   (per RunJob)
                    WorkerReport then ModelsChanged                                (per ChangeModels)

``ChangeModels`` (an operator's load or unload) is sent between jobs only, and answered before the next
``RunJob``. Between messages, the child follows its registry file on its own (``jobs.model_control``).

``Cancel`` is sent while a job runs, at most once per job; the child reads it, without blocking, each time
the engine reports progress, and ends the job with ``Cancelled`` (no image). The pipe keeps messages in
order, so a ``Cancel`` that arrives after its job ended is read before the next ``RunJob`` and ignored.

``NoSpace`` comes each time the child fails to write a finished image because the outputs disk is full. The
child keeps the image and tries again after a growing delay, reading the pipe (a ``Cancel``) while it waits;
the job ends as usual once the image is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imagen.generation.base import DeviceInfo
from imagen.jobs.model_control import ModelOrder
from imagen.jobs.worker_numbers import WorkerNumbers


# -- slot -> child ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunJob:
    task: dict[str, Any]
    output_name: str
    inputs: dict[str, bytes] = field(default_factory=dict)  # the job's input images by role (PNG bytes)


@dataclass(frozen=True)
class Cancel:
    """The running job was cancelled: stop at its next step, write no image."""


@dataclass(frozen=True)
class ChangeModels:
    """An operator's load or unload order, applied by the child's engine (``model_control.apply_order``)."""

    order: ModelOrder


@dataclass(frozen=True)
class Stop:
    """Finish: close the engine and exit."""


# -- child -> slot ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    device: DeviceInfo


@dataclass(frozen=True)
class StartupFailed:
    error: str


@dataclass(frozen=True)
class WorkerReport:
    """The child's numbers for ``/metrics`` (model load time, GPU memory) and the models its engine holds
    with their tier (``Engine.held_models``, for ``/health`` and ``/models``), refreshed after each job and
    each change of its models."""

    numbers: WorkerNumbers
    models: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    step: str
    percent: int  # 0..100 of the whole job (``JobProgress``): ``meta.progress``
    denoising: dict[str, Any] | None = None  # while denoising: ``StepMeter``'s current_step, total_steps, eta_s


@dataclass(frozen=True)
class Preview:
    """A small JPEG of the image after denoising step ``step``: for ``GET /events?preview=1`` only, never
    stored (the slot hands it to the in-process change feed)."""

    step: int
    jpeg: bytes


@dataclass(frozen=True)
class NoSpace:
    """The finished image could not be written: the outputs disk is full. The child tries again in
    ``retry_in_s`` seconds (the job is still running)."""

    error: str
    retry_in_s: float


@dataclass(frozen=True)
class Done:
    result: dict[str, Any]  # the ``result`` object of /status


@dataclass(frozen=True)
class Failed:
    error: str
    retryable: bool  # may another attempt pass (out of memory) or not (bad input, missing file)


@dataclass(frozen=True)
class Cancelled:
    """The job stopped after a ``Cancel``; no image was written."""


@dataclass(frozen=True)
class ModelsChanged:
    """The ``ChangeModels`` order is done; ``error``: why it could not be (the engine's error), else None."""

    error: str | None = None


ToChild = RunJob | Cancel | ChangeModels | Stop
FromChild = (
    Ready | StartupFailed | WorkerReport | Progress | Preview | NoSpace | Done | Failed | Cancelled | ModelsChanged
)


class ProtocolError(Exception):
    """The child sent something the protocol does not allow at that point."""
