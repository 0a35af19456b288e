"""DiffusionModule: the tokenizer's code space picks the net, latent statistics come from the code
folder, and mismatched checkpoints are refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vistok.generators.binary_diffusion import BinaryDiffusion
from vistok.generators.diffusion import FlowMatching
from vistok.generators.diffusion_training import DiffusionModule
from vistok.tokenizers.binary import BinaryTokenizer
from vistok.tokenizers.gaussian import KLTokenizer

TINY = dict(resolution=32, channels=16, num_res_blocks=1, channel_mult=[1, 2, 2], num_mid_blocks=1)


def save(tok, path) -> str:
    state = {f"tokenizer.{k}": v for k, v in tok.state_dict().items()}
    torch.save({"hyper_parameters": {"tokenizer": tok.config}, "state_dict": state}, path)
    return str(path)


@pytest.fixture
def kl(tmp_path) -> str:
    torch.manual_seed(0)
    return save(KLTokenizer(latent_channels=4, **TINY), tmp_path / "kl.ckpt")


def attach(module: DiffusionModule, meta: dict) -> None:
    data = SimpleNamespace(meta=meta, root="latents", hparams={"train_split": "train"})
    strategy = SimpleNamespace(root_device=torch.device("cpu"))
    module._trainer = SimpleNamespace(datamodule=data, strategy=strategy)  # what setup() reads


def latent_meta(module: DiffusionModule, stats: dict | None) -> dict:
    split = {"num_classes": 2, **({"latent_stats": stats} if stats else {})}
    return {"tokenizer": module.identity, "token_shape": [8, 8], "splits": {"train": split}}


def test_code_space_picks_the_net_and_wrong_families_are_named(kl, tmp_path):
    module = DiffusionModule(kl, preset="tiny", num_classes=2)
    assert isinstance(module.net, FlowMatching) and module.net.token_shape == (8, 8)
    assert module.hparams.generator_config == module.net.config
    binary = save(BinaryTokenizer(bits=8, **TINY), tmp_path / "bits.ckpt")
    bits = DiffusionModule(binary, family="binary_diffusion", preset="tiny", num_classes=2)
    assert isinstance(bits.net, BinaryDiffusion) and bits.net.bits == 8
    with pytest.raises(ValueError, match="binary_diffusion.yaml"):
        DiffusionModule(binary, family="flow_matching", preset="tiny")
    with pytest.raises(ValueError, match="dit.yaml"):
        DiffusionModule(kl, family="binary_diffusion", preset="tiny")


def test_latent_statistics_are_copied_from_meta_once(kl):
    module = DiffusionModule(kl, preset="tiny", num_classes=2)
    attach(module, latent_meta(module, None))
    with pytest.raises(ValueError, match="no latent_stats"):
        module.setup("fit")
    stats = {"mean": [0.1, 0.2, 0.3, 0.4], "std": [1.0, 2.0, 3.0, 4.0], "count": 10}
    attach(module, latent_meta(module, stats))
    module.setup("fit")
    assert torch.equal(module.net.latent_std, torch.tensor(stats["std"]))
    attach(module, latent_meta(module, {**stats, "std": [9.0] * 4}))
    module.setup("fit")  # set once: later setups keep the statistics trained with
    assert torch.equal(module.net.latent_std, torch.tensor(stats["std"]))


def test_checkpoint_of_another_net_is_refused(kl):
    module = DiffusionModule(kl, preset="tiny", num_classes=2)
    other = DiffusionModule(kl, preset="tiny", num_classes=2, net={"patch_size": 1})
    with pytest.raises(ValueError, match="different net"):
        module.on_load_checkpoint({"hyper_parameters": dict(other.hparams)})
    module.on_load_checkpoint({"hyper_parameters": dict(module.hparams)})
