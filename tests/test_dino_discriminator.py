"""RobusTok's DINO discriminator: local weights load strictly, only the heads train."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from vistok.common.configurable import instantiate
from vistok.losses.dino_discriminator import DINODiscriminator

ARCH = dict(arch="vit_tiny_patch16_224", layers=[0, 1], img_size=32, head_width=16)


@pytest.fixture
def weights(tmp_path):
    """A random ViT saved as a user's DINO weight file would be (no download here)."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path, vit


def test_weights_load_and_only_heads_learn(weights):
    path, vit = weights
    disc = DINODiscriminator(weights=str(path), **ARCH).train()
    assert not disc.backbone.training
    for k, v in vit.state_dict().items():
        assert torch.equal(disc.backbone.state_dict()[k], v), k
    logits = disc(torch.rand(2, 3, 48, 48) * 2 - 1)
    assert logits.shape == (2, 1, 2 * 4)  # 2 layers x (32/16)^2 patch tokens
    logits.square().mean().backward()
    trained = {n for n, p in disc.named_parameters() if p.grad is not None}
    assert trained == {n for n, _ in disc.heads.named_parameters(prefix="heads")}
    rebuilt = instantiate(disc.config)  # the config names the weight file, not the tensors
    assert torch.equal(rebuilt.backbone.pos_embed, disc.backbone.pos_embed)


def test_weights_of_another_architecture_are_refused(weights):
    path, _ = weights
    with pytest.raises(ValueError, match="does not fit"):
        DINODiscriminator(weights=str(path), **{**ARCH, "arch": "vit_small_patch16_224"})
