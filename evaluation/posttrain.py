"""gFID before and after decoder post-training, with the same generator, seeds and protocol.

    python -m vistok.evaluation.posttrain --generator runs/ar/checkpoints/last.ckpt \
        --after runs/robustok/checkpoints/last.ckpt --pairs pairs/ --out posttrain_eval/ \
        --num-images 50000 --cfg 6.0 --temperature 1.02 --seed 0      # any sample.py option

samples twice (``sample.py``'s library call) with everything equal but ``--tokenizer``: the
tokenizer the generator was trained on (``--before``, default the generator's own) and the
post-trained one (``--after``, accepted because its code-defining parts are verified to be the
source's). Sampling depends on the generator and the seeds only, so both runs decode the same code
maps; only the decoder differs. Outputs under ``--out``: ``before/`` and ``after/`` (sample.py's
outputs), ``results.json`` with both gFIDs, their difference and the shared protocol (refused if
the two protocols differ in anything but the tokenizer), ``samples_before_after.png`` (the same
generated codes decoded before, top, and after, bottom) and, with ``--pairs``, PSNR against the
real images of their reconstructions and of their teacher-forced code maps decoded before and after
post-training (up to 256 pairs of the folder's ``val`` split, else ``train``) under ``pairs``, and
``side_by_side.png``: real images, reconstructions before / after, generated code maps decoded
before / after.

``--ref-batch ADM.npz`` goes to sample.py like its other options: both sides then report FID,
sFID, precision and recall against that ADM reference batch (``adm_before`` / ``adm_after``).

For large runs, sample each side under torchrun (``sample.py --tokenizer X --out OUT/before``,
then ``OUT/after``) and combine them with ``--compare-only``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vistok.common.images import save_grid
from vistok.common.processes import process_teardown
from vistok.common.summary import batch_progress, closing_summary
from vistok.data.pairs import PairDataModule, read_pairs_meta
from vistok.generators.checkpoint import load_generator
from vistok.generators.sample_cli import parse_args as parse_sample_args
from vistok.generators.sample_cli import sample_or_exit
from vistok.tokenizers.checkpoint import read_tokenizer

_OWN = ("--tokenizer", "--out")


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One results entry from two sample.py results that differ only in the tokenizer."""
    pa, pb = json.loads(json.dumps(before["protocol"])), json.loads(json.dumps(after["protocol"]))
    tok_before, tok_after = pa.pop("tokenizer"), pb.pop("tokenizer")
    for p in (pa, pb):  # the first run computes the reference statistics, the second reuses them
        (p.get("fid") or {}).pop("reference_cached", None)
    versions = {"before": pa.pop("code_version", None), "after": pb.pop("code_version", None)}
    differ = sorted(k for k in set(pa) | set(pb) if pa.get(k) != pb.get(k))
    if differ:
        raise ValueError(f"the two sampling runs differ in more than the tokenizer: {differ}")
    gb, ga = before.get("gfid"), after.get("gfid")
    return {
        "gfid_before": gb,
        "gfid_after": ga,
        "gfid_change": ga - gb if gb is not None and ga is not None else None,
        "gfid_skipped": before.get("gfid_skipped") or after.get("gfid_skipped"),
        # sample.py --ref-batch (passed through): sFID, precision, recall of each side
        "adm_before": before.get("adm_metrics"),
        "adm_after": after.get("adm_metrics"),
        "tokenizer_before": tok_before,
        "tokenizer_after": tok_after,
        "protocol": {**pa, "code_version": versions},
    }


def samples_png(out: Path, rows: int = 8) -> Path:
    """The same generated codes decoded before (top row) and after (bottom row)."""
    grids = []
    for side in ("before", "after"):
        arr = np.load(out / side / "samples.npz")["arr_0"][:rows]  # (n, H, W, 3) uint8
        grids.append(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1)
    return save_grid(grids, out / "samples_before_after.png", ["before", "after"])


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def on_pairs(pairs: str, before: str, after: str, out: Path, count: int = 256) -> dict[str, Any]:
    """Numbers and ``side_by_side.png`` on up to ``count`` pairs (the ``val`` split when the
    folder has one, else ``train``). PNG rows: real images, their reconstructions before /
    after, their teacher-forced code maps decoded before / after post-training."""
    split = "val" if "val" in read_pairs_meta(pairs)["splits"] else "train"
    data = PairDataModule(pairs, val_split=split, val_batch_size=32, num_workers=0)
    toks = {"before": read_tokenizer(before).tokenizer, "after": read_tokenizer(after).tokenizer}
    sums: dict[str, float] = {}
    seen, rows = 0, None
    for batch in batch_progress(data.val_dataloader(rank=0, world_size=1), "decoding", count):
        images, codes = batch["image"][: count - seen], batch["codes"][: count - seen]
        decoded = {}
        for side, tok in toks.items():
            decoded[f"reconstruction_{side}"] = tok(images)[0].clamp(-1, 1)
            decoded[f"generated_{side}"] = tok.detokenize(codes).clamp(-1, 1)
        for name, x in decoded.items():
            sums[name] = sums.get(name, 0.0) + psnr(x, images).sum().item()
        if rows is None:
            n = min(8, len(images))
            order = ("reconstruction_before", "reconstruction_after", "generated_before")
            rows = [images[:n], *(decoded[k][:n] for k in (*order, "generated_after"))]
        seen += len(images)
        if seen >= count:
            break
    titles = ["original", "recon. before", "recon. after", "generated before", "generated after"]
    save_grid(rows, out / "side_by_side.png", titles)
    return {
        "split": split,
        "images": seen,
        **{f"psnr_{name}": total / seen for name, total in sums.items()},
        "image": "side_by_side.png",
    }


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__.split("\n\n")[0],
        epilog="Every other option goes to sample.py unchanged (e.g. --num-images, --cfg).",
    )
    p.add_argument("--generator", required=True, help="generator checkpoint or folder")
    p.add_argument("--after", required=True, help="the post-trained tokenizer")
    p.add_argument("--before", help="tokenizer before post-training; default: the generator's")
    p.add_argument("--pairs", help="post-training pairs folder, for side_by_side.png")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--compare-only",
        action="store_true",
        help="combine existing OUT/before and OUT/after sample.py results without sampling",
    )
    args, rest = p.parse_known_args(argv)
    clash = [a for a in rest if a.split("=")[0] in _OWN]
    if clash:
        p.error(f"{clash} are set by this command (use --before/--after and --out)")
    return args, rest


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, rest = parse_args(argv)
    out = Path(args.out)
    before = args.before
    if before is None:
        recorded = load_generator(args.generator).hparams["tokenizer_identity"]
        before = recorded.get("folder") or recorded["path"]
    if not args.compare_only:
        try:  # both sides in one process group, ended once they are sampled
            for side, tok in (("before", before), ("after", args.after)):
                own = ["--generator", args.generator, "--tokenizer", tok, "--out", str(out / side)]
                sample_or_exit(parse_sample_args([*own, *rest]))
        finally:
            process_teardown()
    runs = {s: json.loads((out / s / "results.json").read_text()) for s in ("before", "after")}
    results = compare(runs["before"], runs["after"])
    results["runs"] = {s: f"{s}/results.json" for s in runs}
    results["images"] = {"samples": samples_png(out).name}
    if args.pairs:  # how well each decoder maps the generator's code maps to the real images
        results["pairs"] = on_pairs(args.pairs, before, args.after, out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    figures = {k: results[k] for k in ("gfid_before", "gfid_after", "gfid_change")}
    paths = {"results": out / "results.json", "samples": out / results["images"]["samples"]}
    if args.pairs:
        pairs = results["pairs"]
        figures.update({k: v for k, v in pairs.items() if k.startswith("psnr_generated")})
        paths["pairs grid"] = out / pairs["image"]
    print(
        closing_summary("post-training compared (same codes, decoder before/after)", figures, paths)
    )
    return results


if __name__ == "__main__":
    main()
