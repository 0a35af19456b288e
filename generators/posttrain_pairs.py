"""Make decoder post-training pairs: each real image with the code map a trained generator
regenerates from it by teacher forcing (RobusTok).

    python -m vistok.data.make_posttrain_pairs --generator runs/ar/checkpoints/last.ckpt \
        --tokenizer runs/vq/checkpoints/last.ckpt --shards '/data/train-{000000..001023}.tar' \
        --preservation 0.7 --cfg 6.0 --cfg-schedule pow-cosine --temperature 1.02 --out pairs/
    torchrun --nproc_per_node=8 -m vistok.data.make_posttrain_pairs ...   # same arguments

Each image is centre-cropped to the tokenizer's resolution and encoded (eval mode, the weights
the generator's codes were extracted with); the generator then keeps every code with probability
``--preservation`` and samples the others conditioned on the mixed prefix and the image's class
(``vistok.generators.teacher_forcing``). Codes are stored as ids next to the exact real pixels
(see ``vistok.data.pairs`` for the format): nothing is decoded to PNG and re-encoded.

Continuous tokenizers paired with a flow-matching generator get the analogue: each real latent is
noised to ``--noise-level`` t (``x_t = (1 - t) x_0 + t eps`` in the generator's normalised space,
t playing the part of 1 - sigma) and integrated back to t = 0 in ``--steps`` steps with CFG
``--cfg`` (``vistok.generators.teacher_forcing.partially_denoised``); the float latents are
stored in place of code ids.

Input shard i becomes output shard ``{split}-{i:06d}.tar``; under torchrun process r takes the
input shards i with i % world_size == r. A finished output shard is renamed into place only when
complete, so an interrupted run resumes where it stopped (same arguments; different ones are
refused). Every sample draws its randomness from its own seed, sha256(``--seed|key``), so the
pairs do not depend on the number of processes or the batch size. (``python -m
vistok.generators.posttrain_pairs`` is the same command.)
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from vistok.common.images import to_uint8
from vistok.common.processes import process_setup, process_teardown
from vistok.data.codes import code_dtype, encode_codes
from vistok.data.datamodule import ImageDataModule
from vistok.data.default_dataset import default_shards
from vistok.data.pairs import FORMAT, META, sample_seed
from vistok.data.stream import expand_shards
from vistok.generators.ar import GPT
from vistok.generators.checkpoint import load_generator
from vistok.generators.inference import add_checkpoint_args, add_sampling_args, ar_config
from vistok.generators.sampling import SamplingConfig
from vistok.generators.teacher_forcing import partially_denoised, teacher_forced
from vistok.tokenizers.checkpoint import TokenizerMismatch, recorded_source, resolve_tokenizer

# Fields of meta.json that must match for a run to resume into (or add a split to) a folder.
_SAME_FOLDER = ("generator", "tokenizer", "protocol")


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _mask_bytes(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, mask.astype(bool), allow_pickle=False)
    return buf.getvalue()


def start_meta(out: Path, fresh: dict, split: str, spec: str, num_shards: int) -> dict:
    """meta.json for this run: new, or the existing one if it was made the same way."""
    path = out / META
    fresh = json.loads(json.dumps(fresh))  # tuples -> lists, as they read back
    meta = json.loads(path.read_text()) if path.is_file() else fresh
    for field in _SAME_FOLDER:
        old, new = meta.get(field), fresh[field]
        if field != "protocol":
            old, new = (old or {}).get("sha256"), new.get("sha256")
        if old != new:
            raise SystemExit(
                f"error: {out} holds pairs made with another {field} ({old} vs {new}): use "
                "another --out, or the arguments it was made with"
            )
    info = meta["splits"].get(split)
    if info is not None and (info["source"], info["num_input_shards"]) != (spec, num_shards):
        raise SystemExit(
            f"error: {out} holds {split!r} pairs of {info['source']} ({info['num_input_shards']} "
            f"shards), not of {spec} ({num_shards}): use another --split or --out"
        )
    meta["splits"][split] = {"source": spec, "num_input_shards": num_shards, "complete": False}
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def finish_meta(out: Path, split: str, num_shards: int) -> dict:
    """Collect the per-shard statistics of a split into meta.json."""
    meta = json.loads((out / META).read_text())
    names, totals, skipped = [], {"count": 0, "unlabelled": 0}, {}
    for i in range(num_shards):
        name = f"{split}-{i:06d}"
        if not (out / f"{name}.tar").is_file():
            continue
        names.append(f"{name}.tar")
        stats = json.loads((out / f"{name}.json").read_text())
        for reason, n in stats.pop("skipped").items():
            skipped[reason] = skipped.get(reason, 0) + n
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + v
    info = {"shards": names, "count": totals["count"], "unlabelled": totals["unlabelled"]}
    if "positions" in totals:  # code ids: how many positions kept / changed their code
        positions = max(totals["positions"], 1)
        info["kept_fraction"] = totals["kept"] / positions
        info["changed_fraction"] = totals["changed"] / positions
    if "latent_sq_error" in totals:  # latents: how far the regenerated ones moved
        info["latent_mse"] = totals["latent_sq_error"] / max(totals["count"], 1)
    meta["splits"][split].update(**info, skipped=skipped, complete=len(names) == num_shards)
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def teacher_forcing(gpt: GPT, args: argparse.Namespace, config: SamplingConfig):
    """Discrete codes: regenerate with the AR generator (preservation ratio sigma)."""

    def regenerate(real: torch.Tensor, labels: torch.Tensor, seeds: list[int]):
        out = teacher_forced(gpt, real, labels, args.preservation, seeds, config)
        changed = (gpt.to_sequence(out.codes) != gpt.to_sequence(real)).any(-1)  # (B, N)
        stats = {"positions": out.kept.numel(), "kept": out.kept.sum(), "changed": changed.sum()}
        return out.codes, out.kept, stats

    return regenerate


def partial_noising(model, args: argparse.Namespace):
    """Continuous latents: noise to ``--noise-level`` t, denoise with the flow-matching model."""
    cfg = args.cfg if model.num_classes else 1.0

    def regenerate(real: torch.Tensor, labels: torch.Tensor, seeds: list[int]):
        gen = partially_denoised(
            model, real, labels, args.noise_level, seeds, args.steps, cfg, args.sampler
        )
        error = (gen.float() - real.float()).square().flatten(1).mean(1)  # (B,)
        return gen, None, {"latent_sq_error": error.sum()}

    return regenerate


def pair_shard(
    url: str,
    dest: Path,
    model,
    tokenizer,
    regenerate,
    seed: int,
    batch_size: int,
    dtype: np.dtype,
    device: torch.device,
    progress: tqdm,
) -> None:
    """Regenerate every image of one input shard into ``dest``.tar (+ ``dest``.json)."""
    data = ImageDataModule(
        val_shards=url,
        resolution=tokenizer.resolution,
        val_batch_size=batch_size,
        num_workers=0,
        max_bad_fraction=1.0,  # counted and reported in meta.json, never fatal here
    )
    stats: dict[str, float] = {"count": 0, "unlabelled": 0}
    tmp = dest.with_suffix(".tar.partial")
    with wds.TarWriter(str(tmp)) as sink:
        for batch in data.val_dataloader(rank=0, world_size=1):
            images, labels, keys = batch["image"].to(device), batch["label"], batch["key"]
            if model.num_classes and int(labels.max()) >= model.num_classes:
                raise SystemExit(
                    f"error: {url} has class {int(labels.max())}, but the generator knows "
                    f"{model.num_classes} classes"
                )
            if not model.num_classes:
                labels = torch.full_like(labels, -1)
            real = tokenizer.encode(images)  # (B, *token_shape[, F]) ids or (B, C, *S) latents
            seeds = [sample_seed(seed, k) for k in keys]
            gen, kept, batch_stats = regenerate(real, labels, seeds)
            arrays = to_uint8(images)  # (B, R, R, 3): the exact pixels that were encoded
            gen, real = gen.cpu().numpy(), real.cpu().numpy()
            for j, key in enumerate(keys):
                sample = {
                    "__key__": key,
                    "png": png_bytes(arrays[j]),
                    "codes.npy": encode_codes(gen[j], dtype),
                    "real.npy": encode_codes(real[j], dtype),
                }
                if kept is not None:
                    sample["kept.npy"] = _mask_bytes(kept[j].cpu().numpy())
                if labels[j] >= 0:
                    sample["cls"] = str(int(labels[j])).encode()
                sink.write(sample)
            for k, v in batch_stats.items():
                stats[k] = stats.get(k, 0) + float(v)
            stats["count"] += len(keys)
            stats["unlabelled"] += int((labels < 0).sum())
            progress.update(len(keys))
    stats["skipped"] = data.val_stats.as_dict()
    dest.with_suffix(".json").write_text(json.dumps(stats) + "\n")
    os.replace(tmp, dest.with_suffix(".tar"))  # only now does the shard count as finished


def make_pairs(args: argparse.Namespace) -> dict[str, Any] | None:
    """Write the pairs of ``args.shards`` into ``args.out``; returns meta.json on rank 0. A
    process group it starts stays up for the next call; ``main`` ends it."""
    if not 0.0 <= args.preservation <= 1.0:
        raise SystemExit(f"error: --preservation must be in [0, 1], got {args.preservation}")
    rank, world, device = process_setup()
    gen = load_generator(args.generator, args.ema, device)
    model = gen.model
    tok = resolve_tokenizer(gen.hparams["tokenizer_identity"], args.tokenizer, device)
    tokenizer = tok.tokenizer
    if isinstance(model, GPT):
        args.cfg = 6.0 if args.cfg is None else args.cfg
        config = ar_config(args, args.cfg if model.num_classes else 1.0)
        regenerate = teacher_forcing(model, args, config)
        protocol = {
            "mode": "teacher_forcing",
            "preservation": args.preservation,
            "sampling": config.to_dict(),
        }
    elif getattr(model, "kind", None) == "flow":
        if not 0.0 < args.noise_level <= 1.0:
            raise SystemExit(f"error: --noise-level must be in (0, 1], got {args.noise_level}")
        args.cfg = 1.0 if args.cfg is None else args.cfg
        regenerate = partial_noising(model, args)
        protocol = {
            "mode": "partial_noising",
            "noise_level": args.noise_level,
            "steps": args.steps,
            "sampler": args.sampler,
            "cfg_scale": args.cfg if model.num_classes else 1.0,
        }
    else:
        raise SystemExit(
            "error: pairs need an autoregressive generator (discrete codes) or a flow-matching "
            f"one (continuous latents); {args.generator} holds a {type(model).__name__}"
        )
    if args.shards is None:
        args.shards = default_shards(args.split)
    urls = [
        os.path.expanduser(u) if ":" not in u.split("/")[0] else u
        for u in expand_shards(args.shards)
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    code_space = tokenizer.code_space.to_dict()
    fresh = {
        "format": FORMAT,
        "generator": gen.identity,
        "tokenizer": tok.identity,
        "code_source": recorded_source(tok.identity["path"]) or tok.identity,
        "code_space": code_space,
        "token_shape": list(tokenizer.token_shape),
        "resolution": tokenizer.resolution,
        "dtype": "float32" if code_space["kind"] == "continuous" else code_dtype(code_space).name,
        "protocol": {
            **protocol,
            "seed": args.seed,
            "sample_seed": "sha256('<seed>|<image key>')",
            "classes": "image labels" if model.num_classes else "unconditional",
        },
        "splits": {},
    }
    if rank == 0:
        start_meta(out, fresh, args.split, args.shards, len(urls))
    _barrier(world)

    dtype = np.dtype(fresh["dtype"])
    mine = [(i, u) for i, u in enumerate(urls) if i % world == rank]
    pending = [(i, u) for i, u in mine if not (out / f"{args.split}-{i:06d}.tar").is_file()]
    if rank == 0 and len(pending) < len(mine):
        print(f"resuming: {len(mine) - len(pending)} of this process's {len(mine)} shards are done")
    with torch.inference_mode(), tqdm(unit="img", desc="pairs", disable=rank != 0) as progress:
        for n, (i, url) in enumerate(pending):
            progress.set_postfix_str(f"shard {n + 1}/{len(pending)}")
            dest = out / f"{args.split}-{i:06d}"
            pair_shard(
                url,
                dest,
                model,
                tokenizer,
                regenerate,
                args.seed,
                args.batch_size,
                dtype,
                device,
                progress,
            )
    _barrier(world)
    meta = finish_meta(out, args.split, len(urls)) if rank == 0 else None
    _barrier(world)  # no rank returns before meta.json is complete; the group stays up
    return meta


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    add_checkpoint_args(
        p, "AR generator checkpoint or folder", "tokenizer checkpoint; default: the generator's"
    )
    p.add_argument("--shards", help="real image shards (brace pattern); default: embedded data")
    p.add_argument("--split", default="train", help="split name (output shard prefix)")
    p.add_argument("--out", required=True, help="output folder (shards + meta.json)")
    p.add_argument("--preservation", type=float, default=0.7, help="sigma: P(keep a code)")
    p.add_argument(
        "--cfg",
        type=float,
        help="classifier-free guidance scale (default: RobusTok's 6.0 for AR, 1.0 for flow)",
    )
    add_sampling_args(p, cfg_schedule="pow-cosine", temperature=1.02)  # RobusTok's
    p.add_argument(
        "--noise-level",
        type=float,
        default=0.3,
        help="flow-matching generators: noise level t the real latents are noised to",
    )
    p.add_argument("--steps", type=int, default=25, help="flow matching: denoising steps")
    p.add_argument("--sampler", choices=["euler", "heun"], default="euler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="images per batch and process")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    try:
        meta = make_pairs(args)
    except (TokenizerMismatch, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e
    finally:
        process_teardown()
    if meta is not None:
        info = meta["splits"][args.split]
        moved = (
            f"kept {info['kept_fraction']:.3f} of the codes (preservation {args.preservation}), "
            f"changed {info['changed_fraction']:.3f}"
            if "kept_fraction" in info
            else f"latent MSE to the real latents {info.get('latent_mse', float('nan')):.4g}"
        )
        print(f"{info['count']} pairs in {len(info['shards'])} shards under {args.out}; {moved}")
    return meta


if __name__ == "__main__":
    main()
