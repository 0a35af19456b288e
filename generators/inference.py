"""Sampling images from a trained generator (AR or diffusion): what ``sample.py`` runs.

The checkpoint says which kind it is: an AR GPT samples token by token (``generate``), a
diffusion generator (flow matching or binary diffusion) integrates ``--steps`` steps with
``--sampler`` (flow matching only) through its own ``generate``.

Writes PNGs, a grid PNG, ``samples.npz`` (uint8 NHWC under ``arr_0``, the ADM evaluator's format;
``labels`` beside it) and ``results.json`` (gFID when the FID module is available, always with the
full protocol). Under ``torchrun`` every rank samples a disjoint set of batches and rank 0
gathers the npz. Batch j (of ``--batch-size`` images, global index order) is always sampled with
the seed derived from (``--seed``, j), so the images do not depend on the number of processes.

The generator checkpoint names its tokenizer (path + SHA-256); a tokenizer whose hash differs,
given with ``--tokenizer`` or found at the recorded path, is refused.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from vistok.common.checkpoints import load_strict, read_checkpoint, submodule_state
from vistok.common.configurable import instantiate
from vistok.common.images import save_grid, to_uint8
from vistok.common.results import code_version
from vistok.data.codes import TokenizerCheckpoint, file_sha256, read_tokenizer
from vistok.evaluation.adm import ADMMetrics
from vistok.evaluation.ref_batch import RefBatchError, reference_metrics
from vistok.generators.ar import GPT
from vistok.generators.diffusion import DiffusionSampling
from vistok.generators.sampling import SamplingConfig, generate
from vistok.generators.speculative import (
    Neighbours,
    SpeculativeConfig,
    SpeculativeStats,
    speculative_generate,
)

# Training-checkpoint hyper-parameters that hold the net's config (AR, diffusion); the weights
# are under ``net.`` in both (``GeneratorModule.net``).
NET_KEYS = ("gpt_config", "generator_config")


DEFAULT_STEPS = 50  # diffusion sampling steps when --steps is not given


class TokenizerMismatch(ValueError):
    """The tokenizer is not the one the generator was trained for."""


class GeneratorCheckpoint(NamedTuple):
    model: Any  # GPT, FlowMatching or BinaryDiffusion, eval mode
    hparams: dict[str, Any]
    identity: dict[str, Any]  # path, sha256, ema

    @property
    def gpt(self) -> GPT:
        return self.model


def load_generator(path: str, ema: bool | None = None, device="cpu") -> GeneratorCheckpoint:
    """The generator net (eval mode) from an ``ARModule`` / ``DiffusionModule`` checkpoint (EMA
    weights by default when present), or from an exported folder / Hub id (with the weights it
    was exported with)."""
    if not str(path).endswith(".ckpt"):
        from vistok.common.hub import WEIGHTS, load_pretrained, resolve_folder

        folder = resolve_folder(path)
        gpt, config = load_pretrained(folder, kind="generator", device=device)
        recorded = {**config["tokenizer_identity"], "folder": str(folder / "tokenizer")}
        identity = {
            "path": str(folder),
            "sha256": file_sha256(folder / WEIGHTS),
            "ema": config.get("weights") == "ema",
        }
        return GeneratorCheckpoint(gpt, {"tokenizer_identity": recorded}, identity)
    ckpt = read_checkpoint(path)
    hp = ckpt.get("hyper_parameters") or {}
    key = next((k for k in NET_KEYS if k in hp), None)
    if key is None or "tokenizer_identity" not in hp:
        raise ValueError(f"{path} is not a generator checkpoint (no gpt_config/generator_config)")
    gpt = instantiate(hp[key])
    state = ckpt["state_dict"]
    load_strict(gpt, submodule_state(state, "net"), str(path))
    shadows = submodule_state(state, "ema")
    has_ema = any(k.startswith("shadow_") for k in shadows)
    if ema and not has_ema:
        raise ValueError(f"{path} has no EMA weights (trained without ema_decay)")
    use_ema = has_ema if ema is None else ema
    if use_ema:
        with torch.no_grad():
            for i, param in enumerate(gpt.parameters()):
                param.copy_(shadows[f"shadow_{i}"])
    identity = {"path": str(Path(path).resolve()), "sha256": file_sha256(path), "ema": use_ema}
    return GeneratorCheckpoint(gpt.eval().requires_grad_(False).to(device), hp, identity)


def resolve_tokenizer(recorded: dict, path: str | None = None, device="cpu") -> TokenizerCheckpoint:
    """The generator's tokenizer: ``path``, the one exported beside it, or the recorded one;
    refused if its hash (for an exported tokenizer: its source checkpoint's) differs, unless it
    was post-trained from the recorded one with its encoder and quantizer verified unchanged
    (``vistok.tokenizers.posttrain``)."""
    from vistok.tokenizers.posttrain import load_derived

    chosen = path or recorded.get("folder") or recorded["path"]
    if not str(chosen).endswith(".ckpt"):
        tok = read_tokenizer(chosen, device=device)
        if tok.identity["sha256"] != recorded["sha256"]:
            derived = load_derived(chosen, recorded, device)  # post-trained from it, codes intact
            if derived is not None:
                return derived
            raise TokenizerMismatch(
                f"tokenizer {chosen} was exported from a checkpoint with sha256 "
                f"{str(tok.identity['sha256'])[:12]}, not the one this generator was trained on "
                f"({recorded['path']}, sha256 {recorded['sha256'][:12]})"
            )
        return tok
    if not Path(chosen).is_file():
        raise FileNotFoundError(
            f"tokenizer checkpoint {chosen} not found; pass --tokenizer (its sha256 must be "
            f"{recorded['sha256']})"
        )
    sha = file_sha256(chosen)
    if sha != recorded["sha256"]:
        derived = load_derived(chosen, recorded, device)  # post-trained from it, codes intact
        if derived is not None:
            return derived
        raise TokenizerMismatch(
            f"tokenizer {chosen} (sha256 {sha[:12]}) is not the one this generator was trained "
            f"on: {recorded['path']} (sha256 {recorded['sha256'][:12]}). Its codes would mean "
            "something else; use the generator's tokenizer."
        )
    return read_tokenizer(chosen, recorded.get("ema", True), device)


def class_labels(n: int, num_classes: int, mode: str, seed: int) -> torch.Tensor:
    """balanced: 0, 1, ..., C-1, 0, ... (50 per class for 50k ImageNet); random: uniform."""
    if num_classes == 0:
        return torch.full((n,), -1, dtype=torch.long)
    if mode == "balanced":
        return torch.arange(n) % num_classes
    if mode == "random":
        return torch.randint(num_classes, (n,), generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"classes must be balanced or random, got {mode!r}")


def batch_seed(seed: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed, batch]).generate_state(1, np.uint64)[0] >> 1)


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device); starts the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Sample, write the outputs and results.json; returns the results on rank 0."""
    rank, world, device = init_distributed()
    gen = load_generator(args.generator, args.ema, device)
    tok = resolve_tokenizer(gen.hparams["tokenizer_identity"], args.tokenizer, device)
    model, tokenizer = gen.model, tok.tokenizer
    gpt = model if isinstance(model, GPT) else None
    cfg_scale = args.cfg if model.num_classes else 1.0
    if gpt is not None:
        diffusion_only = {"--steps": args.steps, "--sampler": args.sampler}
        given = [flag for flag, value in diffusion_only.items() if value is not None]
        if given:
            raise SystemExit(f"error: {', '.join(given)} apply to diffusion generators only")
        config = SamplingConfig(
            cfg_scale,
            args.cfg_schedule,
            tuple(args.cfg_interval),
            args.temperature,
            args.top_k,
            args.top_p,
        )
    else:
        config = diffusion_config(args, model, cfg_scale)
    spec, neighbours, spec_stats = speculative_setup(args, gpt, tokenizer)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)

    fid, fid_protocol, skipped = None, None, None
    if args.fid != "off":
        from vistok.generators.gfid import fid_unavailable, make_fid

        skipped = fid_unavailable()
        if skipped and args.fid == "on":
            raise SystemExit(f"error: gFID requested but unavailable: {skipped}")
        if skipped is None and args.ref_batch:  # ADM's reference: FID, sFID, precision, recall
            fid, fid_protocol = reference_metrics(
                args.ref_batch, tokenizer.resolution, device, rank, world
            )
        elif skipped is None:
            fid, fid_protocol = make_fid(
                args.ref_shards, tokenizer.resolution, device, args.ref_count, rank, world
            )
    else:
        skipped = "disabled (--fid off)"
    if skipped and rank == 0:
        print(f"gFID skipped: {skipped}")

    labels = class_labels(args.num_images, model.num_classes, args.classes, args.seed)
    jobs = list(enumerate(range(0, args.num_images, args.batch_size)))[rank::world]
    mine_idx, mine_img = [], []
    for j, start in tqdm(jobs, disable=rank != 0, desc="sampling", unit="batch"):
        idx = torch.arange(start, min(start + args.batch_size, args.num_images))
        g = torch.Generator(device).manual_seed(batch_seed(args.seed, j))
        if gpt is not None and spec is not None:
            codes, stats = speculative_generate(gpt, labels[idx], config, g, spec, neighbours)
            spec_stats = spec_stats + stats
        elif gpt is not None:
            codes = generate(gpt, labels[idx], config, g)
        else:
            codes = model.generate(labels[idx].to(device), config, g)
        images = tokenizer.detokenize(codes).float().clamp(-1, 1)  # (B, 3, H, W)
        if fid is not None:
            fid.update(images, real=False)
        arr = to_uint8(images)  # (B, H, W, 3)
        if args.save_png:
            for i, a in zip(idx.tolist(), arr):
                Image.fromarray(a).save(out / "images" / f"{i:06d}.png")
        mine_idx.append(idx.numpy())
        mine_img.append(arr)
    gfid = fid.compute() if fid is not None else None
    adm = fid.results() if isinstance(fid, ADMMetrics) else None  # every rank: it all-reduces

    parts = [(np.concatenate(mine_idx), np.concatenate(mine_img))] if mine_idx else []
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(parts, gathered, dst=0)
        parts = [p for ps in gathered or [] for p in ps]
        if spec is not None:
            every = [None] * world if rank == 0 else None
            dist.gather_object(spec_stats, every, dst=0)
            spec_stats = sum(every or [], SpeculativeStats())
    results = None
    if rank == 0:
        order = np.concatenate([p[0] for p in parts])
        arrays = np.concatenate([p[1] for p in parts])[np.argsort(order)]  # (N, H, W, 3)
        np.savez(out / "samples.npz", arr_0=arrays, labels=labels.numpy())
        grid = torch.from_numpy(arrays[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1
        save_grid(list(grid.split(8)), out / "grid.png")
        results = {
            "gfid": gfid,
            "gfid_skipped": skipped,
            "adm_metrics": adm,  # with --ref-batch: sfid, precision, recall, no inception score
            # Forward passes per image and acceptance rate of speculative decoding.
            "speculative": spec_stats.to_dict() if spec is not None else None,
            "protocol": {
                "num_images": args.num_images,
                "classes": args.classes if model.num_classes else "unconditional",
                "num_classes": model.num_classes,
                "sampling": config.to_dict(),
                "speculative": (
                    {**spec.to_dict(), "approximate": spec.relaxed != "none"} if spec else None
                ),
                "seed": args.seed,
                "batch_size": args.batch_size,
                "world_size": world,
                "generator": gen.identity,
                "tokenizer": tok.identity,
                "fid": fid_protocol,
                "code_version": code_version(),
            },
            "outputs": {
                "npz": "samples.npz",
                "grid": "grid.png",
                "images": "images/" if args.save_png else None,
            },
        }
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return results


def diffusion_config(args: argparse.Namespace, model, cfg_scale: float) -> DiffusionSampling:
    """The diffusion sampling settings; AR-only flags set away from their defaults are refused."""
    ar_only = {"--top-k": args.top_k != 0, "--top-p": args.top_p != 1.0}
    ar_only["--cfg-schedule"] = args.cfg_schedule != "constant"
    given = [flag for flag, set_ in ar_only.items() if set_]
    if given:
        raise SystemExit(f"error: {', '.join(given)} apply to AR generators only")
    if args.sampler == "heun" and model.kind != "flow":
        raise SystemExit("error: --sampler heun applies to flow-matching generators only")
    sampler = args.sampler or ("euler" if model.kind == "flow" else "posterior")
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    return DiffusionSampling(steps, sampler, cfg_scale, tuple(args.cfg_interval), args.temperature)


def speculative_setup(args: argparse.Namespace, gpt, tokenizer):
    """(SpeculativeConfig or None, LANTERN neighbourhoods or None, empty counters)."""
    if args.speculative == "off":
        return None, None, SpeculativeStats()
    if gpt is None:
        raise SystemExit("error: --speculative applies to AR generators only")
    spec = SpeculativeConfig(args.window, args.relaxed, args.lantern_k, args.lantern_delta)
    neighbours = None
    if args.relaxed == "lantern":  # the tokenizer's codebook geometry
        neighbours = Neighbours.from_tokenizer(tokenizer, args.lantern_k)
    return spec, neighbours, SpeculativeStats()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Sample images from a generator checkpoint.")
    p.add_argument("--generator", required=True, help="generator checkpoint (.ckpt)")
    p.add_argument("--tokenizer", help="tokenizer checkpoint; default: the one it was trained on")
    p.add_argument("--num-images", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32, help="images per batch and process")
    p.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance scale")
    p.add_argument("--cfg-schedule", choices=["constant", "linear"], default="constant")
    p.add_argument(
        "--cfg-interval",
        type=float,
        nargs=2,
        default=[0.0, 1.0],
        metavar=("START", "END"),
        help="fraction with guidance: of token positions (AR), of the way from noise to data "
        "(diffusion)",
    )
    p.add_argument(
        "--steps", type=int, help=f"diffusion: integration steps (default {DEFAULT_STEPS})"
    )
    p.add_argument(
        "--sampler",
        choices=["euler", "heun"],
        help="flow matching: ODE solver (default euler; heun costs 2 evaluations per step)",
    )
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--temperature", type=float, default=1.0, help="AR logits; binary diffusion bit logits"
    )
    p.add_argument(
        "--speculative",
        choices=["off", "jacobi"],
        default="off",
        help="AR: speculative Jacobi decoding, the same distribution in fewer forward passes",
    )
    p.add_argument("--window", type=int, default=16, help="draft tokens verified per pass")
    p.add_argument(
        "--relaxed",
        choices=["none", "lantern"],
        default="none",
        help="approximate LANTERN acceptance over latent neighbours (TV <= delta per token)",
    )
    p.add_argument("--lantern-k", type=int, default=1000, help="neighbours per code")
    p.add_argument("--lantern-delta", type=float, default=0.1, help="TV budget per token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", choices=["balanced", "random"], default="balanced")
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="EMA generator weights (default: when the checkpoint has them)",
    )
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--save-png", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--fid",
        choices=["auto", "on", "off"],
        default="auto",
        help="gFID against the reference shards (auto: when available)",
    )
    p.add_argument("--ref-shards", help="real images for gFID; default: embedded val split")
    p.add_argument("--ref-count", type=int, help="images in --ref-shards (default: counted)")
    p.add_argument(
        "--ref-batch",
        help="ADM reference batch (.npz, e.g. VIRTUAL_imagenet256_labeled.npz) instead of "
        "--ref-shards: adds sFID, precision and recall",
    )
    args = p.parse_args(argv)
    if args.num_images < 1 or args.batch_size < 1:
        p.error("--num-images and --batch-size must be >= 1")
    if args.ref_batch and args.ref_shards:
        p.error("give --ref-batch or --ref-shards, not both")
    if args.relaxed != "none" and args.speculative == "off":
        p.error("--relaxed is an acceptance rule of --speculative jacobi: add that flag")
    if args.window < 1 or args.lantern_k < 1 or not 0 <= args.lantern_delta <= 1:
        p.error("need --window >= 1, --lantern-k >= 1 and 0 <= --lantern-delta <= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    try:
        return run(args)
    except (TokenizerMismatch, FileNotFoundError, RefBatchError) as e:
        raise SystemExit(f"error: {e}") from e
