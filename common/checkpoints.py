"""Reading checkpoints safely and refusing the wrong ones before anything is loaded; writing
them atomically; finding the one ``--ckpt_path last`` resumes."""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, memoised per (path, size, mtime): checkpoints and weights files are
    hashed once per process."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint, loaded with ``weights_only=True`` (never arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds objects that cannot be loaded safely (weights_only=True refused them): "
            f"{e}. Re-save it with plain tensors, or export it with export.py."
        ) from e


def config_differences(expected: Any, found: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two config trees differ, with both values."""
    if isinstance(expected, dict) and isinstance(found, dict):
        out = []
        for key in sorted(set(expected) | set(found)):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in found:
                out.append(f"{where}: missing in checkpoint (expected {expected[key]!r})")
            elif key not in expected:
                out.append(f"{where}: unexpected in checkpoint ({found[key]!r})")
            else:
                out += config_differences(expected[key], found[key], where)
        return out
    if isinstance(expected, (list, tuple)) and isinstance(found, (list, tuple)):
        if len(expected) == len(found):
            return [
                d
                for i, (a, b) in enumerate(zip(expected, found))
                for d in config_differences(a, b, f"{prefix}[{i}]")
            ]
    return [] if expected == found else [f"{prefix}: expected {expected!r}, found {found!r}"]


def state_dict_problems(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches, all found before loading any."""
    own = model.state_dict()
    problems = [f"missing key {k}" for k in own if k not in state]
    problems += [f"unexpected key {k}" for k in state if k not in own]
    problems += [
        f"shape mismatch for {k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    return problems


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    problems = state_dict_problems(model, state)
    if problems:
        shown = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise ValueError(f"{source} does not fit this model ({len(problems)} problems):\n  {shown}")
    model.load_state_dict(state)


def submodule_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    prefix = prefix.rstrip(".") + "."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in its own folder, flushes it to disk, then
    renames it over the target (``os.replace`` is atomic within a filesystem): a kill during a
    write leaves the previous ``last.ckpt`` whole, never a truncated one. Remote paths (``s3://``
    ...) keep Lightning's own writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"  # hidden: no *.ckpt glob sees it
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` by training step that, at a step where validation runs, writes the
    checkpoint after validation instead of before it: a validation that fails (non-finite
    metrics, see ``common/run_guards.py``) then stops the run before its step is saved."""

    def __init__(self, **kwargs):
        super().__init__(save_on_train_epoch_end=False, **kwargs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self._every_n_train_steps
        loop = trainer.fit_loop.epoch_loop
        if (
            every >= 1
            and trainer.global_step % every == 0
            and not self._should_skip_saving_checkpoint(trainer)
            and not loop._skip_next_val
            # The same test the training loop makes right after this hook.
            and loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
        ):
            self._defer_save_until_validation = True  # Lightning's own deferral, saved at
            return  # on_validation_end
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def _loads(path: Path) -> bool:
    try:
        # mmap: the zip directory and pickled structure are read, tensor bytes are not.
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, not a zip, unsafe pickle, ...
        warnings.warn(
            f"skipping checkpoint {path}: it cannot be loaded ({type(e).__name__}: {e})",
            stacklevel=3,
        )
        return False
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        warnings.warn(
            f"skipping checkpoint {path}: not a Lightning training checkpoint", stacklevel=3
        )
        return False
    return True


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """Every checkpoint of a run folder, newest first: ``checkpoints/*.ckpt`` (``last.ckpt``,
    ``step*.ckpt``, ``preempted-step*.ckpt``) and Lightning's SLURM ``hpc_ckpt_*.ckpt``."""
    run_dir = Path(run_dir)
    found = [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def resolve_last(run_dir: str | Path) -> Path | None:
    """The checkpoint ``--ckpt_path last`` resumes: the newest of the run folder that loads,
    whatever its name (the ones that fail are skipped with a warning naming them). None when
    the folder holds no checkpoint at all; an error when it holds some but none loads."""
    candidates = run_checkpoints(run_dir)
    for path in candidates:
        if _loads(path):
            return path
    if candidates:
        raise SystemExit(
            f"error: --ckpt_path last: none of the {len(candidates)} checkpoints in {run_dir} "
            f"can be loaded ({', '.join(p.name for p in candidates)}); pass a good one with "
            "--ckpt_path PATH, or move them away to start fresh"
        )
    return None
