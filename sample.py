"""Sample images from a trained generator (AR or diffusion): PNGs, a grid, an ADM-format npz and
gFID. The checkpoint says which sampler runs.

    python sample.py --generator runs/ar/checkpoints/last.ckpt --num-images 50000 --cfg 2.0 \
        --top-k 0 --top-p 1.0 --temperature 1.0 --seed 0 --out samples/
    python sample.py --generator runs/ar/checkpoints/last.ckpt --speculative jacobi --window 16
    python sample.py --generator runs/dit/checkpoints/last.ckpt --steps 50 --sampler heun --cfg 1.5
    torchrun --nproc_per_node=8 sample.py ...   # each rank samples its share, rank 0 gathers

See ``vistok.generators.inference`` for the outputs and the protocol written to results.json,
``vistok.generators.sample_cli`` for the flags.
"""

from typing import Any

from vistok.common.processes import process_teardown
from vistok.generators.sample_cli import parse_args, sample_or_exit


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    try:
        return sample_or_exit(parse_args(argv))
    finally:
        process_teardown()


if __name__ == "__main__":
    main()
