"""The GAN tokenizer step takes one backward over the generator and discriminator losses.

- It updates both nets bit for bit as the two-backward step did (generator backward and step, then
  discriminator backward and step), before and after ``disc_start``: weights, BatchNorm and LeCAM
  buffers, EMA and both optimizers' states.
- Every trainable parameter gets a gradient in every step, before and after ``disc_start``, for
  every tokenizer config and training stage: DDP without ``find_unused_parameters`` needs that
  (the 2-process runs are in tests/test_ddp.py).
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from helpers import ROOT
from test_ar_cli import TINY_VQ
from test_resume_cli import same_tree
from torch import Tensor
from torch.utils.data import DataLoader

from vistok.common.cli import VistokCLI
from vistok.losses.adversarial import PatchDiscriminator
from vistok.losses.dino_discriminator import DINODiscriminator
from vistok.losses.tokenizer_loss import TokenizerLoss
from vistok.tokenizers.training import TokenizerModule
from vistok.tokenizers.vq import VQTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = sorted(
    str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs" / "tokenizer").glob("*.yaml")
)
# Any tokenizer config, shrunk: two steps, the first without the GAN, the second with it.
TINY_RUN = [
    "--config",
    "presets/cpu_small.yaml",
    "--model.init_args.loss.init_args.disc_start=1",
    "--model.init_args.loss.init_args.perceptual_weight=0",
    "--model.init_args.loss.init_args.discriminator.init_args.ndf=8",
    "--model.init_args.loss.init_args.discriminator.init_args.n_layers=2",
    "--data.init_args.batch_size=2",
    "--data.init_args.num_workers=0",
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=0",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
]


class TwoBackwards(TokenizerModule):
    """The reference: the step as it was, a generator backward and step, then (GAN active) a
    discriminator backward and step."""

    def training_step(self, batch, batch_idx) -> None:
        step = self.global_step
        images, recon, g_loss, _ = self._generator_loss(batch, step)
        (opt_g, opt_d), (sched_g, sched_d) = self.optimizers(), self.lr_schedulers()
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        self._clip(opt_g)
        opt_g.step()
        sched_g.step()
        self.ema.update()
        if self.loss.gan_active(step):
            d_loss, _ = self.loss.discriminator_loss(images, recon.detach(), step)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            self._clip(opt_d)
            opt_d.optimizer.step()
            sched_d.step()


class GradientCheck(pl.Callback):
    """At each generator optimizer step (the step's backward is done): the trainable parameters
    without a gradient, and the norm of the discriminator's gradient (None without one)."""

    def __init__(self):
        self.missing: list[list[str]] = []
        self.disc_grad_norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        self.missing.append([n for n, p in params if p.grad is None])
        disc = [
            p.grad.flatten()
            for n, p in params
            if n.startswith("loss.discriminator.") and p.grad is not None
        ]
        self.disc_grad_norms.append(float(torch.cat(disc).norm()) if disc else None)


def _fit(module: TokenizerModule, data, steps: int) -> GradientCheck:
    check = GradientCheck()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[check],
    )
    if isinstance(data, pl.LightningDataModule):
        trainer.fit(module, datamodule=data)
    else:
        trainer.fit(module, data)
    return check


def _images(count: int, resolution: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.rand(3, resolution, resolution, generator=gen) * 2 - 1 for _ in range(count)]


def _vq_gan(cls: type[TokenizerModule], disc_start: int) -> TokenizerModule:
    pl.seed_everything(0)
    return cls(
        tokenizer=VQTokenizer(**TINY_VQ),
        loss=TokenizerLoss(
            perceptual_weight=0.0,
            adaptive_gan_weight=True,
            lecam_weight=0.05,
            disc_start=disc_start,
            discriminator=PatchDiscriminator(ndf=8, n_layers=2),  # with BatchNorm
        ),
        lr=1e-3,
        ema_decay=0.9,
        grad_clip=0.05,  # small enough to clip both nets
    )


def test_one_backward_updates_both_nets_as_two_backwards_did():
    steps, disc_start = 4, 2
    batches = [{"image": x} for x in _images(2 * steps, TINY_VQ["resolution"])]
    runs = {}
    for cls in (TokenizerModule, TwoBackwards):
        runs[cls] = module = _vq_gan(cls, disc_start)
        d_start = module.loss.discriminator.net[0].weight.detach().clone()
        _fit(module, DataLoader(batches, batch_size=2), steps)
        assert module.global_step == steps
    new, old = runs[TokenizerModule], runs[TwoBackwards]
    # Bit for bit: weights, BatchNorm and LeCAM buffers, EMA, optimizer states and learning rates.
    same_tree(old.state_dict(), new.state_dict(), "state_dict")
    same_tree(old.ema.shadows, new.ema.shadows, "ema")
    for i, (opt_old, opt_new) in enumerate(zip(old.trainer.optimizers, new.trainer.optimizers)):
        same_tree(opt_old.state_dict(), opt_new.state_dict(), f"optimizer {i}")
    # The discriminator's optimizer stepped from disc_start on only, and it did train.
    d_state = new.trainer.optimizers[1].state_dict()["state"]
    assert {int(s["step"]) for s in d_state.values()} == {steps - disc_start}
    assert not torch.equal(old.loss.discriminator.net[0].weight, d_start)  # (the last built)


def _stage1_checkpoint(tmp_path) -> str:
    """A (untrained) MAETok stage-1 checkpoint for the decoder fine-tuning stage."""
    module = VistokCLI(
        ["--config", "tokenizer/maetok.yaml", *TINY_RUN, "--run_dir", str(tmp_path / "stage1")]
    ).model
    checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "stage1.ckpt")
    return str(tmp_path / "stage1.ckpt")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_trainable_parameter_gets_a_gradient_in_each_step(name, tmp_path):
    args = ["--config", name, *TINY_RUN, "--run_dir", str(tmp_path)]
    if name == "tokenizer/maetok_decoder.yaml":
        args.append(f"--model.init_args.init_from={_stage1_checkpoint(tmp_path)}")
    cli = VistokCLI(args)
    assert cli.model.loss.has_discriminator
    check = GradientCheck()
    cli.trainer.callbacks.append(check)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert check.missing == [[], []]
    # Zero gradients for the discriminator before disc_start, its loss's after.
    assert check.disc_grad_norms[0] == 0 < check.disc_grad_norms[1]


class _Pairs(pl.LightningDataModule):
    """Post-training batches: real images and the code maps to decode into them."""

    def __init__(self, identity: dict, batches: list[dict]):
        super().__init__()
        self.tokenizer_identity, self.batches = identity, batches

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=2)


def test_post_training_with_the_dino_discriminator_gives_every_trainable_parameter_a_gradient(
    tmp_path,
):
    tok = VQTokenizer(**TINY_VQ)
    state = {f"tokenizer.{k}": v for k, v in tok.state_dict().items()}
    hparams = {"tokenizer": tok.config, "stage": "main"}
    torch.save({"hyper_parameters": hparams, "state_dict": state}, tmp_path / "tok.ckpt")
    dino = DINODiscriminator("vit_tiny_patch16_224", layers=[0, 1], img_size=32, head_width=16)
    loss = TokenizerLoss(perceptual_weight=0.0, disc_start=1, discriminator=dino)
    module = TokenizerModule(loss=loss, stage="post_train", init_from=str(tmp_path / "tok.ckpt"))
    images = _images(4, TINY_VQ["resolution"])
    with torch.no_grad():
        codes = tok.encode(torch.stack(images))  # (B, h, w)
    pairs = _Pairs(module.source, [{"image": x, "codes": c} for x, c in zip(images, codes)])
    check = _fit(module, pairs, steps=2)
    assert check.missing == [[], []]
    assert check.disc_grad_norms[0] == 0 < check.disc_grad_norms[1]
    assert not any(p.requires_grad for p in dino.backbone.parameters())
