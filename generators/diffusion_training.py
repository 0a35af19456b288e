"""The LightningModule that trains the diffusion generators (flow matching, binary diffusion).

It is ``ARModule`` with another net: the tokenizer identity and code checks, the optimiser and
learning-rate schedule, the EMA (updated after every optimizer step, swapped in for validation
and sample grids) and the results protocol are inherited. What differs is which net the
tokenizer's code space gets (``family``), the per-channel latent statistics that flow matching
copies from the code folder's ``meta.json`` into its buffers before training (so they are saved
with the generator), and validation, which evaluates the loss at fixed seeded noise levels so
successive validations compare.

Defaults follow DiT (https://arxiv.org/abs/2212.09748): AdamW lr 1e-4, no weight decay, betas
(0.9, 0.999), EMA 0.9999.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric

from vistok.common.checkpoints import config_differences
from vistok.common.ema import EMA
from vistok.data.codes import read_tokenizer
from vistok.generators.ar_training import ARModule, check_codes_match
from vistok.generators.binary_diffusion import BinaryDiffusion
from vistok.generators.diffusion import DiffusionSampling, FlowMatching

_NOT_HPARAMS = ("self", "__class__", "tok", "identity", "families", "cls")


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


class DiffusionModule(ARModule):
    """Trains a ``FlowMatching`` or ``BinaryDiffusion`` net over the tokenizer's codes.

    Args:
        tokenizer: the tokenizer checkpoint (or exported folder) whose codes the data holds.
        family: ``flow_matching`` (continuous latents) or ``binary_diffusion`` (bits).
        preset: a name in ``DIT_PRESETS``; ``net`` overrides single fields of it.
        num_classes: class labels in the data (the null class is added on top).
        sample_images / sample_cfg / sample_steps: the grid written at each validation.
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
    ):
        pl.LightningModule.__init__(self)  # ARModule's __init__ would build a GPT
        families = {"flow_matching": FlowMatching, "binary_diffusion": BinaryDiffusion}
        if family not in families:
            raise ValueError(f"family must be one of {sorted(families)}, got {family!r}")
        tok, identity = read_tokenizer(tokenizer, tokenizer_ema)
        cls = families[family]
        self.net = cls(
            code_space=tok.code_space.to_dict(),
            token_shape=list(tok.token_shape),
            num_classes=num_classes,
            preset=preset,
            **dict(net or {}),
        )
        hparams = {k: v for k, v in locals().items() if k not in _NOT_HPARAMS}
        hparams.update(
            net=dict(net or {}), generator_config=self.net.config, tokenizer_identity=identity
        )
        self.save_hyperparameters(hparams)
        self.identity = identity
        self._tokenizer = [tok]  # a list keeps it out of the module tree (state dict, .to())
        self.ema = EMA(self.net, ema_decay) if ema_decay else None
        self.val_loss = MeanMetric()

    @property
    def gpt(self):
        """The net, under the name ``ARModule``'s inherited parts use for it."""
        return self.net

    # --- consistency checks ----------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self.trainer else None
        meta = getattr(datamodule, "meta", None)
        if not meta:
            return
        check_codes_match(meta, self.identity, self.net)
        if isinstance(self.net, FlowMatching) and not bool(self.net.has_stats):
            split = getattr(datamodule, "hparams", {}).get("train_split", "train")
            stats = meta["splits"].get(split, {}).get("latent_stats")
            if stats is None:
                raise ValueError(
                    f"{datamodule.root}/meta.json has no latent_stats for split {split!r}: "
                    "extract the codes again with this version of vistok.data.extract_codes"
                )
            self.net.set_latent_stats(stats["mean"], stats["std"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        hp = checkpoint.get("hyper_parameters", {})
        found = hp.get("tokenizer_identity", {}).get("sha256")
        if found != self.identity["sha256"]:
            raise ValueError(
                f"this checkpoint was trained on codes of tokenizer sha256 {str(found)[:12]}, "
                f"but {self.identity['path']} has sha256 {self.identity['sha256'][:12]}"
            )
        diffs = config_differences(self.net.config, hp.get("generator_config"))
        if diffs:
            raise ValueError("the checkpoint holds a different net:\n  " + "\n  ".join(diffs[:20]))

    # --- validation --------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # The same noise levels and noise at every validation: the numbers compare.
        codes = batch["codes"]
        gen = torch.Generator(codes.device).manual_seed(batch_idx)
        loss, stats = self.net.loss(codes, batch["label"], generator=gen)
        n = codes.shape[0]
        self.val_loss.update(loss, n)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, batch_size=n)
        self.log_dict({f"val/{k}": v for k, v in stats.items()}, batch_size=n)

    @torch.no_grad()
    def sample_images(self, n: int, seed: int = 0) -> torch.Tensor:
        """n images (n, 3, H, W) in [-1, 1] for classes 0, 1, ... with the grid's CFG scale."""
        device, classes = self.net.net.pos.device, self.net.num_classes
        if classes:
            labels, cfg = torch.arange(n, device=device) % classes, self.hparams.sample_cfg
        else:
            labels, cfg = torch.full((n,), -1, device=device), 1.0
        gen = torch.Generator(device).manual_seed(seed)
        config = DiffusionSampling(steps=self.hparams.sample_steps, cfg_scale=cfg)
        was_training = self.net.training
        self.net.eval()
        try:
            codes = self.net.generate(labels, config, gen)
        finally:
            self.net.train(was_training)
        tokenizer = self._tokenizer[0].to(device)
        return tokenizer.detokenize(codes).float().clamp(-1, 1)
