"""One LightningModule that trains any tokenizer.

Manual optimization with a generator (tokenizer) and a discriminator optimizer. Only the generator
optimizer goes through Lightning's wrapper, so ``global_step`` counts generator steps: with two
wrapped optimizers Lightning counts both (Lightning #17958) and "discriminator starts at step N"
would silently mean N/2. fp16 loss scaling is therefore not supported; use bf16-mixed or 32.

Each step takes ONE backward, over the generator loss plus the discriminator loss. Under DDP
without ``find_unused_parameters`` (which costs a traversal of the autograd graph every backward),
each ``manual_backward`` must give every trainable parameter a gradient; a generator backward and
then a discriminator backward would each leave the other net out. The sum has exactly the
gradients of the two separate backwards: the generator loss runs the discriminator on detached
parameters and the discriminator loss takes a detached reconstruction. Before ``disc_start`` the
discriminator loss is a zero that still reaches each discriminator parameter (zero gradients;
the discriminator does not run) and the discriminator's optimizer and schedule do not step.

Stages:
- ``main``: everything trains.
- ``generative_decoder``: WeTok stage 2. Encoder, projection and quantizer are frozen; the decoder
  (with noise input) is initialised from the stage-1 checkpoint given as ``init_from``.
- ``post_train``: decoder post-training against a generator (RobusTok). Batches carry generated
  code maps (``codes``, from ``vistok.data.pairs.PairDataModule``) and the real images they were
  regenerated from; the decoder learns to map the codes (through the frozen quantizer's
  ``codes_to_latents``) to the real image, without perturbation. The tokenizer is built from and
  initialised by ``init_from`` (EMA weights by default, ``init_ema``); encoder, projection and
  quantizer stay frozen, which is verified by hashing them (``vistok.tokenizers.checkpoint``) at
  the start, at every checkpoint and at the end; checkpoints record the source tokenizer.
- ``decoder_finetune``: MAETok stage 2. The pixel decoder is fine-tuned with masking off and the
  encoder, projection and (identity) quantizer frozen, from the tokenizer in ``init_from`` (EMA
  weights by default). The frozen parts are hash-checked like in ``post_train`` and the checkpoint
  records its source, so generators trained on the stage-1 latents accept the fine-tuned decoder.

Mask modeling (MAETok): with a tokenizer whose encoder masks (``masks_patches``), stage ``main``
draws one patch mask per batch, encodes with it, and, when ``mask_modeling`` is given, adds the
auxiliary feature losses on exactly those masked patches. The auxiliary decoders belong to this
module (``mask_modeling.*`` in checkpoints), never to the tokenizer, so they are not exported.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor

from vistok.common.checkpoints import config_differences
from vistok.common.configurable import instantiate
from vistok.common.ema import EMA, restore_ema, save_ema
from vistok.common.images import publish_grid
from vistok.common.schedule import warmup_cosine
from vistok.common.speed import (
    SpeedOptions,
    compile_modules,
    fused_available,
    resolve,
    to_channels_last,
)
from vistok.losses.tokenizer_loss import TokenizerLoss
from vistok.tokenizers.checkpoint import (
    FROZEN_IN_STAGE,
    SOURCE_KEY,
    load_tokenizer_weights,
    verify_codes_unchanged,
)
from vistok.tokenizers.mask_modeling import MaskModeling
from vistok.tokenizers.perturbation import LatentPerturbation
from vistok.tokenizers.posttrain import load_source, source_config
from vistok.tokenizers.tokenizer import Tokenizer

Stage = Literal["main", "generative_decoder", "post_train", "decoder_finetune"]
# Stages that start from a trained tokenizer and must keep its codes: lineage and hash checks.
KEEPS_CODES = ("post_train", "decoder_finetune")


class TokenizerModule(pl.LightningModule):
    def __init__(
        self,
        tokenizer: Tokenizer | None = None,
        loss: TokenizerLoss | None = None,
        perturbation: LatentPerturbation | None = None,
        mask_modeling: MaskModeling | None = None,
        stage: Stage = "main",
        init_from: str | None = None,
        lr: float = 1e-4,
        disc_lr: float | None = None,
        betas: tuple[float, float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        min_lr_ratio: float = 0.1,
        grad_clip: float | None = 1.0,
        ema_decay: float | None = None,
        grid_images: int = 8,
        init_ema: bool = True,
        speed: SpeedOptions | None = None,
    ):
        super().__init__()
        # Checkpoints carry configs, not pickled objects: load_from_checkpoint rebuilds from them.
        if tokenizer is None:  # post-training names its tokenizer by checkpoint only
            if stage not in KEEPS_CODES or not init_from:
                raise ValueError(
                    "no tokenizer given (stages post_train and decoder_finetune read it from "
                    "init_from)"
                )
            tokenizer = source_config(init_from)
        tokenizer = instantiate(tokenizer) if isinstance(tokenizer, dict) else tokenizer
        if loss is None:
            raise ValueError("no loss given: set model.init_args.loss (see configs/tokenizer/)")
        if stage == "post_train" and perturbation is not None:
            raise ValueError("post-training decodes generated codes as they are: no perturbation")
        loss = instantiate(loss) if isinstance(loss, dict) else loss
        if isinstance(perturbation, dict):
            perturbation = instantiate(perturbation)
        if isinstance(mask_modeling, dict):
            mask_modeling = instantiate(mask_modeling)
        if mask_modeling is not None and stage != "main":
            raise ValueError(
                f"mask modeling trains the encoder, which stage {stage!r} freezes: set "
                "model.init_args.mask_modeling to null"
            )
        if perturbation is not None and tokenizer.code_space.kind == "continuous":
            raise ValueError("latent perturbation needs discrete codes; this tokenizer has none")
        hparams = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        hparams.update(tokenizer=tokenizer.config, loss=loss.config, init_from=None)
        hparams["perturbation"] = perturbation.config if perturbation is not None else None
        hparams["mask_modeling"] = mask_modeling.config if mask_modeling is not None else None
        self.save_hyperparameters(hparams)
        self.automatic_optimization = False

        self.tokenizer, self.loss, self.perturbation = tokenizer, loss, perturbation
        self.mask_modeling = mask_modeling.bind(tokenizer) if mask_modeling is not None else None
        self.stage = stage
        self.source = None  # KEEPS_CODES stages: identity of the tokenizer whose codes they keep
        if init_from and stage in KEEPS_CODES:
            self.source = load_source(tokenizer, init_from, init_ema)
        elif init_from:
            load_tokenizer_weights(tokenizer, init_from, stage=stage)
        for name in FROZEN_IN_STAGE[stage]:
            getattr(tokenizer, name).requires_grad_(False)
        self.ema = EMA(tokenizer, ema_decay) if ema_decay else None
        self._grid: list[Tensor] | None = None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before any weight is copied: a checkpoint of another model is refused whole.
        found = checkpoint.get("hyper_parameters", {}).get("tokenizer")
        diffs = config_differences(self.tokenizer.config, found)
        if diffs:
            raise ValueError(
                "the checkpoint was trained with a different tokenizer configuration:\n  "
                + "\n  ".join(diffs[:20])
            )
        source = checkpoint.get(SOURCE_KEY)
        same = ("sha256", "ema", "code_hash")
        if self.source and source and any(source[k] != self.source[k] for k in same):
            raise ValueError(
                f"the checkpoint post-trains tokenizer {source.get('path')}, not "
                f"{self.source.get('path')} given as init_from"
            )
        self.source = source or self.source
        restore_ema(self.ema, checkpoint)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_ema(self.ema, checkpoint)
        if self.source is not None:
            verify_codes_unchanged(self.tokenizer, self.source, f"step {self.global_step}")
            checkpoint[SOURCE_KEY] = self.source

    # --- training ----------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        for name in FROZEN_IN_STAGE[
            self.stage
        ]:  # frozen parts stay deterministic (no EMA codebook)
            getattr(self.tokenizer, name).eval()
        return self

    def setup(self, stage: str) -> None:
        # Speed switches (common.speed), decided for the device the trainer runs on.
        device = self.trainer.strategy.root_device if self.trainer else self.device
        self.speed = resolve(self.hparams.get("speed"), device)
        disc = getattr(self.loss, "discriminator", None)
        if self.speed["channels_last"]:
            to_channels_last(self.tokenizer, disc)
        if self.speed["compile"] and stage == "fit":
            compile_modules(self.tokenizer.encoder, self.tokenizer.decoder, disc)

    def on_fit_start(self) -> None:
        if self.loss.has_discriminator and "16-mixed" == str(self.trainer.precision):
            raise ValueError(
                "GAN training does not support fp16 loss scaling; set trainer.precision to "
                "'bf16-mixed' or '32-true'"
            )
        if self.stage in KEEPS_CODES:
            if self.source is None:
                raise ValueError(
                    f"stage {self.stage} starts from a trained tokenizer: set "
                    "--model.init_from <ckpt>"
                )
            if self.stage == "post_train":
                self._check_post_training_data()
            verify_codes_unchanged(self.tokenizer, self.source, f"start of {self.stage}")

    def on_train_end(self) -> None:
        if self.source is not None:
            verify_codes_unchanged(self.tokenizer, self.source, f"end of {self.stage}")

    def _check_post_training_data(self) -> None:
        made_with = getattr(self.trainer.datamodule, "tokenizer_identity", None)
        if made_with is None:
            raise ValueError(
                "stage post_train trains on generated code maps: use "
                "vistok.data.pairs.PairDataModule (--data.pairs <folder>)"
            )
        src = self.source
        if (made_with.get("sha256"), bool(made_with.get("ema"))) != (src["sha256"], src["ema"]):
            raise ValueError(
                f"the pairs were made with tokenizer {made_with.get('path')} (sha256 "
                f"{str(made_with.get('sha256'))[:12]}, ema={made_with.get('ema')}), but "
                f"post-training starts from {src['path']} (sha256 {src['sha256'][:12]}, "
                f"ema={src['ema']}): pass that checkpoint as --model.init_from (and "
                "--model.init_ema to match)"
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        step = self.global_step  # generator steps only (see module docstring)
        images, recon, g_loss, logs = self._generator_loss(batch, step)
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        scheds = self.lr_schedulers()
        scheds = scheds if isinstance(scheds, list) else [scheds]
        # One backward over both nets' losses (see module docstring): the generator loss does not
        # reach the discriminator's parameters and the discriminator loss sees a detached
        # reconstruction, so each net gets exactly the gradient of its own loss.
        loss, gan = g_loss, self.loss.gan_active(step)
        if self.loss.has_discriminator:
            d_loss, d_logs = self.loss.discriminator_loss(images, recon.detach(), step)
            loss = loss + d_loss  # before disc_start: a zero reaching every D parameter
            if gan:
                logs.update(d_logs)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self._clip(opts[0])
        opts[0].step()
        scheds[0].step()
        if self.ema is not None:
            self.ema.update()
        if gan:  # the discriminator's optimizer and schedule move from disc_start on only
            self._clip(opts[1])
            opts[1].optimizer.step()  # unwrapped on purpose: keeps global_step = generator steps
            scheds[1].step()
        logs.pop("loss", None)
        self.log_dict({f"train/{k}": torch.as_tensor(v).float() for k, v in logs.items()})
        self.log("train/loss", g_loss.detach(), prog_bar=True)

    def _generator_loss(
        self, batch: dict[str, Any], step: int
    ) -> tuple[Tensor, Tensor, Tensor, dict]:
        """The tokenizer's side of a training step: the images (B, 3, H, W) in [-1, 1], their
        reconstruction, the generator loss and the logs."""
        images = batch["image"]  # (B, 3, H, W) in [-1, 1]
        if getattr(self, "speed", {}).get("channels_last"):
            images = images.contiguous(memory_format=torch.channels_last)
        tok = self.tokenizer
        aux_loss = 0.0
        if self.stage == "post_train":
            # Generated codes through the frozen quantizer; the target is the real image.
            quantized = tok.quantizer.codes_to_latents(batch["codes"])  # (B, C, h, w)
            quant_loss, logs = 0.0, {}
        else:
            mask = None  # MAETok: one random patch mask per batch, main stage only
            if self.stage == "main" and getattr(tok, "masks_patches", False):
                mask = tok.sample_patch_mask(images.shape[0], device=images.device)  # (B, N)
                latents = tok.pre_quant(images, patch_mask=mask)  # (B, C_q, K)
            else:
                latents = tok.pre_quant(images)  # (B, C_q, h, w)
            q = tok.quantizer(latents)
            quantized, quant_loss = q.quantized, q.loss
            logs = {f"quant/{k}": v for k, v in q.stats.items()}
            if self.mask_modeling is not None and mask is not None:
                aux_loss, aux_logs = self.mask_modeling(images, quantized, mask)
                logs.update({f"mask/{k}": v for k, v in aux_logs.items()})
            if self.perturbation is not None:  # after the quantizer losses, before the decoder
                quantized, p_logs = self.perturbation(
                    tok.quantizer, q, latents, step, self.current_epoch, self.global_rank
                )
                logs.update(p_logs)
        recon = tok.decode(quantized)
        g_loss, g_logs = self.loss.generator_loss(images, recon, quant_loss, step, tok.last_layer)
        g_loss = g_loss + aux_loss  # MAETok's auxiliary feature losses (0 without them)
        logs.update(g_logs)
        if not torch.isfinite(g_loss):
            raise FloatingPointError(f"non-finite generator loss at step {step}: {logs}")
        return images, recon, g_loss, logs

    def _clip(self, optimizer) -> None:
        if self.hparams.grad_clip:
            self.clip_gradients(optimizer, self.hparams.grad_clip, "norm")

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.tokenizer.parameters() if p.requires_grad]
        if self.mask_modeling is not None:  # the auxiliary decoders train with the tokenizer
            params += [p for p in self.mask_modeling.parameters() if p.requires_grad]
        speed = getattr(self, "speed", None) or resolve(hp.get("speed"), self.device)
        fused = speed["fused_optimizer"] and fused_available(params)
        opt_g = torch.optim.Adam(
            params, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay, fused=fused
        )
        optimizers = [opt_g]
        if self.loss.has_discriminator:
            d_params = list(self.loss.discriminator.parameters())
            optimizers.append(
                torch.optim.Adam(d_params, lr=hp.disc_lr or hp.lr, betas=tuple(hp.betas))
            )
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 0
        schedulers = [
            torch.optim.lr_scheduler.LambdaLR(o, self._lr_factor(total)) for o in optimizers
        ]
        return optimizers, schedulers

    def _lr_factor(self, total_steps: int):
        hp = self.hparams
        return warmup_cosine(hp.warmup_steps, total_steps, hp.lr_schedule, hp.min_lr_ratio)

    # --- validation --------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        if self.ema is not None:
            self.ema.swap()  # validate the averaged weights; swapped back at epoch end

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = batch["image"]
        recon, q = self.tokenizer(images)
        recon = recon.float().clamp(-1, 1)
        err = recon - images.float()
        mse = err.pow(2).flatten(1).mean(1)  # (B,)
        # Baseline a tokenizer must beat: every pixel replaced by its image's mean colour.
        mean_color = images.float().mean(dim=(2, 3), keepdim=True)
        metrics = {
            "val/l1": err.abs().mean(),
            "val/mse": mse.mean(),
            "val/psnr": (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean(),
            "val/baseline_l1": (images.float() - mean_color).abs().mean(),
        }
        metrics.update({f"val/quant_{k}": v.float() for k, v in q.stats.items()})
        generated = None
        if "codes" in batch:  # post-training pairs: decode the generated codes too
            latents = self.tokenizer.quantizer.codes_to_latents(batch["codes"])
            generated = self.tokenizer.decode(latents).float().clamp(-1, 1)
            gen_mse = (generated - images.float()).pow(2).flatten(1).mean(1)  # (B,)
            metrics["val/generated_mse"] = gen_mse.mean()
            gen_psnr = 10 * torch.log10(4.0 / gen_mse.clamp_min(1e-10))
            metrics["val/generated_psnr"] = gen_psnr.mean()
        self.log_dict(metrics, sync_dist=True, batch_size=images.shape[0])
        if batch_idx == 0:
            n = self.hparams.grid_images
            self._grid = [images[:n], recon[:n]]
            if generated is not None:
                self._grid.append(generated[:n])

    def on_validation_epoch_end(self) -> None:
        if self.ema is not None:
            self.ema.swap()
        if self._grid is None or self.trainer.sanity_checking:
            return
        if self.trainer.is_global_zero:  # (trainer.log_dir would be a collective call)
            labels = ["original", "reconstruction", "generated codes"][: len(self._grid)]
            publish_grid(self.trainer, "recon", self._grid, labels)
        self._grid = None

    @property
    def protocol(self) -> dict[str, Any]:
        """What results.json records next to the numbers."""
        p = self.perturbation
        return {"stage": self.stage, "perturbation": p.config["init_args"] if p else None}

    # --- inference helpers ---------------------------------------------------------------------
    def averaged(self):
        """Context in which the tokenizer carries its EMA weights (no-op without EMA)."""
        return self.ema.swapped() if self.ema is not None else nullcontext()
