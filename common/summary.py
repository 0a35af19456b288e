"""What a run tells the person who started it: progress lines when nobody watches a progress
bar (output redirected to a file, a cluster log), and a closing summary of what was produced."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import TQDMProgressBar
from tqdm import tqdm

T = TypeVar("T")

# The figures a closing summary shows, in this order, when the run logged them.
SUMMARY_METRICS = (
    "val/psnr",
    "val/l1",
    "val/baseline_l1",
    "val/codebook_usage",
    "val/rfid",
    "val/pfid",
    "val/loss",
    "val/gfid",
)


def _format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def _value(v: Any) -> float | None:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v)
    return float(v) if isinstance(v, (int, float)) else None


def closing_summary(
    done: str, figures: dict[str, Any] | None = None, paths: dict[str, Any] | None = None
) -> str:
    """The one paragraph a command ends with: what it did, its figures and where it wrote them,
    e.g. ``benchmark: 2 tokenizers on 1000 images; best rFID 3.2. Wrote: table out/x.md.``"""
    text = done
    shown = {k: v for k, v in (figures or {}).items() if v is not None}
    if shown:
        text += "; " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()
        )
    written = {k: v for k, v in (paths or {}).items() if v is not None}
    if written:
        text += ". Wrote: " + ", ".join(f"{k} {v}" for k, v in written.items())
    return text + "."


def _batch_size(batch: Any) -> int:
    """Images in a batch: a tensor, or the first tensor of a tuple/list/dict."""
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    elif isinstance(batch, (tuple, list)):
        batch = batch[0]
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) else len(batch)


def batch_progress(
    batches: Iterable[T], desc: str, total: int | None = None, file=None
) -> Iterator[T]:
    """Yields ``batches`` unchanged while a progress bar counts their images towards ``total``
    (for feature passes: Inception over thousands of images). The bar is drawn only where a
    person watches it: on a terminal (``file``, default stderr, is a TTY), on global rank 0, and
    unless ``VISTOK_PROGRESS=0``."""
    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    off = not rank0 or os.environ.get("VISTOK_PROGRESS", "1") == "0"
    # disable=None: tqdm itself turns the bar off when the stream is not a terminal.
    bar = tqdm(
        total=total, desc=desc, unit="img", file=file, disable=True if off else None, leave=False
    )
    with bar:
        for batch in batches:
            yield batch
            bar.update(_batch_size(batch))


class RunSummary(pl.Callback):
    """Prints a progress line every ``every_seconds`` when stdout is not a terminal (a terminal
    has Lightning's progress bar), and a summary at the end of fit or validate: steps, wall time,
    the last validation's headline figures and the paths of the grid, results.json and the
    newest checkpoint. Global rank 0 prints."""

    def __init__(self, run_dir: str | Path, every_seconds: float = 30.0, stream=None):
        self.run_dir = Path(run_dir)
        self.every_seconds = every_seconds
        self.stream = stream if stream is not None else sys.stdout
        self._start = self._last = 0.0
        self._first_step = 0

    def _print(self, trainer: pl.Trainer, text: str) -> None:
        if trainer.is_global_zero:
            print(text, file=self.stream, flush=True)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last = time.perf_counter()
        self._first_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.stream.isatty() or now - self._last < self.every_seconds:
            return
        self._last = now
        step, total = trainer.global_step, trainer.max_steps
        done = step - self._first_step
        rate = done / max(now - self._start, 1e-9)
        parts = [f"step {step}" + (f"/{total}" if total and total > 0 else "")]
        parts.append(f"{rate:.2f} steps/s")
        if total and total > 0 and rate > 0:
            parts.append(f"eta {_format_duration((total - step) / rate)}")
        loss = _value(trainer.callback_metrics.get("train/loss"))
        if loss is not None:
            parts.append(f"train/loss {loss:.4f}")
        self._print(trainer, " | ".join(parts))

    def summary(self, trainer: pl.Trainer, what: str) -> str:
        lines = [f"{what}: {trainer.global_step} steps"]
        if self._start:
            lines[0] += f" in {_format_duration(time.perf_counter() - self._start)}"
        figures = []
        for name in SUMMARY_METRICS:
            v = _value(trainer.callback_metrics.get(name))
            if v is not None:
                figures.append(f"{name} {v:.4g}")
        if figures:
            lines.append("last validation: " + ", ".join(figures))
        grids = sorted((self.run_dir / "images").glob("*.png"))
        checkpoints = sorted(
            (self.run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime
        )
        paths = {
            "grid": grids[-1] if grids else None,
            "results": self.run_dir / "results.json",
            "checkpoint": checkpoints[-1] if checkpoints else None,
        }
        for label, path in paths.items():
            if path is not None and path.exists():
                lines.append(f"  {label:<10} {path}")
        return "\n".join(lines)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print(trainer, self.summary(trainer, "trained"))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":  # --evaluate: no fit, so report here
            self._print(trainer, self.summary(trainer, "evaluated"))


class StepProgressBar(TQDMProgressBar):
    """Lightning's bar counts batches within an epoch ("Epoch 2/-2", "10/9" on an endless stream
    cut into epochs); training here is measured in steps, so the bar shows global steps out of
    ``max_steps`` across epochs and resumes."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        bar = self.train_progress_bar
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if bar.total != total or bar.n != trainer.global_step:
            bar.reset(total)
            bar.n = trainer.global_step
        bar.set_description("train")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and not bar.disable and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()
