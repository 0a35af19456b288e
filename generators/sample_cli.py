"""sample.py's options and how a command runs them. They live here, not in ``sample.py``, because
another command forwards options to sampling (``vistok.evaluation.posttrain``) and must read them
with the same parser; entry scripts are never imported."""

from __future__ import annotations

import argparse
from typing import Any

from vistok.evaluation.ref_batch import RefBatchError
from vistok.generators.inference import (
    DEFAULT_STEPS,
    add_checkpoint_args,
    add_sampling_args,
    sample,
)
from vistok.tokenizers.checkpoint import TokenizerMismatch


def sample_or_exit(args: argparse.Namespace) -> dict[str, Any] | None:
    """``sample(args)`` with a wrong or missing tokenizer or reference batch reported as a
    command-line error."""
    try:
        results = sample(args)
    except (TokenizerMismatch, FileNotFoundError, RefBatchError) as e:
        raise SystemExit(f"error: {e}") from e
    if results is not None:  # rank 0
        print(summary(results, args.out), flush=True)
    return results


def summary(results: dict[str, Any], out: str) -> str:
    """What a sampling run produced: its figures and where they are."""
    proto = results["protocol"]
    lines = [f"sampled {proto['num_images']} images ({proto['world_size']} process(es)) into {out}"]
    if results.get("gfid") is not None:
        ref = proto.get("fid") or {}
        where = (
            ref.get("reference_batch") or ref.get("reference_shards") or "the embedded val split"
        )
        count = ref.get("reference_images") or ref.get("reference_count")
        lines.append(f"gFID {results['gfid']:.4g} against {count} reference images ({where})")
    elif results.get("gfid_skipped"):
        lines.append(f"gFID skipped: {results['gfid_skipped']}")
    adm = results.get("adm_metrics") or {}
    extra = [f"{k} {v:.4g}" for k, v in adm.items() if isinstance(v, float) and k != "fid"]
    if extra:
        lines.append(", ".join(extra))
    written = [v for v in (results.get("outputs") or {}).values() if v]
    lines.append("wrote " + ", ".join([*written, "results.json"]))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Sample images from a generator checkpoint.", allow_abbrev=False
    )
    add_checkpoint_args(
        p,
        "generator checkpoint (.ckpt)",
        "tokenizer checkpoint; default: the one it was trained on",
    )
    p.add_argument("--num-images", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32, help="images per batch and process")
    p.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance scale")
    add_sampling_args(p)
    p.add_argument(
        "--steps", type=int, help=f"diffusion: integration steps (default {DEFAULT_STEPS})"
    )
    p.add_argument(
        "--sampler",
        choices=["euler", "heun"],
        help="flow matching: ODE solver (default euler; heun costs 2 evaluations per step)",
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
    if args.ref_batch and args.ref_shards:
        p.error("give --ref-batch or --ref-shards, not both")
    if args.num_images < 1 or args.batch_size < 1:
        p.error("--num-images and --batch-size must be >= 1")
    if args.relaxed != "none" and args.speculative == "off":
        p.error("--relaxed is an acceptance rule of --speculative jacobi: add that flag")
    if args.window < 1 or args.lantern_k < 1 or not 0 <= args.lantern_delta <= 1:
        p.error("need --window >= 1, --lantern-k >= 1 and 0 <= --lantern-delta <= 1")
    return args
