"""The real CLI end to end: shards from make_shards -> train -> checkpoint -> resume."""

import copy
import csv

import pytest
import pytorch_lightning as pl
import torch
from helpers import ROOT, TINY, photo_crops, run

from vistok.common.checkpoints import read_checkpoint
from vistok.common.cli import VistokCLI


def test_config_names_resolve_under_configs_and_stack_on_their_base(tmp_path):
    cli = VistokCLI(
        [
            "--config",
            "tokenizer/wetok_ratio768.yaml",
            "--config",
            "presets/cpu_small.yaml",
            "--run_dir",
            str(tmp_path),
        ]
    )
    tok = cli.model.tokenizer
    assert type(tok).__name__ == "WeTok"
    assert tok.encoder.downsample == 32  # from the ratio-768 preset
    assert tok.config["init_args"]["channels"] == 32  # from the CPU preset, stacked last
    assert cli.model.loss.lecam_weight == 0.05  # from wetok.yaml, the base


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--model.init_args.tokenizer.init_args.chanels=3", "chanels"),
        ("--model.init_args.lr=fast", "lr"),
        ("--data.init_args.batchsize=3", "batchsize"),
    ],
)
def test_bad_config_keys_are_named(tmp_path, capsys, override, expected):
    with pytest.raises(SystemExit):
        VistokCLI(["--config", "tokenizer/vq.yaml", override, "--run_dir", str(tmp_path)])
    assert expected in capsys.readouterr().err


def test_missing_config_file_is_named(capsys):
    with pytest.raises(SystemExit, match="tokenizer/nope.yaml"):
        VistokCLI(["--config", "tokenizer/nope.yaml"])


@pytest.mark.slow
def test_train_checkpoint_resume_through_the_real_cli(tmp_path):
    photo_crops(tmp_path / "images", 24)
    run(
        [
            "-m",
            "vistok.data.make_shards",
            str(tmp_path / "images"),
            str(tmp_path / "shards"),
            "--shard-size",
            "10",
        ]
    )
    shards = sorted((tmp_path / "shards").glob("train-*.tar"))
    assert len(shards) == 3
    pattern = str(tmp_path / "shards" / "train-{000000..000002}.tar")
    run_dir = tmp_path / "run"
    base = [
        "train.py",
        "--config",
        "tokenizer/wetok.yaml",
        "--config",
        "presets/cpu_small.yaml",
        *TINY,
        f"--data.init_args.train_shards={pattern}",
        f"--data.init_args.val_shards={pattern}",
        f"--run_dir={run_dir}",
        "--trainer.val_check_interval=3",
    ]
    run([*base, "--trainer.max_steps=3"])
    first = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert first["global_step"] == 3
    assert (run_dir / "config.yaml").is_file() and (run_dir / "results.json").is_file()
    assert list((run_dir / "images").glob("recon_*.png"))

    # Restoring puts back the discriminator, the EMA and both optimizers exactly.
    seen = {}

    class Capture(pl.Callback):
        def on_train_start(self, trainer, module):
            seen["state"] = {k: v.clone() for k, v in module.state_dict().items()}
            module.ema.save_into(seen["state"])  # the averages as a checkpoint holds them
            seen["opts"] = [copy.deepcopy(o.state_dict()) for o in trainer.optimizers]

    cli = VistokCLI([*base[1:], "--trainer.max_steps=4"])
    cli.trainer.callbacks.append(Capture())
    cli.trainer.fit(
        cli.model, datamodule=cli.datamodule, ckpt_path=str(run_dir / "checkpoints/last.ckpt")
    )
    for prefix in ("loss.discriminator.", "ema.", "tokenizer."):
        keys = [k for k in first["state_dict"] if k.startswith(prefix)]
        assert keys and all(torch.equal(seen["state"][k], first["state_dict"][k]) for k in keys)
    for restored, saved in zip(seen["opts"], first["optimizer_states"]):
        step = next(iter(saved["state"].values()))["exp_avg"]
        assert torch.equal(next(iter(restored["state"].values()))["exp_avg"], step)

    run([*base, "--trainer.max_steps=6", "--ckpt_path=last"])
    second = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert second["global_step"] == 6
    # The resumed run trained steps 4..6 only: the CSV has no second copy of steps 0..2.
    with open(run_dir / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert sorted(steps) == steps and len(steps) == len(set(steps))
    # Both optimizers (tokenizer + discriminator) were checkpointed and resumed.
    assert len(second["optimizer_states"]) == 2
    moved = [
        k
        for k in first["state_dict"]
        if k.startswith("loss.discriminator.")
        and first["state_dict"][k].is_floating_point()
        and not torch.equal(first["state_dict"][k], second["state_dict"][k])
    ]
    assert moved, "the discriminator did not train after resuming"
    assert ROOT.joinpath("train.py").is_file()
