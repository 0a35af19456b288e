"""Process setup for the commands that run outside Lightning (sampling, post-training pairs, code
extraction): one call, from ``accelerate``.

Under ``torchrun`` (or any launcher that sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``),
:func:`process_setup` starts the process group through ``accelerate.PartialState`` (NCCL on
CUDA, gloo on CPU) and picks this process's device; a plain ``python`` run is one process on
the default device. ``PartialState`` takes the accelerator's backend when one is present and only
falls back to gloo when asked for the CPU, so the CPU case is requested explicitly when no CUDA
device exists: without it a CPU-only ``torchrun`` would quietly run every rank as rank 0 of 1.

Ending the group is the command's business, not the library call's: ``sample``, ``make_pairs``
and ``extract`` leave the group as they found it (up, once started), so a script or a notebook can
call them again in the same processes; each command's ``main`` calls :func:`process_teardown` on
its way out.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.distributed as dist
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


def process_teardown() -> None:
    """Ends the process group if one is up (a command's last step); a later
    :func:`process_setup` in the same process starts a new one."""
    if dist.is_initialized():
        dist.destroy_process_group()
    # accelerate keeps the rank and world size of the group it started in a shared state; drop
    # them with the group, or a later PartialState would describe a group that no longer exists.
    PartialState._reset_state()
