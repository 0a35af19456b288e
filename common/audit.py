"""``DistributedAudit``: what each rank saw and whether the ranks' weights agree.

A debugging aid for multi-process runs (add with
``--trainer.callbacks+=vistok.common.audit.DistributedAudit``): each rank writes
``audit_rank<R>.json`` into the run folder with the keys of the samples it trained and validated
on, its batch counts and a checksum of every trainable parameter. Ranks whose checksums differ
after a step have diverged (a broken gradient sync); overlapping training keys mean the shards were
not split.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch


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

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_batches += 1
        self.train_keys += list(batch.get("key", []))[: self.max_keys - len(self.train_keys)]

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        if not trainer.sanity_checking:
            self.val_keys += list(batch.get("key", []))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.val_keys = []  # keep the last full validation pass

    def on_train_end(self, trainer, pl_module) -> None:
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "train_batches": self.train_batches,
            "train_keys": self.train_keys,
            "val_keys": self.val_keys,
            "checksum": parameter_checksum(pl_module),
        }
        path = Path(trainer.default_root_dir) / f"audit_rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
