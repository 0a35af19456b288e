"""Peak memory of a stretch of code, for the benchmarks.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` above what was allocated at ``start``.
On CPU (Linux) ``start`` resets the kernel's resident-set high-water mark (writes "5" to
/proc/self/clear_refs) and reads VmRSS; the peak is VmHWM - VmRSS at start. Large tensors are
mmap-allocated and returned to the OS when freed, so the high-water mark follows the live tensors
(plus a few MB of noise); run a warm-up step first so that one-off workspaces are not counted.
Where clear_refs is not writable (``exact`` is False) the figure falls back to getrusage's
ru_maxrss, a process-lifetime peak, and a warm-up would only inflate it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _clear_refs_writable() -> bool:
    try:
        open("/proc/self/clear_refs", "w").close()
    except OSError:
        return False
    return True


class PeakMemory:
    """``start()`` before the measured code, ``peak()`` (bytes) after it."""

    def __init__(self, device: str):
        self.device = device
        self.resettable = device == "cpu" and _clear_refs_writable()
        self.exact = self.resettable or device == "cuda"  # a warm-up step is worth running
        self.before = 0

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        elif self.resettable:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.before = _status_kib("VmRSS") * 1024
        else:
            self.before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak(self) -> int:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() - self.before
        if self.resettable:
            return _status_kib("VmHWM") * 1024 - self.before
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.before


def run_worker(
    script: str, argv: list[str], threads: int, env: dict[str, str] | None = None
) -> dict:
    """Run ``python script --worker ...argv`` in a fresh process, so that each measurement
    starts from a clean heap, and return the JSON object its last output line holds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
    cmd = [sys.executable, script, "--worker", *argv, "--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"worker {' '.join(argv)} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def worker_parser(doc: str, **worker: Any) -> argparse.ArgumentParser:
    """The arguments of a bench that measures in ``run_worker`` subprocesses: ``--worker`` (what
    the subprocess measures; ``worker`` gives its nargs / type / metavar), ``--threads``,
    ``--repeats`` and ``--device``. The bench adds its own."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=doc.split("\n")[0])
    parser.add_argument("--worker", **worker)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    return parser


def serve_worker(threads: int, measure: Callable[[], dict]) -> None:
    """The subprocess side of ``run_worker``: measure with ``threads`` threads and print the
    result as the JSON line it reads."""
    torch.set_num_threads(threads)
    print(json.dumps(measure()))
