"""A tokenizer training checkpoint -> Hub folder with a model card (``export.py``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from vistok.common.checkpoints import read_checkpoint
from vistok.common.export import last_results, run_folder, training_data, write_card
from vistok.common.hub import save_pretrained
from vistok.tokenizers.checkpoint import SOURCE_KEY, read_tokenizer, recorded_source


def export_tokenizer(ckpt: str | Path, out: str | Path, ema: bool) -> Path:
    ckpt = Path(ckpt)
    loaded = read_tokenizer(ckpt, ema=ema)
    if ema and not loaded.identity["ema"]:
        raise ValueError(f"{ckpt} has no EMA weights: export without --ema")
    run = run_folder(ckpt)
    info = {
        "info": loaded.tokenizer.describe(),
        "source_sha256": loaded.identity["sha256"],
        "weights": "ema" if ema else "raw",
        "source": ckpt.name,
        "global_step": read_checkpoint(ckpt).get("global_step"),
        "training_data": training_data(run),
    }
    source = recorded_source(ckpt)
    if source is not None:  # post-trained: the tokenizer whose codes it keeps, and their hash
        info[SOURCE_KEY] = source
    folder = save_pretrained(loaded.tokenizer, out, "tokenizer", info)
    grids = sorted((run / "images").glob("recon_*.png")) if run else []
    image = None
    if grids:
        shutil.copyfile(grids[-1], folder / "reconstructions.png")
        image = "reconstructions.png"
    write_card(folder, last_results(run), image)
    return folder
