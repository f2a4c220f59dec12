"""Test scripts (tests/scripts/) run in one process or under torchrun (gloo on the CPU), for the
multi-process tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_script(script: Path, *args: str, nproc: int = 1, timeout: float = 600) -> None:
    """`python script *args`, or `torchrun --standalone --nproc_per_node nproc script *args` for nproc > 1,
    one thread per process; asserts exit 0, with the end of its stdout and stderr in the message."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    done = subprocess.run([*launcher, str(script), *args], env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"stdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-4000:]}"
