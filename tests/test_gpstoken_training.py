"""GPSToken learns through the CLI on CPU, and its Gaussians can be drawn from the checkpoint."""

import pytest
from helpers import photo_crops
from PIL import Image
from test_titok_training import train_cli

from vistok.tokenizers.gps_overlay import main as draw_overlay

# 32 px, f4 CNN (8x8x16 splatted map), 32 Gaussian tokens, a one-block region transformer.
TINY_GPS = [
    "--data.init_args.resolution=32",
    "--model.init_args.tokenizer.init_args.resolution=32",
    "--model.init_args.tokenizer.init_args.channels=16",
    "--model.init_args.tokenizer.init_args.num_mid_blocks=1",
    "--model.init_args.tokenizer.init_args.num_tokens=32",
    "--model.init_args.tokenizer.init_args.width=64",
    "--model.init_args.tokenizer.init_args.depth=1",
    "--data.init_args.batch_size=4",
    "--data.init_args.num_workers=0",
]


@pytest.mark.slow
def test_gpstoken_config_lowers_validation_loss_and_draws_its_gaussians(tmp_path):
    start, end = train_cli("tokenizer/gpstoken.yaml", tmp_path / "run", TINY_GPS)
    assert end["val/l1"] < 0.6 * start["val/l1"], (start, end)
    assert end["val/l1"] < end["val/baseline_l1"], end
    (image,) = photo_crops(tmp_path / "img", 1, size=48)
    out = draw_overlay(
        [
            "--tokenizer",
            str(tmp_path / "run" / "checkpoints" / "last.ckpt"),
            "--images",
            str(image),
            "--out",
            str(tmp_path / "gaussians.png"),
            "--raw",
        ]
    )
    assert Image.open(out).size == (3 * 256, 256)
