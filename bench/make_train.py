"""``make train`` measured: runs the Makefile's exact train.py command (same configs) as a
subprocess and prints its training wall time, the final validation figures and the machine's
load while it ran. The demo's target: val PSNR >= 20 dB at 64 px within 6 minutes of training
on 2 cores, set-up excluded.

    python bench/make_train.py [--steps 400] [--out runs/bench_make_train/<time>] [--grid-out x.png]

Timing: every line the run prints is timestamped as it arrives. The run is started with
``--progress_seconds=0``, so its progress reporter (``common/summary.py``) prints a
``step N/M`` line after every optimizer step and ``trained: ...`` at the end of fit. Training
time is the span from the first ``step`` line (the end of the first step) to the ``trained``
line, scaled by M/(M-1) to count that first step at the mean step time; it includes the
validations and checkpoint writes of the run but not the set-up before the first step (imports,
config parsing, model build, data loader start, Lightning's sanity check), which is reported
apart. The figures are read from the run's ``results.json`` (the last ``fit`` validation).
``os.getloadavg()`` is sampled while it runs: a 1-minute load well above 0 before the start, or
above the core count during the run, means other work shared the CPU and the time is inflated.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_PSNR, TARGET_SECONDS = 20.0, 360.0


def make_train_command() -> list[str]:
    """train.py and its arguments as the Makefile's ``train`` recipe gives them."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    recipe = shlex.split(lines[lines.index("train: setup") + 1])
    if recipe[:2] != ["$(PYTHON)", "train.py"]:
        raise SystemExit(
            f"error: the Makefile's train recipe is not `$(PYTHON) train.py ...`: {recipe}"
        )
    return recipe[1:]


def configured_steps(command: list[str]) -> tuple[int, int]:
    """(max_steps, val_check_interval) of the run, read back through train.py --print_config."""
    out = subprocess.run(
        [sys.executable, *command, "--print_config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    steps = int(re.search(r"^  max_steps: (\d+)$", out, re.M).group(1))
    interval = int(re.search(r"^  val_check_interval: (\d+)$", out, re.M).group(1))
    return steps, interval


def run(command: list[str], log_path: Path) -> dict:
    """Runs train.py, timestamping its output lines; returns the timings and load samples."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KMP_BLOCKTIME": "0", "PYTHONUNBUFFERED": "1"}
    load_before = os.getloadavg()
    start = time.perf_counter()
    first_step = end = None
    last_step, loads, last_sample = 0, [], 0.0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, *command],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        for line in proc.stdout:
            now = time.perf_counter()
            log.write(line)
            log.flush()
            if now - last_sample >= 5.0:
                loads.append(os.getloadavg()[0])
                last_sample = now
            if m := re.match(r"step (\d+)", line):
                last_step = int(m.group(1))
                first_step = first_step or now
            elif line.startswith("trained:"):
                end = now
                print(line.rstrip())
            elif line.startswith("  "):  # the summary's paths
                print(line.rstrip())
        code = proc.wait()
    if code != 0 or first_step is None or end is None:
        raise SystemExit(f"error: train.py exited with {code}; its output is in {log_path}")
    return {
        "setup": first_step - start,
        "span": end - first_step,
        "steps": last_step,
        "load_before": load_before,
        "loads": loads,
        "load_after": os.getloadavg(),
    }


def final_figures(run_dir: Path) -> dict:
    history = json.loads((run_dir / "results.json").read_text())
    fits = [h for h in history if h.get("run") == "fit"]
    if not fits:
        raise SystemExit(f"error: {run_dir}/results.json holds no validation of the run")
    return {"step": fits[-1]["step"], **fits[-1]["metrics"]}


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="override trainer.max_steps (default: make's)")
    parser.add_argument("--out", type=Path, help="run folder (default: a new one under runs/)")
    parser.add_argument("--grid-out", type=Path, help="also copy the last reconstruction grid here")
    args = parser.parse_args()

    command = make_train_command()
    steps, interval = configured_steps(command)
    if args.steps:
        # Validate at the end of a shortened run too (the configured interval may not divide it).
        steps = args.steps
        interval = interval if steps % interval == 0 else steps
        command += [f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={interval}"]
    run_dir = args.out or ROOT / "runs" / "bench_make_train" / time.strftime("%Y%m%d-%H%M%S")
    if (run_dir / "results.json").exists():
        raise SystemExit(f"error: {run_dir} already holds a run; give a new --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    command += [f"--run_dir={run_dir}", "--progress_seconds=0"]
    print("$ python " + shlex.join(command), flush=True)

    t = run(command, run_dir / "bench_output.log")
    train_seconds = t["span"] * t["steps"] / max(t["steps"] - 1, 1)
    fig = final_figures(run_dir)
    psnr, l1 = fig.get("val/psnr"), fig.get("val/l1")
    # The whole-pass histogram when an evaluation callback ran, else the per-batch one
    # (docs/metrics.md: val/codebook_usage vs val/quant_usage).
    usage_name = "val/codebook_usage" if "val/codebook_usage" in fig else "val/quant_usage"
    usage = fig.get(usage_name)
    grids = sorted((run_dir / "images").glob("recon_*.png"))
    loads = t["loads"] or [t["load_after"][0]]

    rows = [
        ("steps", f"{t['steps']}"),
        ("training time (first step -> end)", f"{train_seconds:.1f} s"),
        ("  per step", f"{train_seconds / t['steps']:.3f} s"),
        ("set-up before the first step", f"{t['setup']:.1f} s"),
        (f"val PSNR (step {fig['step']})", f"{psnr:.2f} dB"),
        (
            "val L1 (mean-colour baseline)",
            f"{l1:.4f} ({fig.get('val/baseline_l1', float('nan')):.4f})",
        ),
        (f"codebook use ({usage_name})", f"{usage:.4f}" if usage is not None else "not logged"),
        ("cores", f"{os.cpu_count()}"),
        ("load avg 1 min: before run", f"{t['load_before'][0]:.2f}"),
        ("  during run (mean / max)", f"{statistics.mean(loads):.2f} / {max(loads):.2f}"),
        ("reconstruction grid", str(grids[-1]) if grids else "none written"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.grid_out and grids:
        args.grid_out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grids[-1], args.grid_out)
        print(f"{'grid copied to':<{width}}  {args.grid_out}")
    met = psnr >= TARGET_PSNR and train_seconds <= TARGET_SECONDS
    print(
        f"\ntarget (val PSNR >= {TARGET_PSNR:g} dB within {TARGET_SECONDS / 60:g} min of training):"
        f" {'met' if met else 'NOT met'}"
        + ("" if max(loads) < (os.cpu_count() or 2) else " (measured on a loaded machine)")
    )


if __name__ == "__main__":
    main()
