"""What a worker does with the models it holds, besides running jobs: an operator's load and unload orders
(``POST /models/{id}/load`` and ``/unload``, the A1111 checkpoint routes) and the registry file's changes.

Both backends carry a :class:`ModelOrder` to the workers they name (embedded: a message down the slot's pipe,
``embedded/messages.py``; distributed: a Redis list per worker, ``distributed/model_orders.py``), and each
worker applies it between jobs with :func:`apply_order`: a job running on that worker finishes first. The
engine does the work (``Engine.load_model`` / ``unload_model``: its model cache decides the tier).

A worker also follows its registry file (:func:`follow_registry`, before each job and once a second while
idle): a new model is offered at once; a model removed from the file, or whose entry changed, is freed
from the engine (after the job it may be running, since this runs between jobs). A job for a removed model
that was still waiting fails, saying so (``generation.runner.run_task``): its model is no longer declared,
and running it with the entry the operator took away would serve what they meant to withdraw.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Literal

from imagen.generation.base import Engine
from imagen.registry.watch import RegistryChange, RegistryWatcher

log = logging.getLogger("imagen.worker")

Action = Literal["load", "unload"]
ACTIONS: tuple[Action, ...] = ("load", "unload")


@dataclass(frozen=True)
class ModelOrder:
    """Load ``model_id`` on the worker, or free it; ``model_id`` None with ``unload``: every model it holds."""

    action: Action
    model_id: str | None = None

    def to_json(self) -> str:
        return json.dumps({"action": self.action, "model_id": self.model_id})

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelOrder:
        data = json.loads(text)
        action, model_id = data.get("action"), data.get("model_id")
        if action not in ACTIONS or not (model_id is None or isinstance(model_id, str)):
            raise ValueError(f"not a model order: {data!r:.200}")
        if action == "load" and model_id is None:
            raise ValueError("a load order names its model")
        return cls(action=action, model_id=model_id)


def apply_order(engine: Engine, order: ModelOrder) -> None:
    """Carry the order out on this worker's engine (between jobs). A model the registry does not declare
    (removed since the order was sent) is not loaded; raises what the engine raises."""
    if order.action == "load":
        assert order.model_id is not None
        if engine.registry.model(order.model_id) is None:
            raise ValueError(f"model {order.model_id!r} is not in this worker's registry")
        log.info("loading model %s (operator's order)", order.model_id)
        engine.load_model(order.model_id)
        return
    targets = [order.model_id] if order.model_id is not None else list(engine.held_models())
    for model_id in targets:
        log.info("freeing model %s (operator's order)", model_id)
        engine.unload_model(model_id)


def follow_registry(engine: Engine, watcher: RegistryWatcher) -> RegistryChange | None:
    """Look at the registry file again; on a change, serve it and free the models gone or changed. Logs,
    never raises, what goes wrong: a file that does not parse (the registry last read stays), a failed free."""
    change = watcher.refresh()
    if change is None:
        return None
    engine.registry = change.registry
    for model_id in change.stale:
        fate = "removed from" if model_id in change.removed else "changed in"
        log.info("freeing model %s: %s the registry file", model_id, fate)
        try:
            engine.unload_model(model_id)
        except Exception:  # the next job, whatever its model, must not fail for it
            log.exception("could not free model %s", model_id)
    return change

