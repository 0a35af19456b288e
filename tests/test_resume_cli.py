"""Exact resume through the real CLI: 10 straight steps == 5 steps + ``--ckpt_path`` + 5 steps,
bit for bit (every weight, buffer, EMA shadow and optimizer state) and batch for batch (the
sample keys each run trained on), from an end-of-run checkpoint and from a mid-run one, for a GAN
tokenizer with EMA and latent perturbation and for the GPT on extracted codes; and a checkpoint
written by a resumed run, in the middle of the pass it resumed, resumes exactly too."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import class_shards, run
from test_ar_cli import TINY_VQ

from vistok.common.checkpoints import read_checkpoint

AUDIT = "--trainer.callbacks+=vistok.common.audit.DistributedAudit"
# StreamLoader's warning when it cannot tell exactly where training stands in the stream.
FALLBACK = "saving the stream position after batch"


def tokenizer_args(shards: str, perturb: bool = True) -> list[str]:
    return [
        "train.py",
        "--config",
        "tokenizer/vq.yaml",
        *(["--config", "perturb/robustok.yaml"] if perturb else []),
        "--config",
        "presets/cpu_small.yaml",
        *[f"--model.init_args.tokenizer.init_args.{k}={v}" for k, v in TINY_VQ.items()],
        "--model.init_args.loss.init_args.disc_start=2",
        "--model.init_args.loss.init_args.perceptual_weight=0",
        "--model.init_args.loss.init_args.discriminator.init_args.ndf=8",
        "--model.init_args.loss.init_args.discriminator.init_args.n_layers=2",
        "--data.init_args.resolution=32",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
        "--data.init_args.batches_per_epoch=3",  # step 5 is in the middle of epoch 1
        "--data.init_args.shuffle_buffer=4",
        f"--data.init_args.train_shards={shards}",
        f"--data.init_args.val_shards={shards}",
        "--trainer.limit_val_batches=0",
        "--trainer.val_check_interval=5",  # a checkpoint every 5 steps
        AUDIT,
    ]


def keys(run_dir, rank: int = 0) -> list[str]:
    """The sample keys rank ``rank`` trained on, in order."""
    return json.loads((run_dir / f"audit_rank{rank}.json").read_text())["train_keys"]


def same_tree(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def same_checkpoints(want_path, got_path) -> None:
    """Weights, buffers, EMA, optimizer states, the stream's position on every rank and every
    rank's generators: all equal."""
    want, got = read_checkpoint(want_path), read_checkpoint(got_path)
    assert got["global_step"] == want["global_step"]
    same_tree(want["state_dict"], got["state_dict"], "state_dict")
    same_tree(want["optimizer_states"], got["optimizer_states"], "optimizer_states")
    loader = want["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    same_tree(loader, got["loops"]["fit_loop"]["state_dict"]["combined_loader"], "stream")
    same_tree(want["callbacks"]["RngState"], got["callbacks"]["RngState"], "generators")


def resume(args: list[str]) -> None:
    """A resumed run that knew exactly where it stood in the stream at every checkpoint."""
    proc = run(args)
    assert FALLBACK not in proc.stderr, proc.stderr[-3000:]


def check_resumes(tmp_path, args: list[str]) -> None:
    straight, first = tmp_path / "straight", tmp_path / "first"
    run([*args, "--trainer.max_steps=10", f"--run_dir={straight}"])
    run([*args, "--trainer.max_steps=5", f"--run_dir={first}"])
    mid = straight / "checkpoints" / "step0000005.ckpt"
    assert mid.exists()
    # From the end-of-run checkpoint of the 5-step run, and from the 10-step run's step-5 one.
    resumed_end, resumed_mid = tmp_path / "resumed_end", tmp_path / "resumed_mid"
    shutil.copytree(first, resumed_end)
    (resumed_end / "audit_rank0.json").unlink()
    resume([*args, "--trainer.max_steps=10", f"--run_dir={resumed_end}", "--ckpt_path=last"])
    resume([*args, "--trainer.max_steps=10", f"--run_dir={resumed_mid}", f"--ckpt_path={mid}"])

    for resumed in (resumed_end, resumed_mid):
        step10 = "checkpoints/step0000010.ckpt"
        same_checkpoints(straight / step10, resumed / step10)
        assert keys(first) + keys(resumed) == keys(straight)
    assert len(set(keys(straight))) < len(keys(straight))  # several epochs: a resume crosses one


def tiny_tokenizer_and_codes(tmp_path, shards: str):
    """A one-step VQ tokenizer and its codes of the training split, two views per image."""
    tok_run = tmp_path / "tok"
    run([*tokenizer_args(shards, perturb=False), "--trainer.max_steps=1", f"--run_dir={tok_run}"])
    tok_ckpt = str(tok_run / "checkpoints" / "last.ckpt")
    codes = tmp_path / "codes"
    run(
        [
            "-m",
            "vistok.data.extract_codes",
            "--tokenizer",
            tok_ckpt,
            "--shards",
            shards,
            "--out",
            str(codes),
            "--split",
            "train",
            "--num-workers",
            "0",
            "--flip",  # the training stream then picks a view per sample at random
        ]
    )
    return tok_ckpt, codes


@pytest.mark.slow
def test_gan_tokenizer_with_ema_and_perturbation_resumes_bit_for_bit(tmp_path, monkeypatch):
    shards = class_shards(tmp_path, monkeypatch, per_class=4)
    check_resumes(tmp_path, tokenizer_args(shards))


@pytest.mark.slow
def test_gpt_on_codes_resumes_bit_for_bit(tmp_path, monkeypatch):
    shards = class_shards(tmp_path, monkeypatch, per_class=4)
    tok_ckpt, codes = tiny_tokenizer_and_codes(tmp_path, shards)
    args = [
        "train.py",
        "--config",
        "generator/ar_cpu_small.yaml",
        f"--model.init_args.tokenizer={tok_ckpt}",
        f"--data.init_args.root={codes}",
        "--data.init_args.val_split=null",
        "--model.init_args.preset=tiny",
        "--model.init_args.num_classes=2",
        "--model.init_args.ema_decay=0.9",
        "--model.init_args.gpt.dropout=0.1",  # draws from torch's generator every step
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
        "--data.init_args.batches_per_epoch=3",
        "--data.init_args.shuffle_buffer=4",
        "--trainer.limit_val_batches=0",
        "--trainer.val_check_interval=5",
        AUDIT,
    ]
    check_resumes(tmp_path, args)


@pytest.mark.slow
def test_checkpoint_written_by_a_resumed_run_resumes_bit_for_bit(tmp_path, monkeypatch):
    """12 straight steps == 4 + resume + 4 + resume + 4: the step-8 checkpoint comes from a run
    that resumed mid-epoch and is itself in the middle of the pass it resumed (10 batches an
    epoch), the last leg crosses into the next epoch."""
    shards = class_shards(tmp_path, monkeypatch, per_class=4)
    args = [*tokenizer_args(shards, perturb=False), "--data.init_args.batches_per_epoch=10"]
    args += ["--trainer.val_check_interval=4"]  # checkpoints at steps 4, 8, 12
    straight, chained = tmp_path / "straight", tmp_path / "chained"
    run([*args, "--trainer.max_steps=12", f"--run_dir={straight}"])
    step = "checkpoints/step{:07d}.ckpt".format
    resume(
        [
            *args,
            "--trainer.max_steps=8",
            f"--run_dir={chained}",
            f"--ckpt_path={straight / step(4)}",
        ]
    )
    second = keys(chained)
    resume([*args, "--trainer.max_steps=12", f"--run_dir={chained}", "--ckpt_path=last"])
    for n in (8, 12):
        same_checkpoints(straight / step(n), chained / step(n))
    # Two samples a batch: steps 5-8 and 9-12 trained on what the straight run trained on.
    assert second + keys(chained) == keys(straight)[8:]
    assert len(keys(chained)) == 8
