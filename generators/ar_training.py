"""The LightningModule that trains the AR generator on pre-extracted codes.

Everything but the net and its validation metrics is shared with the diffusion generators
(``vistok.generators.training.GeneratorModule``: tokenizer identity, code checks, optimiser,
EMA, speed switches, sample grid). Optimisation follows LlamaGen
(https://arxiv.org/abs/2406.06525): AdamW lr 1e-4, weight decay 0.05 on matrices and embeddings
only, betas (0.9, 0.95), gradient clipping 1.0 (set on the trainer: ``gradient_clip_val``),
optional warmup, cosine decay and EMA.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

import torch
from torchmetrics import MeanMetric

from vistok.common.speed import SpeedOptions
from vistok.generators.ar import GPT
from vistok.generators.sampling import SamplingConfig, generate
from vistok.generators.training import GeneratorModule


class GPTOptions(TypedDict, total=False):
    """Overrides of the GPT preset (see ``vistok.generators.ar.GPT``)."""

    depth: int
    dim: int
    heads: int
    head_layers: int
    dropout: float
    attn_dropout: float
    token_dropout: float
    label_dropout: float
    multiple_of: int
    rope_base: float
    class_rope: str


class ARModule(GeneratorModule):
    """Trains a ``GPT`` over the codes of the tokenizer checkpoint ``tokenizer``.

    Args:
        tokenizer: the tokenizer training checkpoint whose codes the data holds.
        preset: a name in ``GPT_PRESETS``; ``gpt`` overrides single fields of it.
        num_classes: class labels in the data (the null class is added on top).
        tokenizer_ema: the codes were made with the tokenizer's EMA weights (when it has them).
        sample_images / sample_cfg: sample grid written at each validation (0 images = none).
        speed: compile / fused optimizer / activation checkpointing (``common.speed``); unset
            switches take the accelerator's default.
    """

    config_key = "gpt_config"

    def __init__(
        self,
        tokenizer: str,
        preset: str = "B",
        num_classes: int = 1000,
        gpt: GPTOptions | None = None,
        tokenizer_ema: bool = True,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        min_lr_ratio: float = 0.1,
        ema_decay: float | None = None,
        sample_images: int = 8,
        sample_cfg: float = 2.0,
        speed: SpeedOptions | None = None,
    ):
        super().__init__(tokenizer, tokenizer_ema)
        tok = self._tokenizer[0]
        self.net = GPT(
            code_space=tok.code_space.to_dict(),
            token_shape=list(tok.token_shape),
            num_classes=num_classes,
            preset=preset,
            **dict(gpt or {}),
        )
        self.finish_init(locals(), ema_decay, gpt=dict(gpt or {}))
        self.val_loss, self.val_nll, self.val_acc = MeanMetric(), MeanMetric(), MeanMetric()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, stats = self.net.loss(batch["codes"], batch["label"])
        n = batch["codes"].shape[0]
        self.val_loss.update(loss, n)
        self.val_nll.update(stats["nll_per_token"], n)
        self.val_acc.update(stats["accuracy"], n)
        # Metric objects: Lightning reduces them across ranks once, at the end of the epoch.
        metrics = {
            "val/loss": self.val_loss,
            "val/nll_per_token": self.val_nll,
            "val/accuracy": self.val_acc,
        }
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=n)

    def sample_codes(self, labels: torch.Tensor, cfg: float, gen: torch.Generator):
        try:
            return generate(self.net, labels, SamplingConfig(cfg_scale=cfg), gen)
        finally:
            self.net.clear_cache()
