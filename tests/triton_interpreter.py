"""Runs a test module's kernel checks under Triton's interpreter, in a child process.

The interpreter runs Triton kernels with NumPy where no GPU is, but only when TRITON_INTERPRET=1 is
set before the kernels are defined, hence a fresh process (`python -m <module>`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_under_interpreter(module: str, *args: str) -> str:
    """`python -m module args` (e.g. "tests.test_triton_lora") with TRITON_INTERPRET=1; its stdout, once it exits 0."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"interpreted kernels failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout
