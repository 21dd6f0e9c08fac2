"""Host memory on a CPU engine: the memory a job's tensors free is kept for the next job, not handed back.

glibc's malloc serves each block of 32 MiB or more with a fresh ``mmap`` and unmaps it when it is freed (and
gives the heap's free top back past 128 KiB). A diffusion job frees and allocates the same big activations
at every step: 16 channels x 1024² x 4 bytes is 64 MiB, so at 1024² each of them came back as new pages,
every 4 KiB page faulted in and zeroed by the kernel, each time. On the demo model at 1024² and 30 steps
(float32, one thread) that was ~280,000 page faults and ~0.45 s of system time per job, a third of its CPU
time; at 512² and 10 steps, up to ~20,000 faults and 10-35 ms. With the two settings below a warm job
faults no page at all.

* ``M_MMAP_MAX`` 0: every block comes from the heap, where a freed block is reused by the next allocation;
* ``M_TRIM_THRESHOLD`` at its largest: the heap's free top is kept, not returned after each job.

The price: the worker's resident memory stays at its peak (what the largest job needed) instead of falling
back between jobs, as with the jemalloc settings that Intel's CPU tuning guide for PyTorch recommends
(``dirty_decay_ms``/``muzzy_decay_ms`` "never"). Elsewhere than glibc (musl, macOS) nothing changes.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_applied = False


def keep_freed_memory() -> bool:
    """Set glibc's malloc of this process to reuse freed memory (see the module); True once it does. Idempotent."""
    global _applied
    if _applied:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # -1: glibc reads the threshold as a size_t, the largest there is (never trim)
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))
    if not _applied:
        log.info("malloc settings not applied: freed host memory goes back to the system after each job")
    return _applied


def give_back_freed_memory() -> bool:
    """After a model is freed: glibc's ``malloc_trim(0)`` returns every whole free page of every arena to the
    system, the middle of the heap included (the two settings above only stop the automatic trim). Without
    it a freed model's gigabytes stay in the process's resident memory, and the next model's allocations,
    of other sizes, fragment them further (the slow leak A1111 users report, model switch after model
    switch). True when glibc released something."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    return bool(malloc_trim(0))
