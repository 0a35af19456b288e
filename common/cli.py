"""The command line behind ``train.py``: LightningCLI with vistok's run-folder conventions.

- ``--config tokenizer/wetok.yaml``: a path that does not exist as given is looked up under
  ``configs/``; several ``--config`` stack, the last one winning. A config that starts with
  ``# base: tokenizer/wetok.yaml`` stacks on that one. ``configs/defaults.yaml`` is always read
  first.
- ``--run_dir``: the run folder (default ``runs/<the configs given, joined by +>``, e.g.
  ``runs/wetok+cpu_small``). It receives
  ``config.yaml`` (the resolved config), ``checkpoints/``, TensorBoard events, ``metrics.csv``,
  ``images/`` (PNG grids) and ``results.json``.
- ``--ckpt_path last`` resumes from the newest checkpoint of the run folder that loads, whatever
  its name (``common/checkpoints.py: resolve_last``); with ``--evaluate`` the checkpoint is
  validated (every metric callback runs, results.json records it) instead.
- Every run writes its checkpoints atomically, checkpoints and exits with 128 + signal on
  SIGTERM/SIGINT/SIGUSR1, and stops on non-finite validation metrics (``common/run_guards.py``;
  ``docs/long_runs.md``).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from jsonargparse import ActionYesNo
from lightning_fabric.plugins import CheckpointIO
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import TensorBoardLogger

from vistok.common.checkpoints import AtomicCheckpointIO, StepCheckpoint, resolve_last
from vistok.common.loggers import AppendingCSVLogger, TrimResumedLog
from vistok.common.results import ResultsJSON
from vistok.common.resume import RngState
from vistok.common.run_guards import FiniteValidation, Preemption
from vistok.common.summary import RunSummary, StepProgressBar

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# Checkpoints are taken after a whole manual step (generator and discriminator), which is the
# state a resume needs; Lightning's warning about pre-optimization state does not apply.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
# The command line is always handed over as ``args``, after --config lookup and stacking, so
# LightningCLI's warning about ``args`` next to a non-empty sys.argv is about our own hand-over.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
# The training streams split their shards between loader workers themselves (data/stream.py), so
# the length Lightning warns about is exact with any number of workers.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
# Lightning's own pytree helper against a newer torch: nothing vistok calls or can change.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def _find_config(value: str) -> Path:
    for path in (Path(value), CONFIG_DIR / value):
        if path.is_file():
            return path
    raise SystemExit(f"error: config file {value!r} not found (looked in ./ and {CONFIG_DIR}/)")


def _with_bases(path: Path, seen: tuple[Path, ...] = ()) -> list[Path]:
    """``path`` preceded by the configs it stacks on, named in ``# base: NAME`` header lines."""
    if path.resolve() in seen:
        raise SystemExit(f"error: config {path} stacks on itself")
    bases = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("# base:"):
            base = _find_config(line.split(":", 1)[1].strip())
            bases += _with_bases(base, (*seen, path.resolve()))
    return [*bases, path]


def resolve_config_args(argv: list[str]) -> list[str]:
    """Expand each ``--config NAME``: look NAME up under ``configs/`` when it is not a path that
    exists, and put the configs it stacks on (``# base:`` headers) in front of it."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        for path in _with_bases(_find_config(value)):
            out += ["--config", str(path)]
    return out


def given_config_names(argv: list[str]) -> list[str]:
    """The stems of the ``--config`` files named on the command line, in order (bases and
    ``defaults.yaml`` not included)."""
    names = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            names.append(Path(argv[i + 1]).stem)
        elif arg.startswith("--config="):
            names.append(Path(arg.split("=", 1)[1]).stem)
    return names


def native_precision(precision, accelerator, automatic_optimization: bool = True):
    """``bf16-mixed`` (the default) where bf16 is native; otherwise the best that is: fp16 with
    loss scaling on older GPUs (manual GAN steps cannot scale: fp32 there), fp32 when
    ``accelerator: auto`` lands on a CPU without bf16 instructions (AVX512-BF16 / AMX), where
    bf16 autocast is emulated and slower."""
    if str(precision) not in ("bf16-mixed", "bf16"):
        return precision
    accelerator = str(accelerator or "auto")
    cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    if cuda and torch.cuda.is_bf16_supported():
        return precision
    if cuda:
        chosen = "16-mixed" if automatic_optimization else "32-true"
    elif accelerator == "auto" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        chosen = "32-true"
    else:  # a CPU with bf16 instructions, or bf16 asked for on an explicit accelerator
        return precision
    print(f"precision {precision} is not native on this {'GPU' if cuda else 'CPU'}: using {chosen}")
    return chosen


class VistokCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, **kwargs):
        args = sys.argv[1:] if args is None else list(args)
        self.given_configs = given_config_names(args)
        args = resolve_config_args(args)
        super().__init__(
            model_class=pl.LightningModule,
            subclass_mode_model=True,
            datamodule_class=pl.LightningDataModule,
            subclass_mode_data=True,
            run=False,
            args=args,
            save_config_callback=None,  # saved by save_config() into the run folder
            auto_configure_optimizers=False,
            parser_kwargs={
                "default_config_files": [str(CONFIG_DIR / "defaults.yaml")],
                # `--trainer.max_step 5` is an error, not silently `max_steps`.
                "allow_abbrev": False,
            },
            **kwargs,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None, help="run folder")
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None, help="checkpoint to resume, or 'last'"
        )
        parser.add_argument(
            "--progress_seconds",
            type=float,
            default=30.0,
            help="seconds between progress lines when the output is not a terminal",
        )
        parser.add_argument(
            "--evaluate",
            action=ActionYesNo,
            default=False,
            help="validate the checkpoint given by --ckpt_path (every metric callback runs) "
            "instead of training",
        )

    @property
    def run_dir(self) -> Path:
        """``--run_dir``, or ``runs/<the configs given, joined by +>``: ``generator/ar.yaml``
        and ``generator/ar_cpu_small.yaml`` never share a folder, nor do a config with and
        without a preset stacked on it."""
        base = self.training_run_dir
        if self.config.evaluate and self.config.ckpt_path:
            # An evaluation never writes over the training run's logs, config or results.
            step = self.evaluated_checkpoint.get("global_step", 0)
            return base / "eval" / f"step{step:07d}"
        return base

    @property
    def training_run_dir(self) -> Path:
        name = "+".join(self.given_configs) or "default"
        return Path(self.config.run_dir or Path("runs") / name)

    @functools.cached_property
    def evaluated_checkpoint(self) -> dict:
        """The checkpoint ``--evaluate`` validates, memory-mapped (only its step and loop
        state are read here; the trainer loads the weights)."""
        if self.checkpoint_file is None:
            raise SystemExit(
                f"error: --ckpt_path last: {self.training_run_dir} holds no checkpoint to evaluate"
            )
        return torch.load(self.checkpoint_file, map_location="cpu", weights_only=True, mmap=True)

    @functools.cached_property
    def checkpoint_file(self) -> Path | None:
        """``--ckpt_path``, with ``last`` resolved in the training run folder (the newest
        checkpoint that loads, see ``resolve_last``; None when it holds none)."""
        path = self.config.ckpt_path
        if path == "last":
            return resolve_last(self.training_run_dir)
        return Path(path) if path else None

    def _instantiate_trainer(self, config: dict, callbacks: list) -> pl.Trainer:
        run_dir = self.run_dir
        config["default_root_dir"] = str(run_dir)
        config["precision"] = native_precision(
            config.get("precision"), config.get("accelerator"), self.model.automatic_optimization
        )
        if config.get("logger") in (None, True):
            # name="" and version="" put every logger's files straight into the run folder.
            config["logger"] = [
                TensorBoardLogger(str(run_dir), name="", version=""),
                AppendingCSVLogger(str(run_dir)),
            ]
            callbacks.append(TrimResumedLog())
        own = list(config.get("callbacks") or []) + callbacks
        if not any(isinstance(c, ModelCheckpoint) for c in own):
            every = config.get("val_check_interval")
            kind = StepCheckpoint if isinstance(every, int) else ModelCheckpoint
            callbacks.append(
                kind(
                    dirpath=str(run_dir / "checkpoints"),
                    save_last=True,
                    save_top_k=-1 if isinstance(every, int) else 1,
                    every_n_train_steps=every if isinstance(every, int) else None,
                    filename="step{step:07d}",
                    auto_insert_metric_name=False,
                )
            )
        # The finite check first: a preemption at a failed validation must not save it.
        callbacks += [FiniteValidation(), Preemption()]
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        if config["logger"]:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        callbacks.append(ResultsJSON(run_dir / "results.json"))
        callbacks.append(RunSummary(run_dir, self.config.progress_seconds))
        if not any(isinstance(c, ProgressBar) for c in own):
            if not sys.stdout.isatty():
                # A log file gets RunSummary's progress lines, not a bar redrawn with \r.
                config["enable_progress_bar"] = False
            elif config.get("enable_progress_bar") is not False:
                callbacks.append(StepProgressBar())
        callbacks.append(RngState())  # exact resume: the generators travel in the checkpoint
        return super()._instantiate_trainer(config, callbacks)

    def save_config(self) -> Path:
        path = self.run_dir / "config.yaml"
        if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)
        return path


def checkpoint_to_resume(cli: VistokCLI) -> str | None:
    """``--ckpt_path`` with ``last`` resolved, saying what was chosen."""
    found = cli.checkpoint_file
    if cli.config.ckpt_path == "last" and cli.trainer.is_global_zero:
        if found is None:
            print(
                f"--ckpt_path last: no checkpoint in {cli.training_run_dir}: starting from scratch"
            )
        else:
            print(f"--ckpt_path last: resuming from {found}")
    return None if found is None else str(found)


def main(args: list[str] | None = None) -> VistokCLI:
    cli = VistokCLI(args)
    cli.save_config()
    if cli.config.evaluate:
        if not cli.config.ckpt_path:
            raise SystemExit("error: --evaluate needs the checkpoint to evaluate: --ckpt_path X")
        # Validation does not restore the training loops: without their state every number,
        # image and results.json entry would be labelled step 0 instead of the checkpoint's step.
        cli.trainer.fit_loop.load_state_dict(cli.evaluated_checkpoint["loops"]["fit_loop"])
        cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=cli.checkpoint_file)
    else:
        ckpt_path = checkpoint_to_resume(cli)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli
