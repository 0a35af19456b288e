"""Every YAML under configs/ parses and instantiates (with the CPU preset) and runs a batch."""

import pytest
import torch
from helpers import ROOT

from vistok.common.cli import VistokCLI

ALL = {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")}
TOKENIZERS = sorted(c for c in ALL if c.startswith("tokenizer/"))
# Configs meant to stack on a tokenizer config.
STACKED = sorted(c for c in ALL if c.startswith(("perturb/", "eval/")))
# Generator configs name a tokenizer checkpoint; they are parsed and type-checked here, built in
# tests/test_ar_cli.py.
GENERATORS = sorted(c for c in ALL if c.startswith("generator/"))
# Post-training configs name a tokenizer checkpoint and a pairs folder: run in test_posttrain.py.
POSTTRAIN = sorted(c for c in ALL if c.startswith("posttrain/"))


def test_every_config_is_covered():
    covered = set(TOKENIZERS) | set(STACKED) | set(GENERATORS) | set(POSTTRAIN)
    # cpu_small is stacked by every test above; the GPU speed/FSDP presets resolve to real objects
    # in tests/test_speed.py; cpu_demo is make train's, run in tests/test_first_hour.py.
    presets = {
        "presets/cpu_small.yaml",
        "presets/gpu_fast.yaml",
        "presets/fsdp.yaml",
        "presets/cpu_demo.yaml",
    }
    assert ALL - covered == {"defaults.yaml"} | presets


@pytest.mark.parametrize("name", TOKENIZERS + STACKED)
def test_config_instantiates_and_runs_one_batch(name, tmp_path):
    configs = ["tokenizer/vq.yaml", name] if name in STACKED else [name]
    args = [a for c in configs for a in ("--config", c)]
    cli = VistokCLI([*args, "--config", "presets/cpu_small.yaml", "--run_dir", str(tmp_path)])
    model = cli.model
    res = model.tokenizer.resolution
    images = torch.rand(2, 3, res, res) * 2 - 1
    with torch.no_grad():
        recon, q = model.tokenizer(images)
    assert recon.shape == images.shape and torch.isfinite(recon).all()
    assert torch.isfinite(q.loss)
    if name.startswith("perturb/"):
        assert model.perturbation is not None
    if name.startswith("eval/"):
        assert any(type(c).__name__ == "ReconstructionEval" for c in cli.trainer.callbacks)


@pytest.mark.parametrize("name", GENERATORS)
def test_generator_config_parses(name, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        VistokCLI(
            [
                "--config",
                name,
                "--model.init_args.tokenizer=tok.ckpt",
                "--run_dir",
                str(tmp_path),
                "--print_config",
            ]
        )
    assert done.value.code in (None, 0)
    assert "vistok.generators" in capsys.readouterr().out
