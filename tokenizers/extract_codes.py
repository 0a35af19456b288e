"""Encode an image dataset once with a frozen tokenizer; write the codes as WebDataset shards.

    python -m vistok.data.extract_codes --tokenizer runs/vq/checkpoints/last.ckpt --out codes/ \
        [--shards '/data/train-{000000..001023}.tar'] [--split train] [--flip]

Without ``--shards`` the embedded default dataset's ``--split`` is encoded. Images are
centre-cropped to the tokenizer's resolution; ``--flip`` also stores the codes of the mirrored
image (training then picks one of the two views at random). Continuous latents (KL, 1D or
Gaussian tokens) are stored as float32 (``--float16`` halves the size) and the split's per-channel
mean and std go into ``meta.json``. The tokenizer runs in eval mode with
its EMA weights when the checkpoint has them (``--no-ema`` for the raw ones). Run it once per
split into the same folder; ``meta.json`` there records the tokenizer's identity and refuses a
different tokenizer. See ``vistok.data.codes`` for the format. (``python -m
vistok.tokenizers.extract_codes`` is the same command.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vistok.data.codes import FORMAT, META, LatentStats, code_dtype, decode_codes, encode_codes
from vistok.data.datamodule import ImageDataModule
from vistok.data.default_dataset import default_shards
from vistok.data.make_shards import write_shards
from vistok.tokenizers.checkpoint import read_tokenizer


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _base_meta(out: Path, tokenizer, identity: dict, float16: bool = False) -> dict:
    """The folder's meta.json, new or existing; refuses codes of another tokenizer."""
    fresh = {
        "format": FORMAT,
        "tokenizer": identity,
        "code_space": tokenizer.code_space.to_dict(),
        "token_shape": list(tokenizer.token_shape),
        "resolution": tokenizer.resolution,
        "dtype": code_dtype(tokenizer.code_space.to_dict(), float16).name,
        "splits": {},
    }
    path = out / META
    if not path.is_file():
        return fresh
    meta = json.loads(path.read_text())
    old = meta.get("tokenizer", {})
    if (old.get("sha256"), old.get("ema")) != (identity["sha256"], identity["ema"]):
        raise SystemExit(
            f"error: {out} holds codes of tokenizer {old.get('path')} (sha256 "
            f"{str(old.get('sha256'))[:12]}, ema={old.get('ema')}), not of {identity['path']} "
            f"(sha256 {identity['sha256'][:12]}, ema={identity['ema']}): use another --out"
        )
    return {**meta, "tokenizer": identity}


def encoded_samples(tokenizer, loader, device: torch.device, flip: bool, dtype, progress):
    """{"__key__", "codes.npy", "cls"} dicts; codes (A, *token_shape[, F]), A = 1 or 2."""
    for batch in loader:
        images = batch["image"].to(device)  # (B, 3, R, R) in [-1, 1]
        views = [tokenizer.encode(images)]  # (B, *token_shape[, F])
        if flip:
            views.append(tokenizer.encode(images.flip(-1)))
        codes = torch.stack(views, dim=1).cpu().numpy()  # (B, A, *token_shape[, F])
        for key, label, c in zip(batch["key"], batch["label"].tolist(), codes):
            sample = {"__key__": key, "codes.npy": encode_codes(c, dtype)}
            if label >= 0:
                sample["cls"] = label
            progress.update(1)
            yield sample, label


def extract(
    tokenizer_path: str,
    out: str,
    shards: str | None = None,
    split: str = "train",
    flip: bool = False,
    ema: bool = True,
    batch_size: int = 32,
    num_workers: int = 2,
    shard_size: int = 5000,
    device: str = "auto",
    float16: bool = False,
) -> dict:
    """Encode ``shards`` (or the embedded dataset's ``split``) into ``out``; returns meta.json."""
    dev = pick_device(device)
    tokenizer, identity = read_tokenizer(tokenizer_path, ema, dev)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = _base_meta(out_dir, tokenizer, identity, float16)
    if shards is None:
        shards = default_shards(split)
    data = ImageDataModule(
        val_shards=shards,
        resolution=tokenizer.resolution,
        val_batch_size=batch_size,
        num_workers=num_workers,
    )
    loader = data.val_dataloader(rank=0, world_size=1)  # every image once, centre crop
    dtype = np.dtype(meta["dtype"])
    continuous = meta["code_space"]["kind"] == "continuous"
    labels: list[int] = []
    stats = LatentStats()

    def samples(progress):
        for sample, label in encoded_samples(tokenizer, loader, dev, flip, dtype, progress):
            labels.append(label)
            if continuous:
                stats.update(decode_codes(sample["codes.npy"]))  # (A, C, *S)
            yield sample

    with torch.inference_mode(), tqdm(unit="img", desc=f"{split} codes") as progress:
        paths = write_shards(samples(progress), out_dir, split, shard_size)
    if not paths:
        raise SystemExit(f"error: no readable images in {shards}")
    names = [Path(p).name for p in paths]
    for stale in out_dir.glob(f"{split}-*.tar"):  # shards of an earlier, longer extraction
        if stale.name not in names:
            stale.unlink()
    meta["splits"][split] = {
        "shards": names,
        "count": len(labels),
        "views": 2 if flip else 1,
        "num_classes": max(labels) + 1,
        "source": shards,
        "skipped": data.val_stats.as_dict(),
    }
    if continuous:
        meta["splits"][split]["latent_stats"] = stats.as_dict()
    (out_dir / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="tokenizer training checkpoint (.ckpt)")
    p.add_argument("--out", required=True, help="output folder (shards + meta.json)")
    p.add_argument("--shards", help="image shards (brace pattern); default: embedded dataset")
    p.add_argument("--split", default="train", help="split name (shard prefix), e.g. train/val")
    p.add_argument("--flip", action="store_true", help="also store codes of mirrored images")
    p.add_argument("--no-ema", action="store_true", help="raw weights even if EMA ones exist")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--float16", action="store_true", help="continuous latents as float16")
    a = p.parse_args(argv)
    meta = extract(
        a.tokenizer,
        a.out,
        a.shards,
        a.split,
        a.flip,
        not a.no_ema,
        a.batch_size,
        a.num_workers,
        a.shard_size,
        a.device,
        a.float16,
    )
    info = meta["splits"][a.split]
    print(
        f"{info['count']} code maps ({info['views']} view(s)) in {len(info['shards'])} shards "
        f"under {a.out}; tokenizer sha256 {meta['tokenizer']['sha256'][:12]}, "
        f"ema={meta['tokenizer']['ema']}"
    )
    return meta


if __name__ == "__main__":
    main()
