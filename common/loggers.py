"""A CSV logger that keeps what earlier runs wrote into the same run folder.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts (with a warning on
every run into a non-empty folder), so a resumed run loses its history. This one appends: the
existing header is kept (and widened when new metrics appear), and when a run resumes from a
checkpoint at step k the rows after k, which the resumed run is about to log again, are dropped.
"""

from __future__ import annotations

import csv
import os

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            header = next(csv.reader(f), [])
        self.metrics_keys = sorted(k for k in header if k)

    def drop_after(self, step: int) -> int:
        """Remove the rows logged after ``step``; returns how many were removed."""
        if not os.path.isfile(self.metrics_file_path):
            return 0
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if not r.get("step") or int(float(r["step"])) <= step]
        if len(kept) < len(rows):
            with open(self.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
        return len(rows) - len(kept)


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` writing straight into ``save_dir`` and appending to its ``metrics.csv``."""

    def __init__(self, save_dir: str):
        super().__init__(save_dir, name="", version="")

    @property
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class TrimResumedLog(pl.Callback):
    """At the start of training (after a resume has restored the step), drop the CSV rows that
    the interrupted run logged after its checkpoint: the resumed run logs those steps again."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, AppendingCSVLogger):
                logger.experiment.drop_after(trainer.global_step)
