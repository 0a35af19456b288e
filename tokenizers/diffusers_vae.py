"""Released diffusers VAEs (SD-VAE, SDXL-VAE, FLUX-VAE) as vistok KL tokenizers.

diffusers' own encoder/decoder are the nets (``nets/diffusers_vae.py``); ``quant_conv`` and
``post_quant_conv`` (1x1 convs) are the tokenizer's ``proj_in`` / ``proj_out`` (the same linear
map over channels), absent in FLUX/SD3-style VAEs; the posterior is vistok's
:class:`DiagonalGaussian` (same logvar clamp to [-30, 20] as diffusers). ``encode`` gives
``latent_dist.mean`` and ``decode`` takes what diffusers' ``decode`` takes.

Scaling: vistok's latents are the VAE's raw latents. diffusers pipelines feed a diffusion model
``(z - shift_factor) * scaling_factor`` and undo it before decoding; vistok's diffusion
generators instead normalise each channel by the statistics measured when latents are extracted
(``extract_codes`` -> ``latent_stats``), which subsumes both factors. The factors are kept
(``scaling_factor``, ``shift_factor``, recorded in config.json) and applied only by
:meth:`to_diffusers_latents` / :meth:`from_diffusers_latents`, for exchanging latents with
diffusers-trained models.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from typing_extensions import Unpack

from vistok.tokenizers.nets.diffusers_vae import DiffusersDecoder, DiffusersEncoder, VAESizes
from vistok.tokenizers.quantizers.gaussian import DiagonalGaussian
from vistok.tokenizers.tokenizer import Tokenizer, resolve_preset

_SD = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32)

# The released configs (config.json of each repository).
DIFFUSERS_VAE_PRESETS: dict[str, dict] = {
    # stabilityai/sd-vae-ft-ema and sd-vae-ft-mse
    "sd_vae": dict(
        _SD, latent_channels=4, scaling_factor=0.18215, shift_factor=None, use_quant_conv=True
    ),  # fmt: skip
    # stabilityai/sdxl-vae
    "sdxl_vae": dict(
        _SD, latent_channels=4, scaling_factor=0.13025, shift_factor=None, use_quant_conv=True
    ),  # fmt: skip
    # black-forest-labs/FLUX.1-dev vae/
    "flux_vae": dict(
        _SD, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False
    ),  # fmt: skip
}


class DiffusersKLArgs(VAESizes, total=False):
    """A released VAE's config values, each overridable (absent: the preset's)."""

    use_quant_conv: bool
    scaling_factor: float
    shift_factor: float | None


class DiffusersKL(Tokenizer):
    """A diffusers ``AutoencoderKL`` of DownEncoderBlock2D/UpDecoderBlock2D layout."""

    def __init__(
        self,
        preset: str = "sd_vae",
        resolution: int = 256,
        act_fn: str = "silu",
        mid_block_add_attention: bool = True,
        kl_weight: float = 1e-6,
        **sizes: Unpack[DiffusersKLArgs],
    ):
        cfg = resolve_preset(DIFFUSERS_VAE_PRESETS, preset, **sizes)
        nets = dict(
            {k: cfg[k] for k in VAESizes.__annotations__},
            act_fn=act_fn,
            mid_block_add_attention=mid_block_add_attention,
        )
        super().__init__(
            DiffusersEncoder(**nets),
            DiagonalGaussian(channels=cfg["latent_channels"], kl_weight=kl_weight),
            DiffusersDecoder(**nets),
            resolution,
            project=cfg["use_quant_conv"],
        )
        self.scaling_factor = cfg["scaling_factor"]
        self.shift_factor = cfg["shift_factor"] or 0.0

    def to_diffusers_latents(self, latents: Tensor) -> Tensor:
        """vistok (raw) latents -> the scaled latents diffusers' diffusion models take."""
        return (latents - self.shift_factor) * self.scaling_factor

    def from_diffusers_latents(self, latents: Tensor) -> Tensor:
        return latents / self.scaling_factor + self.shift_factor

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
        }
