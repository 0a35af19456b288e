"""diffusers AutoencoderKL folders converted to vistok compute what diffusers computes."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

import vistok
from vistok.convert.__main__ import main


def tiny_vae(folder, sd_style: bool) -> AutoencoderKL:
    """A random AutoencoderKL: SD-style (4 channels, quant convs) or FLUX-style (16, none)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4 if sd_style else 16,
        use_quant_conv=sd_style,
        use_post_quant_conv=sd_style,
        scaling_factor=0.18215 if sd_style else 0.3611,
        shift_factor=None if sd_style else 0.1159,
        sample_size=32,
    ).eval()
    vae.save_pretrained(folder)
    return vae


@pytest.mark.parametrize("sd_style", [True, False])
def test_matches_diffusers(tmp_path, sd_style):
    vae = tiny_vae(tmp_path / "vae", sd_style)
    main(["diffusers-vae", str(tmp_path / "vae"), "--out", str(tmp_path / "out")])
    tok = vistok.load_tokenizer(str(tmp_path / "out"))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
        latents = tok.tokenize(images)
        torch.testing.assert_close(latents, mean, rtol=0, atol=1e-4)
        torch.testing.assert_close(tok.decode(mean), vae.decode(mean).sample, rtol=0, atol=1e-4)
        torch.testing.assert_close(tok.detokenize(latents), vae(images).sample, rtol=0, atol=1e-4)
    assert tok.code_space.kind == "continuous"
    assert tok.code_space.channels == vae.config.latent_channels
    assert tok.token_shape == (16, 16)  # sample_size 32, f2
    # Scaling is diffusers' convention, applied only on request, and it round-trips.
    scaled = tok.to_diffusers_latents(mean)
    shift = vae.config.shift_factor or 0.0
    torch.testing.assert_close(scaled, (mean - shift) * vae.config.scaling_factor)
    torch.testing.assert_close(tok.from_diffusers_latents(scaled), mean)
    info = json.loads((tmp_path / "out" / "config.json").read_text())["info"]
    assert info["scaling_factor"] == vae.config.scaling_factor


def test_pre_0_14_attention_names_are_renamed(tmp_path):
    """Early diffusers VAE files (e.g. sd-vae-ft-mse) name the attention query/key/value."""
    vae = tiny_vae(tmp_path / "vae", sd_style=True)
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = load_file(str(path))
    for new, before in old.items():
        for k in [k for k in state if f".{new}." in k]:
            state[k.replace(f".{new}.", f".{before}.")] = state.pop(k)
    save_file(state, str(path))
    main(["diffusers-vae", str(tmp_path / "vae"), "--out", str(tmp_path / "out")])
    tok = vistok.load_tokenizer(str(tmp_path / "out"))
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(tok.detokenize(tok.tokenize(images)), vae(images).sample,
                                   rtol=0, atol=1e-4)  # fmt: skip


def test_bad_folders_are_refused(tmp_path, capsys):
    tiny_vae(tmp_path / "vae", sd_style=True)
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(SystemExit, match="truncated or corrupt"):
        main(["diffusers-vae", str(tmp_path / "vae"), "--out", str(tmp_path / "out")])
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    cfg["_class_name"] = "AutoencoderTiny"
    (tmp_path / "vae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match="not an AutoencoderKL"):
        main(["diffusers-vae", str(tmp_path / "vae"), "--out", str(tmp_path / "out")])
