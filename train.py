"""Train a tokenizer or a generator: ``python train.py --config tokenizer/wetok.yaml``.

Configs stack (``--config tokenizer/wetok.yaml --config presets/cpu_small.yaml``), any key can be
overridden (``--data.train_shards '/data/train-{000000..001023}.tar'``), ``--print_config`` shows
the resolved config and ``--ckpt_path last`` resumes. See README.md.
"""

from vistok.common.cli import main

if __name__ == "__main__":
    main()
