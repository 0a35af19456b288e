"""Process setup for the commands that run outside Lightning (sampling, post-training pairs, code
extraction): one call, from ``accelerate``.

Under ``torchrun`` (or any launcher that sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``),
:func:`process_setup` starts the process group through ``accelerate.PartialState`` (NCCL on
CUDA, gloo on CPU) and picks this process's device; a plain ``python`` run is one process on
the default device. ``PartialState`` takes the accelerator's backend when one is present and only
falls back to gloo when asked for the CPU, so the CPU case is requested explicitly when no CUDA
device exists: without it a CPU-only ``torchrun`` would quietly run every rank as rank 0 of 1.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from accelerate import PartialState


class Processes(NamedTuple):
    rank: int
    world: int
    device: torch.device


def process_setup() -> Processes:
    """(rank, world size, device) of this process; starts the process group when launched as one
    of several. Leaves the thread count alone (``OMP_NUM_THREADS`` is set for accelerate, which
    otherwise resets it under a CPU launch)."""
    cpu = not torch.cuda.is_available()
    if cpu and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    state = PartialState(cpu=cpu)
    return Processes(state.process_index, state.num_processes, state.device)
