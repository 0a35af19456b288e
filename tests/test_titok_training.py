"""1D tokenizers learn through the CLI, and their prefixes decode better the longer they are."""

import numpy as np
import pytest
import torch
from helpers import photo_crops
from PIL import Image

from vistok.common.cli import VistokCLI
from vistok.tokenizers.titok import Tokenizer1D

STEPS = 200
# Tiny ViTs at 32 px: 8x8 patches of 4 px, 16 latent tokens, width 64, two blocks each side.
TINY_1D = [
    "--data.init_args.resolution=32",
    "--model.init_args.tokenizer.init_args.resolution=32",
    "--model.init_args.tokenizer.init_args.patch_size=4",
    "--model.init_args.tokenizer.init_args.num_latents=16",
    "--model.init_args.tokenizer.init_args.channels=64",
    "--model.init_args.tokenizer.init_args.num_res_blocks=2",
    "--data.init_args.batch_size=8",
    "--data.init_args.num_workers=0",
]


def train_cli(config: str, run_dir, extra: list[str] = ()) -> tuple[dict, dict]:
    """Validate, train STEPS steps through the CLI, return (start, end) validation metrics."""
    cli = VistokCLI(
        [
            "--config",
            config,
            "--config",
            "presets/cpu_small.yaml",
            *extra,
            "--trainer.limit_val_batches=4",
            f"--trainer.max_steps={STEPS}",
            f"--trainer.val_check_interval={STEPS}",
            "--trainer.enable_progress_bar=false",
            # L1 only, no EMA lag, no warmup: a short run that shows learning, not a recipe.
            "--model.init_args.loss.init_args.perceptual_weight=0",
            "--model.init_args.loss.init_args.disc_start=1000000",
            "--model.init_args.ema_decay=null",
            "--model.init_args.warmup_steps=0",
            "--model.init_args.lr=1e-3",
            "--run_dir",
            str(run_dir),
        ]
    )
    start = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == STEPS
    return start, {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "config", ["tokenizer/titok.yaml", "tokenizer/flextok.yaml", "tokenizer/binary1d.yaml"]
)
def test_1d_config_lowers_validation_reconstruction_loss(config, tmp_path):
    # Batches of 8 x 16 tokens: dead codes are restarted every 10 steps rather than every 100.
    extra = ["--model.init_args.tokenizer.init_args.restart_every=10"]
    start, end = train_cli(config, tmp_path, [*TINY_1D, *extra])
    assert end["val/l1"] < 0.6 * start["val/l1"], (start, end)


@pytest.mark.slow
def test_longer_prefixes_reconstruct_better_after_a_short_training(tmp_path):
    torch.manual_seed(0)
    paths = photo_crops(tmp_path, 16, size=32)
    images = torch.stack(
        [torch.from_numpy(np.asarray(Image.open(p))).permute(2, 0, 1).float() for p in paths]
    )
    images = images / 127.5 - 1  # (16, 3, 32, 32) real photo crops
    # FlexTok's ordering (causal latents) with k uniform on 1..16: in a run this short, drawing k
    # from powers of two sometimes leaves every token after the first unused.
    tok = Tokenizer1D(
        "flextok_b256",
        resolution=32,
        patch_size=4,
        num_latents=16,
        channels=64,
        num_res_blocks=2,
        nested_dropout="uniform",
    )
    assert tok.encoder.causal_latents
    opt = torch.optim.Adam(tok.parameters(), lr=1e-3, betas=(0.9, 0.99))
    for _ in range(300):  # nested dropout is on: each image decodes from a random prefix
        recon, q = tok(images)
        loss = (recon - images).abs().mean() + q.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    tok.eval()
    with torch.no_grad():
        latents = tok.quantize(images).quantized
        errors = [
            (tok.decode(latents, num_tokens=k) - images).abs().mean().item()
            for k in tok.prefix_lengths
        ]
    assert tok.prefix_lengths == [1, 2, 4, 8, 16]
    # Non-increasing in k up to 3% (the last tokens are barely trained after 300 steps), and
    # clearly better with all tokens than with one.
    for shorter, longer in zip(errors, errors[1:]):
        assert longer <= 1.03 * shorter, errors
    assert errors[-1] < 0.9 * errors[0], errors
