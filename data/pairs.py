"""Post-training pairs (real image, generated code map): the folder format and its DataModule.

A pairs folder (written by ``python -m vistok.data.make_posttrain_pairs``) holds WebDataset shards
``{split}-{i:06d}.tar``, one per input image shard i, and ``meta.json``. Each sample is:

- ``png``: the real image exactly as the tokenizer encoded it (the centre crop at the tokenizer's
  resolution, uint8, lossless), the decoder's target;
- ``codes.npy``: the code map the generator regenerated from it by teacher forcing, in the
  tokenizer's layout ``(*token_shape[, F])`` (int16 or int32): code ids, never decoded to pixels
  and re-encoded;
- ``real.npy``: the tokenizer's own codes of the image (the ground truth teacher forcing starts
  from), ``kept.npy``: which positions kept their ground-truth code (bool, ``token_shape``);
- ``cls``: the class label when the image has one.

``meta.json`` names the generator and the tokenizer (path, SHA-256, EMA or not), ``code_source``
(the tokenizer whose codes these are: the tokenizer itself, or the one it was post-trained from),
the code space, token shape and resolution, the sampling protocol (preservation ratio, CFG,
temperature, top-k/p, seed and the per-sample seed rule) and per split the shards, sample count,
measured kept and changed fractions and whether the split is complete.

``PairDataModule`` batches are dicts: ``image`` (B, 3, R, R) float in [-1, 1] (never cropped or
flipped: the codes belong to these exact pixels), ``codes`` (B, *token_shape[, F]) int64,
``label`` (B,) int64, ``key`` list[str]. The stream is ``vistok.data.stream``'s with the
``PairSamples`` decoder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vistok.data.codes import decode_codes, read_meta
from vistok.data.datamodule import StreamDataModule
from vistok.data.image_decode import ImageDecoder
from vistok.data.stream import ImageSamples

FORMAT = "vistok-pairs-v1"
META = "meta.json"


def sample_seed(seed: int, key: str) -> int:
    """The seed of one sample's teacher forcing: sha256(``seed|key``), independent of the batch,
    the shard order and the number of processes."""
    digest = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative int64


def read_pairs_meta(root: str | os.PathLike) -> dict[str, Any]:
    return read_meta(root, FORMAT, "vistok.data.make_posttrain_pairs")


def split_urls(root: str | os.PathLike, meta: dict, split: str) -> list[str]:
    splits = meta.get("splits", {})
    if split not in splits:
        raise ValueError(f"{root} has no {split!r} pairs (has {sorted(splits)})")
    info = splits[split]
    if not info.get("complete"):
        raise ValueError(
            f"the {split!r} pairs in {root} are unfinished ({len(info.get('shards', []))} of "
            f"{info.get('num_input_shards')} shards): rerun make_posttrain_pairs with the same "
            "arguments, it resumes"
        )
    return [str(Path(root) / name) for name in info["shards"]]


class PairSamples(ImageSamples):
    """Images (never cropped at random or flipped: the codes belong to these exact pixels) with
    their generated code map: ``image`` (B, 3, R, R) and ``codes`` (B, *token_shape[, F])."""

    fields = ("image", "codes")

    def __call__(self, sample, rng):
        out = super().__call__(sample, None)  # no random crop or flip, ever
        if isinstance(out, str):
            return out
        if "codes.npy" not in sample:
            return "corrupt"
        try:
            out["codes"] = decode_codes(sample["codes.npy"])
        except Exception:
            return "corrupt"
        return out

    def collate(self, fields):
        codes = fields["codes"]
        stacked = torch.from_numpy(np.stack(codes)) if codes else torch.empty(0, dtype=torch.long)
        # Code ids become int64; continuous latents stay float.
        codes = stacked if stacked.is_floating_point() else stacked.long()
        return {**super().collate(fields), "codes": codes}


class PairDataModule(StreamDataModule):
    """Batches of (real image, generated code map) pairs for decoder post-training.

    Args:
        pairs: the pairs folder (``meta.json`` + shards) written by ``make_posttrain_pairs``.
        train_split: split name in ``meta.json``.
        val_split: held-out pairs for validation; None validates on the training split read once
            (capped by ``trainer.limit_val_batches``).
        stream: batch size, workers, bad-sample budget, seed (see ``StreamDataModule``).
    """

    def __init__(
        self,
        pairs: str,
        train_split: str = "train",
        val_split: str | None = None,
        **stream,
    ):
        super().__init__(**stream)
        self.save_hyperparameters()
        self.meta = read_pairs_meta(pairs)
        self._train_urls = split_urls(pairs, self.meta, train_split)
        self._val_urls = split_urls(pairs, self.meta, val_split) if val_split else self._train_urls
        self.resolution = int(self.meta["resolution"])
        self.decoder = ImageDecoder(resolution=self.resolution, random_crop=False, hflip=False)
        self.train_decoder = self.val_decoder = PairSamples(self.decoder)

    def train_urls(self) -> list[str]:
        return self._train_urls

    def val_urls(self) -> list[str]:
        return self._val_urls

    @property
    def tokenizer_identity(self) -> dict[str, Any]:
        """The tokenizer whose codes the pairs hold (what post-training must start from)."""
        return self.meta["code_source"]

    @property
    def val_shards(self) -> str:
        """Recorded by results.json next to the validation numbers."""
        return "::".join(self._val_urls)
