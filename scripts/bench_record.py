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
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


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
