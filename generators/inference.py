"""Sampling images from a trained generator (AR or diffusion): the library call ``sample.py``
runs (its flags: ``vistok.generators.sample_cli``).

The checkpoint says which kind it is: an AR GPT samples token by token (``generate``), a
diffusion generator (flow matching or binary diffusion) integrates ``--steps`` steps with
``--sampler`` (flow matching only) through its own ``generate``.

Writes PNGs, a grid PNG, ``samples.npz`` (uint8 NHWC under ``arr_0``, the ADM evaluator's format;
``labels`` beside it) and ``results.json`` (gFID when the FID module is available, always with the
full protocol). Under ``torchrun`` every rank samples a disjoint set of batches and appends
them to its own part file as it goes (``parts/rank{r}.npy``); rank 0 then merges the parts by
global index into ``samples.npz``, one batch at a time, and deletes them: no image travels
between processes and no rank's memory grows with ``--num-images``. Batch j (of
``--batch-size`` images, global index order) is always sampled with the seed derived from
(``--seed``, j), so the images do not depend on the number of processes.

The generator checkpoint names its tokenizer (path + SHA-256); a tokenizer whose hash differs,
given with ``--tokenizer`` or found at the recorded path, is refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from vistok.common.images import save_grid, to_uint8
from vistok.common.processes import process_setup
from vistok.common.rank_parts import PartSet, PartWriter, write_npz_stream
from vistok.common.results import code_version
from vistok.evaluation.adm import ADMMetrics
from vistok.evaluation.ref_batch import reference_metrics
from vistok.generators.ar import GPT
from vistok.generators.checkpoint import GeneratorCheckpoint, load_generator
from vistok.generators.diffusion import DiffusionSampling
from vistok.generators.gfid import fid_unavailable, make_fid
from vistok.generators.sampling import CFG_SCHEDULES, SamplingConfig, generate
from vistok.generators.speculative import (
    Neighbours,
    SpeculativeConfig,
    SpeculativeStats,
    speculative_generate,
)
from vistok.tokenizers.checkpoint import TokenizerCheckpoint, resolve_tokenizer

DEFAULT_STEPS = 50  # diffusion sampling steps when --steps is not given


class Sampler(NamedTuple):
    """Everything a batch is sampled with."""

    model: Any  # GPT, FlowMatching or BinaryDiffusion, eval mode
    tokenizer: Any  # the generator's tokenizer, eval mode
    config: SamplingConfig | DiffusionSampling
    spec: SpeculativeConfig | None  # speculative decoding (AR only)
    neighbours: Neighbours | None  # LANTERN's relaxed acceptance

    @property
    def gpt(self) -> GPT | None:
        return self.model if isinstance(self.model, GPT) else None

    def codes(self, labels: torch.Tensor, g: torch.Generator):
        """(codes, speculative counters or None) for one batch of class labels."""
        if self.gpt is not None and self.spec is not None:
            return speculative_generate(
                self.gpt, labels, self.config, g, self.spec, self.neighbours
            )
        if self.gpt is not None:
            return generate(self.gpt, labels, self.config, g), None
        return self.model.generate(labels.to(g.device), self.config, g), None


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


def sample(args: argparse.Namespace) -> dict[str, Any] | None:
    """Sample, write the outputs and results.json; returns the results on rank 0. ``args``
    holds sample.py's options (``vistok.generators.sample_cli.parse_args``). A process group it
    starts stays up for the next call; the command ends it (``process_teardown``)."""
    rank, world, device = process_setup()
    gen = load_generator(args.generator, args.ema, device)
    tok = resolve_tokenizer(gen.hparams["tokenizer_identity"], args.tokenizer, device)
    sampler = make_sampler(args, gen.model, tok.tokenizer)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    fid, fid_protocol, skipped = setup_fid(args, tok.tokenizer.resolution, device, rank, world)
    labels = class_labels(args.num_images, gen.model.num_classes, args.classes, args.seed)
    spec_stats = sample_batches(args, sampler, labels, fid, out, rank, world, device)
    gfid = fid.compute() if fid is not None else None  # sums ranks' feature sums, no images
    adm = fid.results() if isinstance(fid, ADMMetrics) else None  # every rank: it all-reduces
    if world > 1:
        if sampler.spec is not None:
            spec_stats = gather_stats(spec_stats, rank, world)
        dist.barrier()  # every rank's part is written
    results = None
    if rank == 0:
        write_images(out, PartSet(out / "parts", world), labels, args.batch_size)
        results = {
            "gfid": gfid,
            "gfid_skipped": skipped,
            "adm_metrics": adm,  # with --ref-batch: sfid, precision, recall, no inception score
            # Forward passes per image and acceptance rate of speculative decoding.
            "speculative": spec_stats.to_dict() if sampler.spec is not None else None,
            "protocol": protocol(args, sampler, gen, tok, world, fid_protocol),
            "outputs": {
                "npz": "samples.npz",
                "grid": "grid.png",
                "images": "images/" if args.save_png else None,
            },
        }
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if world > 1:
        dist.barrier()  # no rank returns before the outputs are written; the group stays up
    return results


def make_sampler(args: argparse.Namespace, model, tokenizer) -> Sampler:
    """The sampling settings for this kind of generator; flags of the other kind are refused."""
    cfg_scale = args.cfg if model.num_classes else 1.0
    if isinstance(model, GPT):
        diffusion_only = {"--steps": args.steps, "--sampler": args.sampler}
        given = [flag for flag, value in diffusion_only.items() if value is not None]
        if given:
            raise SystemExit(f"error: {', '.join(given)} apply to diffusion generators only")
        config = ar_config(args, cfg_scale)
    else:
        config = diffusion_config(args, model, cfg_scale)
    spec, neighbours = speculative_setup(args, model if isinstance(model, GPT) else None, tokenizer)
    return Sampler(model, tokenizer, config, spec, neighbours)


def setup_fid(args: argparse.Namespace, resolution: int, device, rank: int, world: int):
    """(FID accumulator or None, its protocol or None, why gFID is skipped or None)."""
    fid, fid_protocol = None, None
    if args.fid == "off":
        skipped = "disabled (--fid off)"
    else:
        skipped = fid_unavailable()
        if skipped and args.fid == "on":
            raise SystemExit(f"error: gFID requested but unavailable: {skipped}")
        if skipped is None and args.ref_batch:  # ADM's reference: FID, sFID, precision, recall
            fid, fid_protocol = reference_metrics(args.ref_batch, resolution, device, rank, world)
        elif skipped is None:
            fid, fid_protocol = make_fid(
                args.ref_shards, resolution, device, args.ref_count, rank, world
            )
    if skipped and rank == 0:
        print(f"gFID skipped: {skipped}")
    return fid, fid_protocol, skipped


def sample_batches(args, sampler: Sampler, labels, fid, out: Path, rank: int, world: int, device):
    """Samples this rank's share of the batches into ``out/parts/rank{rank}.npy`` (uint8
    (n, H, W, 3), written batch by batch); returns its speculative counters. Batch j is sampled
    with the seed of (``--seed``, j) whatever the number of processes."""
    spec_stats = SpeculativeStats()
    jobs = list(enumerate(range(0, args.num_images, args.batch_size)))[rank::world]
    share = sum(min(args.batch_size, args.num_images - start) for _, start in jobs)
    part = PartWriter(out / "parts", rank, share)
    for j, start in tqdm(jobs, disable=rank != 0, desc="sampling", unit="batch"):
        idx = torch.arange(start, min(start + args.batch_size, args.num_images))
        g = torch.Generator(device).manual_seed(batch_seed(args.seed, j))
        codes, stats = sampler.codes(labels[idx], g)
        if stats is not None:
            spec_stats = spec_stats + stats
        images = sampler.tokenizer.detokenize(codes).float().clamp(-1, 1)  # (B, 3, H, W)
        if fid is not None:
            fid.update(images, real=False)
        arr = to_uint8(images)  # (B, H, W, 3)
        if args.save_png:
            for i, a in zip(idx.tolist(), arr):
                Image.fromarray(a).save(out / "images" / f"{i:06d}.png")
        part.append(idx.numpy(), arr)
    part.close()
    return spec_stats


def gather_stats(spec_stats: SpeculativeStats, rank: int, world: int) -> SpeculativeStats:
    """The speculative counters summed over ranks, on rank 0 (a few numbers per rank)."""
    every = [None] * world if rank == 0 else None
    dist.gather_object(spec_stats, every, dst=0)
    return sum(every or [], SpeculativeStats())


def write_images(out: Path, parts: PartSet, labels: torch.Tensor, chunk: int) -> None:
    """samples.npz (the ADM evaluator's format: uint8 (N, H, W, 3) ``arr_0`` in global index
    order, ``labels`` beside it) streamed from the parts ``chunk`` images at a time, grid.png
    from the first 64; then the parts are deleted."""
    first = []  # the grid's images, kept as they stream past

    def chunks():
        for rows in parts.chunks(chunk):  # (<=chunk, H, W, 3)
            kept = sum(map(len, first))
            if kept < 64:
                first.append(rows[: 64 - kept].copy())
            yield rows

    write_npz_stream(out / "samples.npz", parts.shape, parts.dtype, chunks(), labels=labels.numpy())
    grid = torch.from_numpy(np.concatenate(first)).permute(0, 3, 1, 2).float() / 127.5 - 1
    save_grid(list(grid.split(8)), out / "grid.png")
    parts.remove()


def protocol(
    args: argparse.Namespace,
    sampler: Sampler,
    gen: GeneratorCheckpoint,
    tok: TokenizerCheckpoint,
    world: int,
    fid_protocol: dict | None,
) -> dict[str, Any]:
    """How the images were made, recorded beside the numbers."""
    spec, num_classes = sampler.spec, sampler.model.num_classes
    return {
        "num_images": args.num_images,
        "classes": args.classes if num_classes else "unconditional",
        "num_classes": num_classes,
        "sampling": sampler.config.to_dict(),
        "speculative": {**spec.to_dict(), "approximate": spec.relaxed != "none"} if spec else None,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "world_size": world,
        "generator": gen.identity,
        "tokenizer": tok.identity,
        "fid": fid_protocol,
        "code_version": code_version(),
    }


def add_checkpoint_args(p: argparse.ArgumentParser, generator: str, tokenizer: str) -> None:
    """``--generator`` / ``--tokenizer`` (with these helps) and ``--ema``: the weights that
    sample.py and the post-training pairs load."""
    p.add_argument("--generator", required=True, help=generator)
    p.add_argument("--tokenizer", help=tokenizer)
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="EMA generator weights (default: when the checkpoint has them)",
    )


def add_sampling_args(
    p: argparse.ArgumentParser, cfg_schedule: str = "constant", temperature: float = 1.0
) -> None:
    """The sampling flags that ``ar_config`` and ``diffusion_config`` read (sample.py, the
    post-training pairs, the sampling bench), with these defaults for the two that differ."""
    p.add_argument(
        "--cfg-schedule",
        choices=CFG_SCHEDULES,
        default=cfg_schedule,
        help="AR guidance over token positions (default %(default)s); pow-cosine is RAR's ramp up "
        "to --cfg (at 6.0 peak, about 3.3 on average over 256 tokens)",
    )
    p.add_argument("--cfg-power", type=float, default=1.15, help="exponent of pow-cosine")
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
        "--temperature",
        type=float,
        default=temperature,
        help="AR logits; binary diffusion bit logits (default %(default)s)",
    )
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)


def ar_config(args: argparse.Namespace, cfg_scale: float) -> SamplingConfig:
    """AR sampling settings from the flags that sample.py and the post-training pairs share."""
    return SamplingConfig(
        cfg_scale,
        args.cfg_schedule,
        tuple(args.cfg_interval),
        args.temperature,
        args.top_k,
        args.top_p,
        args.cfg_power,
    )


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
    """(SpeculativeConfig or None, LANTERN neighbourhoods or None)."""
    if args.speculative == "off":
        return None, None
    if gpt is None:
        raise SystemExit("error: --speculative applies to AR generators only")
    spec = SpeculativeConfig(args.window, args.relaxed, args.lantern_k, args.lantern_delta)
    neighbours = None
    if args.relaxed == "lantern":  # the tokenizer's codebook geometry
        neighbours = Neighbours.from_tokenizer(tokenizer, args.lantern_k)
    return spec, neighbours
