"""``DistributedAudit``: what each rank saw and whether the ranks' weights agree.

A debugging aid for multi-process runs (add with
``--trainer.callbacks+=vistok.common.audit.DistributedAudit``): each rank writes
``audit_rank<R>.json`` into the run folder with the keys of the samples it trained and validated
on, its batch counts and a checksum of every trainable parameter. Ranks whose checksums differ
after a step have diverged (a broken gradient sync); overlapping training keys mean the shards were
not split.

Under DDP it also counts the bytes each training step sends, by category: gradients (through a
DDP communication hook around the standard all-reduce), buffers (DDP's per-forward broadcast,
per top-level submodule: ``ema`` must stay at 0) and other collectives (metric syncs, ...).
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter")


def _nbytes(tensors) -> int:
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def parameter_checksum(module: torch.nn.Module) -> float:
    """Sum of a fixed pseudo-random projection of all parameters: equal weights, equal sums."""
    total = 0.0
    for i, p in enumerate(module.parameters()):
        flat = p.detach().double().flatten()
        weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
        total += float((flat * weights).sum()) * (i + 1)
    return total


class DistributedAudit(pl.Callback):
    def __init__(self, max_keys: int = 100_000):
        self.max_keys = max_keys
        self.train_keys: list[str] = []
        self.val_keys: list[str] = []
        self.train_batches = 0
        self.sent: Counter = Counter()  # bytes by category, training steps only
        self._in_step = self._in_hook = False
        self._patched: dict[str, object] = {}
        self.step_seconds: list[float] = []
        self._step_start = 0.0
        self.find_unused_parameters: bool | None = None  # None: not under DDP

    def on_train_start(self, trainer, pl_module) -> None:
        ddp = trainer.strategy.model
        if not isinstance(ddp, DistributedDataParallel):
            return
        self.find_unused_parameters = ddp.find_unused_parameters

        def count_gradients(state, bucket):
            self.sent["gradients"] += _nbytes(bucket.buffer())
            self._in_hook = True  # the hook's own dist.all_reduce is not "other"
            try:
                return allreduce_hook(state, bucket)
            finally:
                self._in_hook = False

        ddp.register_comm_hook(None, count_gradients)
        names = {id(b): n.split(".")[0] for n, b in ddp.module.named_buffers()}
        broadcast = ddp._distributed_broadcast_coalesced

        def count_buffers(bufs, bucket_size, authoritative_rank=0):
            if self._in_step:
                for b in bufs:
                    self.sent[f"buffers/{names.get(id(b), '?')}"] += _nbytes(b)
            return broadcast(bufs, bucket_size, authoritative_rank)

        ddp._distributed_broadcast_coalesced = count_buffers
        for name in COLLECTIVES:
            original = getattr(dist, name)
            self._patched[name] = original

            def counted(tensor, *args, _original=original, **kwargs):
                if self._in_step and not self._in_hook:
                    self.sent["other"] += _nbytes(tensor)
                return _original(tensor, *args, **kwargs)

            setattr(dist, name, counted)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._in_step = True
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_step = False
        self.step_seconds.append(time.perf_counter() - self._step_start)
        self.train_batches += 1
        self.train_keys += list(batch.get("key", []))[: self.max_keys - len(self.train_keys)]

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        if not trainer.sanity_checking:
            self.val_keys += list(batch.get("key", []))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.val_keys = []  # keep the last full validation pass

    def on_train_end(self, trainer, pl_module) -> None:
        for name, original in self._patched.items():
            setattr(dist, name, original)
        self._patched = {}
        steps = max(self.train_batches, 1)
        record = {
            "bytes_per_step": {k: v / steps for k, v in sorted(self.sent.items())},
            # The first step pays for warm-up (allocations, DDP's first bucket rebuild).
            "median_step_seconds": statistics.median(self.step_seconds[1:] or self.step_seconds),
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            # True costs an extra autograd-graph traversal in every backward.
            "find_unused_parameters": self.find_unused_parameters,
            "global_step": trainer.global_step,
            "train_batches": self.train_batches,
            "train_keys": self.train_keys,
            "val_keys": self.val_keys,
            "checksum": parameter_checksum(pl_module),
        }
        path = Path(trainer.default_root_dir) / f"audit_rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
