"""What every generator's LightningModule shares (AR in ``ar_training``, diffusion in
``diffusion_training``): they differ only in the net they build and how they validate and sample.

The generator config names a tokenizer checkpoint and never repeats its architecture: the code
space and token shape are read from it, and its identity (path + SHA-256, EMA or not) goes into
the generator's checkpoint so that ``sample.py`` can refuse a mismatched pair. The tokenizer is
kept frozen and outside this module's state (generator checkpoints hold no tokenizer weights);
it only decodes the sample grids written at each validation. The net is ``self.net``; its config
is saved under the hyper-parameter ``config_key``.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import FSDPStrategy
from torch import nn

from vistok.common.checkpoints import config_differences
from vistok.common.ema import EMA, restore_ema, save_ema
from vistok.common.images import publish_grid
from vistok.common.schedule import warmup_cosine
from vistok.common.speed import compile_modules, fused_available, resolve
from vistok.generators.layers import Block
from vistok.tokenizers.checkpoint import read_tokenizer

_NOT_HPARAMS = ("self", "__class__", "tok", "identity", "net", "kwargs")


class GeneratorModule(pl.LightningModule):
    """Base: tokenizer identity, code checks, AdamW + warmup/cosine, EMA, speed switches, the
    sample grid and the results protocol. Subclasses build ``self.net`` in ``__init__`` (after
    ``super().__init__``), then call ``self.finish_init(hparams)``."""

    config_key = "generator_config"

    def __init__(self, tokenizer: str, tokenizer_ema: bool):
        super().__init__()
        tok, self.identity = read_tokenizer(tokenizer, tokenizer_ema)
        self._tokenizer = [tok]  # a list keeps it out of the module tree (state dict, .to())
        self.net: nn.Module

    def finish_init(self, args: dict[str, Any], ema_decay: float | None, **extra) -> None:
        """Save the constructor ``args`` (+ the net's config and the tokenizer identity) as
        hyper-parameters and set up the EMA of the net."""
        hparams = {k: v for k, v in args.items() if k not in _NOT_HPARAMS}
        hparams.update(extra, tokenizer_identity=self.identity)
        hparams[self.config_key] = self.net.config
        self.save_hyperparameters(hparams)
        self.ema = EMA(self.net, ema_decay) if ema_decay else None

    # --- consistency checks ----------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self.trainer else None
        meta = getattr(datamodule, "meta", None)
        if meta:
            check_codes_match(meta, self.identity, self.net)
            self.prepare_from_data(datamodule, meta)
        device = self.trainer.strategy.root_device if self.trainer else self.device
        self.speed = resolve(self.hparams.get("speed"), device)
        if hasattr(self.net, "activation_checkpointing"):
            self.net.activation_checkpointing = self.speed["activation_checkpointing"]
        if self.speed["compile"] and stage == "fit":
            compile_modules(self.net)  # training calls net(...); sampling uses the eager parts

    def prepare_from_data(self, datamodule, meta: dict) -> None:
        """Hook: take what the net needs from the code folder (e.g. latent statistics)."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        hp = checkpoint.get("hyper_parameters", {})
        found = hp.get("tokenizer_identity", {}).get("sha256")
        if found != self.identity["sha256"]:
            raise ValueError(
                f"this checkpoint was trained on codes of tokenizer sha256 {str(found)[:12]}, "
                f"but {self.identity['path']} has sha256 {self.identity['sha256'][:12]}"
            )
        diffs = config_differences(self.net.config, hp.get(self.config_key))
        if diffs:
            raise ValueError("the checkpoint holds a different net:\n  " + "\n  ".join(diffs[:20]))
        restore_ema(self.ema, checkpoint)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_ema(self.ema, checkpoint)

    # --- training ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, stats = self.net.loss(batch["codes"], batch["label"])
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
        params = [p for p in self.net.parameters() if p.requires_grad]
        speed = getattr(self, "speed", None) or resolve(hp.get("speed"), self.device)
        fused = speed["fused_optimizer"] and fused_available(params)
        groups = decay_groups(params, hp.weight_decay)
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), fused=fused)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 0
        factor = warmup_cosine(hp.warmup_steps, total, hp.lr_schedule, hp.min_lr_ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- validation --------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        if self.ema is not None:
            self.ema.swap()  # validate and sample with the averaged weights

    def on_validation_epoch_end(self) -> None:
        try:
            trainer = self.trainer
            if (
                self.hparams.sample_images
                and not trainer.sanity_checking
                and trainer.is_global_zero
            ):
                publish_grid(trainer, "samples", [self.sample_images(self.hparams.sample_images)])
        finally:
            if self.ema is not None:
                self.ema.swap()

    @torch.no_grad()
    def sample_images(self, n: int, seed: int = 0) -> torch.Tensor:
        """n images (n, 3, H, W) in [-1, 1] for classes 0, 1, ... with the grid's CFG scale."""
        device = next(self.net.parameters()).device
        if self.net.num_classes:
            labels = torch.arange(n, device=device) % self.net.num_classes
            cfg = self.hparams.sample_cfg
        else:  # unconditional: the null class, nothing to guide towards
            labels, cfg = torch.full((n,), -1, device=device), 1.0
        gen = torch.Generator(device).manual_seed(seed)
        was_training = self.net.training
        self.net.eval()
        try:
            codes = self.sample_codes(labels, cfg, gen)
        finally:
            self.net.train(was_training)
        tokenizer = self._tokenizer[0].to(device)
        return tokenizer.detokenize(codes).float().clamp(-1, 1)

    def sample_codes(self, labels: torch.Tensor, cfg: float, gen: torch.Generator):
        raise NotImplementedError

    @property
    def protocol(self) -> dict[str, Any]:
        """What results.json records next to the validation numbers."""
        return {"tokenizer": self.identity, "preset": self.hparams.preset}


def decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups: norm gains and biases are not decayed (LlamaGen decays tensors with
    >= 2 dims: matrices and embeddings)."""
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def check_codes_match(meta: dict, identity: dict, net: nn.Module) -> None:
    """Refuse codes extracted with another tokenizer (or other weights of the same one)."""
    made_by = meta["tokenizer"]
    if made_by["sha256"] != identity["sha256"] or made_by.get("ema") != identity["ema"]:
        raise ValueError(
            f"the codes were extracted with tokenizer {made_by['path']} (sha256 "
            f"{made_by['sha256'][:12]}, ema={made_by.get('ema')}), but the generator is set up "
            f"for {identity['path']} (sha256 {identity['sha256'][:12]}, ema={identity['ema']})"
        )
    if list(meta["token_shape"]) != list(net.token_shape):
        raise ValueError(f"codes have token shape {meta['token_shape']}, net {net.token_shape}")
    labels = max(s.get("num_classes", 0) for s in meta["splits"].values())
    if labels > net.num_classes:
        raise ValueError(
            f"the codes carry {labels} classes but the generator has "
            f"num_classes={net.num_classes}: set --model.init_args.num_classes {labels}"
        )


class GPTFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP with each transformer block (``generators.layers.Block``) as one shard
    unit, for the largest generators (GPT-XL/XXL): parameters, gradients and optimizer state are
    split over the ranks instead of replicated. ``use_orig_params`` keeps the parameter objects
    visible, which ``torch.compile`` and per-tensor weight decay groups need; full state dicts
    keep checkpoints loadable without FSDP (sampling, export)."""

    def __init__(
        self,
        sharding_strategy: str = "FULL_SHARD",
        state_dict_type: str = "full",
        cpu_offload: bool = False,
        **kwargs,
    ):
        super().__init__(
            auto_wrap_policy={Block},
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            cpu_offload=cpu_offload,
            use_orig_params=True,
            **kwargs,
        )
