"""The DataModule inside a real Trainer: epochs, skip-count metrics, validation pass."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image

from vistok.data.datamodule import ImageDataModule, SkipCountLogger
from vistok.data.make_shards import write_shards


class _Probe(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.train_keys: list[list[str]] = []
        self.val_keys: list[str] = []

    def training_step(self, batch, batch_idx):
        self.train_keys.append(list(batch["key"]))
        return self.layer(batch["image"].mean(dim=(2, 3))).mean()  # (B, 3) -> (B, 1)

    def validation_step(self, batch, batch_idx):
        self.val_keys += batch["key"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def test_fit_logs_skips_and_reseeds_epochs(tmp_path):
    samples = []
    for i in range(12):
        samples.append({"__key__": f"ok{i}", "jpg": _jpeg(i), "cls": i % 3})
        if i % 4 == 0:
            samples.append({"__key__": f"bad{i}", "jpg": b"garbage"})
    paths = write_shards(samples, tmp_path, "s", shard_size=5)
    spec = "::".join(paths)
    dm = ImageDataModule(
        train_shards=spec,
        val_shards=spec,
        resolution=16,
        batch_size=4,
        num_workers=0,
        batches_per_epoch=3,
        max_bad_fraction=0.5,
        bad_fraction_min_samples=1,
        shuffle_buffer=4,
    )
    model = _Probe()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=2,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
    assert sum(isinstance(c, SkipCountLogger) for c in trainer.callbacks) == 1
    assert trainer.current_epoch == 2 and len(model.train_keys) == 6
    # epochs 0 and 1 were seeded differently: the key order differs
    assert model.train_keys[:3] != model.train_keys[3:]
    metrics = trainer.callback_metrics
    assert metrics["data/skipped_corrupt"] == dm.train_stats.skipped["corrupt"] > 0
    assert metrics["data/skipped_empty"] == 0
    # validation read every good sample once, and its three bad ones
    assert sorted(model.val_keys) == sorted(f"ok{i}" for i in range(12))
    assert metrics["data/val_skipped_corrupt"] == 3
