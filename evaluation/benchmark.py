"""One protocol for every tokenizer family: a table, a JSON and plots from one command.

    python -m vistok.evaluation.benchmark --tokenizers runs/vq/checkpoints/last.ckpt \\
        exported/wetok org/robustok-hub-id --data '/data/imagenet/val-{000000..000063}.tar' \\
        --num-images 50000 --out bench/
    torchrun --nproc_per_node=8 -m vistok.evaluation.benchmark --devices 8 ...   # multi-GPU

Each entry of ``--tokenizers`` is a training checkpoint (``.ckpt``, EMA weights when present), an
exported folder (including those written by ``python -m vistok.convert``) or a Hub id; all are
loaded by :func:`vistok.load_tokenizer`. Every tokenizer goes through the same pass: the
validation images of ``--data`` (centre crops at the tokenizer's resolution, or ``--resolution``)
run through :class:`vistok.evaluation.callbacks.ReconstructionEval`, the evaluation that runs
during training, under ``Trainer.validate`` (so ``torchrun``/``--devices`` split the images over
processes and the metrics reduce their sums across them). It gives:

- rFID against the Inception statistics of the same originals (cached on disk, shared by all
  tokenizers at one resolution) or of an ADM-format ``--ref-batch``; PSNR, SSIM, LPIPS-VGG;
- the pFID curve over ``--pfid-strengths`` and its headline (``--pfid-headline``), for discrete
  codes (VQ, FSQ, LFQ/GQ, binary, 1D): each quantizer's own perturbation rule, defined in
  :mod:`vistok.evaluation.pfid`. Continuous latents (KL) have no perturbation rule of that kind and
  no RobusTok-comparable number, so their pFID is reported as n/a (not a Gaussian-noise stand-in,
  which would be a different metric under the same name);
- codebook usage and perplexity (index and group codes) and bit entropy (group and bit codes).

Next to them, from the tokenizer itself: tokens per image, bits per token (log2 of the vocabulary,
or the bit count; continuous: n/a, channels per token given instead), the compression ratio
(24 bits per RGB pixel / bits per image; continuous: the ratio of RGB values to latent values),
parameters, and encode and decode throughput (images/s on this process's device, batch
``--batch-size``, measured after one warm-up batch over ``--timing-batches`` batches; rank 0's).

A tokenizer that fails to load or to evaluate is reported in the table and the JSON with its error,
and the others still run. Outputs in ``--out``: ``benchmark.json`` (numbers, protocol, failures),
``benchmark.md`` (the table also printed on stdout), ``pfid_curves.png`` (pFID against strength,
one line per tokenizer; strength 0 is rFID) and ``pfid_vs_rfid.png``; each tokenizer's
reconstruction / perturbation grid is under ``<out>/<name>/images/``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

import vistok
from vistok.common.checkpoints import read_checkpoint
from vistok.common.ema import pop_averages
from vistok.common.hub import read_config, resolve_folder
from vistok.common.summary import closing_summary
from vistok.data.datamodule import ImageDataModule
from vistok.evaluation.callbacks import ReconstructionEval
from vistok.evaluation.pfid import strength_tag


class _Evaluated(pl.LightningModule):
    """What ReconstructionEval needs from a module: a ``tokenizer`` (no EMA: the weights given)."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def validation_step(self, batch, batch_idx):
        return None


def load(src: str, device: str = "cpu"):
    """The one place the benchmark loads a tokenizer: checkpoint, exported folder or Hub id."""
    return vistok.load_tokenizer(src, device=device)


def provenance(src: str) -> dict[str, Any]:
    """The training step and the weights (EMA when the source has them, as ``load`` takes them)
    of a run checkpoint, an exported folder or a Hub id, for the protocol: the evaluation's own
    trainer starts at step 0 and holds no EMA."""
    if src.endswith(".ckpt"):
        ckpt = read_checkpoint(src)
        ema = pop_averages(dict(ckpt.get("state_dict") or {}), src) is not None
        return {"evaluated_at_step": ckpt.get("global_step"), "weights": "ema" if ema else "raw"}
    config = read_config(resolve_folder(src))
    return {"evaluated_at_step": config.get("global_step"), "weights": config.get("weights")}


def describe_codes(tokenizer, resolution: int) -> dict[str, Any]:
    """Tokens, bits per token, compression ratio and parameters at ``resolution``."""
    info = tokenizer.describe()
    space = tokenizer.code_space
    probe = torch.zeros(1, 3, resolution, resolution, device=_device(tokenizer))
    with torch.no_grad():
        codes = tokenizer.encode(probe)
    if space.kind == "continuous":  # (1, C, *S)
        tokens, per_token = math.prod(codes.shape[2:]), space.channels
        bits = None
    else:  # (1, *S) index codes, (1, *S, G) group codes, (1, *S, bits) bit codes
        spatial = codes.shape[1:] if space.kind == "index" else codes.shape[1:-1]
        tokens, per_token = math.prod(spatial), None
        bits = math.log2(space.vocab_size) if space.kind == "index" else float(space.bits)
    pixels = resolution * resolution
    return {
        "family": info["family"],
        "code_kind": space.kind,
        "tokens": tokens,
        "bits_per_token": bits,
        "channels_per_token": per_token,
        # Discrete: 24-bit RGB over the code bits. Continuous: RGB values over latent values.
        "compression_ratio": 24 * pixels / (tokens * bits) if bits else None,
        "dimension_ratio": 3 * pixels / (tokens * per_token) if per_token else None,
        "parameters": info["parameters"],
    }


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def throughput(tokenizer, batches: list[torch.Tensor]) -> dict[str, float]:
    """Encode and decode images/s over ``batches`` after one warm-up batch."""
    device = _device(tokenizer)
    x = batches[0].to(device)
    tokenizer.detokenize(tokenizer.encode(x))  # warm-up (allocations, cudnn autotune)
    enc = dec = 0.0
    count = 0
    for x in batches:
        x = x.to(device)
        _sync(device)
        t0 = time.perf_counter()
        codes = tokenizer.encode(x)
        _sync(device)
        t1 = time.perf_counter()
        tokenizer.detokenize(codes)
        _sync(device)
        enc, dec, count = enc + t1 - t0, dec + time.perf_counter() - t1, count + len(x)
    return {"encode_images_per_s": count / enc, "decode_images_per_s": count / dec}


def _data(args: argparse.Namespace, resolution: int):
    return ImageDataModule(
        val_shards=args.data,
        resolution=resolution,
        val_batch_size=args.batch_size,
        num_workers=args.num_workers,
    )


def evaluate(src: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """All numbers for one tokenizer (raises on any failure; the caller reports it)."""
    device = "cuda" if torch.cuda.is_available() and args.devices != 0 else "cpu"
    tokenizer = load(src, device).eval().requires_grad_(False)
    resolution = args.resolution or tokenizer.resolution
    data = _data(args, resolution)
    callback = ReconstructionEval(
        num_images=args.num_images,
        fid_feature=args.fid_feature,
        pfid_strengths=args.pfid_strengths,
        pfid_headline=args.pfid_headline,
        pfid_seed=args.seed,
        lpips=args.lpips,
        grid_images=8,
        # The data id names the shards only: every tokenizer at a resolution shares the cache.
        dataset_id=f"benchmark-{_slug(args.data)}",
        stats_dir=args.stats_dir,
        ref_batch=args.ref_batch,
    )
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=max(args.devices, 1),
        num_nodes=args.num_nodes,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,  # the callback reads the split itself
        callbacks=[callback],
        default_root_dir=str(out / _slug(src)),
    )
    trainer.validate(_Evaluated(tokenizer), datamodule=data, verbose=False)
    m = {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items()}
    discrete = tokenizer.code_space.kind != "continuous"
    curve = None
    if discrete:  # pFID@0 = rFID
        curve = {"0": m["rfid"]}
        curve.update({strength_tag(s): m[f"pfid@{strength_tag(s)}"] for s in callback.strengths})
    batches = []
    for batch in data.val_dataloader(rank=0, world_size=1):
        batches.append(batch["image"])
        if len(batches) >= args.timing_batches:
            break
    row = {
        "tokenizer": src,
        "name": display_name(src),
        **describe_codes(tokenizer, resolution),
        "resolution": resolution,
        "rfid": m["rfid"],
        "pfid": m["pfid"] if discrete else None,
        "pfid_curve": curve,
        "pfid_note": None if discrete else "n/a: continuous latents have no code perturbation",
        "psnr": m["psnr_full"],
        "ssim": m["ssim"],
        "lpips": m.get("lpips"),
        "codebook_usage": m.get("codebook_usage"),
        "codebook_perplexity": m.get("codebook_perplexity"),
        "bit_entropy": m.get("bit_entropy"),
        **throughput(tokenizer, batches),
        "protocol": {**callback.protocol["reconstruction_eval"], **provenance(src)},
    }
    return row


def display_name(src: str) -> str:
    """Short table name: a folder's or Hub id's last part; for a checkpoint, its run folder and
    file (``runs/vq/checkpoints/last.ckpt`` -> ``vq/last``)."""
    path = Path(src)
    if path.suffix == ".ckpt":
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return f"{run.name}/{path.stem}"
    return path.name or str(src)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")[-80:] or "tokenizer"


# --------------------------------------------------------------------------- outputs
COLUMNS = [
    ("name", "tokenizer", "{}"),
    ("family", "family", "{}"),
    ("tokens", "tokens", "{}"),
    ("bits_per_token", "bits/token", "{:.2f}"),
    ("compression_ratio", "compression", "{:.1f}"),
    ("rfid", "rFID", "{:.2f}"),
    ("pfid", "pFID", "{:.2f}"),
    ("psnr", "PSNR", "{:.2f}"),
    ("ssim", "SSIM", "{:.3f}"),
    ("lpips", "LPIPS", "{:.3f}"),
    ("codebook_usage", "usage", "{:.3f}"),
    ("bit_entropy", "bit entropy", "{:.3f}"),
    ("parameters", "params (M)", "{:.2f}"),
    ("encode_images_per_s", "enc img/s", "{:.1f}"),
    ("decode_images_per_s", "dec img/s", "{:.1f}"),
]


def markdown_table(rows: list[dict[str, Any]], failed: list[dict[str, str]]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |"]
    lines.append("|" + "---|" * len(COLUMNS))
    for row in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            value = value / 1e6 if key == "parameters" else value
            cells.append("n/a" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    for f in failed:
        error = f["error"].replace("|", "/").replace("\n", " ")
        lines.append(f"| {display_name(f['tokenizer'])} | failed: {error} |" + " |" * 13)
    return "\n".join(lines)


def plots(rows: list[dict[str, Any]], out: Path) -> list[str]:
    """pFID curves and pFID against rFID as PNG files; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        if row["pfid_curve"]:
            strengths = sorted(row["pfid_curve"], key=float)
            ax.plot([float(s) for s in strengths], [row["pfid_curve"][s] for s in strengths], "o-")
            ax.lines[-1].set_label(row["name"])
    ax.set(xlabel="perturbation strength s (0 = rFID)", ylabel="pFID", title="pFID curves")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pfid_curves.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for row in rows:
        if row["pfid"] is not None:
            ax.scatter(row["rfid"], row["pfid"])
            ax.annotate(row["name"], (row["rfid"], row["pfid"]), fontsize=7)
    ax.set(xlabel="rFID", ylabel="pFID (headline strength)", title="pFID against rFID")
    fig.tight_layout()
    fig.savefig(out / "pfid_vs_rfid.png", dpi=120)
    plt.close(fig)
    return ["pfid_curves.png", "pfid_vs_rfid.png"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description="Benchmark tokenizers of any family, one protocol."
    )
    p.add_argument("--tokenizers", nargs="+", required=True, help=".ckpt, folder or Hub id")
    p.add_argument("--data", required=True, help="validation image shards (spec)")
    p.add_argument("--num-images", type=int, default=50_000, help="images (total over ranks)")
    p.add_argument("--resolution", type=int, help="default: each tokenizer's own")
    p.add_argument("--out", default="benchmark", help="output folder")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch and process")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--pfid-strengths", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument("--pfid-headline", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0, help="pFID perturbation seed")
    p.add_argument("--fid-feature", type=int, default=2048, choices=[64, 192, 768, 2048])
    p.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--timing-batches", type=int, default=4, help="batches timed per tokenizer")
    p.add_argument("--devices", type=int, default=1, help="processes per node (0: force CPU)")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument(
        "--ref-batch",
        help="ADM-format npz as the rFID/pFID reference instead of the evaluated originals",
    )
    p.add_argument("--stats-dir", help="reference statistics cache (default in $VISTOK_CACHE)")
    args = p.parse_args(argv)
    if args.num_images < 2 or args.batch_size < 1 or args.timing_batches < 1:
        p.error("need --num-images >= 2, --batch-size >= 1 and --timing-batches >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], []
    for src in args.tokenizers:
        try:
            rows.append(evaluate(src, args, out))
        except Exception as e:  # reported with its reason; the other tokenizers still run
            failed.append({"tokenizer": src, "error": f"{type(e).__name__}: {e}"})
            print(f"benchmark: {src} failed: {type(e).__name__}: {e}")
    protocol = {
        "data": args.data,
        "num_images_requested": args.num_images,
        "resolution": args.resolution or "each tokenizer's own",
        "pfid_strengths": args.pfid_strengths,
        "pfid_headline": args.pfid_headline,
        "seed": args.seed,
        "fid_feature": args.fid_feature,
        "reference": args.ref_batch or "Inception statistics of the evaluated originals",
        "timing": f"{args.timing_batches} batches of {args.batch_size} after one warm-up, rank 0",
        "continuous_pfid": "n/a (no code perturbation for continuous latents)",
        "per_tokenizer": "see each result's protocol (ReconstructionEval)",
    }
    results = {"protocol": protocol, "results": rows, "failed": failed}
    if rank_zero():
        table = markdown_table(rows, failed)
        print(table)
        (out / "benchmark.md").write_text(table + "\n")
        results["plots"] = plots(rows, out)
        (out / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
        best = min(rows, key=lambda r: r["rfid"], default=None)
        paths = {"table": out / "benchmark.md", "results": out / "benchmark.json"}
        paths["plots"] = ", ".join(str(out / p) for p in results["plots"])
        print(
            closing_summary(
                f"benchmark: {len(rows)} of {len(args.tokenizers)} tokenizer(s) evaluated",
                {"best rFID": f"{best['rfid']:.3f} ({best['name']})" if best else None},
                paths,
            )
        )
    return results


def rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


if __name__ == "__main__":
    main()
