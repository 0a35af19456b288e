"""results.json: every validation's numbers, with the protocol they were measured under."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from vistok.common.version import package_version


def code_version() -> str:
    """The package version plus the git commit when run from a checkout."""
    version = package_version()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+{commit}" if commit else version


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


class ResultsJSON(pl.Callback):
    """Appends ``{step, metrics, protocol}`` after each validation (global rank 0 writes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _protocol(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        data = trainer.datamodule
        return {
            "split": "val",
            "val_shards": getattr(data, "val_shards", None) or "embedded default dataset",
            "resolution": getattr(data, "resolution", None),
            "weights": "ema" if getattr(pl_module, "ema", None) is not None else "raw",
            "seed": torch.initial_seed(),
            "code_version": code_version(),
            **getattr(pl_module, "protocol", {}),
            # Metric callbacks describe what they measured (images, reference set, seeds...).
            **{
                k: v
                for c in trainer.callbacks
                for k, v in (getattr(c, "protocol", None) or {}).items()
            },
        }

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: _plain(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        entry = {
            "step": trainer.global_step,
            "run": trainer.state.fn.value,  # "fit" or "validate" (--evaluate)
            "metrics": metrics,
            "protocol": self._protocol(trainer, pl_module),
        }
        history = json.loads(self.path.read_text()) if self.path.exists() else []
        history.append(entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(history, indent=2))
