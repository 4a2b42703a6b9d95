"""Host memory for XLA:CPU programs: keep freed memory in the process instead of returning it to the OS.

Why. An XLA:CPU executable gets all its temporaries as **one** buffer per call: 2.85 GB for the DPO train
step of SmolLM2-135M at 8 pairs of 96 + 32 tokens. glibc's ``malloc`` serves a request that large with a
fresh ``mmap`` from a thread's arena and ``munmap`` s it on ``free``, so every call touches that memory for
the first time again: about 700 000 page faults per step, each a kernel entry that zeroes a 4 KiB page.
On a 2-core AMD EPYC that was 3.8 s of system CPU time in an 8.7 s step (docs/benchmarks.md, "Host
memory"). No result changes: only where the bytes live.

What :func:`keep_host_memory` does, with glibc's ``mallopt`` (the same settings as the environment
variables ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<max>``):

* ``M_ARENA_MAX = 1``: threads that allocate from now on share the main arena (a thread's own arena
  falls back to ``mmap`` for any request larger than its 64 MiB heap, whatever the other settings);
* ``M_MMAP_MAX = 0``: requests are carved from the heap, never mapped on their own;
* ``M_TRIM_THRESHOLD = max``: freed memory at the top of the heap is kept, so the next call's
  temporaries reuse pages that are already mapped.

The cost: the process's resident memory does not shrink after its peak, and threads allocate from one
arena. It must run before JAX starts its CPU threads (before the first computation) to reach them.
The ``jaxalign`` command calls it at start-up when JAX will compute on the CPU; Python users call it
first thing. ``JAXALIGN_KEEP_HOST_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

#: mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
#: Environment variable that turns the policy off when set to 0.
ENV = "JAXALIGN_KEEP_HOST_MEMORY"


def _glibc():
    """The C library when it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``), else ``None``."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (musl and macOS have no such symbol)
        return libc
    except (OSError, AttributeError):
        return None


def keep_host_memory() -> bool:
    """Sets glibc's allocator to keep freed memory mapped (see the module docstring).

    Returns:
      ``True`` when the settings were applied; ``False`` without glibc (macOS, musl) or when the
      environment variable ``JAXALIGN_KEEP_HOST_MEMORY`` is ``0``.
    """
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    libc = _glibc()
    if libc is None:
        return False
    # mallopt takes an int; glibc stores the trim threshold as size_t, so -1 means "never trim".
    return all(libc.mallopt(param, value) == 1
               for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


def computes_on_cpu() -> bool:
    """Whether JAX will run its programs on the CPU: ``JAX_PLATFORMS`` names only ``cpu``, or no TPU or
    GPU plugin is installed. Decided without starting a JAX backend (that would start its threads)."""
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms == ["cpu"]
    plugins = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")
    return not any(importlib.util.find_spec(name) for name in plugins)
