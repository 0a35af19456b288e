"""Shared test helpers: tiny presets, real photo crops, running the real CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

# Stacked after presets/cpu_small.yaml: the smallest nets that still exercise every code path.
TINY = [
    "--model.init_args.tokenizer.init_args.channels=16",
    "--model.init_args.tokenizer.init_args.num_mid_blocks=1",
    "--data.init_args.resolution=32",
    "--model.init_args.tokenizer.init_args.resolution=32",
    "--data.init_args.batch_size=4",
    "--data.init_args.num_workers=0",
    "--trainer.limit_val_batches=1",
]


def photo_crops(folder: Path, count: int, size: int = 48, seed: int = 0) -> list[Path]:
    """Random crops of real photos shipped with scikit-image, written as PNG files."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        img = photos[i % len(photos)]
        y = rng.integers(0, img.shape[0] - size)
        x = rng.integers(0, img.shape[1] - size)
        path = folder / f"crop_{i:04d}.png"
        Image.fromarray(img[y : y + size, x : x + size]).save(path)
        paths.append(path)
    return paths


def run(
    args: list[str], cwd: Path = ROOT, timeout: int = 900, expect: int = 0
) -> subprocess.CompletedProcess:
    """Runs ``python ARGS`` and checks its exit code. ``tests/`` is importable in the child, so
    ``--trainer.callbacks+=helpers.SignalAtStep`` works."""
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT / "tests")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == expect, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


class SignalAtStep(pl.Callback):
    """Sends ``signum`` to its own process (on one rank, or all) as the training step after
    ``step`` starts: the real signal path, at a step that does not depend on timing."""

    def __init__(self, step: int, signum: int, rank: int | None = None):
        self.step, self.signum, self.rank = step, signum, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.signum)


class PoisonAtStep(pl.Callback):
    """Fills every floating weight, buffer and EMA average with NaN once step ``step`` is done
    (a diverged run, on cue)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            ema = getattr(pl_module, "ema", None)  # the averages live outside the module tree
            averages = ema.shadows if ema is not None else []
            with torch.no_grad():
                for t in [*pl_module.parameters(), *pl_module.buffers(), *averages]:
                    if t.is_floating_point():
                        t.fill_(float("nan"))


def class_shards(tmp_path: Path, monkeypatch, per_class: int) -> str:
    """Shards of real photo crops in two classes ("a", "b") for end-to-end CLI runs, with the
    offline FID weights in place (their package is a required install: gFID is always checked)."""
    from vistok.evaluation.inception import fid_weights_path

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models on a shared CPU
    monkeypatch.setenv("VISTOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VISTOK_FID_WEIGHTS", fid_weights_path())
    for label in ("a", "b"):
        photo_crops(tmp_path / "images" / label, per_class, size=48, seed=ord(label))
    images, shards = str(tmp_path / "images"), str(tmp_path / "shards")
    size = str(per_class)
    run(["-m", "vistok.data.make_shards", images, shards, "--classes", "--shard-size", size])
    return str(tmp_path / "shards" / "train-{000000..000001}.tar")


class RankDraws(pl.Callback):
    """Draws ``1 + rank`` numbers from torch's global generator at every training step, so that
    the ranks' generators part ways, and writes them to ``draws_rank<R>.json`` in the run folder:
    a resumed run continues each rank's own sequence only if each rank's state was saved."""

    def __init__(self):
        self.draws: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.draws.append(torch.rand(1 + trainer.global_rank).tolist())

    def on_train_end(self, trainer, pl_module) -> None:
        path = Path(trainer.default_root_dir) / f"draws_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.draws))
