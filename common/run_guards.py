"""Callbacks that keep long runs trustworthy: preemption checkpoints and non-finite validation.

Both are added by the CLI (``common/cli.py``) to every run. See ``docs/long_runs.md``.

- ``Preemption``: SIGTERM, SIGINT and SIGUSR1 are recorded by a signal handler; at the next
  step boundary every rank agrees on it (a max all-reduce of the signal number), the trainer
  writes ``checkpoints/preempted-step<N>.ckpt`` (all ranks take part, rank 0 writes) and the
  process exits with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1), the code
  a shell reports for a process killed by that signal, so a scheduler never reads a preempted job
  as finished. On SLURM with Lightning's auto-requeue, the requeue signal (SIGUSR1 by default) is
  left to Lightning, which writes its ``hpc_ckpt_*.ckpt`` and requeues the job. A second SIGINT
  interrupts at once (Lightning's usual Ctrl+C shutdown, exit code 1).
- ``FiniteValidation``: a validation metric that is NaN or infinite stops the run with an error
  naming it, before any checkpoint of that step is written (``common/cli.py`` defers the step's
  checkpoint until after validation), so ``last`` stays the last good checkpoint.
"""

from __future__ import annotations

import math
import signal
import threading
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.trainer.states import TrainerFn

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def agree_max(trainer: pl.Trainer, value: float) -> float:
    """The largest ``value`` over all ranks (the value itself in a single process)."""
    if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=trainer.strategy.root_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; its code is ``128 + signal``."""


class Preemption(pl.Callback):
    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _signals(self, trainer: pl.Trainer) -> list[int]:
        env = trainer._accelerator_connector.cluster_environment  # what Lightning itself reads
        lightning_owns = None
        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            lightning_owns = env.requeue_signal
        return [s for s in PREEMPTION_SIGNALS if s != lightning_owns]

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl+C twice: stop now
        # Only a flag: printing here could re-enter a stdout write the signal interrupted.
        self.signum = self.signum or signum

    def _install(self, trainer: pl.Trainer) -> None:
        # Installed once the loops start, after Lightning's own handlers (registered just before)
        # so that Lightning does not turn SIGTERM into a silent exit 0; Lightning's teardown puts
        # back the handlers that were there before fit.
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for s in self._signals(trainer):
            self._previous[s] = signal.signal(s, self._handle)

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            if signal.getsignal(s) == self._handle:  # not already undone by Lightning's teardown
                signal.signal(s, handler)
        self._previous = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.signum = 0

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe_stop(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._maybe_stop(trainer)

    def _maybe_stop(self, trainer: pl.Trainer) -> None:
        signum = int(agree_max(trainer, self.signum))
        if not signum:
            return
        ckpt_dir = Path(trainer.default_root_dir) / "checkpoints"
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            ckpt_dir = Path(trainer.checkpoint_callback.dirpath)
        path = ckpt_dir / f"preempted-step{trainer.global_step:07d}.ckpt"
        trainer.save_checkpoint(path)  # every rank calls it; rank 0 writes
        name, code = signal.Signals(signum).name, 128 + signum
        if trainer.is_global_zero:
            print(
                f"{name}: checkpoint at step {trainer.global_step} written to {path}; exiting "
                f"with code {code}. Resume with --ckpt_path last.",
                flush=True,
            )
        self._restore()
        raise Preempted(code)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()


class NonFiniteValidation(SystemExit):
    """Raised when a validation metric is NaN or infinite; the process exits with code 1."""


class FiniteValidation(pl.Callback):
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != TrainerFn.FITTING:  # --evaluate reports what it measures
            return
        bad = {}
        for name, value in trainer.callback_metrics.items():
            if name.startswith("val") and torch.is_tensor(value) and value.numel() == 1:
                if not math.isfinite(float(value)):
                    bad[name] = float(value)
        if not agree_max(trainer, float(bool(bad))):
            return
        shown = ", ".join(f"{k} = {v}" for k, v in sorted(bad.items())) or "on another rank"
        step = trainer.global_step
        raise NonFiniteValidation(
            f"error: validation at step {step} gave a non-finite metric ({shown}); the run "
            f"stops and no checkpoint of step {step} is written. Resume from the last good one "
            "(--ckpt_path last) with a lower learning rate or stronger clipping."
        )
