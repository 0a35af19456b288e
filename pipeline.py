"""The whole vistok pipeline in one command: tokenizer -> rFID/pFID -> export -> codes -> AR
generator -> samples -> gFID -> export, then ``report.md`` with the figures and pictures.

    python -m vistok.pipeline --preset cpu_small            # ~25 min on a 2-core CPU
    python -m vistok.pipeline --preset cpu_small --out runs/demo2 --extra-tokenizer-args ...

Each stage runs the project's own command line (``train.py``, ``extract_codes``, ``sample.py``,
``export.py``) as a subprocess, exactly as a user would type it, and is skipped when its output
already exists: a stopped pipeline resumes where it stopped when started again.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent

# Sizes of the whole pipeline. ``tokenizer`` and ``generator`` are the train.py arguments;
# the figures of ``cpu_small`` are the README's demo, ``tiny`` only checks that every stage runs.
PIPELINE_PRESETS: dict[str, dict[str, Any]] = {
    "cpu_small": dict(
        tokenizer=[
            "--config=tokenizer/wetok.yaml",
            "--config=presets/cpu_demo.yaml",
            "--config=eval/reconstruction_small.yaml",
            # 8x downsampling (8x8 tokens at 64 px) instead of make train's 4x: the generator's
            # step costs 1.7 s at 64 tokens against 7.3 s at 256 (GPT-S with its group head,
            # batch 16, 2 idle cores), which is what keeps the whole pipeline under 30 minutes.
            "--model.init_args.tokenizer.init_args.channel_mult=[1,2,4,4]",
            "--trainer.max_steps=400",
            # validation (and so the rFID/pFID evaluation) must fall on the last step
            "--trainer.val_check_interval=200",
            "--trainer.callbacks.init_args.every_n_steps=400",  # once, at the last step
        ],
        generator=["--config=generator/ar_cpu_small.yaml", "--trainer.max_steps=300"],
        samples=64,
        sample_args=["--cfg=2.0"],
    ),
    "tiny": dict(
        tokenizer=[
            "--config=tokenizer/wetok.yaml",
            "--config=presets/cpu_demo.yaml",
            "--config=eval/reconstruction_small.yaml",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=4",
            "--trainer.limit_val_batches=1",
            "--trainer.callbacks.init_args.every_n_steps=4",
            "--trainer.callbacks.init_args.num_images=16",
            "--trainer.callbacks.init_args.fid_feature=64",
            "--trainer.callbacks.init_args.grid_images=4",
            "--model.init_args.tokenizer.init_args.channels=16",
            "--data.init_args.num_workers=0",
        ],
        generator=[
            "--config=generator/ar_cpu_small.yaml",
            "--model.init_args.preset=tiny",
            "--model.init_args.sample_images=2",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=4",
            "--trainer.limit_val_batches=1",
            "--data.init_args.num_workers=0",
        ],
        samples=8,
        sample_args=["--cfg=2.0", "--batch-size=8"],
    ),
}


@dataclass
class Stage:
    name: str
    output: Path  # the stage is done when this exists
    commands: list[list[str]] = field(default_factory=list)


def stages(out: Path, preset: dict[str, Any], shown: bool = False) -> list[Stage]:
    """The stages writing into ``out``; ``shown``: the commands as a user types them from the
    repo root (``python train.py ...``) instead of as this process runs them."""

    def _python(*args: str) -> list[str]:
        return ["python" if shown else sys.executable, *args]

    def script(name: str) -> str:
        return name if shown else str(ROOT / name)

    tok, gen = out / "tokenizer", out / "generator"
    tok_ckpt, gen_ckpt = tok / "checkpoints" / "last.ckpt", gen / "checkpoints" / "last.ckpt"
    codes = out / "codes"
    extract = _python("-m", "vistok.data.extract_codes", "--tokenizer", str(tok_ckpt))
    return [
        Stage(
            "train the tokenizer (with rFID/pFID at the last step)",
            tok_ckpt,
            [_python(script("train.py"), *preset["tokenizer"], f"--run_dir={tok}")],
        ),
        Stage(
            "extract codes (train and val splits)",
            codes / "val-000000.tar",
            [
                [*extract, "--out", str(codes), "--split", "train", "--num-workers", "0"],
                [*extract, "--out", str(codes), "--split", "val", "--num-workers", "0"],
            ],
        ),
        Stage(
            "train the AR generator on the codes",
            gen_ckpt,
            [
                _python(
                    script("train.py"),
                    *preset["generator"],
                    f"--model.init_args.tokenizer={tok_ckpt}",
                    f"--data.init_args.root={codes}",
                    f"--run_dir={gen}",
                )
            ],
        ),
        Stage(
            "sample and measure gFID",
            out / "samples" / "results.json",
            [
                _python(
                    script("sample.py"),
                    "--generator",
                    str(gen_ckpt),
                    f"--num-images={preset['samples']}",
                    *preset["sample_args"],
                    "--out",
                    str(out / "samples"),
                )
            ],
        ),
        Stage(
            "export the tokenizer and the generator as Hub folders",
            out / "export" / "generator" / "config.json",
            [
                _python(script("export.py"), "--ckpt", str(tok_ckpt), "--ema", "--out")
                + [str(out / "export" / "tokenizer")],
                # The GPT trains without an EMA (LlamaGen's recipe): its own weights.
                _python(script("export.py"), "--ckpt", str(gen_ckpt), "--out")
                + [str(out / "export" / "generator")],
            ],
        ),
    ]


def _last_entry(path: Path) -> dict[str, Any]:
    entries = json.loads(path.read_text())
    return entries[-1] if isinstance(entries, list) else entries


def _newest(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern))
    return found[-1] if found else None


def report(out: Path, preset_name: str, seconds: dict[str, float]) -> Path:
    """``report.md``: every figure read from the stages' own results.json files."""
    tok = _last_entry(out / "tokenizer" / "results.json")
    gen = _last_entry(out / "generator" / "results.json")
    samples = json.loads((out / "samples" / "results.json").read_text())
    tm, tp = tok["metrics"], tok["protocol"]
    rec = tp.get("reconstruction_eval", {})

    def fig(metrics: dict, key: str) -> str:
        v = metrics.get(key)
        return f"{v:.4g}" if isinstance(v, (int, float)) else "n/a"

    lines = [
        f"# vistok pipeline report (`--preset {preset_name}`)",
        "",
        "## Tokenizer",
        "",
        f"Step {tok['step']}, {tp.get('weights')} weights, {rec.get('images', 'n/a')} validation "
        f"images at {tp.get('resolution')} px.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key in ("val/psnr", "val/l1", "val/rfid", "val/pfid", "val/codebook_usage"):
        lines.append(f"| `{key}` | {fig(tm, key)} |")
    pfid = rec.get("pfid", {})
    if pfid:
        lines += [
            "",
            f"pFID: FID of reconstructions decoded from perturbed codes, headline strength "
            f"{pfid.get('headline')}, strengths {pfid.get('strengths')}, seed {pfid.get('seed')}.",
        ]
    lines += [
        "",
        "## Generator",
        "",
        f"Step {gen['step']}: `val/loss` {fig(gen['metrics'], 'val/loss')}.",
        "",
        f"gFID **{fig(samples, 'gfid')}** from {samples['protocol'].get('num_images')} samples; "
        "protocol:",
        "",
        "```json",
        json.dumps(samples["protocol"].get("sampling", {}), indent=2),
        "```",
        "",
        "## Pictures",
        "",
    ]
    pictures = {
        "Reconstructions (originals over reconstructions)": _newest(
            out / "tokenizer" / "images", "recon_*.png"
        ),
        "Perturbation (rows: original, reconstruction, each strength)": _newest(
            out / "tokenizer" / "images", "perturb_*.png"
        ),
        "Samples": out / "samples" / "grid.png",
    }
    for title, path in pictures.items():
        if path is not None and path.exists():
            lines.append(f"**{title}**\n\n![{title}]({path.relative_to(out)})\n")
    lines += [
        "## Outputs",
        "",
        f"- tokenizer run: `{out / 'tokenizer'}`; exported: `{out / 'export' / 'tokenizer'}`",
        f"- generator run: `{out / 'generator'}`; exported: `{out / 'export' / 'generator'}`",
        f"- samples: `{out / 'samples'}`",
        "",
        "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()),
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    p.add_argument("--preset", choices=sorted(PIPELINE_PRESETS), default="cpu_small")
    p.add_argument("--out", default="runs/demo", help="folder for every stage's output")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    preset = PIPELINE_PRESETS[args.preset]
    if args.dry_run:
        for stage in stages(Path(args.out), preset, shown=True):
            print(f"# {stage.name}")
            for command in stage.commands:
                print(shlex.join(command))
        return Path(args.out)
    out = Path(args.out).resolve()  # the stages run from the repo root
    out.mkdir(parents=True, exist_ok=True)
    all_stages = stages(out, preset)
    seconds: dict[str, float] = {}
    for i, stage in enumerate(all_stages, 1):
        head = f"[{i}/{len(all_stages)}] {stage.name}"
        if stage.output.exists():
            print(f"{head}: done already ({stage.output}), skipped", flush=True)
            continue
        print(f"{head} ...", flush=True)
        start = time.perf_counter()
        for command in stage.commands:
            print("  $ " + shlex.join(command), flush=True)
            result = subprocess.run(command, cwd=ROOT)
            if result.returncode != 0:
                raise SystemExit(
                    f"stage '{stage.name}' failed (exit {result.returncode}); fix the problem "
                    "above and run the same command again: finished stages are skipped"
                )
        seconds[stage.name.split(" (")[0]] = time.perf_counter() - start
    path = report(out, args.preset, seconds)
    print(f"\npipeline done: report {path}")
    return path


if __name__ == "__main__":
    main()
