"""Image grids: row titles drawn into the PNG, and the same picture in TensorBoard."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from helpers import TINY
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vistok.common.cli import main
from vistok.common.images import grid_image, label_band, save_grid

ROWS = [torch.rand(3, 3, 16, 16) * 2 - 1 for _ in range(3)]
LABELS = ["original", "reconstruction", "s=0.5"]


def test_labelled_grid_is_the_plain_grid_behind_a_band_of_row_titles(tmp_path):
    plain = np.asarray(grid_image(ROWS))
    labelled = np.asarray(Image.open(save_grid(ROWS, tmp_path / "g.png", LABELS)))
    band = np.asarray(label_band(LABELS, row_height=18, pad=2))
    assert plain.shape == (3 * 18 + 2, 3 * 18 + 2, 3)
    assert labelled.shape == (plain.shape[0], band.shape[1] + plain.shape[1], 3)
    assert np.array_equal(labelled[:, band.shape[1] :], plain)
    assert np.array_equal(labelled[:, : band.shape[1]], band)
    # Every row has its title: dark text pixels in its stretch of the band, and no two alike.
    stripes = [band[2 + 18 * i : 2 + 18 * (i + 1)] for i in range(3)]
    assert all((s < 128).any() for s in stripes)
    assert not np.array_equal(stripes[0], stripes[1])
    assert not np.array_equal(stripes[1], stripes[2])
    # The band is wide enough for the longest title and nothing spills past the grid's height.
    assert band.shape[1] > band.shape[0] // 4
    assert (band[:, -2:] == 255).all()


def test_grid_refuses_labels_that_do_not_match_the_rows():
    with pytest.raises(ValueError, match="2 row labels for 3 grid rows"):
        grid_image(ROWS, LABELS[:2])


@pytest.mark.slow
def test_training_grid_reaches_tensorboard_as_the_same_picture(tmp_path, monkeypatch):
    """A one-step run through the real CLI: its TensorBoard event file holds the labelled
    reconstruction grid, pixel for pixel the PNG in images/."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_dir = tmp_path / "run"
    steps = ["--trainer.max_steps=1", "--trainer.val_check_interval=1"]
    args = ["--config", "tokenizer/vq.yaml", "--config", "presets/cpu_small.yaml", *TINY, *steps]
    main([*args, "--trainer.enable_progress_bar=false", f"--run_dir={run_dir}"])
    png = np.asarray(Image.open(run_dir / "images" / "recon_0000001.png").convert("RGB"))
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    assert "recon" in events.Tags()["images"]
    (logged,) = events.Images("recon")
    assert logged.step == 1
    tb = np.asarray(Image.open(io.BytesIO(logged.encoded_image_string)))
    assert np.array_equal(tb[..., :3], png)
    # Two titled rows (original, reconstruction) of 8 images, 32 px, 2 px padding.
    band = label_band(["original", "reconstruction"], row_height=34, pad=2)
    assert png.shape == (2 * 34 + 2, band.width + 8 * 34 + 2, 3)
