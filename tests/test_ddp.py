"""The same train.py under torchrun: 2 processes on one node, and 2 single-process "nodes"; and
exact resume with 2 processes. The GAN tokenizers run plain DDP (no ``find_unused_parameters``)
across ``disc_start``, with LeCAM and the adaptive GAN weight."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, TINY, class_shards
from test_resume_cli import FALLBACK, keys, same_checkpoints, tokenizer_args

from vistok.common.checkpoints import read_checkpoint
from vistok.data.default_dataset import num_samples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(run_dir, devices: int, nodes: int) -> list[str]:
    return [
        "train.py",
        "--config",
        "tokenizer/wetok.yaml",
        "--config",
        "presets/cpu_small.yaml",
        *TINY,
        "--data.init_args.num_workers=1",
        f"--trainer.devices={devices}",
        f"--trainer.num_nodes={nodes}",
        # Step 0 without the GAN, steps 1-2 with it (and its autograd.grad-based weight).
        "--model.init_args.loss.init_args.disc_start=1",
        "--model.init_args.loss.init_args.adaptive_gan_weight=true",
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=3",
        "--trainer.limit_val_batches=null",
        f"--run_dir={run_dir}",
        "--trainer.callbacks+=vistok.common.audit.DistributedAudit",
    ]


def _check_audits(run_dir, world: int) -> None:
    audits = [json.loads((run_dir / f"audit_rank{r}.json").read_text()) for r in range(world)]
    # Same number of steps and batches on every rank, and identical weights after them.
    assert {a["global_step"] for a in audits} == {3}
    # One backward a step reaches every parameter: no graph search for unused ones.
    assert {a["find_unused_parameters"] for a in audits} == {False}
    assert {a["train_batches"] for a in audits} == {3}
    assert len({round(a["checksum"], 6) for a in audits}) == 1
    # Training data disjoint across ranks; validation covered exactly once.
    train = [set(a["train_keys"]) for a in audits]
    assert not set.intersection(*train)
    val = [k for a in audits for k in a["val_keys"]]
    assert len(val) == len(set(val)) == num_samples("val")
    # Per step: gradients are all-reduced; DDP's buffer broadcast never carries the EMA.
    for a in audits:
        sent = a["bytes_per_step"]
        assert sent["gradients"] > 0 and sent.get("buffers/ema", 0) == 0, sent
        assert sent.get("other", 0) < sent["gradients"], sent  # gradients counted once
        assert sent.get("buffers/loss", 0) > 0, sent  # what it does broadcast is counted
    # 4 validation shards of 64 samples (keys numbered through the split) for 2 ranks: rank r
    # reads whole shards r and r + 2, and no other.
    for a in audits:
        shards = {int(k.rsplit("_", 1)[1]) // 64 for k in a["val_keys"]}
        assert shards == {a["rank"], a["rank"] + 2}


def _torchrun(args, extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", *extra, *args]
    # ``tests/`` importable in the ranks, for callbacks given as ``helpers.<Name>``.
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT / "tests")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
def test_two_processes_one_node(tmp_path):
    proc = _torchrun(_train_args(tmp_path, 2, 1), ["--standalone", "--nproc_per_node=2"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-5000:]
    _check_audits(tmp_path, 2)


@pytest.mark.slow
def test_two_nodes_on_loopback(tmp_path):
    port = _free_port()
    procs = [
        _torchrun(
            _train_args(tmp_path, 1, 2),
            [
                "--nnodes=2",
                f"--node_rank={r}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
            ],
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-5000:]
    _check_audits(tmp_path, 2)


def _two_processes(args) -> str:
    proc = _torchrun(args, ["--standalone", "--nproc_per_node=2"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-5000:]
    return out


@pytest.mark.slow
def test_two_processes_resume_bit_for_bit(tmp_path, monkeypatch):
    """10 straight steps == 5 + resume + 5 with 2 ranks: final weights, optimizer and each rank's
    stream position and generators equal, and each rank trained on the same batches. The ranks
    read different shards and draw different amounts from their generators (``RankDraws``), so
    restoring rank 0's state on both would show."""
    shards = class_shards(tmp_path, monkeypatch, per_class=4)  # one shard per rank
    args = [
        *tokenizer_args(shards, perturb=False),  # 3 batches an epoch: step 5 is mid-epoch
        "--trainer.devices=2",
        "--trainer.callbacks+=helpers.RankDraws",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _two_processes([*args, "--trainer.max_steps=10", f"--run_dir={straight}"])
    mid = straight / "checkpoints" / "step0000005.ckpt"
    out = _two_processes(
        [*args, "--trainer.max_steps=10", f"--run_dir={resumed}", f"--ckpt_path={mid}"]
    )
    assert FALLBACK not in out, out[-3000:]

    # Rank 0 wrote the checkpoint, holding both ranks' stream positions and generators.
    ckpt = read_checkpoint(mid)
    streams = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["ranks"]
    generators = ckpt["callbacks"]["RngState"]["ranks"]
    assert len(streams) == len(generators) == 2 and None not in streams
    assert not torch.equal(generators[0]["torch"], generators[1]["torch"])
    step10 = "checkpoints/step0000010.ckpt"
    same_checkpoints(straight / step10, resumed / step10)
    for rank in range(2):  # 2 samples a batch: the resumed run's 5 steps are the last 10
        assert len(keys(resumed, rank)) == 10 and keys(straight, rank)[10:] == keys(resumed, rank)
        draws = [
            json.loads((d / f"draws_rank{rank}.json").read_text()) for d in (straight, resumed)
        ]
        assert draws[0][5:] == draws[1]
    assert not set(keys(straight, 0)) & set(keys(straight, 1))  # each rank its own shard
    # Plain DDP across disc_start (step 2 here).
    assert (
        json.loads((straight / "audit_rank0.json").read_text())["find_unused_parameters"] is False
    )
