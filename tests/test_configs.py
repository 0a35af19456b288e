"""Every YAML under configs/ parses and instantiates (with the CPU preset) and runs a batch."""

import pytest
import torch
from helpers import ROOT

from vistok.common.cli import VistokCLI

CONFIGS = sorted(
    str(p.relative_to(ROOT / "configs"))
    for p in (ROOT / "configs").rglob("*.yaml")
    if p.parent.name in ("tokenizer",)
)
STACKED = {"perturb/robustok.yaml": "tokenizer/vq.yaml"}  # configs meant to stack on another


def test_every_config_is_covered():
    listed = {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")}
    covered = set(CONFIGS) | set(STACKED) | {"defaults.yaml", "presets/cpu_small.yaml"}
    assert listed <= covered | {c for c in listed if c.startswith("generator/")}, listed - covered


@pytest.mark.parametrize("name", CONFIGS + list(STACKED))
def test_config_instantiates_and_runs_one_batch(name, tmp_path):
    configs = [STACKED[name], name] if name in STACKED else [name]
    args = [a for c in configs for a in ("--config", c)]
    cli = VistokCLI([*args, "--config", "presets/cpu_small.yaml", "--run_dir", str(tmp_path)])
    model = cli.model
    res = model.tokenizer.resolution
    images = torch.rand(2, 3, res, res) * 2 - 1
    with torch.no_grad():
        recon, q = model.tokenizer(images)
    assert recon.shape == images.shape and torch.isfinite(recon).all()
    assert torch.isfinite(q.loss)
    if name in STACKED:
        assert model.perturbation is not None
