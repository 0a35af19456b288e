"""What multi-process training and sampling cost beyond the work itself, counted on CPU
processes (gloo) since that is what can be measured without GPUs:

- bytes sent per training step by category (gradients, buffers per submodule, other
  collectives) and the median step time, for a GAN tokenizer and a GPT, with 1 and 2 processes
  (``vistok.common.audit.DistributedAudit`` counts them inside the real ``train.py`` run);
- rank-0 peak memory (max RSS) of 2-process sampling for two image counts: what rank 0 holds
  should not grow with the number of images;
- validation I/O per rank for 2 ranks: the shards each rank's validation loader opens, the
  samples those shards hold, the samples the rank keeps and the bytes its process reads, for the
  tokenizer's images and the GPT's codes.

    python bench/distributed_overhead.py [--steps 6] [--images 64 256] [--out /tmp/dist_bench]
"""

from __future__ import annotations

import argparse
import json
import resource
import runpy
import subprocess
import sys
import tarfile
from pathlib import Path

from vistok.data.codes import CodeDataModule
from vistok.data.datamodule import ImageDataModule

ROOT = Path(__file__).resolve().parent.parent
TINY_DATA = [
    "--data.init_args.resolution=32",
    "--data.init_args.batch_size=4",
    "--data.init_args.num_workers=0",
    "--trainer.limit_val_batches=1",
]
TOKENIZER = [
    "--config=tokenizer/wetok.yaml",
    "--config=presets/cpu_small.yaml",
    "--model.init_args.tokenizer.init_args.resolution=32",
    "--model.init_args.tokenizer.init_args.channels=16",
    *TINY_DATA,
]


def _torchrun(nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def train(out: Path, name: str, args: list[str], nproc: int, steps: int) -> dict:
    run_dir = out / f"{name}_{nproc}p"
    _torchrun(
        nproc,
        "train.py",
        *args,
        f"--trainer.devices={nproc}",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=vistok.common.audit.DistributedAudit",
        f"--run_dir={run_dir}",
    )
    return json.loads((run_dir / "audit_rank0.json").read_text())


def sampling_peak(out: Path, generator: str, images: int) -> float:
    """Rank-0 max RSS (MiB) of a 2-process sample.py run of ``images`` images."""
    folder = out / f"samples_{images}"
    _torchrun(
        2,
        str(Path(__file__).resolve()),
        "--worker-sample",
        str(folder),
        "--generator",
        generator,
        "--num-images",
        str(images),
        "--batch-size",
        "16",
        "--fid",
        "off",
        "--no-save-png",
        "--out",
        str(folder),
    )
    return json.loads((folder / "peak_rank0.json").read_text())["max_rss_mib"]


def worker_sample(folder: str, argv: list[str]) -> None:
    """Runs sample.py in this process (one torchrun rank) and records its peak memory."""
    import os

    sys.argv = [str(ROOT / "sample.py"), *argv]
    runpy.run_path(str(ROOT / "sample.py"), run_name="__main__")
    rank = int(os.environ.get("RANK", 0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"peak_rank{rank}.json").write_text(json.dumps({"max_rss_mib": peak}))


class _Opens:
    """Paths of the ``.tar`` files this process opens while ``paths`` is a list: a Python audit
    hook sees every ``open()``, whichever code (vistok's or webdataset's) makes it."""

    def __init__(self):
        self.paths: list[str] | None = None
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if event == "open" and self.paths is not None and str(args[0]).endswith(".tar"):
            self.paths.append(str(args[0]))


def _bytes_read() -> int:
    """Bytes this process has read through read() and friends (Linux ``/proc/self/io``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def _samples_in(shard: str) -> int:
    with tarfile.open(shard) as tar:
        return len({Path(m.name).name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})


def validation_reads(datamodule, world_size: int, opens: _Opens) -> list[dict]:
    """One validation pass per rank through ``datamodule.val_dataloader(rank, world_size)`` (the
    loader each rank builds under DDP), run here one rank after another in this process."""
    ranks = []
    for rank in range(world_size):
        loader = datamodule.val_dataloader(rank=rank, world_size=world_size)
        opens.paths, start = [], _bytes_read()
        kept = sum(len(batch["key"]) for batch in loader)
        read, shards = _bytes_read() - start, sorted(set(opens.paths))
        opens.paths = None
        held = sum(_samples_in(s) for s in shards)
        ranks.append({"shards": len(shards), "samples_read": held, "kept": kept, "bytes": read})
    return ranks


def _reads_row(name: str, total_shards: int, ranks: list[dict]) -> str:
    per_rank = "; ".join(
        f"rank {r}: {x['shards']}/{total_shards} shards, {x['samples_read']} samples read, "
        f"{x['kept']} kept, {x['bytes'] / 2**20:.2f} MiB"
        for r, x in enumerate(ranks)
    )
    return f"{name:<10} {per_rank}"


def _row(name: str, nproc: int, audit: dict) -> str:
    sent = audit["bytes_per_step"]
    grads = sent.get("gradients", 0) / 2**20
    buffers = {k.split("/", 1)[1]: v / 2**20 for k, v in sent.items() if k.startswith("buffers/")}
    listed = ", ".join(f"{k} {v:.3f}" for k, v in sorted(buffers.items())) or "-"
    return (
        f"{name:<10} {nproc:>5} {audit['median_step_seconds']:>8.3f} {grads:>10.3f} "
        f"{sent.get('other', 0) / 2**20:>9.4f}   buffers MiB: {listed}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--images", type=int, nargs=2, default=[64, 256])
    p.add_argument("--out", default="/tmp/vistok_distributed_bench")
    if sys.argv[1:2] == ["--worker-sample"]:  # a torchrun rank: everything after the folder
        worker_sample(sys.argv[2], sys.argv[3:])  # is sample.py's (its --out included)
        return
    args = p.parse_args()
    out = Path(args.out)
    print(f"{'model':<10} {'procs':>5} {'s/step':>8} {'grads MiB':>10} {'other MiB':>9}")
    tok_audits = {}
    for nproc in (1, 2):
        tok_audits[nproc] = train(out, "tokenizer", TOKENIZER, nproc, args.steps)
        print(_row("tokenizer", nproc, tok_audits[nproc]), flush=True)

    # GPT: codes of the tokenizer just trained, then the CPU GPT preset shrunk to "tiny".
    tok_ckpt = out / "tokenizer_1p" / "checkpoints" / "last.ckpt"
    codes = out / "codes"
    if not (codes / "val-000000.tar").exists():
        for split in ("train", "val"):
            subprocess.run(
                [sys.executable, "-m", "vistok.data.extract_codes", "--tokenizer", str(tok_ckpt)]
                + ["--out", str(codes), "--split", split, "--num-workers", "0"],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
    gpt = [
        "--config=generator/ar_cpu_small.yaml",
        f"--model.init_args.tokenizer={tok_ckpt}",
        f"--data.init_args.root={codes}",
        "--model.init_args.preset=tiny",
        "--model.init_args.sample_images=2",
        "--data.init_args.batch_size=8",
        "--data.init_args.num_workers=0",
        "--trainer.limit_val_batches=1",
    ]
    for nproc in (1, 2):
        print(_row("gpt", nproc, train(out, "gpt", gpt, nproc, args.steps)), flush=True)

    print("\nvalidation I/O per rank, 2 ranks (one pass, num_workers=0):")
    opens = _Opens()
    for name, data in (
        ("images", ImageDataModule(resolution=32, batch_size=4, num_workers=0)),
        ("codes", CodeDataModule(root=str(codes), batch_size=8, num_workers=0)),
    ):
        ranks = validation_reads(data, 2, opens)
        print(_reads_row(name, len(data.val_urls()), ranks), flush=True)

    generator = str(out / "gpt_1p" / "checkpoints" / "last.ckpt")
    small, large = args.images
    peaks = {n: sampling_peak(out, generator, n) for n in (small, large)}
    print(
        f"\nsampling, 2 processes: rank-0 max RSS {peaks[small]:.0f} MiB for {small} images, "
        f"{peaks[large]:.0f} MiB for {large} ({peaks[large] / peaks[small]:.3f}x)"
    )


if __name__ == "__main__":
    main()
