"""The LightningModule that trains the diffusion generators (flow matching, binary diffusion).

The tokenizer identity and code checks, the optimiser and learning-rate schedule, the EMA
(updated after every optimizer step, swapped in for validation and sample grids), the speed
switches and the results protocol are ``GeneratorModule``'s, shared with the AR module. What
differs: which net the tokenizer's code space gets (``family``), the per-channel latent
statistics that flow matching copies from the code folder's ``meta.json`` into its buffers
before training (so they are saved with the generator), and validation, which evaluates the loss
at fixed seeded noise levels so successive validations compare.

Defaults follow DiT (https://arxiv.org/abs/2212.09748): AdamW lr 1e-4, no weight decay, betas
(0.9, 0.999), EMA 0.9999.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

import torch
from torchmetrics import MeanMetric

from vistok.common.speed import SpeedOptions
from vistok.generators.binary_diffusion import BinaryDiffusion
from vistok.generators.diffusion import DiffusionSampling, FlowMatching
from vistok.generators.training import GeneratorModule

FAMILIES = {"flow_matching": FlowMatching, "binary_diffusion": BinaryDiffusion}


class DiTOptions(TypedDict, total=False):
    """Overrides of the DiT preset and objective (see ``FlowMatching`` / ``BinaryDiffusion``)."""

    patch_size: int
    depth: int
    dim: int
    heads: int
    mlp_ratio: float
    label_dropout: float
    qk_norm: bool
    logit_mean: float  # flow matching only
    logit_std: float  # flow matching only
    schedule: Literal["linear", "cosine"]  # binary diffusion only


class DiffusionModule(GeneratorModule):
    """Trains a ``FlowMatching`` or ``BinaryDiffusion`` net over the tokenizer's codes.

    Args:
        tokenizer: the tokenizer checkpoint (or exported folder) whose codes the data holds.
        family: ``flow_matching`` (continuous latents) or ``binary_diffusion`` (bits).
        preset: a name in ``DIT_PRESETS``; ``net`` overrides single fields of it.
        num_classes: class labels in the data (the null class is added on top).
        sample_images / sample_cfg / sample_steps: the grid written at each validation.
        speed: compile / fused optimizer (``common.speed``); unset switches take the
            accelerator's default.
    """

    def __init__(
        self,
        tokenizer: str,
        family: Literal["flow_matching", "binary_diffusion"] = "flow_matching",
        preset: str = "B",
        num_classes: int = 1000,
        net: DiTOptions | None = None,
        tokenizer_ema: bool = True,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        min_lr_ratio: float = 0.1,
        ema_decay: float | None = 0.9999,
        sample_images: int = 8,
        sample_cfg: float = 1.5,
        sample_steps: int = 50,
        speed: SpeedOptions | None = None,
    ):
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
        super().__init__(tokenizer, tokenizer_ema)
        tok, options = self._tokenizer[0], dict(net or {})
        self.net = FAMILIES[family](
            code_space=tok.code_space.to_dict(),
            token_shape=list(tok.token_shape),
            num_classes=num_classes,
            preset=preset,
            **options,
        )
        self.finish_init(locals(), ema_decay, net=options)
        self.val_loss = MeanMetric()

    def prepare_from_data(self, datamodule, meta: dict) -> None:
        # Flow matching normalises latents per channel with the statistics extraction wrote;
        # copied once into buffers, so checkpoints and exports carry them.
        if not isinstance(self.net, FlowMatching) or bool(self.net.has_stats):
            return
        split = getattr(datamodule, "hparams", {}).get("train_split", "train")
        stats = meta["splits"].get(split, {}).get("latent_stats")
        if stats is None:
            raise ValueError(
                f"{datamodule.root}/meta.json has no latent_stats for split {split!r}: "
                "extract the codes again with this version of vistok.data.extract_codes"
            )
        self.net.set_latent_stats(stats["mean"], stats["std"])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # The same noise levels and noise at every validation: the numbers compare.
        codes = batch["codes"]
        gen = torch.Generator(codes.device).manual_seed(batch_idx)
        loss, stats = self.net.loss(codes, batch["label"], generator=gen)
        n = codes.shape[0]
        self.val_loss.update(loss, n)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, batch_size=n)
        self.log_dict({f"val/{k}": v for k, v in stats.items()}, batch_size=n)

    def sample_codes(self, labels: torch.Tensor, cfg: float, gen: torch.Generator):
        config = DiffusionSampling(steps=self.hparams.sample_steps, cfg_scale=cfg)
        return self.net.generate(labels, config, gen)
