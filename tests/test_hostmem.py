"""jaxalign.hostmem: freed host memory is reused without page faults, counted by the kernel.

Each case runs in a fresh interpreter (the policy is process-wide and must precede the threads it
covers). The probe allocates a block as large as an XLA:CPU temporary buffer would be (here 256 MiB),
touches every page, frees it, allocates it again and counts the minor page faults of the second touch
(``getrusage``): with the policy the pages are still mapped (≈ 0 faults); with glibc's defaults the block
is a fresh ``mmap`` and every page faults again. The second case is the control that shows the probe
can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxalign import hostmem

pytestmark = pytest.mark.skipif(hostmem._glibc() is None, reason="needs glibc's mallopt")

MIB = 1 << 20
PAGES = 256 * MIB // 4096

PROBE = r"""
import ctypes, json, resource, sys, threading
from jaxalign import hostmem
applied = hostmem.keep_host_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 256 << 20

def touch():
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    return p

faults = {}
def run(name):
    libc.free(touch())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = touch()
    faults[name] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(p)

run("main thread")
t = threading.Thread(target=run, args=("new thread",))  # a thread started after the call, like XLA's
t.start(); t.join()
print(json.dumps(dict(applied=applied, faults=faults)))
"""


def _probe(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.pop(hostmem.ENV, None)
    if env_value is not None:
        env[hostmem.ENV] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
    result = _probe(None)
    assert result["applied"] is True
    for where, faults in result["faults"].items():
        assert faults < PAGES // 100, (where, faults, PAGES)


def _huge_pages_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(_huge_pages_always(), reason="transparent huge pages 'always': 2 MiB faults, few of them")
def test_without_the_policy_every_page_faults_again():
    result = _probe("0")
    assert result["applied"] is False
    for where, faults in result["faults"].items():
        assert faults > PAGES * 9 // 10, (where, faults, PAGES)


@pytest.mark.parametrize("platforms, expected", [("cpu", True), (" cpu ", True), ("tpu", False),
                                                 ("cpu,tpu", False), ("cuda", False)])
def test_computes_on_cpu_reads_jax_platforms(monkeypatch, platforms, expected):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert hostmem.computes_on_cpu() is expected


def test_computes_on_cpu_without_jax_platforms_looks_for_accelerator_plugins(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    installed: set[str] = set()
    monkeypatch.setattr(hostmem.importlib.util, "find_spec", lambda name: object() if name in installed else None)
    assert hostmem.computes_on_cpu() is True
    installed.add("libtpu")
    assert hostmem.computes_on_cpu() is False


def test_the_command_applies_the_policy_only_when_computing_on_cpu(monkeypatch):
    from jaxalign import cli

    calls = []
    monkeypatch.setattr(hostmem, "keep_host_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(cli, "main", lambda: 0)
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert cli.console() == 0 and calls == []
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert cli.console() == 0 and calls == [1]
