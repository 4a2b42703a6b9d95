"""One JSON line per benchmark run: what ran, where, under what load, and the raw results.

Every benchmark script's ``--record FILE.jsonl`` appends through :func:`append`, so each figure in
docs/benchmarks.md can be traced to the line that produced it (``docs/bench/*.jsonl``).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo with its family, model and widest vector unit, e.g.
    ``AMD EPYC (family 25 model 1, AVX2)`` (``platform.processor()`` elsewhere). Machines named alike can
    differ (Zen 3 without AVX-512, Zen 4 with it), and their timings by 2×."""
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        flags = set(fields.get("flags", "").split())
        vector = "AMX" if "amx_tile" in flags else "AVX-512" if "avx512f" in flags else \
            "AVX2" if "avx2" in flags else "no AVX2"
        return f"{fields['model name']} (family {fields.get('cpu family')} model {fields.get('model')}, {vector})"
    except (OSError, KeyError):
        return platform.processor()


def keep_host_memory(enabled: bool = True) -> bool:
    """Applies jaxalign's host-memory policy to this process (:mod:`jaxalign.hostmem`) as the ``jaxalign``
    command does at start-up; call it before JAX or torch start their threads. ``False``: not applied
    (``enabled`` false, ``JAXALIGN_KEEP_HOST_MEMORY=0``, not on the CPU, or no glibc)."""
    from jaxalign import hostmem

    return enabled and hostmem.computes_on_cpu() and hostmem.keep_host_memory()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=Path(__file__).parent).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None


def _versions() -> dict:
    from importlib import metadata
    found = {}
    for name in ("jax", "jaxlib", "flax", "torch", "transformers", "trl", "numpy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def append(path: str | Path, script: str, settings: dict, results, *, load_before, load_after) -> None:
    """Append one line: date, script, commit, machine, versions, load averages, settings and results."""
    entry = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "script": script, "commit": _git_commit(),
             "machine": cpu_name(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
             "versions": _versions(), "load_before": list(load_before), "load_after": list(load_after),
             "settings": settings, "results": results}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
