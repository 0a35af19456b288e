"""Encode an image dataset once with a frozen tokenizer; write the codes as WebDataset shards.

    python -m vistok.data.extract_codes --tokenizer runs/vq/checkpoints/last.ckpt --out codes/ \
        [--shards '/data/train-{000000..001023}.tar'] [--split train] [--flip]
    torchrun --nproc_per_node=8 -m vistok.data.extract_codes ...   # same arguments

Without ``--shards`` the embedded default dataset's ``--split`` is encoded. Images are
centre-cropped to the tokenizer's resolution; ``--flip`` also stores the codes of the mirrored
image (training then picks one of the two views at random). Continuous latents (KL, 1D or
Gaussian tokens) are stored as float32 (``--float16`` halves the size) and the split's per-channel
mean and std go into ``meta.json``. The tokenizer runs in eval mode with
its EMA weights when the checkpoint has them (``--no-ema`` for the raw ones). Run it once per
split into the same folder; ``meta.json`` there records the tokenizer's identity and refuses a
different tokenizer. See ``vistok.data.codes`` for the format.

Under torchrun each process encodes its share of the images (whole shards when there are at least
as many as processes, else every world_size-th sample) on its own device and writes its own shards,
``{split}-r{rank:03d}-000000.tar`` ...; rank 0 collects only their names, counts and latent sums
(never codes) and writes ``meta.json``. Discrete codes do not depend on the number of processes;
float latents only to rounding (a batch's composition changes the kernels' summation order).
(``python -m vistok.tokenizers.extract_codes`` is the same command.)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from vistok.common.processes import process_setup, process_teardown
from vistok.data.codes import FORMAT, META, LatentStats, code_dtype, decode_codes, encode_codes
from vistok.data.datamodule import ImageDataModule
from vistok.data.default_dataset import default_shards
from vistok.data.image_decode import SHARD_REASON
from vistok.data.make_shards import write_shards
from vistok.tokenizers.checkpoint import read_tokenizer


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


class RankShare(NamedTuple):
    """What one process extracted: its shard names and counts, and its latents' sums."""

    shards: list[str]
    count: int
    max_label: int
    skipped: dict[str, int]
    stats: LatentStats


def merge_shares(shares: list[RankShare], by_shard: bool, continuous: bool) -> dict:
    """The split's entry of meta.json from every rank's share. ``by_shard``: ranks read disjoint
    shards; else every rank read every shard, so each counted the same unreadable ones."""
    skipped = {}
    for reason in shares[0].skipped:
        counts = [s.skipped[reason] for s in shares]
        skipped[reason] = max(counts) if reason == SHARD_REASON and not by_shard else sum(counts)
    info = {
        "shards": [name for s in shares for name in s.shards],
        "count": sum(s.count for s in shares),
        "num_classes": max(s.max_label for s in shares) + 1,
        "skipped": skipped,
    }
    if continuous and info["count"]:
        stats = LatentStats()
        for s in shares:
            stats.add(s.stats)
        info["latent_stats"] = stats.as_dict()
    return info


def remove_stale_shards(out: Path, split: str, keep: list[str]) -> None:
    """Deletes the split's shards of an earlier extraction (longer, or run with another number
    of processes) that ``keep`` does not list; other splits' shards are left alone."""
    own = re.compile(rf"{re.escape(split)}-(r\d+-)?\d{{6}}\.tar")
    for path in out.glob(f"{split}-*.tar"):
        if own.fullmatch(path.name) and path.name not in keep:
            path.unlink()


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
) -> dict | None:
    """Encode ``shards`` (or the embedded dataset's ``split``) into ``out``; returns meta.json on
    rank 0 (None on the other ranks of a multi-process run). The process group stays up, so a
    script can extract several splits in a row; ``main`` ends it."""
    rank, world, dev = process_setup()
    if device != "auto":  # the launcher's device per rank wins over one named for all
        if world == 1:
            dev = torch.device(device)
        elif rank == 0 and str(torch.device(device)) not in (str(dev), dev.type):
            print(f"note: --device {device} ignored: each of the {world} processes uses {dev.type}")
    tokenizer, identity = read_tokenizer(tokenizer_path, ema, dev)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Every rank reads meta.json (only rank 0 writes it, at the end): all refuse a folder of
    # another tokenizer alike, so none is left waiting for the others.
    meta = _base_meta(out_dir, tokenizer, identity, float16)
    if shards is None:
        shards = default_shards(split)
    data = ImageDataModule(
        val_shards=shards,
        resolution=tokenizer.resolution,
        val_batch_size=batch_size,
        num_workers=num_workers,
    )
    loader = data.val_dataloader(rank=rank, world_size=world)  # this rank's images, centre crop
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

    prefix = split if world == 1 else f"{split}-r{rank:03d}"  # each rank writes its own shards
    desc = f"{split} codes" + (f" (rank 0 of {world})" if world > 1 else "")
    with torch.inference_mode(), tqdm(unit="img", desc=desc, disable=rank != 0) as progress:
        paths = write_shards(samples(progress), out_dir, prefix, shard_size)
    share = RankShare(
        [Path(p).name for p in paths],
        len(labels),
        max(labels, default=-1),
        data.val_stats.as_dict(),
        stats,
    )
    # A few numbers and names per rank, on every rank: all know the totals and fail alike.
    shares = [share]
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, share)
    split_meta = merge_shares(shares, len(data.val_urls()) >= world, continuous)
    if not split_meta["count"]:
        raise SystemExit(f"error: no readable images in {shards}")
    if rank == 0:
        remove_stale_shards(out_dir, split, split_meta["shards"])
        split_meta.update(views=2 if flip else 1, source=shards)
        meta["splits"][split] = split_meta
        (out_dir / META).write_text(json.dumps(meta, indent=2) + "\n")
    if world > 1:
        dist.barrier()  # no rank returns before meta.json is written
    return meta if rank == 0 else None


def main(argv: list[str] | None = None) -> dict | None:
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
    process_teardown()
    if meta is None:  # not rank 0
        return None
    info = meta["splits"][a.split]
    print(
        f"{info['count']} code maps ({info['views']} view(s)) in {len(info['shards'])} shards "
        f"under {a.out}; tokenizer sha256 {meta['tokenizer']['sha256'][:12]}, "
        f"ema={meta['tokenizer']['ema']}"
    )
    return meta


if __name__ == "__main__":
    main()
