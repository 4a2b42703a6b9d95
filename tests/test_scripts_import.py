"""Every script under scripts/ imports: the benchmarks and reproductions import helpers from each other
(``from bench_forward import _default_model``), and a helper renamed or moved in one breaks another that
no other test runs (``bench_lora.py`` imported ``_cpu_name`` from ``bench_forward`` after it had moved to
``bench_record``). Importing runs only the scripts' top levels, not their ``main``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def test_every_script_imports():
    names = sorted(p.stem for p in SCRIPTS.glob("*.py"))
    assert "bench_lora" in names and "bench_record" in names
    code = ("import importlib, sys\nfailed = []\n"
            f"for name in {names!r}:\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except Exception as err:\n        failed.append(f'{name}: {type(err).__name__}: {err}')\n"
            "print('\\n'.join(failed)); sys.exit(1 if failed else 0)\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], cwd=SCRIPTS, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
