"""The LightningModule that trains the AR generator on pre-extracted codes.

The generator config names a tokenizer checkpoint and never repeats its architecture: the code
space and token shape are read from it, and its identity (path + SHA-256, EMA or not) goes into
the generator's checkpoint so that ``sample.py`` can refuse a mismatched pair. The tokenizer is
kept frozen and outside this module's state (generator checkpoints hold no tokenizer weights);
it only decodes the sample grids written at each validation.

Optimisation follows LlamaGen (https://arxiv.org/abs/2406.06525): AdamW lr 1e-4, weight decay
0.05 on matrices and embeddings only, betas (0.9, 0.95), gradient clipping 1.0 (set on the
trainer: ``gradient_clip_val``), optional warmup, cosine decay and EMA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypedDict

import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric

from vistok.common.checkpoints import config_differences
from vistok.common.ema import EMA
from vistok.common.images import save_grid
from vistok.common.schedule import warmup_cosine
from vistok.common.speed import SpeedOptions, compile_modules, fused_available, resolve
from vistok.data.codes import read_tokenizer
from vistok.generators.ar import GPT
from vistok.generators.sampling import SamplingConfig, generate

_NOT_HPARAMS = ("self", "__class__", "tok", "identity")


class GPTOptions(TypedDict, total=False):
    """Overrides of the GPT preset (see ``vistok.generators.ar.GPT``)."""

    depth: int
    dim: int
    heads: int
    head_layers: int
    dropout: float
    token_dropout: float
    label_dropout: float
    multiple_of: int
    rope_base: float


class ARModule(pl.LightningModule):
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
        super().__init__()
        tok, identity = read_tokenizer(tokenizer, tokenizer_ema)
        self.gpt = GPT(
            code_space=tok.code_space.to_dict(),
            token_shape=list(tok.token_shape),
            num_classes=num_classes,
            preset=preset,
            **dict(gpt or {}),
        )
        hparams = {k: v for k, v in locals().items() if k not in _NOT_HPARAMS}
        hparams.update(gpt=dict(gpt or {}), gpt_config=self.gpt.config, tokenizer_identity=identity)
        self.save_hyperparameters(hparams)
        self.identity = identity
        self._tokenizer = [tok]  # a list keeps it out of the module tree (state dict, .to())
        self.ema = EMA(self.gpt, ema_decay) if ema_decay else None
        self.val_loss, self.val_nll, self.val_acc = MeanMetric(), MeanMetric(), MeanMetric()

    # --- consistency checks ----------------------------------------------------------------
    def setup(self, stage: str) -> None:
        meta = getattr(self.trainer.datamodule, "meta", None) if self.trainer else None
        if meta:
            check_codes_match(meta, self.identity, self.gpt)
        device = self.trainer.strategy.root_device if self.trainer else self.device
        self.speed = resolve(self.hparams.get("speed"), device)
        self.gpt.activation_checkpointing = self.speed["activation_checkpointing"]
        if self.speed["compile"] and stage == "fit":
            compile_modules(self.gpt)  # training calls gpt(...); sampling uses the eager parts

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        hp = checkpoint.get("hyper_parameters", {})
        found = hp.get("tokenizer_identity", {}).get("sha256")
        if found != self.identity["sha256"]:
            raise ValueError(
                f"this checkpoint was trained on codes of tokenizer sha256 {str(found)[:12]}, "
                f"but {self.identity['path']} has sha256 {self.identity['sha256'][:12]}"
            )
        diffs = config_differences(self.gpt.config, hp.get("gpt_config"))
        if diffs:
            raise ValueError("the checkpoint holds a different GPT:\n  " + "\n  ".join(diffs[:20]))

    # --- training ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, stats = self.gpt.loss(batch["codes"], batch["label"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in stats.items()})
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end, which runs after the checkpoint callback has
        # saved that step: a resumed run would miss one EMA update per checkpoint.
        if self.ema is not None:
            self.ema.update()

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.gpt.parameters() if p.requires_grad]
        # Norm gains and biases are not decayed (LlamaGen decays tensors with >= 2 dims).
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        speed = getattr(self, "speed", None) or resolve(hp.get("speed"), self.device)
        fused = speed["fused_optimizer"] and fused_available(params)
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), fused=fused)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 0
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor(total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _lr_factor(self, total_steps: int):
        hp = self.hparams
        return warmup_cosine(hp.warmup_steps, total_steps, hp.lr_schedule, hp.min_lr_ratio)

    # --- validation --------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        if self.ema is not None:
            self.ema.swap()  # validate and sample with the averaged weights

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, stats = self.gpt.loss(batch["codes"], batch["label"])
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

    def on_validation_epoch_end(self) -> None:
        try:
            trainer = self.trainer
            if (
                self.hparams.sample_images
                and not trainer.sanity_checking
                and trainer.is_global_zero
                and trainer.log_dir
            ):
                path = Path(trainer.log_dir) / "images" / f"samples_{self.global_step:07d}.png"
                save_grid([self.sample_images(self.hparams.sample_images)], path)
        finally:
            if self.ema is not None:
                self.ema.swap()

    @torch.no_grad()
    def sample_images(self, n: int, seed: int = 0) -> torch.Tensor:
        """n images (n, 3, H, W) in [-1, 1] for classes 0, 1, ... with the grid's CFG scale."""
        device, classes = self.gpt.norm.weight.device, self.gpt.num_classes
        if classes:
            labels, cfg = torch.arange(n, device=device) % classes, self.hparams.sample_cfg
        else:  # unconditional: the null class, nothing to guide towards
            labels, cfg = torch.full((n,), -1, device=device), 1.0
        gen = torch.Generator(device).manual_seed(seed)
        was_training = self.gpt.training
        self.gpt.eval()
        try:
            codes = generate(self.gpt, labels, SamplingConfig(cfg_scale=cfg), gen)
        finally:
            self.gpt.clear_cache()
            self.gpt.train(was_training)
        tokenizer = self._tokenizer[0].to(device)
        return tokenizer.detokenize(codes).float().clamp(-1, 1)

    @property
    def protocol(self) -> dict[str, Any]:
        """What results.json records next to the validation numbers."""
        return {"tokenizer": self.identity, "preset": self.hparams.preset}


def check_codes_match(meta: dict, identity: dict, gpt: GPT) -> None:
    """Refuse codes extracted with another tokenizer (or other weights of the same one)."""
    made_by = meta["tokenizer"]
    if made_by["sha256"] != identity["sha256"] or made_by.get("ema") != identity["ema"]:
        raise ValueError(
            f"the codes were extracted with tokenizer {made_by['path']} (sha256 "
            f"{made_by['sha256'][:12]}, ema={made_by.get('ema')}), but the generator is set up "
            f"for {identity['path']} (sha256 {identity['sha256'][:12]}, ema={identity['ema']})"
        )
    if list(meta["token_shape"]) != list(gpt.token_shape):
        raise ValueError(f"codes have token shape {meta['token_shape']}, GPT {gpt.token_shape}")
    labels = max(s.get("num_classes", 0) for s in meta["splits"].values())
    if labels > gpt.num_classes:
        raise ValueError(
            f"the codes carry {labels} classes but the GPT has num_classes={gpt.num_classes}: "
            f"set --model.init_args.num_classes {labels}"
        )
