"""What a generation worker reports about itself for ``/metrics``: how long its engine took to load, how
many models it has loaded since (``Engine.model_loads``), and its GPU memory.
Measured in the worker process (the API process has no model and no CUDA); it reaches the
API through the embedded child's ``WorkerReport`` message or the distributed worker's heartbeat.

torch is read only if the engine imported it already: an engine without torch (the test pattern) reports
no GPU memory, and this module never imports it.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class WorkerNumbers:
    model_load_seconds: float | None = None
    gpu_memory_used_bytes: int | None = None  # torch.cuda.memory_allocated(): this process's tensors
    gpu_memory_total_bytes: int | None = None  # torch.cuda.mem_get_info(): the device's size
    model_loads: int | None = None  # models its engine read from disk since it started

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def gpu_memory() -> tuple[int, int] | None:
    """(used, total) bytes on this process's current CUDA device; None without CUDA (or torch)."""
    torch: Any = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return None
        _free, total = torch.cuda.mem_get_info()
        return int(torch.cuda.memory_allocated()), int(total)
    except Exception:  # a device in a bad state: the numbers are advisory
        return None


def measure(model_load_seconds: float | None, model_loads: int | None = None) -> WorkerNumbers:
    memory = gpu_memory()
    return WorkerNumbers(
        model_load_seconds=model_load_seconds,
        model_loads=model_loads,
        gpu_memory_used_bytes=memory[0] if memory else None,
        gpu_memory_total_bytes=memory[1] if memory else None,
    )
