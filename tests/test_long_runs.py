"""Long runs: preemption checkpoints and exit codes, ``--ckpt_path last``, atomic checkpoint
writes, non-finite validation, option prefixes refused (through the real CLI where it matters)."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import pytorch_lightning as pl
import torch
from helpers import ROOT, TINY, SignalAtStep, run
from lightning_fabric.plugins.environments import SLURMEnvironment
from torch import nn

from vistok.common.checkpoints import AtomicCheckpointIO, read_checkpoint, resolve_last
from vistok.common.cli import VistokCLI, main
from vistok.common.run_guards import Preempted, Preemption

BASE = ["train.py", "--config", "tokenizer/vq.yaml", "--config", "presets/cpu_small.yaml", *TINY]


def _callback(name: str, **init_args) -> str:
    spec = {"class_path": f"helpers.{name}", "init_args": init_args}
    return f"--trainer.callbacks+={json.dumps(spec)}"


def _ckpts(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))


@pytest.mark.slow
def test_sigterm_mid_run_checkpoints_the_step_reached_exits_143_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = [*BASE, f"--run_dir={run_dir}", "--trainer.val_check_interval=5"]
    args += ["--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1"]  # no validation
    # SIGTERM arrives while step 3 runs: that step finishes, is saved, and the run exits.
    proc = run(
        [*args, "--trainer.max_steps=8", _callback("SignalAtStep", step=2, signum=15)], expect=143
    )
    assert "SIGTERM: checkpoint at step 3" in proc.stdout
    assert _ckpts(run_dir) == ["preempted-step0000003.ckpt"]
    assert read_checkpoint(run_dir / "checkpoints/preempted-step0000003.ckpt")["global_step"] == 3

    # No last.ckpt and no step*.ckpt: `last` still finds the preemption checkpoint.
    proc = run([*args, "--trainer.max_steps=5", "--ckpt_path=last"])
    assert "resuming from" in proc.stdout and "preempted-step0000003.ckpt" in proc.stdout
    assert read_checkpoint(run_dir / "checkpoints/last.ckpt")["global_step"] == 5
    with open(run_dir / "metrics.csv") as f:
        logged = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    # The resumed run went on from step 3: it logged steps 3 and 4, not 0..2 again.
    assert logged[-2:] == [3, 4] and logged == sorted(set(logged))


@pytest.mark.slow
def test_ranks_agree_on_a_signal_only_one_of_them_got(tmp_path):
    run_dir = tmp_path / "run"
    args = [*BASE, f"--run_dir={run_dir}", "--trainer.devices=2", "--trainer.max_steps=6"]
    args += ["--trainer.limit_val_batches=0", _callback("SignalAtStep", step=2, signum=15, rank=1)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT / "tests")]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + args,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    # Rank 1 got SIGTERM; rank 0 learnt it at the same step boundary and wrote the checkpoint.
    assert "SIGTERM: checkpoint at step 3" in out, out[-3000:]
    assert _ckpts(run_dir) == ["preempted-step0000003.ckpt"]
    assert re.search(r"exitcode\s*:\s*143", out), out[-3000:]  # torchrun's failure summary


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.net(batch).pow(2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, *callbacks, **kw):
    return pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=10,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        **kw,
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1, signal.SIGTERM])
def test_each_preemption_signal_saves_at_the_next_step_and_exits_with_128_plus_it(tmp_path, signum):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)}
    trainer = _trainer(tmp_path, SignalAtStep(4, int(signum)), Preemption())
    with pytest.raises(Preempted) as info:
        trainer.fit(Tiny())
    assert info.value.code == 128 + signum
    ckpt = read_checkpoint(tmp_path / "checkpoints" / "preempted-step0000005.ckpt")
    assert ckpt["global_step"] == 5
    # The handlers in place before fit are back, after a preemption and after a whole run.
    assert {s: signal.getsignal(s) for s in before} == before
    _trainer(tmp_path / "again", Preemption()).fit(Tiny())
    assert {s: signal.getsignal(s) for s in before} == before


def test_slurm_auto_requeue_keeps_its_signal_for_lightning(tmp_path):
    trainer = _trainer(tmp_path)
    preemption = Preemption()
    assert signal.SIGUSR1 in preemption._signals(trainer)
    trainer._accelerator_connector.cluster_environment = SLURMEnvironment(auto_requeue=True)
    assert preemption._signals(trainer) == [signal.SIGTERM, signal.SIGINT]
    env = SLURMEnvironment(auto_requeue=False)
    trainer._accelerator_connector.cluster_environment = env
    assert signal.SIGUSR1 in preemption._signals(trainer)


def _save(path, step: int, when: float) -> None:
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": step}, path)
    os.utime(path, (when, when))


def test_ckpt_path_last_takes_the_newest_checkpoint_that_loads(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    assert resolve_last(tmp_path) is None  # nothing at all: start fresh
    _save(ckpts / "step0000002.ckpt", 2, 1000)
    _save(ckpts / "step0000004.ckpt", 4, 2000)
    assert resolve_last(tmp_path).name == "step0000004.ckpt"  # any name, no last.ckpt needed
    _save(tmp_path / "hpc_ckpt_1.ckpt", 5, 3000)  # Lightning's SLURM checkpoint counts too
    assert resolve_last(tmp_path).name == "hpc_ckpt_1.ckpt"
    # A truncated newest checkpoint and a non-checkpoint are skipped, each named in a warning.
    data = (ckpts / "step0000004.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])
    torch.save({"weights": torch.ones(1)}, ckpts / "other.ckpt")
    for i, name in enumerate(["last.ckpt", "other.ckpt"]):
        os.utime(ckpts / name, (5000 + i, 5000 + i))
    with pytest.warns(UserWarning) as caught:
        assert resolve_last(tmp_path).name == "hpc_ckpt_1.ckpt"
    messages = " ".join(str(w.message) for w in caught)
    assert "last.ckpt" in messages and "other.ckpt" in messages
    # Checkpoints that all fail: an error, not a fresh start.
    for path in [*ckpts.glob("step*.ckpt"), tmp_path / "hpc_ckpt_1.ckpt"]:
        path.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning), pytest.raises(SystemExit, match="none of the 5 checkpoints"):
        resolve_last(tmp_path)


def test_cli_stops_when_no_checkpoint_of_the_run_loads_and_says_when_it_starts_fresh(
    tmp_path, capsys
):
    args = ["--config", "tokenizer/vq.yaml", *TINY, f"--run_dir={tmp_path}", "--ckpt_path=last"]
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.warns(UserWarning, match="last.ckpt"), pytest.raises(SystemExit, match="none"):
        main(args)
    (tmp_path / "checkpoints" / "last.ckpt").unlink()
    from vistok.common.cli import checkpoint_to_resume

    assert checkpoint_to_resume(VistokCLI(args)) is None
    assert "no checkpoint in" in capsys.readouterr().out


_WRITER = """
import sys, torch
from vistok.common.checkpoints import AtomicCheckpointIO
io, i = AtomicCheckpointIO(), 0
while True:
    i += 1
    io.save_checkpoint({"global_step": i, "w": torch.full((4_000_000,), float(i))}, sys.argv[1])
    print(i, flush=True)
"""


def test_a_kill_during_checkpoint_writes_never_leaves_a_truncated_file(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 0, "w": torch.zeros(4)}, path)
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    for _ in range(2):  # kill it somewhere inside its third write (16 MB each)
        proc.stdout.readline()
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["global_step"] >= 2 and torch.all(ckpt["w"] == ckpt["global_step"])
    # Only the hidden temporary file of the killed write may remain; no *.ckpt glob sees it.
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["last.ckpt"]


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)

    def broken(obj, f):
        f.write(b"PK\x03\x04 half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_non_finite_validation_stops_the_run_and_last_stays_the_last_good_one(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(
        [
            *BASE,
            f"--run_dir={run_dir}",
            "--trainer.val_check_interval=1",
            "--trainer.max_steps=5",
            _callback("PoisonAtStep", step=2),  # the weights turn NaN after step 2
        ],
        expect=1,
    )
    assert re.search(r"non-finite metric \(.*val/l1 = nan", proc.stderr), proc.stderr[-2000:]
    assert "no checkpoint of step 2 is written" in proc.stderr
    assert _ckpts(run_dir) == ["last.ckpt", "step0000001.ckpt"]
    last = read_checkpoint(run_dir / "checkpoints/last.ckpt")
    assert last["global_step"] == 1
    weights = [v for v in last["state_dict"].values() if v.is_floating_point()]
    assert all(torch.isfinite(v).all() for v in weights)


def test_option_prefixes_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        VistokCLI(["--config", "tokenizer/vq.yaml", "--trainer.max_step", "5"])
    assert "--trainer.max_step" in capsys.readouterr().err
    from vistok.data import make_shards

    with pytest.raises(SystemExit):
        make_shards.main([str(tmp_path), str(tmp_path / "out"), "--shard-siz", "5"])
    assert "--shard-siz" in capsys.readouterr().err
    # Every argparse command line of the repository refuses prefixes.
    sources = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "tests" not in p.parts]
    lenient = [
        str(p.relative_to(ROOT))
        for p in sources
        if re.search(r"ArgumentParser\((?![^)]*allow_abbrev=False)", p.read_text())
    ]
    assert not lenient, f"ArgumentParser without allow_abbrev=False in {lenient}"
