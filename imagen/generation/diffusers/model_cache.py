"""The models one worker holds, kept by memory budget in two tiers, least recently used leaving first.

* **device** (``IMAGEN_MODEL_MEMORY_GB``): ready to run, on the GPU (on a CPU-only worker: in RAM). Unset,
  the budget is 75 % of the GPU's memory on CUDA (the rest is for a job's activations), half of the RAM
  on a CPU. ``IMAGEN_MAX_LOADED_MODELS``, when set, also caps how many models are ready at once.
* **ram** (``IMAGEN_MODEL_RAM_GB``, 0 = off): a model pushed off the device waits here in host RAM
  (its modules moved with ``.to("cpu")``); switching back to it copies it to the device instead of
  reading and converting its files again. Pushed past this budget too, a model is freed. On a CPU-only
  worker both tiers are RAM and nothing moves: the RAM tier only lets a worker hold more models, and a
  switch back from it costs a re-pointing, no read.

A model's size is the bytes of its modules' parameters and buffers, each storage counted once: a module
two models share (:mod:`.shared_components`) counts once per tier, and the fused-QKV views of
:mod:`.acceleration` are not counted twice. Sizes are read when a decision is made, so a VAE cast to
float32 for decoding, or a text encoder copied for a LoRA, counts as it is.

The one rule that overrides the budget: the model a job is about to use is never pushed off for it, so a
model larger than the whole budget still loads, alone. The cache only decides; the engine moves and frees
(``demote`` / ``free`` callbacks), then gives the memory back (:mod:`.host_memory`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch

from imagen.config import Settings
from imagen.generation.base import TIER_DEVICE, TIER_RAM

log = logging.getLogger(__name__)

GIB = 1 << 30
CUDA_SHARE = 0.75  # of the GPU's memory, when IMAGEN_MODEL_MEMORY_GB is unset
CPU_SHARE = 0.5  # of the machine's RAM, likewise


class Holdable(Protocol):
    def weight_modules(self) -> list[torch.nn.Module]:
        """The modules whose weights this model holds (shared ones included)."""


Entry = TypeVar("Entry", bound=Holdable)


@dataclass(frozen=True)
class Budget:
    device_bytes: int
    ram_bytes: int = 0
    max_device_models: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings, device: torch.device) -> Budget:
        if settings.model_memory_gb is not None:
            device_bytes = int(settings.model_memory_gb * GIB)
        else:
            device_bytes = default_device_bytes(device)
        return cls(
            device_bytes=device_bytes,
            ram_bytes=int(settings.model_ram_gb * GIB),
            max_device_models=settings.max_loaded_models,
        )


def default_device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * CUDA_SHARE)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 16 * GIB
    return int(ram * CPU_SHARE)


def storage_bytes(modules: Iterable[torch.nn.Module]) -> int:
    """Bytes of the parameters' and buffers' storages of ``modules``, each storage once."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


class ModelCache(Generic[Entry]):
    """Held models by id, in least-recently-used order, each in a tier; the budget rules of the module."""

    def __init__(
        self,
        budget: Budget,
        demote: Callable[[Entry, set[int]], None],
        free: Callable[[str], None],
    ) -> None:
        self.budget = budget
        self._demote = demote  # (entry, ids of modules that must stay on the device): move the rest to RAM
        self._free = free  # called once the cache holds no reference to the model: its memory can go
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self._tiers: dict[str, str] = {}
        self._lock = threading.Lock()  # held_models() is read by the heartbeat thread while a job runs

    # --- reading -------------------------------------------------------------------------------------
    def tier(self, model_id: str) -> str | None:
        return self._tiers.get(model_id)

    def held(self) -> dict[str, str]:
        with self._lock:
            return dict(self._tiers)

    def modules_in(self, tier: str, exclude: str | None = None) -> list[torch.nn.Module]:
        unique: dict[int, torch.nn.Module] = {}
        for model_id, entry in self.entries.items():
            if self._tiers[model_id] == tier and model_id != exclude:
                for module in entry.weight_modules():
                    unique[id(module)] = module
        return list(unique.values())

    def device_bytes(self) -> int:
        return storage_bytes(self.modules_in(TIER_DEVICE))

    def ram_bytes(self, exclude: str | None = None) -> int:
        on_device = {id(module) for module in self.modules_in(TIER_DEVICE)}
        return storage_bytes(m for m in self.modules_in(TIER_RAM, exclude) if id(m) not in on_device)

    def incoming_bytes(self, modules: Iterable[torch.nn.Module], keep: str | None = None) -> int:
        """What ``modules`` add to the device tier (those already there, shared, add nothing)."""
        on_device = {id(module) for module in self.modules_in(TIER_DEVICE, exclude=keep)}
        return storage_bytes(m for m in modules if id(m) not in on_device)

    # --- changing --------------------------------------------------------------------------------------
    def touch(self, model_id: str) -> None:
        self.entries.move_to_end(model_id)

    def add(self, model_id: str, entry: Entry) -> None:
        """A model ready on the device (just loaded, or copied back from the RAM tier), most recent."""
        with self._lock:
            self.entries[model_id] = entry
            self.entries.move_to_end(model_id)
            self._tiers[model_id] = TIER_DEVICE

    def make_room(self, keep: str, incoming: int) -> None:
        """Push least recently used models off the device until ``incoming`` more bytes (and, with a count
        cap, one more model) fit; ``keep`` (the model about to run) never leaves."""
        budget = self.budget
        while True:
            ready = [m for m, tier in self._tiers.items() if tier == TIER_DEVICE and m != keep]
            too_many = budget.max_device_models is not None and len(ready) + 1 > budget.max_device_models
            if not ready or (not too_many and self.device_bytes() + incoming <= budget.device_bytes):
                break
            victim = next(m for m in self.entries if m in ready)
            if budget.ram_bytes > 0:
                self._to_ram(victim)
            else:
                self.remove(victim)
        self._fit_ram(keep)

    def remove(self, model_id: str) -> bool:
        """Free a model from whichever tier holds it; False when none does."""
        with self._lock:
            entry = self.entries.pop(model_id, None)
            self._tiers.pop(model_id, None)
        if entry is None:
            return False
        del entry
        self._free(model_id)
        return True

    def clear(self) -> None:
        for model_id in list(self.entries):
            self.remove(model_id)

    def _to_ram(self, model_id: str) -> None:
        entry = self.entries[model_id]
        with self._lock:
            self._tiers[model_id] = TIER_RAM
        staying = {id(module) for module in self.modules_in(TIER_DEVICE)}
        self._demote(entry, staying)
        log.info("model %s moved to the RAM tier", model_id)

    def _fit_ram(self, keep: str) -> None:
        while self.ram_bytes(exclude=keep) > self.budget.ram_bytes:
            parked = [m for m in self.entries if self._tiers[m] == TIER_RAM and m != keep]
            if not parked:
                break
            self.remove(parked[0])
