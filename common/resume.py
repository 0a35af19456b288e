"""``RngState``: every random number generator training draws from, saved in the checkpoint and
restored on resume, so that a resumed run draws what the uninterrupted run would have drawn.

Saved: torch's CPU generator, every CUDA device's, numpy's and Python's global generators, and
each ``torch.Generator`` held as an attribute by a module of the LightningModule (perturbation or
noise generators; found by walking the module tree, keyed by module path and attribute name).
The data streams keep their own position (``vistok.data.stream.StreamLoader.state_dict``).

Under DDP each rank's generators are saved (gathered into the checkpoint rank 0 writes) and each
rank restores its own: ranks whose draws differ in number (a rank-dependent mask, a data-dependent
retry) stay exact. A checkpoint from a different number of ranks gives every rank rank 0's states.

The states are restored at ``on_train_start``, after the sanity-check validation, and every
validation pass runs on a fork of the generators (the states are put back when it ends), so that
validation, which a resumed run does not repeat at the same steps, never shifts training's draws.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist

FORMAT = "vistok-rng-v2"


def gather_ranks(value: Any, rank: int, world_size: int) -> list[Any]:
    """``value`` from every rank, listed by rank: a collective under DDP (every rank calls it, in
    the same order), ``[None, ..., value, ..., None]`` without a process group."""
    values = [None] * world_size
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_gather_object(values, value)
    else:
        values[rank] = value
    return values


def module_generators(module: torch.nn.Module) -> dict[str, torch.Generator]:
    """``torch.Generator`` attributes of ``module`` and its submodules, by ``path:attribute``."""
    found = {}
    for path, sub in module.named_modules():
        for name, value in vars(sub).items():
            if isinstance(value, torch.Generator):
                found[f"{path}:{name}"] = value
    return found


def _numpy_state() -> tuple:
    # Plain types and a tensor: checkpoints are read with ``weights_only=True``.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


def capture(module: torch.nn.Module | None = None) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": _numpy_state(),
        "python": random.getstate(),
        "generators": {},
    }
    if module is not None:
        state["generators"] = {k: g.get_state() for k, g in module_generators(module).items()}
    return state


def restore(state: dict[str, Any], module: torch.nn.Module | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if module is not None:
        generators = module_generators(module)
        for key, value in state["generators"].items():
            if key in generators:
                generators[key].set_state(value)


class RngState(pl.Callback):
    """Saves and restores the generators (see the module docstring); the train CLI adds it."""

    def __init__(self):
        self._loaded: dict[str, Any] | None = None
        self._before_validation: dict[str, Any] | None = None
        self._trainer: pl.Trainer | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        # A checkpoint written during validation records training's generators, not the fork.
        trainer = self._trainer
        module = None if trainer is None else trainer.lightning_module
        mine = self._before_validation or capture(module)
        rank, world_size = (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)
        return {"format": FORMAT, "ranks": gather_ranks(mine, rank, world_size)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is None:
            return
        if loaded.get("format") == FORMAT:
            ranks = loaded["ranks"]
            same_ranks = len(ranks) == trainer.world_size
            loaded = ranks[trainer.global_rank if same_ranks else 0]
        restore(loaded, pl_module)  # (an older checkpoint holds one state for every rank)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._before_validation = capture(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._before_validation is not None:
            restore(self._before_validation, pl_module)
            self._before_validation = None
